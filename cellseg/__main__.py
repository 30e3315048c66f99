"""`python -m cellseg ...`: the `cellseg` command (a checkout run without installing it)."""

from .cli import main

main()

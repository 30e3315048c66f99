"""`python -m cellseg ...`: the `cellseg` command, for a checkout used without installing it."""

from .cli import main

main(prog_name="cellseg")

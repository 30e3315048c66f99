#!/usr/bin/env bash
# What travels to a lent GPU machine is the tracked tree plus the carried folders, 64 MiB in all (docs/gpu.md). The
# committed candidate bundles' weights and the docs' screenshots and figures are not needed there, and with them the
# tree alone is over the limit. This takes them out of what travels, without touching the files or the commits:
#     bash scripts/gpu_travel_light.sh on [--without-shipped]   # before the lease's calls
#     bash scripts/gpu_travel_light.sh off                      # after them, before any commit
# `on` unstages them (git rm --cached) and ignores them in .git/info/exclude (an ignored untracked file stays behind);
# --without-shipped does the same to the shipped nuclei weights, for calls that carry their own bundle (GPU_INIT).
# `off` puts them back in the index as HEAD has them and empties what `on` added to the exclude file.
set -euo pipefail
cd "$(dirname "$0")/.."
marker="# gpu_travel_light.sh"
exclude=.git/info/exclude
case "${1:-}" in
on)
    grep -qF "$marker" "$exclude" 2>/dev/null && { echo "gpu_travel_light: already on ('off' first)" >&2; exit 1; }
    files=$(git ls-files 'references/nuclei/candidates/*/weights.safetensors' 'docs/*.png' 'docs/*.jpg')
    [ "${2:-}" = --without-shipped ] && files="$files cellseg/models/nuclei/weights.safetensors"
    mkdir -p "$(dirname "$exclude")"
    echo "$marker" >> "$exclude"
    for f in $files; do
        git rm -q --cached "$f"
        echo "/$f" >> "$exclude"
    done
    ;;
off)
    grep -qF "$marker" "$exclude" 2>/dev/null || { echo "gpu_travel_light: not on" >&2; exit 1; }
    files=$(sed -n "/^$marker\$/,\$p" "$exclude" | grep -v "^#" | sed 's|^/||')
    git reset -q -- $files
    sed -i "/^$marker\$/,\$d" "$exclude"
    ;;
*)
    echo "gpu_travel_light: expected 'on' [--without-shipped] or 'off', found '${1:-}'" >&2
    exit 2
    ;;
esac
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "the tree that travels: $((tree / 1048576)) MiB of 64"

#!/usr/bin/env bash
# Make what a lent GPU machine needs for the nuclei recipe, in .carry/ (ignored by git; see docs/gpu.md):
#   .carry/train_data/      the split's training images (JPEG q95) + labels + split.json
#                           (references/nuclei/pack_training_data.py), and the same in parts that each fit one call
#                           beside the tracked tree (.carry/train_part1, 2, ...: the v4 data is ~61 MB)
#   .carry/wheels_train/    cp312 wheels the machine may lack for training (tomli-w, lazy-loader, orjson)
#   .carry/wheels_bench/    ... and for benchmarks/run.py (zarr, numcodecs, pycocotools, OpenSlide, imagecodecs trimmed
#                           to the codecs cellseg uses: the full wheel alone is 26 MB of the 64 MiB that may travel)
# Run `bash scripts/gpu_travel_light.sh on` first (the tracked tree alone is over the limit with the candidates).
# Then prints what each device call would send (the tracked tree + the carried folder) against the 64 MiB limit.
#   bash scripts/gpu_prepare.sh [SPLIT_JSON]      (e.g. references/nuclei/splits/v4.json; default: a new split of
#                                                 ../shared/data, as the recipe makes)
set -euo pipefail
cd "$(dirname "$0")/.."
SPLIT=${1:-}
rm -rf .carry/train_data .carry/train_part* .carry/wheels_train .carry/wheels_bench
python3 -m references.nuclei.pack_training_data --out .carry/train_data ${SPLIT:+--split "$SPLIT"}

PLATFORM="--only-binary=:all: --no-deps --python-version 3.12 --implementation cp"
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
    PLATFORM="$PLATFORM --platform $p"
done
python3 -m pip download -q $PLATFORM -d .carry/wheels_train "tomli-w==1.2.0" "lazy-loader==0.6" "orjson==3.13.0"
python3 -m pip download -q $PLATFORM -d .carry/wheels_bench "tomli-w==1.2.0" "lazy-loader==0.6" "orjson==3.13.0" \
    "zarr==3.1.6" "numcodecs==0.16.6" \
    "donfig==0.8.1.post1" "google-crc32c==1.9.0" "pycocotools==2.0.11" "openslide-python==1.4.7" \
    "openslide-bin==4.0.1.2" "shapely==2.2.0" "imagecodecs==2026.3.6"

# imagecodecs: keep the modules cellseg and tifffile use here (zstd, deflate/zlib, zlib-ng for the label pyramids, JPEG,
# PNG) and their libraries (zlib-ng is linked into its module). bench_env.sh checks on the machine that they import.
work=$(mktemp -d)
wheel=$(ls .carry/wheels_bench/imagecodecs-*.whl)
(cd "$work" && unzip -q "$OLDPWD/$wheel")
keep='^(__init__\.py|imagecodecs\.py|_imagecodecs\.py|py\.typed|_shared\.abi3\.so|_shared_cython\.abi3\.so|_imcd\.abi3\.so|_zstd\.abi3\.so|_deflate\.abi3\.so|_zlib\.abi3\.so|_zlibng\.abi3\.so|_jpeg8\.abi3\.so|_png\.abi3\.so|_lzw\.abi3\.so|licenses)$'
for f in "$work"/imagecodecs/*; do basename "$f" | grep -Eq "$keep" || rm -rf "$f"; done
for f in "$work"/imagecodecs.libs/*; do basename "$f" | grep -Eq '^lib(zstd|deflate|jpeg|png16|z)-' || rm -f "$f"; done
# The RECORD lists removed files; pip installs a wheel without checking it is complete, so rewrite it to match.
record=$(ls "$work"/imagecodecs-*.dist-info/RECORD)
(cd "$work" && find . -type f ! -name RECORD | sed 's|^\./||' | sed 's|$|,,|' > "$record" && echo "$(basename "$(dirname "$record")")/RECORD,," >> "$record")
rm "$wheel"
(cd "$work" && zip -q -r -9 "$OLDPWD/$wheel" .)
rm -rf "$work"

tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb | tail -1 | cut -f1)
# Parts of the pack that fit beside the tree and the training wheels, 2 MiB to spare
wheels=$(du -sb .carry/wheels_train | cut -f1)
part_mib=$(( (64 * 1048576 - tree - ${untracked:-0} - wheels) / 1048576 - 2 ))
if [ "$part_mib" -lt 8 ]; then
    echo "gpu_prepare: expected the tree that travels to leave room for the data, found $((tree / 1048576)) MiB of 64:" \
         "run 'bash scripts/gpu_travel_light.sh on' first (candidates' weights and screenshots stay here)" >&2
    exit 1
fi
python3 -m references.nuclei.pack_training_data --parts .carry/train_data --part-mib "$part_mib"
for carried in .carry/train_data .carry/train_part* .carry/wheels_train .carry/wheels_bench; do
    size=$(du -sb "$carried" | cut -f1)
    echo "$carried: $((size / 1048576)) MiB; with the tree ($(((tree + ${untracked:-0}) / 1048576)) MiB): $(((tree + ${untracked:-0} + size) / 1048576)) MiB of 64"
done

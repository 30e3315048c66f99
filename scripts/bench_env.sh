# Sourced by the benchmark scripts run on a lent machine (gpu_benchmark.sh, ceiling_cores.sh): the wheels carried in
# .carry/wheels_bench installed beside the checkout, and the checkout first on the import path.
if [ -d .carry/wheels_bench ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cellseg-site .carry/wheels_bench/*.whl
    export PYTHONPATH=$PWD:/tmp/cellseg-site${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# Fail at once, not minutes into a lease, when a codec or package a count imports did not travel.
python3 -c "import orjson, shapely; from imagecodecs import png_decode, zlibng_encode, zstd_decode, zstd_encode" \
    || { echo "bench_env.sh: expected orjson, shapely and imagecodecs' png, zlib-ng and zstd codecs importable" \
              "(bash scripts/gpu_prepare.sh makes .carry/wheels_bench), found the error above" >&2; exit 1; }

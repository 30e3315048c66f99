# Sourced by the benchmark scripts run on a lent machine (gpu_benchmark.sh, ceiling_cores.sh): the wheels carried in
# .carry/wheels_bench installed beside the checkout, and the checkout first on the import path.
if [ -d .carry/wheels_bench ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cellseg-site .carry/wheels_bench/*.whl
    export PYTHONPATH=$PWD:/tmp/cellseg-site${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

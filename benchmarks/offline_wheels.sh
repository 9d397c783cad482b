# Sourced by benchmarks/gpu.sh and benchmarks/gpu_pipeline.sh: on a machine without the package index (this
# project's GPU machines), installs the wheel folder .whl/ beside the checkout into /tmp/site when `$PY -c "$1"`
# (an import check) fails, and puts /tmp/site on PYTHONPATH.
offline_wheels() {
    if ! "$PY" -c "$1" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
}

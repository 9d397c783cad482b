# Sourced by benchmarks/gpu.sh and benchmarks/gpu_pipeline.sh: on a machine without the package index (this
# project's GPU machines), installs the bundle that benchmarks/device_packages.sh builds in .whl/ beside the checkout
# (wheels, and Ray unpacked and trimmed as a tar.xz) into /tmp/site when `$PY -c "$1"` (an import check) fails, and
# puts /tmp/site on PYTHONPATH. WHEELS and OFFLINE_SITE name other folders (device_packages.sh --check does).
offline_wheels() {
    local wheels=${WHEELS:-.whl} site=${OFFLINE_SITE:-/tmp/site}
    if ! "$PY" -c "$1" 2>/dev/null && ls "$wheels"/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$wheels"/*.whl
        # Python's tarfile (lzma is in the standard library): the machine need not have xz
        "$PY" -c 'import sys, tarfile
for t in sys.argv[2:]:
    tarfile.open(t).extractall(sys.argv[1], filter="data")' "$site" $(ls "$wheels"/*.tar.xz 2>/dev/null)
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
}

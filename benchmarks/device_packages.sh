#!/usr/bin/env bash
# The Python packages this project's GPU machines lack, as a folder that travels with the checkout (.whl/, ignored by
# git), installed there by benchmarks/offline_wheels.sh (sourced by gpu.sh and gpu_pipeline.sh). Run here, on CPU.
#
# The machines (Python 3.12, torch 2.11; their documented package list) already hold numpy, scipy, pillow, pyyaml,
# tqdm, pyarrow, pandas, scikit-learn, requests, click, filelock, msgpack, packaging, protobuf, fsspec, attrs, zipp,
# huggingface-hub, safetensors, regex, nvidia-ml-py. What the stages need beyond that, and those of their dependencies
# that the machines lack:
#   ray, pydantic, diffusers, torch-fidelity           the project's pins (pyproject.toml)
#   jsonschema, jsonschema-specifications, referencing, rpds-py   Ray's jsonschema
#   pydantic-core, annotated-types, typing-inspection   pydantic's
#   typing-extensions                                   pydantic needs >= 4.16, newer than the machines' may be
#   importlib-metadata                                  diffusers'
# Each at the version `make install` resolved (.venv), so the bundle is the set the tests ran with. Not carried:
# tensorboardX (declared by ray[train], imported only by Tune's TensorBoard logger, which the stages do not use).
#
# Ray's wheel (79 MB) alone exceeds what may travel (64 MiB), so it goes unpacked and trimmed, as a tar.xz: without
# ray/jars/ray_dist.jar (the Java workers), the dashboard's *.js.map, and with `strip --strip-unneeded` on its three
# big binaries; RECORD is rewritten to match.
#
#   bash benchmarks/device_packages.sh                  # cp312 -> .whl/, and the carry's size check (< 60 MiB)
#   PYVER=3.11 bash benchmarks/device_packages.sh --check
#       the cp311 build of the same (-> .whl-cp311/), installed --no-index into a fresh virtual environment that
#       holds only what the machines hold (from PyPI), where a local Ray starts and `gpu_pipeline.sh --smoke` runs
#
# Each run writes benchmarks/results/device_bundle_cp<NN>.json (sizes; with --check, the smoke's result).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
TAG=cp${PYVER/./}
DEST=${DEST:-$([ "$TAG" = cp312 ] && echo .whl || echo ".whl-$TAG")}
LIMIT_MIB=${LIMIT_MIB:-60}
VENV_PY=.venv/bin/python  # the project's environment: the versions, and the record's writer
PACKAGES=(ray pydantic diffusers torch-fidelity jsonschema jsonschema-specifications referencing rpds-py
          pydantic-core annotated-types typing-inspection typing-extensions importlib-metadata)
case "${1:-}" in
    --check) CHECK=1 ;;
    "") CHECK=0 ;;
    *) echo "error: unknown argument $1: the only one accepted is --check" >&2; exit 2 ;;
esac
if [ ! -x "$VENV_PY" ]; then
    echo "error: $VENV_PY is missing: run \`make install\` first (it gives the versions)" >&2; exit 2
fi
if [ "$CHECK" = 1 ] && ! command -v "python$PYVER" >/dev/null; then
    echo "error: --check needs python$PYVER on this machine (PYVER=3.11 tests the cp311 build)" >&2; exit 2
fi
WORK=$(mktemp -d /tmp/device-packages-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# name==version for each package, as installed in .venv
pins() {
    "$VENV_PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
}

download() {
    rm -rf "$DEST" && mkdir -p "$DEST"
    # shellcheck disable=SC2046
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WORK/wheels" $(pins) 2>&1 \
        | grep -v "is ignored: it is neither" || true
    local n; n=$(ls "$WORK"/wheels/*.whl | wc -l)
    [ "$n" = "${#PACKAGES[@]}" ] || { echo "error: downloaded $n wheels, expected ${#PACKAGES[@]}" >&2; exit 1; }
    find "$WORK/wheels" -name '*.whl' ! -name 'ray-*' -exec cp {} "$DEST"/ \;
}

# RECORD (the wheel's list of files, hashes and sizes) of the unpacked tree $1, after the trimming
rewrite_record() {
    python3 - "$1" <<'EOF'
import base64, hashlib, sys
from pathlib import Path
root = Path(sys.argv[1])
record = next(root.glob("*.dist-info/RECORD"))
rows = []
for p in sorted(q for q in root.rglob("*") if q.is_file() and q != record):
    digest = base64.urlsafe_b64encode(hashlib.sha256(p.read_bytes()).digest()).rstrip(b"=").decode()
    rows.append(f"{p.relative_to(root).as_posix()},sha256={digest},{p.stat().st_size}")
rows.append(f"{record.relative_to(root).as_posix()},,")
record.write_text("\n".join(rows) + "\n")
EOF
}

trim_ray() {
    local wheel un big
    wheel=$(ls "$WORK"/wheels/ray-*.whl)
    un=$WORK/ray && mkdir -p "$un" && unzip -q "$wheel" -d "$un"
    RAY_WHEEL_B=$(stat -c %s "$wheel")
    RAY_UNPACKED_B=$(du -sb "$un" | cut -f1)
    rm -f "$un/ray/jars/ray_dist.jar"
    find "$un/ray/dashboard" -name '*.js.map' -delete
    big=("$un/ray/_raylet.so" "$un/ray/core/src/ray/gcs/gcs_server" "$un/ray/core/src/ray/raylet/raylet")
    strip --strip-unneeded "${big[@]}"
    rewrite_record "$un"
    RAY_TRIMMED_B=$(du -sb "$un" | cut -f1)
    RAY_TAR=$DEST/$(basename "$wheel" .whl).trimmed.tar.xz
    tar -C "$un" -cf - $(cd "$un" && ls) | xz -9 > "$RAY_TAR"
}

# Bytes that travel to the device: tracked files, untracked files git does not ignore, and the carried $DEST.
carry_bytes() {
    { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null \
        | awk -v extra="$(du -sb "$DEST" | cut -f1)" '{ s += $1 } END { print s + extra }'
}

# A virtual environment like the device's: Python, torch and what the machines already hold (from PyPI, at the
# project's versions), none of the bundle; then gpu_pipeline.sh's own install of the bundle (--no-index), a local Ray,
# and the smoke. Sets SMOKE_RC, RAY_FILE, PIP_CHECK; leaves the environment's own packages in $WORK/freeze.txt and
# the smoke's record in $WORK/out.
check() {
    local venv=$WORK/venv site=$WORK/site
    python"$PYVER" -m venv "$venv"
    "$VENV_PY" -m pip freeze --exclude-editable > "$WORK/constraints.txt"
    "$venv/bin/python" -m pip install -q -c "$WORK/constraints.txt" torch==2.14.1 torchvision==0.29.1 numpy scipy \
        pillow pyyaml tqdm pyarrow pandas scikit-learn matplotlib requests click filelock msgpack packaging protobuf \
        fsspec attrs zipp huggingface-hub safetensors regex 2>&1 | grep -v "is ignored: it is neither" || true
    "$venv/bin/python" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
def present(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
held = {n: present(n) for n in sys.argv[1:] if n != "typing-extensions" and present(n)}
if held:
    sys.exit(f"error: the device-like environment already holds {held}: the check would prove nothing")
EOF
    "$venv/bin/python" -m pip freeze > "$WORK/freeze.txt"
    SMOKE_RC=0
    PYTHON=$venv/bin/python WHEELS=$DEST OFFLINE_SITE=$site OUT=$WORK/out \
        bash benchmarks/gpu_pipeline.sh --smoke || SMOKE_RC=$?
    export PYTHONPATH=$site
    RAY_FILE=$("$venv/bin/python" - <<'EOF' || true
import ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
assert ray.get(ray.remote(lambda x: x * x).remote(7)) == 49  # a task on a worker of the trimmed Ray
ray.shutdown()
print(ray.__file__)
EOF
)
    PIP_CHECK=$("$venv/bin/python" -m pip check 2>&1 || true)
    unset PYTHONPATH
}

download
trim_ray
CARRY_B=$(carry_bytes)
[ "$CHECK" = 1 ] && check

export PYVER DEST TAG LIMIT_MIB CHECK RAY_WHEEL_B RAY_UNPACKED_B RAY_TRIMMED_B RAY_TAR CARRY_B WORK
export SMOKE_RC=${SMOKE_RC:-} RAY_FILE=${RAY_FILE:-} PIP_CHECK=${PIP_CHECK:-}
"$VENV_PY" - "$@" <<'EOF'
import json, os, sys
from pathlib import Path
from benchmarks.common import write_result

e = os.environ
dest, limit = Path(e["DEST"]), int(e["LIMIT_MIB"])
mib = lambda b: round(int(b) / 2**20, 2)
record = {
    "python_tag": e["TAG"], "folder": str(dest),
    "files": {p.name: mib(p.stat().st_size) for p in sorted(dest.iterdir())},
    "folder_mib": mib(sum(p.stat().st_size for p in dest.iterdir())),
    "ray": {"wheel_mib": mib(e["RAY_WHEEL_B"]), "unpacked_mib": mib(e["RAY_UNPACKED_B"]),
            "trimmed_unpacked_mib": mib(e["RAY_TRIMMED_B"]),
            "trimmed_tar_xz_mib": mib(Path(e["RAY_TAR"]).stat().st_size),
            "trimmed": "ray/jars/ray_dist.jar and ray/dashboard/**/*.js.map removed; strip --strip-unneeded on "
                       "_raylet.so, gcs_server, raylet; RECORD rewritten"},
    "carry_mib": mib(e["CARRY_B"]), "carry_limit_mib": limit, "carry_ok": int(e["CARRY_B"]) < limit * 2**20,
    "carry": "git ls-files + untracked files git does not ignore + the bundle folder",
}
if e["CHECK"] == "1":
    smoke = Path(e["WORK"]) / "out" / "gpu_pipeline_smoke.json"
    s = json.loads(smoke.read_text()) if smoke.is_file() else {}
    record["check"] = {
        "environment": "fresh venv: torch 2.14.1 + the machines' packages from PyPI, none of the bundle's; the bundle "
                       "installed by benchmarks/offline_wheels.sh (pip --no-index --target, then the tar.xz)",
        "ray_imported_from": e["RAY_FILE"].replace(e["WORK"], "$WORK"),
        "ray_task": "ray.init(num_cpus=1) and one remote task returned 49" if e["RAY_FILE"] else "failed",
        "environment_packages": (Path(e["WORK"]) / "freeze.txt").read_text().split(),
        "pip_check": e["PIP_CHECK"],
        "smoke_command": "bash benchmarks/gpu_pipeline.sh --smoke", "smoke_exit_status": int(e["SMOKE_RC"]),
        "smoke_stages": {k: {f: v.get(f) for f in ("exit_status", "wall_s", "images", "images_per_s", "failed",
                                                   "skipped") if f in v}
                         for k, v in s.get("stages", {}).items()},
    }
command = ("" if e["TAG"] == "cp312" else f"PYVER={e['PYVER']} ") + "bash benchmarks/device_packages.sh"
write_result(f"device_bundle_{e['TAG']}", record, " ".join([command, *sys.argv[1:]]))
r = record["ray"]
print(f"ray wheel {r['wheel_mib']} MiB, unpacked {r['unpacked_mib']} MiB, trimmed {r['trimmed_unpacked_mib']} MiB, as "
      f"tar.xz {r['trimmed_tar_xz_mib']} MiB; {dest}: {record['folder_mib']} MiB; files {record['files']}; the carry "
      f"(checkout + {dest}): {record['carry_mib']} MiB (limit {limit} MiB)")
if not record["carry_ok"]:
    print(f"error: the carry is {record['carry_mib']} MiB, over {limit} MiB: trim the bundle or the checkout",
          file=sys.stderr)
ok = record["carry_ok"] and record.get("check", {}).get("smoke_exit_status", 0) == 0 and \
    record.get("check", {}).get("ray_task", "") != "failed"
sys.exit(0 if ok else 1)
EOF

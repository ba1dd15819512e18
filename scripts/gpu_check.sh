#!/usr/bin/env bash
# The GPU acceptance check (issue 25) on a lent device machine, as one short run.
#
#   scripts/gpu_check.sh prepare   here, once, in the checkout the session started in: copies the group
#                                  photo and the face detector from ../shared into ./shared (the device
#                                  machine gets the checkout, not what lies beside it) and downloads PyAV's
#                                  wheel for the device's Python into ./.whl (it has torch, OpenCV,
#                                  onnxruntime, safetensors, filelock and tqdm, not PyAV; nothing can be
#                                  fetched there). Both folders are ignored through .git/info/exclude.
#   scripts/gpu_check.sh [FLAGS]   there: the device tool's run, with carry [".whl"] and timeout_s 420:
#                                  installs the carried wheels, then `python -m gpen bench --acceptance
#                                  --budget 300 FLAGS`, its table, JSON, markdown and log written into $OUT as
#                                  they come (a run cut short keeps its rows). A lease is 15 minutes of device
#                                  time, a machine's start 1-2 of them, and one goes back 30 s after a call:
#                                  the first run takes about 7; fix what failed, then a second run of only
#                                  those sections (FLAGS: --sections memory pipeline, say) fits what is left.
#
# Its rows go into BENCHMARKS.md's "GPU" section, with the GPU's name (the markdown's title line).
set -euo pipefail
cd "$(dirname "$0")/.."

PYAV=av==18.1.0  # the version this machine's tests run; abi3 wheels, so cp311 ones serve the device's 3.12
DEVICE_PYTHON=3.12
python=${PYTHON:-python3}  # the device's python3 holds its torch

if [[ "${1:-}" == prepare ]]; then
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")"
    for ignored in /shared/ /.whl/; do
        grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >>"$exclude"
    done
    mkdir -p shared/images shared/models .whl
    cp ../shared/images/solvay_1927.png shared/images/
    cp ../shared/models/retinaface_mobilenet0.25.pth shared/models/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$PYAV"
    du -sh shared .whl
    echo 'ready: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=420)'
    exit 0
fi

out="${OUT:-acceptance-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
export PYTHONUNBUFFERED=1
budget=(--budget 300)  # checks start within 5 minutes; the last one, imports and CUDA's start come on top
[[ " $* " == *" --budget "* ]] && budget=()
"$python" -m gpen bench --acceptance --out "$out" "${budget[@]}" "$@" 2>&1 | tee "$out/acceptance.log"

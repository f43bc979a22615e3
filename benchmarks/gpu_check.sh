#!/usr/bin/env bash
# The GPU checks of issue 7 in one run, for a session that is lent a device machine:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# It runs from the repo root with that machine's own python3 (PyTorch, CUDA, Triton,
# numpy, safetensors, tqdm, matplotlib and pytest are there; nothing can be fetched), and
# writes at most 8 files to $OUT, which the device tool brings back: copy the JSON and PNG
# files to benchmarks/results/ and commit them with the figures in the README.
#
#   1. tests/kernels on the GPU: the Triton step and chunked kernels (forward, backward)
#      against the reference, the tests that skip on CPU machines included
#   2. hytrec benchmark kernels: PyTorch vs Triton chunked vs fla's gated delta rule
#   3. hytrec benchmark step: step events/s vs users and state size, against the roofline
#   4. hytrec benchmark efficiency --device cuda: per-event cost vs history length
#
# fla is optional (row 2 says when it is absent): carry it as wheels in .whl/ (ignored by
# git), fetched on a machine with the registries, for the device's Python 3.12:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl flash-linear-attention
#   (then its Requires-Dist that the machine lacks, e.g. fla-core)
#
# QUICK=1 DEVICE=cpu OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh runs every step at tiny
# sizes on a CPU machine: a check of this script, not of the GPU.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ -n "${QUICK:-}" ]; then
    kernels=(--quick) step=(--quick) efficiency=(--quick)
else
    kernels=(--lengths 1024,4096,16384 --batch 4 --heads 4 --head-dim 64)
    step=(--users 1,16,256,4096,65536 --head-dims 32,64,128 --copy-mib 4096)
    efficiency=()
fi

failed=0
check() {  # run one step, keep going when it fails, remember that it did
    echo "== $*"
    "$@" || { echo "!! failed ($?): $*"; failed=1; }
}

if [ "$DEVICE" = cuda ]; then
    check nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
check python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
check python3 -m pytest -q -p no:cacheprovider -o addopts=-ra tests/kernels \
    --junitxml="$OUT/pytest-kernels.xml"
check python3 -m hytrec.cli benchmark kernels --device "$DEVICE" "${kernels[@]}" \
    --output "$OUT/kernels-gpu"
check python3 -m hytrec.cli benchmark step --device "$DEVICE" "${step[@]}" \
    --output "$OUT/step-gpu"
check python3 -m hytrec.cli benchmark efficiency --device "$DEVICE" "${efficiency[@]}" \
    --no-progress --output "$OUT/efficiency-gpu"
exit $failed

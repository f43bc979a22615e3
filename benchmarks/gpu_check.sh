#!/usr/bin/env bash
# The GPU checks of issue 7 in one run, for a session that is lent a device machine:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
#
# (the session's 15 device minutes include the machine's start: 480 s leaves a rerun of a
# step). It runs from the repo root with that machine's own python3 (PyTorch, CUDA, Triton,
# numpy, safetensors, tqdm, matplotlib, pytest, einops and transformers are there; nothing
# can be fetched), and writes 8 files to $OUT, which the device tool brings back: its log,
# the test report, and the JSON and PNG of each benchmark; copy those to
# benchmarks/results/ and commit them with the figures in the README. Each step has its own
# time limit, so one that hangs costs only itself; the most wanted come first:
#
#   1. tests/kernels on the GPU: the Triton step and chunked kernels (forward, backward)
#      against the reference, the tests that skip on CPU machines included
#   2. hytrec benchmark step: step events/s vs users and state size, against the roofline
#   3. hytrec benchmark kernels: PyTorch vs Triton chunked vs fla's gated delta rule (bf16)
#   4. hytrec benchmark efficiency --device cuda: per-event cost vs history length
#
# LEADERBOARD_S=N runs instead, in a call of its own, N seconds of the leaderboard's gpu
# profile (hours of cells in all), resumable across leases: the cells it finishes come back
# in $OUT/leaderboard-cells.tgz, and the next call carries them in as runs/leaderboard and
# goes on where this one stopped; the JSON is written once every cell is done. It reads the
# data from .data, a copy of ../shared/data (5.7 MiB), and HiSAC's semantic IDs need faiss
# (a faiss-cpu wheel in .whl):
#   echo /.data/ >> .git/info/exclude && cp -r ../shared/data .data
#   mkdir -p runs/leaderboard && tar -xzf FILES_AT/leaderboard-cells.tgz -C runs/leaderboard
#   run(command="LEADERBOARD_S=240 bash benchmarks/gpu_check.sh",
#       carry=[".whl", ".data", "runs/leaderboard"], timeout_s=300)
#
# fla is optional (step 3 notes when it does not import): carry its wheels in .whl/ (git
# ignores it), fetched on a machine with the registries, for the device's Python 3.12:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#       flash-linear-attention fla-core
#   (then whatever else their Requires-Dist names that the machine lacks: `unzip -p
#   .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`)
#
# QUICK=1 DEVICE=cpu OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh runs every step at tiny
# sizes on a CPU machine: a check of this script, not of the GPU.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
DEVICE=${DEVICE:-cuda}
KERNEL_TESTS=${KERNEL_TESTS:-tests/kernels}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1  # only the output's tail comes back otherwise

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${LEADERBOARD_S:-0}" -gt 0 ]; then
    cells=${LEADERBOARD_CELLS:-runs/leaderboard}
    mkdir -p "$cells"
    # timeout ends the run inside a cell; every cell finished before it is kept
    HYTREC_SHARED_DATA=${HYTREC_SHARED_DATA:-.data} timeout "$LEADERBOARD_S" python3 -m \
        hytrec.cli benchmark leaderboard --profile gpu --cells "$cells" \
        --output "$OUT/leaderboard-gpu"
    rc=$?
    echo "leaderboard: rc $rc (124: stopped by its limit; the next call resumes)"
    echo "cells kept: $(find "$cells" -name '*seed*.json' | wc -l)"
    tar -czf "$OUT/leaderboard-cells.tgz" -C "$cells" .
    [ $rc -eq 0 ] || [ $rc -eq 124 ]
    exit
fi

if [ -n "${QUICK:-}" ]; then
    kernels=(--quick) step=(--quick) efficiency=(--quick)
else
    kernels=(--lengths 1024,4096,16384 --batch 4 --heads 4 --head-dim 64 --dtype bfloat16
             --budget-s 3)
    step=(--users 1,16,256,4096,65536 --head-dims 32,64,128 --copy-mib 4096 --pool-mib 4096
          --budget-s 3)
    efficiency=(--budget-s 5 --step-repeats 20)
fi

failed=0
check() {  # LIMIT_S COMMAND...: run one step within its limit, keep going when it fails
    local limit=$1
    shift
    echo "== $*"
    timeout "$limit" "$@" || { echo "!! failed ($?): $*"; failed=1; }
}

if [ "$DEVICE" = cuda ]; then
    check 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
check 60 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
check 150 python3 -m pytest -q -p no:cacheprovider -o addopts=-ra "$KERNEL_TESTS" \
    --junitxml="$OUT/pytest-kernels.xml"
check 120 python3 -m hytrec.cli benchmark step --device "$DEVICE" "${step[@]}" \
    --output "$OUT/step-gpu"
check 90 python3 -m hytrec.cli benchmark kernels --device "$DEVICE" "${kernels[@]}" \
    --output "$OUT/kernels-gpu"
check 120 python3 -m hytrec.cli benchmark efficiency --device "$DEVICE" "${efficiency[@]}" \
    --no-progress --output "$OUT/efficiency-gpu"
exit $failed

#!/usr/bin/env bash
# On a machine with a CUDA GPU, from the checkout, with the torch and triton installed there. Two
# parts, each meant to fit one command of at most 10 minutes on a lent machine:
#
#     OUT=out/gpu bash bench/gpu_run.sh tests   # the whole suite: the gpu-marked tests and CUDA cases
#     OUT=out/gpu bash bench/gpu_run.sh bench   # bert-large and many-small, every backend
#
# Everything lands in $OUT (default: out/gpu): versions.txt, tests.txt, and per preset steps.csv,
# plus steps.png when matplotlib is installed (otherwise draw it elsewhere with
# `python -m bench --chart-from steps.csv --out DIR`). many-small runs without the torch.compile
# providers, whose first step compiled for over 13 minutes on CPU there.
set -uo pipefail
if [ "${1:-}" != tests ] && [ "${1:-}" != bench ]; then
    echo "usage: OUT=DIR bash bench/gpu_run.sh tests|bench" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/versions.txt"
case "${1:-}" in
    tests)
        python -m pytest -q -rs 2>&1 | tee "$OUT/tests.txt"
        exit "${PIPESTATUS[0]}"
        ;;
    bench)
        python -m bench --device cuda --preset bert-large --out "$OUT/bert-large" || exit
        python -m bench --device cuda --preset many-small --no-compile --out "$OUT/many-small"
        ;;
esac

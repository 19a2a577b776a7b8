#!/usr/bin/env bash
# One run on a machine with a CUDA GPU, from the checkout, with the torch and triton installed there:
# the whole test suite (the `gpu`-marked tests and the CUDA cases run there), then the benchmark on
# the presets issue 5 asks for, on every backend. Everything lands in $OUT (default: out/gpu):
# tests.txt, steps.csv, and steps.png when matplotlib is installed (otherwise draw it elsewhere
# with `python -m bench --chart-from steps.csv --out DIR`).
#
#     OUT=out/gpu bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/versions.txt"
python -m pytest -q -rs 2>&1 | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}
python -m bench --device cuda --preset bert-large,many-small --out "$OUT"
bench=$?
echo "tests exit $tests, bench exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

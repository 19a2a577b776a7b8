#!/usr/bin/env bash
# On a machine with a CUDA GPU, from the checkout, with the torch and triton installed there
# (nothing is downloaded), in one command meant to fit a short loan:
#
#     OUT=out/gpu bash bench/gpu_run.sh
#
# 1. the gpu-marked tests and every CUDA case of the suites (triton, cuda and torch backends; the
#    cuda backend's kernels compile first, a minute or two), log in $OUT/tests.txt;
# 2. the benchmark on bert-large and many-small with every backend (many-small without the
#    torch.compile providers, whose first step compiled for over 13 minutes on CPU), steps.csv and,
#    when matplotlib is installed, steps.png per preset (otherwise draw it elsewhere with
#    `python -m bench --chart-from steps.csv --out DIR`);
# 3. each stage on its own on bert-large (`--stages`): GB/s and % of copy per stage and backend.
#
# $OUT holds at most 8 files, one folder deep: versions.txt, tests.txt, bert-large/steps.{csv,png},
# many-small/steps.{csv,png}, stages/stages.{csv,png}. Each part has its own time limit ($TEST_SECONDS, $BENCH_SECONDS) so
# that a hang in one still leaves the other's results. Exit status: the tests' (or the benchmark's
# when the tests passed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
TEST_SECONDS="${TEST_SECONDS:-300}"
BENCH_SECONDS="${BENCH_SECONDS:-200}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -2
} 2>&1 | tee "$OUT/versions.txt"

timeout "$TEST_SECONDS" python -m pytest -q -rs -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}

bench=0
timeout "$BENCH_SECONDS" python -m bench --device cuda --preset bert-large --out "$OUT/bert-large" || bench=$?
timeout "$BENCH_SECONDS" python -m bench --device cuda --preset many-small --no-compile --out "$OUT/many-small" || bench=$?
timeout "$BENCH_SECONDS" python -m bench --device cuda --preset bert-large --stages --out "$OUT/stages" || bench=$?

echo "== summary: tests $(tail -1 "$OUT/tests.txt")"
for preset in bert-large many-small stages; do
    for csv in "$OUT/$preset"/*.csv; do [ -f "$csv" ] && echo "== $preset: $(($(wc -l < "$csv") - 1)) rows in $csv"; done
done
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"

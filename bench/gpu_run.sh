#!/usr/bin/env bash
# On a machine with a CUDA GPU, from the checkout, with the torch and triton installed there
# (nothing is downloaded), in one command meant to fit a short loan:
#
#     OUT=out/gpu bash bench/gpu_run.sh
#
# 1. the gpu-marked tests and every CUDA case of the suites (triton, cuda and torch backends; the
#    cuda backend's kernels compile first, a minute or two), log in $OUT/tests.txt;
# 2. the benchmark on bert-large, many-small and host-bound with every backend (the last two without
#    the torch.compile providers, whose first step compiled for over 13 minutes on CPU; host-bound:
#    1000 tensors of 16 elements, a step whose time is the host's work), steps.csv and,
#    when matplotlib is installed, steps.png per preset (otherwise draw it elsewhere with
#    `python -m bench --chart-from steps.csv --out DIR`);
# 3. each stage on its own on bert-large (`--stages`): GB/s and % of copy per stage and backend;
#    then the Triton kernels' scalar variant alone (LAMB_KERNELS_TRITON_VECTORIZE=0), to compare
#    with the vectorized one of the same run; then the stages with 8-bit states (`--state-dtype
#    int8`, 26 bytes per LAMB step against 44), against the float32 ones of the same run.
#
# $OUT holds at most 8 files, one folder deep: versions.txt, tests.txt, bert-large/steps.{csv,png},
# many-small/steps.csv, stages/stages.csv, stages-scalar/stages.csv, stages-int8/stages.csv (the
# charts that would make more are left out; draw them elsewhere from the CSVs with `--chart-from`).
# Each part has its own time limit ($TEST_SECONDS, default 240, $BENCH_SECONDS for the steps,
# default 70, 90 for the two small presets, and $STAGE_SECONDS per stages run, default 55: at most
# 9.5 minutes in all), so that a hang in one still leaves the others' results. Exit status: the
# tests' (or the benchmark's when the tests passed).
#
# DRY_RUN=1 runs the same steps on the CPU in seconds (the tests of one file, the `tiny` preset with
# the cpp backend and two timed steps): a check of this script where no GPU is (tests/test_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
TEST_SECONDS="${TEST_SECONDS:-240}"
BENCH_SECONDS="${BENCH_SECONDS:-70}"
STAGE_SECONDS="${STAGE_SECONDS:-55}"
DEVICE=cuda BIG=bert-large SMALL=many-small,host-bound SCALAR_BACKENDS=triton TESTS=() QUICK=()
if [ "${DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu BIG=tiny SMALL=tiny SCALAR_BACKENDS=cpp TESTS=(tests/test_host_path.py)
    QUICK=(--backends cpp --repeats 2 --warmup 1)
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -2
} 2>&1 | tee "$OUT/versions.txt"

timeout "$TEST_SECONDS" python -m pytest -q -rs -m gpu -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}

bench=0
timeout "$BENCH_SECONDS" python -m bench --device "$DEVICE" --preset "$BIG" --compile "${QUICK[@]}" --out "$OUT/bert-large" \
    || bench=$?
timeout "$((BENCH_SECONDS + 20))" python -m bench --device "$DEVICE" --preset "$SMALL" "${QUICK[@]}" \
    --out "$OUT/many-small" || bench=$?
timeout "$STAGE_SECONDS" python -m bench --device "$DEVICE" --preset "$BIG" --stages "${QUICK[@]}" --out "$OUT/stages" \
    || bench=$?
LAMB_KERNELS_TRITON_VECTORIZE=0 timeout "$STAGE_SECONDS" python -m bench --device "$DEVICE" --preset "$BIG" --stages \
    "${QUICK[@]}" --backends "$SCALAR_BACKENDS" --out "$OUT/stages-scalar" || bench=$?
timeout "$STAGE_SECONDS" python -m bench --device "$DEVICE" --preset "$BIG" --stages --state-dtype int8 "${QUICK[@]}" \
    --out "$OUT/stages-int8" || bench=$?
rm -f "$OUT/many-small/steps.png" "$OUT/stages/stages.png" "$OUT/stages-scalar/stages.png" "$OUT/stages-int8/stages.png"

echo "== tests: $(tail -1 "$OUT/tests.txt")"
python - "$OUT" <<'PY'
import csv, glob, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "*.csv"))):
    print(f"== {os.path.relpath(path, sys.argv[1])}")
    for row in csv.DictReader(open(path, newline="", encoding="utf-8")):
        name = row.get("provider") or f"{row['backend']}: {row['stage']}"
        if row["status"] != "ok":
            print(f"   {row['algorithm']:<5} {name:<48} {row['status']}")
            continue
        ratio = row.get("ratio_to_yardstick") or ""
        ratio = f"{float(ratio):.2f}x" if ratio else ""
        print(f"   {row['algorithm']:<5} {name:<48} {float(row['gb_per_s']):8.1f} GB/s "
              f"{float(row['pct_of_copy'] or 'nan'):5.0f}% copy {ratio:>7}")
PY
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"

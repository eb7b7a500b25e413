#!/usr/bin/env bash
# The project on one GPU, in two parts; each prints its summary at the end.
#
#   DATA=/data/DRIVE-root bash benchmarks/gpu_check.sh speed   # the tutorial's 200 epochs and predict.py (~6 min)
#   bash benchmarks/gpu_check.sh paths                         # every GPU path once, the cuda tests (~8 min)
#   bash benchmarks/gpu_check.sh                               # both
#   PYTHON=.venv/bin/python OUT=/tmp/gpu bash benchmarks/gpu_check.sh speed
#
# speed: benchmarks/gpu_speed.py on $DATA (a folder holding DRIVE/; synthetic DRIVE-sized images without it):
#    "200 epochs: S s, dice D", "GPU busy: B%" for the tutorial's default path and each new one, then
#    "predict: R photographs/s" on 200 DRIVE-sized photographs, and a profile line per training path
# paths:
# 1. --recipe fast (with its AMP, float16 on CUDA) on $DATA, or without it on synthetic DRIVE-sized data
#    (20 training, 5 test images of 584 x 565): final dice and wall time
# 2. torchrun on one GPU (NCCL backend) for 2 demo epochs
# 3. fp16 AMP with the gradient scaler, 2 demo epochs, then --test-only in float32
# 4. torch.compile, 2 demo epochs
# 5. the benchmark's epochs on synthetic DRIVE-sized data: the tutorial-style run (a) and train.py (b) in
#    float32, and train.py with AMP (fp16), one round of 1- and 12-epoch runs each
# 6. the test suite's tests marked cuda (pytest -m cuda; pytest must be installed), with their counts
# Each step has its own time limit (speed 590 s, paths 1015 s); a failing step is reported and the others
# still run.
set -uo pipefail
PART=${1:-all}
case $PART in speed|paths|all) ;; *) echo "usage: bash benchmarks/gpu_check.sh [speed|paths|all]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
status=0

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name: $*" | tee -a "$LOG"
    if timeout "$limit" "$@" >> "$LOG" 2>&1; then
        echo "=== $name: ok in $((SECONDS - t0)) s" | tee -a "$LOG"
    else
        echo "=== $name: FAILED (exit $?) after $((SECONDS - t0)) s; see $LOG" | tee -a "$LOG"
        status=1
    fi
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$LOG" || exit 1

if [ "$PART" != paths ]; then
    data_args=()
    [ -n "${DATA:-}" ] && data_args=(--data-path "$DATA")
    step "speed" 590 "$PY" benchmarks/gpu_speed.py "${data_args[@]}" --out "$OUT/speed" --json "$OUT/speed.json"
    echo "--- speed summary" | tee -a "$LOG"
    grep -E "^(200 epochs|GPU busy|predict|profile)" "$LOG" | tee "$OUT/speed_summary.txt"
    [ "$PART" = speed ] && exit $status
fi

if [ -n "${DATA:-}" ]; then
    RECIPE_ROOT=$DATA
else
    RECIPE_ROOT=$OUT/synth
    step "synthetic-drive" 30 "$PY" my_dataset.py --output-dir "$RECIPE_ROOT" --num-train 20 --num-test 5 --height 584 --width 565
fi
step "recipe-fast" 240 "$PY" train.py --recipe fast --device cuda --data-path "$RECIPE_ROOT" --output-dir "$OUT/fast" \
    --no-plots --print-freq 1000 --seed 0
# The final model's dice (the last line of log.jsonl, always a validated epoch), the wall time it took, and
# the dice at every validated epoch against the time since training began.
"$PY" -c "
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
r = recs[-1]
print('recipe fast on %s: final dice %.4f, auc %.4f, %d epochs in %.1f s' % (sys.argv[2], r['dice'], r['auc'], r['epoch'] + 1, r['elapsed']))
print('recipe fast curve (epoch, s, dice): ' + ', '.join('%d %.1f %.4f' % (x['epoch'] + 1, x['elapsed'], x['dice']) for x in recs))
" "$OUT/fast/log.jsonl" "$RECIPE_ROOT" 2>&1 | tee -a "$LOG"

step "torchrun-nccl" 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_multi_GPU.py \
    --demo --device cuda --epochs 2 --output-dir "$OUT/ddp"
step "amp-fp16" 60 "$PY" train.py --demo --device cuda --amp --amp-dtype float16 --epochs 2 --output-dir "$OUT/amp"
step "amp-test-only" 45 "$PY" train.py --demo --device cuda --test-only --resume "$OUT/amp/checkpoint.pth" \
    --output-dir "$OUT/amp"
step "compile" 120 "$PY" train.py --demo --device cuda --compile --epochs 2 --output-dir "$OUT/compile"
step "benchmark-fp32" 180 "$PY" benchmarks/benchmark.py --device cuda --rounds 1 --configs a b --json "$OUT/bench_fp32.json"
step "benchmark-amp" 100 "$PY" benchmarks/benchmark.py --device cuda --rounds 1 --configs b --b-args=--amp \
    --json "$OUT/bench_amp.json"

step "cuda-tests" 180 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests

echo "--- summary" | tee -a "$LOG"
grep -E "^=== .*(ok|FAILED)|^\| (a|b)|best dice|backend nccl|^recipe fast|^[0-9]+ (passed|failed|skipped|deselected)|^=+ .*(passed|failed|error)" "$LOG" | tee "$OUT/summary.txt"
exit $status

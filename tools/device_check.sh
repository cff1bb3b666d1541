#!/usr/bin/env bash
# The GPU check, one script: the test suite (CUDA tests included), a bf16 smoke run of every
# script and of study.py, then bench.py on Qwen2.5-3B's shape (random weights, bf16), printing as
# it goes. Run from the repository root on
# the lent GPU machine (H100 or H200), after tools/fetch_wheels.sh here (POT travels as a wheel):
#
#   run(command="bash tools/device_check.sh", carry=[".whl"], timeout_s=600)
#
# Expected: about 6-7 minutes on an H100 (tests about 2, bench about 4); it stops starting steps
# at BUDGET seconds (default 540) so the call ends inside its 600 s, and every step has its own
# time limit and goes on after a failure. Logs and bench.csv land in $OUT (they come back).
# Afterwards, here: append $OUT/bench.csv's rows to results/bench.csv (same columns).
# The smoke runs and the study add about a minute.
set -u
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
unset CUDA_VISIBLE_DEVICES  # the suite must pass with every GPU visible (issue 13)
START=$(date +%s)
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}       # DEVICE=cpu SHAPE=tiny BUDGET=200: a dry run of this script on a CPU
SHAPE=${SHAPE:-qwen2.5-3b}

log() { echo "[device_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/device_check.log"; }

# step NAME LIMIT CMD...: run CMD with at most LIMIT seconds (less if the budget is nearly spent),
# its output to the screen and to $OUT/NAME.log; skipped when under 30 s of budget remain.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 30 )); then log "SKIP $name: ${left}s of budget left"; return 0; fi
  (( limit > left )) && limit=$left
  log "START $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  log "END $name: exit $rc after $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (time limit)')"
}

{
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc; free -g | head -2
} 2>&1 | tee "$OUT/env.log"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    && log "installed from .whl: $(ls .whl)" || log "pip install from .whl failed"
else
  log "no .whl folder: POT missing, so A's OT source (bench part a, the exp_a tests) will fail"
fi
$PY -c "import ot; print('POT', ot.__version__)" 2>&1 | tee -a "$OUT/env.log"

# 1. The whole suite, CUDA tests included (about 2 minutes on an H100).
step pytest 240 $PY -m pytest -q -rs -p no:cacheprovider --durations=15 tests

# 2. Every script's smoke run and the whole study in bf16 on the device (tiny model: seconds each).
for x in exp_a_patching exp_b_residual exp_c_ard_mmd exp_d_bridge exp_e_layer_sweep; do
  step "smoke_$x" 60 $PY $x.py --model tiny-random --smoke --device $DEVICE --dtype bfloat16 \
    --out "$OUT/smoke/$x"
done
step smoke_study 90 $PY study.py --model tiny-random --device $DEVICE --dtype bfloat16 --out "$OUT/study"

# 3. bench.py, Qwen2.5-3B's shape in bf16; rows appended to $OUT/bench.csv as each part ends.
#    a: A's gold grid (40 pairs, 5 new tokens: the direct template's need); step: the decode step
#    at batch 512 beside model.generate. Then the sample and B, D; C and the sweep last.
B="$PY bench.py --device $DEVICE --shape $SHAPE --out $OUT/bench.csv"
step bench_a_step 200 $B --parts a step
step bench_single_b_d 100 $B --parts single b d
step bench_c_e 120 $B --parts c e
# 4. If time is left: A's grid at 100 new tokens on 10 pairs (the issue's second A target, scaled).
step bench_a100 120 $B --parts a --limit 10 --new-tokens 100

log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
[ -f "$OUT/bench.csv" ] && cat "$OUT/bench.csv"

#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, check the kernels, time long-context inference,
# then (if time is left) the stage-2 distillation benchmark. Every script writes its JSON after each
# configuration, so whatever a timeout cuts short still comes back.
#
#   run(command="bash benchmarks/gpu_all.sh", carry=[".whl"], timeout_s=560)
# Environment: TOTAL_S (wall budget of this script, default 520), KC_S (kernel check limit, default 150),
#   SKIP_KC=1 (second call: no kernel check), RESUME=1 (continue benchmarks/results/long_context.json),
#   LC_ARGS (extra long_context.py arguments), DISTILL_MIN_S (least time worth a distill run, default 100).
# Results: $OUT/{kernel_check,long_context,distill_gpu}.{json,md}, long_context.png, log.txt (8 files at most).
set -u
START=$(date +%s)
TOTAL=${TOTAL_S:-520}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
say() { echo "[gpu_all +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >>"$LOG" 2>&1 || say "wheel install failed"
export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit --format=csv >>"$LOG" 2>&1
python3 -c "import torch, triton, transformers; from hylo_lab.ops import dispatch as d; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'fla', d.kernel_available('fla'), d.import_error('fla'), 'mamba_ssm', d.kernel_available('mamba_ssm'), 'bwd refused:', d.fla_gated_backward_refused())" >>"$LOG" 2>&1
say "setup done"

if [ "${SKIP_KC:-0}" != 1 ]; then
  say "kernel_check (limit ${KC_S:-150}s)"
  timeout "${KC_S:-150}" python3 benchmarks/kernel_check.py --out "$OUT" >>"$LOG" 2>&1 || say "kernel_check exit $?"
fi

if [ "${RESUME:-0}" = 1 ] && [ -f benchmarks/results/long_context.json ]; then
  cp benchmarks/results/long_context.json "$OUT/"
  RES="--resume"
else
  RES=""
fi
DMIN=${DISTILL_MIN_S:-100}
LC_BUDGET=$(( $(left) - 25 ))
say "long_context (budget ${LC_BUDGET}s)"
timeout $(( LC_BUDGET + 200 > $(left) - 5 ? $(left) - 5 : LC_BUDGET + 200 )) \
  python3 benchmarks/long_context.py --out "$OUT" --budget-s "$LC_BUDGET" $RES ${LC_ARGS:-} >>"$LOG" 2>&1 \
  || say "long_context exit $?"

if [ "$(left)" -gt "$DMIN" ]; then
  DB=$(( $(left) - 30 ))
  say "distill_gpu (budget ${DB}s)"
  timeout $(( DB + 20 )) python3 benchmarks/distill_gpu.py --out "$OUT" --budget-s "$DB" >>"$LOG" 2>&1 \
    || say "distill_gpu exit $?"
else
  say "no time left for distill_gpu"
fi
say "done"
tail -c 6000 "$OUT/kernel_check.md" 2>/dev/null
cat "$OUT/long_context.md" 2>/dev/null

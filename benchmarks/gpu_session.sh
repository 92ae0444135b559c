#!/usr/bin/env bash
# One device call that checks and times the GPU paths of issues 18 and 19, each step under its own time limit,
# results written as they land and packed into $OUT/results.tar.gz (the device tool returns at most 8 files).
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590)
# Environment: TOTAL_S (wall budget, default 570), WHEEL_DIR (carried wheels, default .whl), STEPS (space-separated subset of: tests decode long kernels distill; default all), LABEL (a note
#   on the software stack), Z3=1 (tilelang's z3 from .whl_z3 is carried too: sets LD_LIBRARY_PATH).
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_out}
R="$OUT/results"
mkdir -p "$R"
LOG="$OUT/log.txt"
say() { echo "[gpu_session +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
pack() { tar -czf "$OUT/results.tar.gz" -C "$OUT" results; }
trap pack EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WHEELS=$(ls ${WHEEL_DIR:-.whl}/*.whl 2>/dev/null; [ "${Z3:-0}" = 1 ] && ls .whl_z3/*.whl 2>/dev/null)
[ -n "$WHEELS" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $WHEELS >>"$LOG" 2>&1 || say "wheel install failed or no wheels"
export PYTHONPATH="$PWD:/tmp/site"
[ "${Z3:-0}" = 1 ] && export LD_LIBRARY_PATH="/tmp/site/z3/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >>"$LOG" 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >>"$LOG" 2>&1
STEPS=${STEPS:-tests decode long kernels distill}
TOTAL=${TOTAL_S:-570}
has() { [[ " $STEPS " == *" $1 "* ]]; }

if has tests; then
  say "GPU parity tests"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_mla_decode.py tests/test_losses.py \
    tests/test_long_context.py tests/test_upcycle.py >"$R/pytest_gpu.txt" 2>&1; say "pytest exit $?"
fi
if has decode; then
  say "mla_decode_check"
  timeout 90 python3 benchmarks/mla_decode_check.py --out "$R" >>"$LOG" 2>&1 || say "mla_decode_check exit $?"
fi
if has long; then
  say "long_context 1B GDN, triton decode"
  timeout 100 python3 benchmarks/long_context.py --out "$R/lc" --fresh --budget-s 85 \
    --models llama3.2-1b/4MLA12GDN --lengths 8K 128K 512K >>"$LOG" 2>&1 || say "long_context exit $?"
  say "long_context 1B GDN, torch decode (reference)"
  timeout 50 python3 benchmarks/long_context.py --out "$R/lcref" --fresh --budget-s 40 --decode-backend torch \
    --models llama3.2-1b/4MLA12GDN --lengths 8K 128K >>"$LOG" 2>&1 || say "long_context ref exit $?"
fi
if has kernels; then
  say "kernel_check"
  timeout 75 python3 benchmarks/kernel_check.py --out "$R" \
    --checks gdn_chunk,ssd_chunk,ssd_recurrent,gdn_torch_train,ssd_torch_train >>"$LOG" 2>&1 || say "kernel_check exit $?"
fi
if has distill; then
  LEFT=$(( TOTAL - ($(date +%s) - START) ))
  if [ "$LEFT" -gt 60 ]; then
    say "distill_gpu (budget $(( LEFT - 25 ))s)"
    timeout $(( LEFT - 10 )) python3 benchmarks/distill_gpu.py --out "$R" --budget-s $(( LEFT - 25 )) \
      --label "${LABEL:-default stack}" >>"$LOG" 2>&1 || say "distill_gpu exit $?"
  else
    say "no time left for distill_gpu"
  fi
fi
say "done"
cp "$LOG" "$R/"

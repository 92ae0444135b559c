#!/usr/bin/env bash
# One device call that checks and times the GPU paths of issues 18 and 19, each step under its own time limit,
# results written as they land and packed into $OUT/results.tar.gz (the device tool returns at most 8 files).
#
#   run(command="SITE_TAR=.gpu_site/site.tar.xz bash benchmarks/gpu_session.sh", carry=[".gpu_site"], timeout_s=590)
# Environment: TOTAL_S (wall budget, default 570); STEPS (space-separated subset of: tests decode long kernels
#   distill; default all); LABEL (a note on the software stack); the carried packages, either
#   SITE_TAR: one .tar.xz of an unpacked site-packages (fla + fla-core + liger-kernel + tilelang with its deps and
#     z3's library: 39 MB, how to build it in benchmarks/gpu_site.txt), unpacked to $GPU_WORK/site, or
#   WHEEL_DIR (wheels, default .whl) and Z3=1 (tilelang's z3 from .whl_z3 too);
#   TCACHE: a tcache.tar.gz from an earlier call's $OUT (triton's autotune results: saves the minutes fla
#     autotunes, which on 2026-12-06 took more than 100 s of every fresh process); packed back into $OUT each call.
#   DISTILL_ONLY (losses | student | step), DISTILL_S (its wall budget; default: what is left), KERNEL_CHECKS
#   (comma-separated), LC_LENGTHS (default "8K 128K 512K"), GPU_WORK (scratch folder, default /tmp), OUT;
#   LC_VARIANTS (decode-step variants of the long_context step, each its own run and folder lc_<variant>: plain,
#     pack (--pack-decode), compile (--compile-decode), pack+compile; default "plain"; LC_COMPILE=1 adds compile).
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_out}
W=${GPU_WORK:-/tmp}  # scratch: gpu_work/results, site (unpacked packages), tcache (triton's cache)
R=$W/gpu_work/results  # packed into $OUT/results.tar.gz at exit: $OUT then holds three files
mkdir -p "$R" "$OUT"
LOG="$OUT/log.txt"
say() { echo "[gpu_session +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
pack() { cp "$LOG" "$R/"; tar -czf "$OUT/results.tar.gz" -C "$W/gpu_work" results; }
pack_cache() {  # triton's autotune results only (kilobytes; the compiled kernels are tens of MB): a later call
  # restored from them compiles each kernel's chosen config once instead of benchmarking every config again
  [ -d "$W/tcache" ] && (cd "$W" && find tcache -name '*.autotune.json' | tar -czf "$OUT/tcache.tar.gz" -T -) \
    && [ "$(stat -c %s "$OUT/tcache.tar.gz")" -lt 16000000 ] || rm -f "$OUT/tcache.tar.gz"; }
trap 'pack; pack_cache' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=$W/tcache
mkdir -p "$W/site" "$W/tcache"
[ -n "${TCACHE:-}" ] && [ -f "$TCACHE" ] && tar -xzf "$TCACHE" -C "$W" && say "triton cache restored"
if [ -n "${SITE_TAR:-}" ]; then
  tar -xJf "$SITE_TAR" -C "$W/site" >>"$LOG" 2>&1 && say "site unpacked" || say "site unpack failed"
  [ -d "$W/site/z3/lib" ] && export LD_LIBRARY_PATH="$W/site/z3/lib:${LD_LIBRARY_PATH:-}"
else
  WHEELS=$(ls ${WHEEL_DIR:-.whl}/*.whl 2>/dev/null; [ "${Z3:-0}" = 1 ] && ls .whl_z3/*.whl 2>/dev/null)
  [ -n "$WHEELS" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$W/site" $WHEELS >>"$LOG" 2>&1 || say "wheel install failed or no wheels"
  [ "${Z3:-0}" = 1 ] && export LD_LIBRARY_PATH="$W/site/z3/lib:${LD_LIBRARY_PATH:-}"
fi
export PYTHONPATH="$PWD:$W/site"
python3 -c "
from hylo_lab.ops import dispatch
for m in ('fla', 'tilelang', 'liger_kernel'):
    print(m, 'imports' if dispatch.module_imports(m) else 'does NOT import')" >>"$LOG" 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >>"$LOG" 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >>"$LOG" 2>&1
STEPS=${STEPS:-tests decode long kernels distill}
TOTAL=${TOTAL_S:-570}
left() { echo $(( TOTAL - ($(date +%s) - START) - 15 )); }  # seconds a step may still take
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }

step_tests() {
  say "GPU parity tests"
  timeout $(cap 150) python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_mla_decode.py tests/test_losses.py \
    tests/test_long_context.py tests/test_upcycle.py >"$R/pytest_gpu.txt" 2>&1; say "pytest exit $?"
}
step_decode() {
  say "mla_decode_check"
  timeout $(cap 90) python3 benchmarks/mla_decode_check.py --out "$R" >>"$LOG" 2>&1 || say "mla_decode_check exit $?"
}
step_long() {
  local variants=${LC_VARIANTS:-plain}
  [ "${LC_COMPILE:-0}" = 1 ] && variants="$variants compile"
  for v in $variants; do
    local flags=""
    case $v in *pack*) flags="$flags --pack-decode";; esac
    case $v in *compile*) flags="$flags --compile-decode";; esac
    say "long_context 1B hybrids, decode step: $v"
    T=$(cap 150); timeout $T python3 benchmarks/long_context.py --out "$R/lc_$v" --fresh --budget-s $(( T - 20 )) \
      $flags --models llama3.2-1b/4MLA12GDN llama3.2-1b/4MLA12M2 --lengths ${LC_LENGTHS:-8K 128K 512K} \
      >>"$LOG" 2>&1 || say "long_context ($v) exit $?"
  done
}
step_kernels() {
  say "kernel_check"
  timeout $(cap ${KERNEL_S:-120}) python3 benchmarks/kernel_check.py --out "$R" \
    --checks ${KERNEL_CHECKS:-gdn_chunk,ssd_chunk,ssd_chunk_gla,gdn_recurrent,ssd_recurrent} >>"$LOG" 2>&1 \
    || say "kernel_check exit $?"
}
step_distill() {
  LEFT=$(( TOTAL - ($(date +%s) - START) ))
  [ -n "${DISTILL_S:-}" ] && [ "$DISTILL_S" -lt "$LEFT" ] && LEFT=$DISTILL_S
  if [ "$LEFT" -gt 60 ]; then
    say "distill_gpu (budget $(( LEFT - 25 ))s)"
    timeout $(( LEFT - 10 )) python3 benchmarks/distill_gpu.py --out "$R" --budget-s $(( LEFT - 25 )) \
      --label "${LABEL:-default stack}" ${DISTILL_ONLY:+--only $DISTILL_ONLY} >>"$LOG" 2>&1 || say "distill_gpu exit $?"
  else
    say "no time left for distill_gpu"
  fi
}
for s in $STEPS; do
  if [ "$(left)" -gt 30 ]; then "step_$s"; else say "no time left for $s"; fi
done
say "done"
cp "$LOG" "$R/"

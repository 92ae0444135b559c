#!/usr/bin/env bash
# The four ablation sweeps (and optionally the demo over seeds) on one lent GPU machine within one device call:
# papermill workers share the GPU, each point exported to <yaml dir>/results/<name>/points/ as it finishes; the
# exports are packed into $OUT/points.tar.gz. A later call with those exports copied back into the checkout
# skips the finished points (sweeps resume from the exports; no MLflow there, so nothing is tracked).
#
#   run(command="bash benchmarks/gpu_ablations.sh", carry=[".whl_nb", ".toycache"], timeout_s=600)
#
# Carried: .whl_nb (papermill + ipykernel and their needs as cp312 wheels, git-ignored: fetch them with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl_nb -r benchmarks/gpu_ablations_wheels.txt), .toycache (HYLO_LAB_HOME with the toy
# world and the teachers already trained, so no teacher is retrained). Environment: TOTAL_S (wall budget for the
# sweeps, default 540), SWEEPS ("file:jobs ..." default the four ablations), SEEDS (e.g. 0 or 1,2: instead of the
# files' seeds), GIT_SHA (the commit the working tree
# is, recorded in each export; the machine has no .git).
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
say() { echo "[gpu_ablations +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
pack() { find ablations benchmarks -path '*/results/*/points/*.json' -newer "$OUT/started" -print0 \
           | tar -czf "$OUT/points.tar.gz" --null -T -; cp -r runs/sweeps "$OUT/notebooks" 2>/dev/null;
         find "$OUT/notebooks" -name '*.ipynb' -size +2M -delete 2>/dev/null
         find -L .toycache -mindepth 3 -maxdepth 3 -path '*/teachers/*' -newer "$OUT/started" ! -name '*.tmp*' -print0 \
           | tar -czhf "$OUT/teachers.tar.gz" --null -T -; }  # teachers trained here, for the next call's carry
touch "$OUT/started"
trap pack EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export HYLO_LAB_HOME="$PWD/.toycache" HYLO_LAB_PROGRESS=lines HYLO_LAB_GIT_SHA="${GIT_SHA:-}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_nb/*.whl \
  >>"$LOG" 2>&1 || say "wheel install failed"
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH"
nvidia-smi --query-gpu=name,memory.total --format=csv >>"$LOG" 2>&1
python3 -c "import papermill, ipykernel, hylo_lab; print('papermill', papermill.__version__)" >>"$LOG" 2>&1 \
  || { say "papermill or hylo_lab not importable"; exit 1; }
SWEEPS=${SWEEPS:-ablations/layer_ratio.yaml:7 ablations/teacher_size.yaml:3 ablations/training_length.yaml:3
        ablations/yarn.yaml:3}
SEED_ARGS=(); [ -n "${SEEDS:-}" ] && SEED_ARGS=(--seeds "$SEEDS")
TOTAL=${TOTAL_S:-540}
pids=()
for item in $SWEEPS; do
  file=${item%%:*}; jobs=${item##*:}; name=$(basename "$file" .yaml)
  say "sweep $name with $jobs jobs"
  timeout --signal=INT --kill-after=20 "$TOTAL" python3 -m hylo_lab.cli sweep "$file" --jobs "$jobs" "${SEED_ARGS[@]}" \
    --tracking-uri "sqlite:////tmp/untracked.db" >"$OUT/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
say "done: $(find ablations benchmarks -path '*/results/*/points/*.json' -newer "$OUT/started" | wc -l) new exports"

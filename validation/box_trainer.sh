#!/usr/bin/env bash
# One device call on a GPU box: the H200 calibration rerun (validation.measure on
# validation/cases_h200_calibration.yaml), then the Trainer cases (validation.trainer_run on
# validation/cases_trainer.yaml), both into OUTDIR, within SECONDS (default 540).
#
#   ./validation/box_trainer.sh "$OUT" [SECONDS]
#
# Resuming: no case starts when fewer than 60 s are left; a case cut short is not recorded. The
# box's $OUT starts empty, so rows from an earlier call must travel with the tree: put the returned
# h200-calibration.jsonl in validation/results_h200/ and h200-trainer.jsonl in
# validation/results_trainer/ (untracked files travel); this script copies them into OUTDIR first
# and both harnesses run with --skip-done, so a second identical call does only what is left.
#
# The pinned wheels in .whl/ (bitsandbytes, peft, liger-kernel) go to /tmp/site (validation/box_env.sh).
set -u
OUT_DIR=${1:?usage: box_trainer.sh OUTDIR [SECONDS]}
BUDGET_S=${2:-540}
STOP_AT=$(( $(date +%s) + BUDGET_S ))
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/box_trainer.log"

source "$(dirname "$0")/box_env.sh"
export HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1  # no tqdm in the log
# SPEC's device total is under PyTorch's default allocator.
unset PYTORCH_CUDA_ALLOC_CONF

for pair in "validation/results_h200/h200-calibration.jsonl:h200-calibration.jsonl" \
            "validation/results_trainer/h200-trainer.jsonl:h200-trainer.jsonl"; do
  src=${pair%%:*}; dst="$OUT_DIR/${pair##*:}"
  if [ -f "$src" ] && [ ! -f "$dst" ]; then cp "$src" "$dst"; fi
done

{
  echo "== $(date -u +%FT%TZ) box_trainer.sh, budget ${BUDGET_S}s"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || true
  python3 -c "import torch, transformers, peft, accelerate, bitsandbytes, liger_kernel, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bnb', bitsandbytes.__version__, 'triton', triton.__version__)" 2>&1 | tail -1
} 2>&1 | tee -a "$LOG"

echo "== calibration rerun" | tee -a "$LOG"
python3 -m validation.measure --cases validation/cases_h200_calibration.yaml \
  --out "$OUT_DIR/h200-calibration.jsonl" --diag --skip-done --keep-checkpoints \
  --stop-at "$STOP_AT" 2>&1 | tee -a "$LOG"

echo "== trainer cases" | tee -a "$LOG"
python3 -m validation.trainer_run --cases validation/cases_trainer.yaml \
  --out "$OUT_DIR/h200-trainer.jsonl" --skip-done --stop-at "$STOP_AT" 2>&1 | tee -a "$LOG"

for f in h200-calibration.jsonl h200-trainer.jsonl; do
  echo "$f: $(cat "$OUT_DIR/$f" 2>/dev/null | wc -l) rows" | tee -a "$LOG"
done
echo "== left: $(python3 -m validation.measure --cases validation/cases_h200_calibration.yaml --out "$OUT_DIR/h200-calibration.jsonl" --skip-done --list | wc -l) calibration, $(python3 -m validation.trainer_run --cases validation/cases_trainer.yaml --out "$OUT_DIR/h200-trainer.jsonl" --skip-done --list | wc -l) trainer" | tee -a "$LOG"

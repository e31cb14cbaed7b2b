#!/usr/bin/env bash
# Session 6 of 2026-12-01, call m (issue 12): QLoRA round e through transformers.Trainer
# (validation/cases_trainer_e.yaml), committed before this call ran; the reference case recorded
# with frames, the holdouts without. One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
export HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
unset PYTORCH_CUDA_ALLOC_CONF
python3 -m validation.trainer_run --cases validation/cases_trainer_e.yaml --out $R/h200-trainer-e.jsonl \
  --only 'llama-3.2-1b-trainer-qlora-*' --snapshot-dir $R/snaps --snapshot-frames --stop-at $((T0 + 150)) > $R/trainer-e.log 2>&1
compact_snapshots $R $R/trainer-e.log
python3 -m validation.trainer_run --cases validation/cases_trainer_e.yaml --out $R/h200-trainer-e.jsonl --skip-done \
  --snapshot-dir $R/snaps --stop-at $((T0 + 530)) >> $R/trainer-e.log 2>&1
compact_snapshots $R $R/trainer-e.log
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

#!/usr/bin/env bash
# Session 6 of 2026-12-01, call n (issue 12), both case files committed before this call ran:
# 1. round f, five device-total holdouts of SPEC's loop under expandable segments
#    (validation/cases_h200_device_f.yaml), with allocator histories;
# 2. four reference histories, recorded with each request's line, of the steps not traced yet:
#    Liger under the Trainer and TRL's SFTTrainer (validation/cases_references_f.yaml).
# One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
export HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
unset PYTORCH_CUDA_ALLOC_CONF
python3 -m validation.measure --cases validation/cases_h200_device_f.yaml --out $R/h200-device-f.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 260)) > $R/device-f.log 2>&1
compact_snapshots $R $R/device-f.log
python3 -m validation.trainer_run --cases validation/cases_references_f.yaml --out $R/h200-references-f.jsonl \
  --snapshot-dir $R/snaps --snapshot-frames --stop-at $((T0 + 520)) > $R/references-f.log 2>&1
compact_snapshots $R $R/references-f.log
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

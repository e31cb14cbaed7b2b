#!/usr/bin/env bash
# Session 6 of 2026-12-01, call l (issue 12): QLoRA round e of SPEC's plain loop
# (validation/cases_h200_device_e.yaml), committed before this call ran. The two reference cases are
# recorded with frames (each allocation's line kept in its compact stream's "sites"), the holdouts
# without. One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
python3 -m validation.measure --cases validation/cases_h200_device_e.yaml --out $R/h200-device-e.jsonl \
  --only 'llama-3.2-1b-qlora-b4-s1024-r16' --only 'qwen2-1.5b-instruct-qlora-b4-s1024-r16-gc' \
  --snapshot-dir $R/snaps --snapshot-frames --stop-at $((T0 + 200)) > $R/device-e.log 2>&1
compact_snapshots $R $R/device-e.log
python3 -m validation.measure --cases validation/cases_h200_device_e.yaml --out $R/h200-device-e.jsonl --skip-done \
  --snapshot-dir $R/snaps --stop-at $((T0 + 530)) >> $R/device-e.log 2>&1
compact_snapshots $R $R/device-e.log
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

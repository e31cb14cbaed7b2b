#!/usr/bin/env bash
# Session 5 of 2026-12-01, call k (issue 12): device-total round d, sixteen training steps of SPEC's
# plain loop (validation/cases_h200_device_d.yaml), committed before this call ran, with their
# allocator histories (no frames) compacted for replay checks. One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
python3 -m validation.measure --cases validation/cases_h200_device_d.yaml --out $R/h200-device-d.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 480)) > $R/device-d.log 2>&1
compact_snapshots $R $R/device-d.log
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

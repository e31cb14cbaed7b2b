#!/usr/bin/env bash
# Session 4 of 2026-12-01, call i (issue 12): device-total round c, seven MoE decodes
# (validation/cases_h200_device_c.yaml), committed before this call ran, with their allocator
# histories (no frames) compacted for the replay checks. One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
python3 -m validation.measure --cases validation/cases_h200_device_c.yaml --out $R/h200-device-c.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 420)) > $R/device-c.log 2>&1
if ls $R/snaps/*.pickle >/dev/null 2>&1; then
  python3 -m validation.snapshot $R/snaps/*.pickle --out-dir $R/streams >> $R/device-c.log 2>&1
  rm -rf $R/snaps
fi
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

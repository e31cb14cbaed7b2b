#!/usr/bin/env bash
# Session of 2026-12-02, call d (issue 12): round j, ten decodes and prefills
# (validation/cases_h200_device_j.yaml, 10 holdouts), committed before this call ran. SPEC's protocol,
# one process per case, PyTorch's default allocator unless a case sets expandable segments;
# each checkpoint is deleted after its cases.
# One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
unset PYTORCH_CUDA_ALLOC_CONF
python3 -m validation.measure --cases validation/cases_h200_device_j.yaml --out $R/h200-device-j.jsonl \
  --stop-at $((T0 + 540)) > $R/device-j.log 2>&1
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

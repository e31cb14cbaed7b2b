#!/usr/bin/env bash
# Session 4 of 2026-12-01, call g (issue 13): the second families round, validation/cases_h200_families_b.yaml
# (22 holdouts over 13 model types), committed before this call ran. SPEC's protocol, one process per case,
# PyTorch's default allocator; each checkpoint is deleted after its cases. One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
python3 -m validation.measure --cases validation/cases_h200_families_b.yaml --out $R/h200-families-b.jsonl \
  --stop-at $((T0 + 540)) > $R/families-b.log 2>&1
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

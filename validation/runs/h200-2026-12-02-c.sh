#!/usr/bin/env bash
# Session of 2026-12-02, call c (issues 12 and 13): round i, four reference histories with each
# request's line (validation/cases_references_i.yaml), committed before this call ran, measured
# twice (two processes per case, one pass after the other) to see whether the MoE loader's race
# repeats. SPEC's protocol, PyTorch's default allocator. One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
unset PYTORCH_CUDA_ALLOC_CONF
for pass in 1 2; do
  mkdir -p $R/pass$pass
  python3 -m validation.measure --cases validation/cases_references_i.yaml --out $R/pass$pass/h200-references-i.jsonl \
    --snapshot-dir $R/pass$pass/snaps --snapshot-frames --keep-checkpoints --stop-at $((T0 + 250 * pass)) \
    > $R/pass$pass/references-i.log 2>&1
  compact_snapshots $R/pass$pass $R/pass$pass/references-i.log
done
rm -rf /tmp/canirun
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/pass*/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

#!/usr/bin/env bash
# Session 4 of 2026-12-01, call j: diagnosis, not scoring. Four MoE decodes already measured and
# committed, whose device totals the written stream still misses (Qwen3-Next's linear attention,
# Mixtral-8x22B in bf16, Qwen3-235B's shapes, DeepSeek-V3's MLA), again with their allocator histories
# (no frames) compacted for replay checks on the CPU. One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
python3 -m validation.measure --cases validation/cases_h200_families.yaml --out $R/diag-stream.jsonl --snapshot-dir $R/snaps \
  --only 'qwen3-next-80b-a3b-thinking-inference-bf16-b2-p1024-n32-L4' --stop-at $((T0 + 120)) > $R/diag.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_families_b.yaml --out $R/diag-stream.jsonl --snapshot-dir $R/snaps \
  --only 'mixtral-8x22b-v0.1-inference-bf16-b2-p2048-n32-L2' --only 'qwen3-235b-a22b-inference-bf16-b4-p1024-n32-L2' \
  --only 'deepseek-v3-inference-bf16-b8-p512-n32-L2-dense1-noquant' --stop-at $((T0 + 250)) >> $R/diag.log 2>&1
if ls $R/snaps/*.pickle >/dev/null 2>&1; then
  python3 -m validation.snapshot $R/snaps/*.pickle --out-dir $R/streams >> $R/diag.log 2>&1
  rm -rf $R/snaps
fi
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

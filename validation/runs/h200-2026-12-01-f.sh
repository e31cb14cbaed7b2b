#!/usr/bin/env bash
# Session 4 of 2026-12-01, call f: diagnosis, not scoring. Every case here is already measured and
# committed; this call records what the allocator held at each one's peak, line by line, so the
# mechanisms behind last session's misses can be read rather than guessed (issue 13), then resumes the
# two edge searches left (issue 12), then profiles two decodes' host time (issue 16).
# 1. validation.measure --snapshot-dir --snapshot-frames on nine family cases that missed (MoE
#    inference low, LoRA on MoE high, Gemma 3's 8-bit AdamW high, DeepSeek-V3's and Qwen3-Next's device
#    totals low); `validation.snapshot --explain` turns each history into the blocks alive at peak by
#    the line that allocated them; the compact streams are kept for the replay.
# 2. validation.edge --skip-done: the 1B bf16 decode, both allocators (cases_edge.yaml).
# 3. two calibration decodes again with --profile-generate, which now also lists the host's top ops.
# One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
python3 -m validation.measure --cases validation/cases_h200_families.yaml --out $R/diag-families.jsonl \
  --snapshot-dir $R/snaps --snapshot-frames --stop-at $((T0 + 250)) \
  --only 'qwen3-30b-a3b-inference-bf16-b8-p1024-n64-L4' --only 'mixtral-8x7b-v0.1-inference-nf4-b8-p1024-n64-L4' \
  --only 'llama-4-scout-17b-16e-instruct-inference-bf16-b4-p1024-n64-L2-nope10' \
  --only 'gpt-oss-20b-lora-b2-s1024-r16-drop0.0-eager-L4-noquant' --only 'gemma-3-4b-it-full-amp_bf16-b1-s512-adamw_8bit' \
  --only 'mixtral-8x7b-v0.1-qlora-b4-s1024-r16-drop0.0-gc-L4' --only 'qwen3-next-80b-a3b-thinking-inference-bf16-b2-p1024-n32-L4' \
  --only 'deepseek-v3-inference-bf16-b4-p1024-n32-L2-dense1-noquant' --only 'deepseek-v3-lora-b2-s1024-r16-drop0.0-L2-dense1-noquant' \
  > $R/diag.log 2>&1
if ls $R/snaps/*.pickle >/dev/null 2>&1; then
  python3 -m validation.snapshot $R/snaps/*.pickle --explain > $R/explain.txt 2>&1
  python3 -m validation.snapshot $R/snaps/*.pickle --out-dir $R/streams >> $R/diag.log 2>&1
  rm -rf $R/snaps
fi
cp validation/results_h200/h200-edge.jsonl $R/h200-edge.jsonl
python3 -m validation.edge --cases validation/cases_edge.yaml --out $R/h200-edge.jsonl --skip-done \
  --stop-at $((T0 + 500)) > $R/edge.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_calibration.yaml --out $R/diag-speed.jsonl --profile-generate \
  --only 'qwen2.5-0.5b-inference-bf16-b1-p512-n128' --only 'llama-3.2-1b-inference-bf16-b4-p2048-n256' \
  --stop-at $((T0 + 545)) > $R/speed.log 2>&1
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop\|^edge" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

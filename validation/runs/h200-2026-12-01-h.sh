#!/usr/bin/env bash
# Session 4 of 2026-12-01, call h: diagnosis, not scoring; every case is already measured and committed.
# 1. Issue 16: three decodes again with SDPA restricted to flash and memory-efficient attention
#    (`--sdpa-backends flash,efficient`), beside their committed rows under torch's default choice
#    (cuDNN attention on the H200, as the last profile's host ops showed): does the default's per-step
#    host time come from cuDNN's per-shape plans, each decode step being a new KV length?
# 2. Issue 12: the allocator histories, with frames, of two device-total misses (the 3B 4-bit prefill,
#    -7.0%, and the 3B paged 8-bit AdamW step, -11.2%), explained by the line that allocated them.
# One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
python3 -m validation.measure --cases validation/cases_h200_calibration.yaml --out $R/diag-sdpa.jsonl --sdpa-backends flash,efficient \
  --only 'qwen2.5-0.5b-inference-bf16-b1-p512-n128' --only 'llama-3.2-1b-inference-bf16-b4-p2048-n256' \
  --stop-at $((T0 + 150)) > $R/sdpa.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_device.yaml --out $R/diag-sdpa.jsonl --sdpa-backends flash,efficient \
  --only 'llama-3.2-3b-inference-bf16-b32-p1024-n128' --stop-at $((T0 + 200)) >> $R/sdpa.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_device.yaml --out $R/diag-device.jsonl \
  --snapshot-dir $R/snaps --snapshot-frames --stop-at $((T0 + 400)) \
  --only 'llama-3.2-3b-inference-nf4-b16-p2048-n128' --only 'llama-3.2-3b-full-bf16-b2-s2048-paged_adamw_8bit-gc' > $R/diag.log 2>&1
if ls $R/snaps/*.pickle >/dev/null 2>&1; then
  python3 -m validation.snapshot $R/snaps/*.pickle --explain > $R/explain.txt 2>&1
  python3 -m validation.snapshot $R/snaps/*.pickle --out-dir $R/streams >> $R/diag.log 2>&1
  rm -rf $R/snaps
fi
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

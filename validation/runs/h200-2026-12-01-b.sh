#!/usr/bin/env bash
# Device call b of 2026-12-01 (H200): the last round-b device-total case, allocator snapshots
# (repeats of measured cases: decode, and the training cases the device total misses most, plain
# loop and Trainer), then the edge searches left. The edge search cut short by call a's deadline
# (3B nf4 decode, default allocator) starts again from scratch.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cp validation/incoming/a/h200-device-b.jsonl $OUT/h200-device-b.jsonl
python3 -m validation.measure --cases validation/cases_h200_device_b.yaml --out $OUT/h200-device-b.jsonl \
  --skip-done --stop-at $((T0 + 120)) > $OUT/device-b-2.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_device.yaml --out $OUT/h200-snap.jsonl \
  --snapshot-dir $OUT/snaps --stop-at $((T0 + 250)) \
  --only 'llama-3.2-1b-inference-nf4-b16-p1024-n256' --only 'llama-3.2-1b-inference-bf16-b64-p512-n256' \
  --only 'llama-3.2-3b-full-bf16-b2-s2048-paged_adamw_8bit-gc' --only 'llama-3.2-3b-lora-b8-s4096-r64-gc' \
  --only 'qwen2.5-0.5b-full-amp_bf16-b16-s2048-adamw_fused-gc' > $OUT/snap.log 2>&1
python3 -m validation.trainer_run --cases validation/cases_trainer.yaml --out $OUT/h200-snap-trainer.jsonl \
  --snapshot-dir $OUT/snaps --stop-at $((T0 + 330)) \
  --only 'qwen2.5-0.5b-trainer-full-amp_bf16-b4-g1-s1024-sgd-clip0' --only 'qwen2.5-0.5b-trainer-full-bf16-b4-g1-s1024-adafactor' \
  --only 'qwen2.5-0.5b-trainer-full-amp_bf16-b4-g1-s1024-adamw_torch_fused-liger' > $OUT/snap-trainer.log 2>&1
ls $OUT/snaps/*.pickle >/dev/null 2>&1 && python3 -m validation.snapshot $OUT/snaps/*.pickle --out-dir $OUT/streams >> $OUT/snap.log 2>&1 && rm -f $OUT/snaps/*.pickle
cp validation/incoming/a/h200-edge-resume.jsonl $OUT/h200-edge.jsonl
python3 -m validation.edge --cases validation/cases_edge.yaml --out $OUT/h200-edge.jsonl --skip-done \
  --stop-at $((T0 + 585)) > $OUT/edge-4.log 2>&1
echo "done in $(( $(date +%s) - T0 )) s"
grep -v "Loading\|Writing\|MatMul8bit\|Warning\|setter" $OUT/*.log | tail -n 40

#!/usr/bin/env bash
# Device call a of 2026-12-01 (H200): allocator snapshots of six round-a device-total cases
# (repeats, for checking the allocator replay), the round-b device-total holdouts, and the edge
# searches left from the last session. Run from the repo root on the GPU box with .whl carried.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
python3 -m validation.measure --cases validation/cases_h200_device.yaml --out $OUT/h200-snap.jsonl \
  --snapshot-dir $OUT/snaps --stop-at $((T0 + 130)) \
  --only 'llama-3.2-1b-inference-nf4-b16-p1024-n256' --only 'llama-3.2-1b-inference-bf16-b64-p512-n256' \
  --only 'llama-3.2-1b-inference-int8-b16-p512-n64' --only 'llama-3.2-1b-lora-b16-s2048-r16' \
  --only 'qwen2.5-0.5b-full-amp_bf16-b16-s2048-adamw_fused-gc' --only 'qwen2.5-0.5b-inference-bf16-b32-p2048-n128' \
  > $OUT/snap.log 2>&1
python3 -m validation.snapshot $OUT/snaps/*.pickle --out-dir $OUT/streams >> $OUT/snap.log 2>&1 && rm -f $OUT/snaps/*.pickle
python3 -m validation.measure --cases validation/cases_h200_device_b.yaml --out $OUT/h200-device-b.jsonl \
  --stop-at $((T0 + 380)) > $OUT/device-b.log 2>&1
cp validation/results_h200/h200-edge.jsonl $OUT/h200-edge.jsonl
python3 -m validation.edge --cases validation/cases_edge.yaml --out $OUT/h200-edge.jsonl --skip-done \
  --stop-at $((T0 + 580)) > $OUT/edge-3.log 2>&1
echo "done in $(( $(date +%s) - T0 )) s"
tail -n 3 $OUT/*.log

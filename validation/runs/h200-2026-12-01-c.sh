#!/usr/bin/env bash
# Device call c of 2026-12-01 (H200): the SFTTrainer holdouts (cases_sft.yaml), allocator snapshots
# (repeats of measured cases: the no-KV-cache 4-bit decode that reserves 5x what it allocates, a
# 4-bit decode with a cache, a LoRA step with checkpointing, the Trainer's sgd step), then the speed
# calibration (the 13 memory-calibration cases rerun with timing, and the six larger ones). At most
# 8 files come back from $OUT, so everything ends in one tarball.
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m validation.trainer_run --cases validation/cases_sft.yaml --out $R/h200-sft.jsonl \
  --stop-at $((T0 + 230)) > $R/sft.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_device_b.yaml --out $R/h200-snap-c.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 350)) --only 'qwen3-4b-inference-nf4-nodq-b16-p1024-n128' > $R/snap.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_device.yaml --out $R/h200-snap-c.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 350)) \
  --only 'llama-3.2-1b-inference-nf4-b16-p1024-n256' --only 'llama-3.2-3b-lora-b8-s4096-r64-gc' >> $R/snap.log 2>&1
python3 -m validation.trainer_run --cases validation/cases_trainer.yaml --out $R/h200-snap-c-trainer.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 350)) \
  --only 'qwen2.5-0.5b-trainer-full-amp_bf16-b4-g1-s1024-sgd-clip0' >> $R/snap.log 2>&1
ls $R/snaps/*.pickle >/dev/null 2>&1 && python3 -m validation.snapshot $R/snaps/*.pickle --out-dir $R/streams >> $R/snap.log 2>&1 && rm -rf $R/snaps
python3 -m validation.measure --cases validation/cases_h200_calibration.yaml --out $R/h200-speed-calibration.jsonl \
  --stop-at $((T0 + 480)) > $R/speed.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_speed_calibration.yaml --out $R/h200-speed-calibration-b.jsonl \
  --stop-at $((T0 + 560)) >> $R/speed.log 2>&1
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call-c.tgz r && rm -rf $R
ls -la $OUT

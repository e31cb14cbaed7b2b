#!/usr/bin/env bash
# Session 3 of 2026-12-01, call d (issue 12): the allocator histories of five training steps, the
# first part of validation/runs/h200-next-allocator.sh (its edge searches and speed cases wait for
# a later session: this session's device time goes to issue 13's families round). Repeats of
# measured cases, each already committed: three plain-loop (cases_h200_device.yaml) and two Trainer
# (cases_trainer.yaml). Everything ends in one tarball ($OUT/call.tgz, unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m validation.measure --cases validation/cases_h200_device.yaml --out $R/h200-snap-train.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 170)) \
  --only 'qwen2.5-0.5b-full-amp_bf16-b16-s2048-adamw_fused-gc' --only 'llama-3.2-3b-lora-b8-s4096-r64-gc' \
  --only 'llama-3.2-3b-full-bf16-b2-s2048-paged_adamw_8bit-gc' > $R/snap.log 2>&1
python3 -m validation.trainer_run --cases validation/cases_trainer.yaml --out $R/h200-snap-trainer.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 250)) \
  --only 'qwen2.5-0.5b-trainer-full-amp_bf16-b4-g1-s1024-sgd-clip0' --only 'qwen2.5-0.5b-trainer-full-bf16-b4-g1-s1024-adafactor' >> $R/snap.log 2>&1
ls $R/snaps/*.pickle >/dev/null 2>&1 && python3 -m validation.snapshot $R/snaps/*.pickle --out-dir $R/streams >> $R/snap.log 2>&1 && rm -rf $R/snaps
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

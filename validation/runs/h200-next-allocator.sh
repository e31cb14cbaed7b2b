#!/usr/bin/env bash
# Superseded on 2026-12-01 by calls d and e (validation/runs/h200-2026-12-01-{d,e}.sh), which ran its
# snapshots, one edge search and the speed cases. What is left is the 1B bf16 decode's two edge
# searches: rerun h200-2026-12-01-e.sh (its --skip-done starts at them). Kept as it was run.
# For the next H200 session (issue 12): allocator histories of training steps, for writing the
# training step's request stream as generate()'s was (estimator/stream.py), then the three edge
# searches left, then the ten speed-calibration cases left. Every case here is already written
# down and committed (repeats of measured cases, or cases_edge.yaml / the speed calibration); at
# most 8 files come back, so everything ends in one tarball.
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m validation.measure --cases validation/cases_h200_device.yaml --out $R/h200-snap-train.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 150)) \
  --only 'qwen2.5-0.5b-full-amp_bf16-b16-s2048-adamw_fused-gc' --only 'llama-3.2-3b-lora-b8-s4096-r64-gc' \
  --only 'llama-3.2-3b-full-bf16-b2-s2048-paged_adamw_8bit-gc' > $R/snap.log 2>&1
python3 -m validation.trainer_run --cases validation/cases_trainer.yaml --out $R/h200-snap-trainer.jsonl \
  --snapshot-dir $R/snaps --stop-at $((T0 + 220)) \
  --only 'qwen2.5-0.5b-trainer-full-amp_bf16-b4-g1-s1024-sgd-clip0' --only 'qwen2.5-0.5b-trainer-full-bf16-b4-g1-s1024-adafactor' >> $R/snap.log 2>&1
ls $R/snaps/*.pickle >/dev/null 2>&1 && python3 -m validation.snapshot $R/snaps/*.pickle --out-dir $R/streams >> $R/snap.log 2>&1 && rm -rf $R/snaps
cp validation/results_h200/h200-edge.jsonl $R/h200-edge.jsonl
python3 -m validation.edge --cases validation/cases_edge.yaml --out $R/h200-edge.jsonl --skip-done \
  --stop-at $((T0 + 430)) > $R/edge.log 2>&1
cp validation/results_h200/h200-speed-calibration.jsonl validation/results_h200/h200-speed-calibration-b.jsonl $R/
python3 -m validation.measure --cases validation/cases_h200_calibration.yaml --out $R/h200-speed-calibration.jsonl --profile-generate \
  --skip-done --stop-at $((T0 + 510)) > $R/speed.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_speed_calibration.yaml --out $R/h200-speed-calibration-b.jsonl --profile-generate \
  --skip-done --stop-at $((T0 + 565)) >> $R/speed.log 2>&1
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop\|^edge" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R

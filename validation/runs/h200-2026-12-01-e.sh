#!/usr/bin/env bash
# Session 3 of 2026-12-01, call e: the rest of validation/runs/h200-next-allocator.sh after call d
# took its snapshots: the three edge searches left (issue 12, validation/cases_edge.yaml, resumed
# with --skip-done), then the speed-calibration cases left (issue 16) with --profile-generate.
# Every case is already written down and committed. One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cp validation/results_h200/h200-edge.jsonl $R/h200-edge.jsonl
python3 -m validation.edge --cases validation/cases_edge.yaml --out $R/h200-edge.jsonl --skip-done \
  --stop-at $((T0 + 330)) > $R/edge.log 2>&1
cp validation/results_h200/h200-speed-calibration.jsonl validation/results_h200/h200-speed-calibration-b.jsonl $R/
python3 -m validation.measure --cases validation/cases_h200_calibration.yaml --out $R/h200-speed-calibration.jsonl --profile-generate \
  --skip-done --stop-at $((T0 + 450)) > $R/speed.log 2>&1
python3 -m validation.measure --cases validation/cases_h200_speed_calibration.yaml --out $R/h200-speed-calibration-b.jsonl --profile-generate \
  --skip-done --stop-at $((T0 + 520)) >> $R/speed.log 2>&1
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop\|^edge" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

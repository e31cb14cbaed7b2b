#!/usr/bin/env bash
# Issue 13's families round on the H200: the holdouts of validation/cases_h200_families.yaml (new
# model families, reduced-layer MoE configs, gpt-oss' dequantized bf16 path, Gemma 3 with its vision
# tower), SPEC's plain loop by `python -m validation.measure`, one process per case, PyTorch's
# default allocator. Every LoRA row carries PEFT's trainable count and the estimator's.
#
# Run from the repo root on the GPU box with .whl carried (peft 0.21.2, bitsandbytes 0.50.2):
#     run(command="bash validation/runs/h200-next-families.sh", carry=[".whl"], timeout_s=600)
# One call runs the cases in file order until --stop-at; what is left resumes in a second call:
# unpack this call's tarball as validation/incoming/families/ (so that
# validation/incoming/families/r/h200-families.jsonl exists) and run the same command again;
# --skip-done starts at the first case not measured. At most 8 files come back from $OUT, so
# everything ends in one tarball.
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PREV=validation/incoming/families/r/h200-families.jsonl
[ -f $PREV ] && cp $PREV $R/h200-families.jsonl
df -h /tmp | tail -1 > $R/families.log
# Checkpoints of up to ~28 GB (DeepSeek-V3, last) are built in /tmp/canirun and deleted after their
# cases. --stop-at starts nothing new in its last 60 s; a checkpoint build is not cut by it, so
# `timeout` ends the harness at T0+580 whatever it is doing (rows are appended one line per case, so
# a case cut there is simply not recorded) and the tarball is always written.
timeout -k 5 $((T0 + 580 - $(date +%s))) python3 -m validation.measure --cases validation/cases_h200_families.yaml \
  --out $R/h200-families.jsonl --skip-done --stop-at $((T0 + 560)) >> $R/families.log 2>&1
echo "rc=$? done in $(( $(date +%s) - T0 )) s" >> $R/families.log
grep -h "^ok\|^oom\|^error\|^stop\|^rc=" $R/families.log | tail -n 40
python3 -c "
import json
for line in open('$R/h200-families.jsonl'):
    r = json.loads(line)
    print(r['case'], r.get('status'), 'peft', r.get('params_trainable'), 'ours', r.get('estimator_params_trainable'))
" 2>/dev/null | tail -n 40
tar -C $OUT -czf $OUT/families.tgz r && rm -rf $R
ls -la $OUT

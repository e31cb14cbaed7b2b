#!/usr/bin/env bash
# Session of 2026-12-02, call b (issue 12): round h, TRL 1.16.0's SFTTrainer, 9 holdouts
# (validation/cases_sft_h.yaml), committed before this call ran, with trl, datasets, dill and
# multiprocess carried as wheels beside bitsandbytes and peft (validation/box_env.sh installs them).
# validation.trainer_run, one process per case, PyTorch's default allocator.
# One tarball: $OUT/call.tgz (unpack -> r/).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
source validation/box_env.sh
export HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
unset PYTORCH_CUDA_ALLOC_CONF
python3 -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)" > $R/sft-h.log 2>&1
python3 -m validation.trainer_run --cases validation/cases_sft_h.yaml --out $R/h200-sft-h.jsonl \
  --stop-at $((T0 + 540)) >> $R/sft-h.log 2>&1
echo "done in $(( $(date +%s) - T0 )) s"
grep -h "^ok\|^oom\|^error\|^stop\|^trl" $R/*.log | tail -n 40
tar -C $OUT -czf $OUT/call.tgz r && rm -rf $R
ls -la $OUT

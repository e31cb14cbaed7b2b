#!/usr/bin/env bash
# One device call on a GPU box: the SFTTrainer cases (validation.trainer_run on
# validation/cases_sft.yaml, TRL 1.16.0) into OUTDIR, within SECONDS (default 540).
#
#   ./validation/box_sft.sh "$OUT" [SECONDS]
#
# The box has torch, transformers, accelerate, pandas, pyarrow, xxhash, fsspec, aiohttp and
# requests but not trl, datasets, dill, multiprocess (nor bitsandbytes, peft, liger-kernel): the
# pinned wheels in .whl/ go to /tmp/site (validation/box_env.sh, as for box.sh). Before any case runs,
# datasets' and trl's own requirements are checked against what the box has (a mismatch is
# logged, not fatal: the wheels are installed without their dependencies).
#
# Resuming: no case starts when fewer than 60 s are left; a case cut short is not recorded. Rows
# from an earlier call travel with the tree as validation/results_trainer/h200-sft.jsonl (untracked
# files travel); this script copies it into OUTDIR first and runs with --skip-done.
set -u
OUT_DIR=${1:?usage: box_sft.sh OUTDIR [SECONDS]}
BUDGET_S=${2:-540}
STOP_AT=$(( $(date +%s) + BUDGET_S ))
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/box_sft.log"

source "$(dirname "$0")/box_env.sh"
export HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
# SPEC's device total is under PyTorch's default allocator.
unset PYTORCH_CUDA_ALLOC_CONF

src=validation/results_trainer/h200-sft.jsonl
if [ -f "$src" ] && [ ! -f "$OUT_DIR/h200-sft.jsonl" ]; then cp "$src" "$OUT_DIR/h200-sft.jsonl"; fi

{
  echo "== $(date -u +%FT%TZ) box_sft.sh, budget ${BUDGET_S}s"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || true
  python3 - <<'PY' 2>&1 | grep -v "kernels-community"
import importlib.metadata as md
from packaging.requirements import Requirement
for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "liger_kernel", "triton", "trl", "datasets",
             "dill", "multiprocess", "tokenizers", "pyarrow", "fsspec", "huggingface_hub", "xxhash", "pandas"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
for pkg in ("trl", "datasets"):
    for text in md.requires(pkg) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            print(f"WARNING {pkg} needs {req}: missing")
            continue
        if not req.specifier.contains(have, prereleases=True):
            print(f"WARNING {pkg} needs {req}: the box has {have}")
import trl, datasets  # noqa: E401  (fails loudly here rather than in every case)
from trl import SFTConfig, SFTTrainer  # noqa: F401
print("trl", trl.__version__, "datasets", datasets.__version__, "import ok")
PY
} 2>&1 | tee -a "$LOG"

echo "== sft cases" | tee -a "$LOG"
python3 -m validation.trainer_run --cases validation/cases_sft.yaml \
  --out "$OUT_DIR/h200-sft.jsonl" --skip-done --stop-at "$STOP_AT" 2>&1 | tee -a "$LOG"

echo "h200-sft.jsonl: $(cat "$OUT_DIR/h200-sft.jsonl" 2>/dev/null | wc -l) rows" | tee -a "$LOG"
echo "== left: $(python3 -m validation.trainer_run --cases validation/cases_sft.yaml --out "$OUT_DIR/h200-sft.jsonl" --skip-done --list | wc -l) sft" | tee -a "$LOG"

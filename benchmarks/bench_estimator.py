"""Estimator speed: a cold inventory build and a warm table of estimates (not a test).

    python benchmarks/bench_estimator.py

Cold: a fresh process builds the inventory of an 8B and a 70B config on the meta device, without
the prebuilt store (what a Hub model costs), and separately reports the import of torch and
transformers, which a process pays once. Warm: the 16 estimates of four jobs × four dtypes on an
inventory already built (what the app pays per widget change). Targets (issue 2, on the 2-core
machine): cold ≤ 3 s for 70B, warm table ≤ 20 ms.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers, accelerate
from transformers import AutoModelForCausalLM
t1 = time.perf_counter()
from estimator.inventory import build_inventory
from estimator.catalog import find_entry
config = find_entry(sys.argv[1]).config()
t2 = time.perf_counter()
inv = build_inventory(config)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t3 - t2, "params": inv.params_total}))
"""


def cold(repo: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", COLD, repo], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm_table(repo: str, repeats: int = 20) -> float:
    from estimator import Job, estimate, inventory_from_config
    from estimator.catalog import find_entry

    inv = inventory_from_config(find_entry(repo).config())
    jobs = []
    for w in ("fp32", "bf16", "int8", "nf4"):
        jobs.append(Job(mode="inference", weights=w))
    for p in ("amp_bf16", "bf16", "fp32", "amp_fp16"):
        jobs.append(Job(mode="full", precision=p))
    for b in ("bf16", "fp16", "fp32", "bf16"):
        jobs.append(Job(mode="lora", base_dtype=b))
    for q, dq in (("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)):
        jobs.append(Job(mode="qlora", quant=q, double_quant=dq))
    for job in jobs:
        estimate(inv, job)  # first touch
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for job in jobs:
            estimate(inv, job)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    for repo in ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.3-70B-Instruct"):
        c = cold(repo)
        print(f"cold {repo}: import torch+transformers {c['import_s']:.2f} s, meta build {c['build_s']:.2f} s ({c['params']:,} parameters)")
    for repo in ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.3-70B-Instruct"):
        print(f"warm 4 jobs × 4 dtypes on {repo}: {warm_table(repo) * 1000:.1f} ms (median of 20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

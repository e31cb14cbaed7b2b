"""Edge searches (issue 12): the largest batch, or at batch 1 the longest sequence, that runs on
this GPU, measured by bisection, one process per probe, under either allocator setting.

    python -m validation.edge --cases validation/cases_edge.yaml --out edge.jsonl [--skip-done] [--stop-at T]

Each search starts at the estimator's own boundary (`estimator.limits.largest_fitting` on this
GPU, from `gpu_db`), probes it and its neighbour, and bisects between the largest size that ran
and the smallest that failed until they are adjacent or `--max-probes` is spent. A probe is a case
of `validation.measure` (SPEC's plain loop or generate()) in its own process; it fails on CUDA's
out-of-memory and on any allocation failure inside a library (cuBLAS failing to create a handle
counts). Each row records every probe (size, status, peak allocated and reserved, device total, the
failure message), the boundary found, and the estimator's prediction.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from estimator import Job
from validation import measure
from validation.cases import Case, read_case_list

FIELDS = ("batch_size", "seq_len", "prompt_len")
ALLOCATION_FAILURES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_NOT_INITIALIZED", "cudaErrorMemoryAllocation")


@dataclass(frozen=True)
class EdgeCase:
    id: str
    model: str
    job: Job  # every field but the searched one
    field: str  # what is searched: batch_size, or seq_len / prompt_len at batch 1
    gpu: str  # the gpu_db name the prediction is made for
    holdout: bool = True


def load_edge_cases(path: str | Path) -> list[EdgeCase]:
    out, seen = [], set()
    for row in read_case_list(path):
        row = dict(row)
        field = row.pop("search")
        if field not in FIELDS:
            raise ValueError(f"{path}: search must be one of {', '.join(FIELDS)}; got {field!r}")
        model, gpu, holdout = row.pop("model"), row.pop("gpu", "H200 SXM 141GB"), bool(row.pop("holdout", True))
        case_id = row.pop("id", None)
        job = Job.from_dict(row)
        if case_id is None:
            alloc = "expandable" if job.expandable_segments else "default"
            case_id = f"edge-{model.split('/')[-1].lower()}-{job.mode.value}-{field}-{alloc}"
            if job.mode.value == "inference":
                case_id += f"-{job.weights.value}"
            elif job.gradient_checkpointing:
                case_id += "-gc"
        if case_id in seen:
            raise ValueError(f"{path}: duplicate edge case id {case_id}")
        seen.add(case_id)
        out.append(EdgeCase(case_id, model, job, field, gpu, holdout))
    return out


def predicted_boundary(case: EdgeCase, inv=None) -> int:
    """The estimator's largest fitting size on the case's GPU (one GPU, no strategy); `inv`: the
    model's inventory when the caller has built it."""
    import gpu_db
    from estimator import estimate, inventory_from_config
    from estimator.catalog import find_entry
    from estimator.fit import Strategy
    from estimator.limits import largest_fitting

    if inv is None:
        inv = inventory_from_config(find_entry(case.model).config())
    limit = largest_fitting(lambda j: estimate(inv, j), case.job, case.field, gpu_db.find_gpu(case.gpu), Strategy.SINGLE,
                            lower_bound_of=lambda j: estimate(inv, j, replay=False))
    return limit.value


def failed(row: dict) -> bool:
    if row.get("status") == "oom":
        return True
    message = str(row.get("error", ""))
    return row.get("status") != "ok" and any(word in message for word in ALLOCATION_FAILURES)


def search(case: EdgeCase, run_probe, start: int, max_probes: int = 7) -> dict:
    """Bisect the boundary with `run_probe(size) -> row`; returns the edge row (probes included).

    A probe that fails for a reason other than memory ends the search with that error."""
    probes: list[dict] = []
    ok_sizes: list[int] = []
    bad_sizes: list[int] = []

    def probe(size: int) -> bool | None:
        row = run_probe(size)
        probes.append({"size": size, "status": row.get("status"), "peak_allocated_bytes": row.get("peak_allocated_bytes"),
                       "peak_reserved_bytes": row.get("peak_reserved_bytes"), "device_total_bytes": row.get("device_total_bytes"),
                       "error": str(row.get("error", ""))[:500] or None})
        if row.get("status") == "ok":
            ok_sizes.append(size)
            return True
        if failed(row):
            bad_sizes.append(size)
            return False
        return None  # not a memory failure: stop

    size = max(start, 1)
    first = probe(size)
    if first is None:
        return _row(case, start, probes, None, None, "error")
    step = max(1, round(size * 0.05))
    while len(probes) < max_probes:  # find a bracket: ok below, failing above
        lo = max(ok_sizes, default=None)
        hi = min(bad_sizes, default=None)
        if lo is not None and hi is not None:
            break
        nxt = (lo + step) if hi is None else max(hi - step, 1)
        if hi is not None and hi == 1:
            break
        step *= 2
        if probe(nxt) is None:
            return _row(case, start, probes, max(ok_sizes, default=None), min(bad_sizes, default=None), "error")
    while len(probes) < max_probes:
        lo, hi = max(ok_sizes, default=None), min(bad_sizes, default=None)
        if lo is None or hi is None or hi - lo <= 1:
            break
        if probe((lo + hi) // 2) is None:
            break
    lo, hi = max(ok_sizes, default=None), min(bad_sizes, default=None)
    exact = lo is not None and hi is not None and hi - lo <= 1
    return _row(case, start, probes, lo, hi, "exact" if exact else "bracket")


def _row(case: EdgeCase, predicted: int, probes: list, largest_ok, smallest_failed, status: str) -> dict:
    return {"case": case.id, "model": case.model, "holdout": case.holdout, "job": case.job.to_dict(), "search": case.field,
            "gpu": case.gpu, "predicted": predicted, "largest_ok": largest_ok, "smallest_failed": smallest_failed,
            "status": status, "probes": probes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.edge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="validation/cases_edge.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", action="append", help="case id pattern (* wildcards)")
    parser.add_argument("--work", default="/tmp/canirun")
    parser.add_argument("--skip-done", action="store_true")
    parser.add_argument("--max-probes", type=int, default=7)
    parser.add_argument("--stop-at", type=float, help="unix time: start no probe within --reserve-s of it")
    parser.add_argument("--reserve-s", type=float, default=75.0)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    cases = load_edge_cases(args.cases)
    if args.only:
        cases = [c for c in cases if any(fnmatch.fnmatch(c.id, p) for p in args.only)]
    out = Path(args.out)
    done = set()
    if args.skip_done and out.exists():
        done = {json.loads(line)["case"] for line in out.read_text().splitlines() if line.strip()}
    cases = [c for c in cases if c.id not in done]
    if args.list:
        for c in cases:
            print(c.id)
        return 0
    work = Path(args.work)
    for case in cases:
        if args.stop_at and time.time() > args.stop_at - args.reserve_s:
            print(f"stop   --stop-at is near; --skip-done resumes at {case.id}", flush=True)
            break
        start = predicted_boundary(case)
        ckpt = measure._checkpoint(case.model, work)

        def run_probe(size: int, case=case, ckpt=ckpt) -> dict:
            if args.stop_at and time.time() > args.stop_at - args.reserve_s:
                return {"status": "error", "error": "stopped: --stop-at is near"}
            job = case.job.with_(**{case.field: size})
            probe_case = Case(id=f"{case.id}@{size}", model=case.model, job=job, holdout=case.holdout)
            timeout = 600.0 if not args.stop_at else max(30.0, args.stop_at - time.time() - 15)
            row = measure._in_subprocess(probe_case, ckpt, False, timeout)
            print(f"probe  {case.id} {case.field}={size}: {row.get('status')}", flush=True)
            return row

        row = search(case, run_probe, start, args.max_probes)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"edge   {case.id}: predicted {row['predicted']}, ran {row['largest_ok']}, failed {row['smallest_failed']} ({row['status']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

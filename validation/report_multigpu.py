"""Score the per-GPU estimate against the worst rank of each multi-GPU measurement.

    python -m validation.report_multigpu                      # validation/results_multigpu/*.jsonl
    python -m validation.report_multigpu results.jsonl ...

For every merged row of `python -m validation.multigpu` it runs `estimator.estimate` on the case's
job and `estimator.fit.per_gpu(result, Strategy(row["strategy"]), row["nproc"])`, and compares
both of SPEC's figures with the worst rank's: peak allocated (the largest
`torch.cuda.max_memory_allocated` of any GPU) and device total (the most any GPU's use grew, as
nvidia-smi sees it). Error = (estimate − measured) / measured. CPU dry-run rows, whose counters
read 0, and rows that did not complete are listed without an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from estimator import Job, estimate, inventory_from_config
from estimator.catalog import find_entry
from estimator.fit import Strategy, per_gpu

RESULTS_DIR = Path(__file__).resolve().parent / "results_multigpu"
GIB = 1024**3


@dataclass(frozen=True)
class MultiComparison:
    case: str
    strategy: str
    num_gpus: int
    status: str
    dry_run: bool
    measured_peak_bytes: int | None
    estimated_peak_bytes: int | None  # None: the estimator refused the job (see `note`)
    measured_device_bytes: int | None
    estimated_device_bytes: int | None
    note: str = ""

    @property
    def scored(self) -> bool:
        return self.status == "ok" and not self.dry_run

    @property
    def peak_error(self) -> float | None:
        return _err(self.estimated_peak_bytes, self.measured_peak_bytes) if self.scored else None

    @property
    def device_error(self) -> float | None:
        return _err(self.estimated_device_bytes, self.measured_device_bytes) if self.scored else None


def _err(estimated: int | None, measured: int | None) -> float | None:
    if estimated is None or not measured:
        return None
    return (estimated - measured) / measured


def compare(row: dict) -> MultiComparison:
    """One merged row against the estimator's per-GPU figures for its strategy and GPU count."""
    job = Job.from_dict(row["job"])
    entry = find_entry(row["model"])
    if entry is None:
        raise ValueError(f"{row['case']}: model {row['model']!r} is not in the catalog")
    n = int(row.get("num_gpus") or row["nproc"])
    try:
        figures = per_gpu(estimate(inventory_from_config(entry.config()), job), Strategy(row["strategy"]), n)
        estimated_peak, estimated_device, note = figures.peak_allocated_bytes, figures.device_total_bytes, ""
    except ValueError as err:  # e.g. LoRA targets the model lacks: the run failed on them too
        estimated_peak, estimated_device, note = None, None, f"not estimated: {err}"
    return MultiComparison(
        case=row["case"],
        strategy=row["strategy"],
        num_gpus=n,
        status=row.get("status", "error"),
        dry_run=bool(row.get("dry_run", False)),
        measured_peak_bytes=row.get("worst_rank_peak_allocated_bytes"),
        estimated_peak_bytes=estimated_peak,
        measured_device_bytes=row.get("worst_rank_device_total_bytes"),
        estimated_device_bytes=estimated_device,
        note=note or (row.get("error", "") if row.get("status") != "ok" else ""),
    )


def load_rows(paths: list[Path]) -> list[dict]:
    """Merged rows; a later line for the same case replaces an earlier one."""
    rows: dict[str, dict] = {}
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
            for key in ("case", "model", "job", "strategy", "nproc"):
                if key not in row:
                    raise ValueError(f"{path}:{number}: a multi-GPU result needs {key}")
            rows[row["case"]] = row
    return list(rows.values())


def _gib(value: int | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:+.1f}%"


def render(comparisons: list[MultiComparison]) -> str:
    if not comparisons:
        return (
            "No multi-GPU results yet: run `python -m validation.multigpu` on a multi-GPU box "
            "(validation/MULTIGPU.md) and point this at its output."
        )
    lines = [
        "Worst rank measured against the per-GPU estimate (GiB); error = (estimate − measured) / measured",
        "",
        "| case | strategy | GPUs | status | measured peak | estimated | error | measured device | estimated | error |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        status = c.status + (" (CPU dry run: counters read 0)" if c.dry_run else "")
        lines.append(
            f"| {c.case} | {c.strategy} | {c.num_gpus} | {status} | {_gib(c.measured_peak_bytes)} | "
            f"{_gib(c.estimated_peak_bytes)} | {_pct(c.peak_error)} | {_gib(c.measured_device_bytes)} | "
            f"{_gib(c.estimated_device_bytes)} | {_pct(c.device_error)} |"
        )
    notes = [c for c in comparisons if c.note]
    if notes:
        lines += [""] + [f"- {c.case}: {c.note[:300]}" for c in notes]
    scored = [c for c in comparisons if c.scored]
    if not scored:
        lines += ["", "No GPU measurement among these rows: nothing is scored."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.report_multigpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", help=f"merged JSON lines files (default: {RESULTS_DIR}/*.jsonl)")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.results] if args.results else sorted(RESULTS_DIR.glob("*.jsonl"))
    print(render([compare(row) for row in load_rows(paths)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Score the speed estimate (estimator/speed.py) and the peers' speed figures on the timed holdouts.

    python -m validation.report_speed          # prints the summary, writes validation/REPORT_SPEED.md

Holdouts are every timed row under `validation/results_trainer/` and `validation/results_h200/`
whose case is not in the speed calibration set (validation.speed_fit.calibration_ids): the 28
Trainer cases (timed before any speed model existed), and the rows measured later (device-total
round b, SFT, issue 13's families) as they land. Error is (estimate − measured) / measured, on
seconds: a training step (mean of the steps after the first), generate()'s prefill, and the mean
decode step (decode tokens/s is batch / that step, so its error is the step's, inverted).
The peers: gpu_poor's and llmfit's published formulas (validation/peers.py, sources there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gpu_db
from estimator import inventory_from_config
from estimator.catalog import find_entry
from estimator.speed import PER_GPU, REFERENCE, speed
from validation.peers import gpu_poor_speed, llmfit_speed
from validation.report import job_of, load_rows, summarize
from validation.speed_fit import calibration_ids

HERE = Path(__file__).resolve().parent
HOLDOUT_DIRS = (HERE / "results_trainer", HERE / "results_h200")
REPORT_PATH = HERE / "REPORT_SPEED.md"
# The holdout sets the issue names, by file; a set with no timed rows is "not measured yet".
EXPECTED_SETS = (
    ("Trainer holdouts (timed before the speed model)", "results_trainer/h200-trainer.jsonl"),
    ("device-total round b", "results_h200/h200-device-b.jsonl"),
    ("TRL SFTTrainer", "results_trainer/h200-sft*.jsonl"),
)
SPANS = ("training step", "prefill", "decode step")
PEERS = ("gpu_poor", "llmfit")


@dataclass(frozen=True)
class SpeedComparison:
    case: str
    source: str  # the results file
    span: str
    measured_s: float
    estimated_s: float
    peers: dict[str, float | None] = field(default_factory=dict)

    @property
    def error(self) -> float:
        return (self.estimated_s - self.measured_s) / self.measured_s

    def peer_error(self, name: str) -> float | None:
        value = self.peers.get(name)
        return None if value is None else (value - self.measured_s) / self.measured_s


def _rows_with_source(dirs) -> list[tuple[str, dict]]:
    out = []
    for d in dirs:
        for path in sorted(Path(d).glob("*.jsonl")):
            for row in load_rows_of(path):
                out.append((f"{Path(d).name}/{path.name}", row))
    return out


def load_rows_of(path: Path) -> list[dict]:
    """One file's rows, through report.load_rows's checks (a later line for a case replaces an earlier)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / path.name).write_text(path.read_text())
        return load_rows(Path(tmp))


def compare(source: str, row: dict) -> list[SpeedComparison]:
    if row.get("status") != "ok":
        return []
    entry = find_entry(row["model"])
    if entry is None:
        return []
    job = job_of(row)
    inv = inventory_from_config(entry.config())
    name = (row.get("gpu") or {}).get("name")
    gpu = gpu_db.find_gpu(name) if name else gpu_db.find_gpu(REFERENCE)
    ours = speed(inv, job, gpu)
    poor, fit = gpu_poor_speed(inv, job, gpu), llmfit_speed(inv, job, gpu)
    out = []
    if job.is_training and row.get("step_seconds"):
        out.append(SpeedComparison(row["case"], source, "training step", statistics.fmean(row["step_seconds"]), ours.step_seconds,
                                   {"gpu_poor": poor.step_seconds, "llmfit": fit.step_seconds}))
    if not job.is_training and row.get("prefill_seconds") is not None:
        out.append(SpeedComparison(row["case"], source, "prefill", float(row["prefill_seconds"]), ours.prefill_seconds,
                                   {"gpu_poor": poor.prefill_seconds, "llmfit": fit.prefill_seconds}))
    if not job.is_training and row.get("decode_token_seconds"):
        out.append(SpeedComparison(row["case"], source, "decode step", statistics.fmean(row["decode_token_seconds"]),
                                   ours.decode_step_seconds,
                                   {"gpu_poor": poor.decode_step_seconds, "llmfit": fit.decode_step_seconds}))
    return out


def holdout_comparisons(dirs=HOLDOUT_DIRS) -> list[SpeedComparison]:
    calibration = calibration_ids()
    out = []
    for source, row in _rows_with_source(dirs):
        if row["case"] in calibration:
            continue
        out.extend(compare(source, row))
    return out


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.0%}" if signed else f"{v:.0%}"


def _s(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def summary_table(comparisons: list[SpeedComparison]) -> list[str]:
    lines = ["| span | cases | this estimator, median / worst \\|error\\| | gpu_poor | llmfit |", "|---|---:|---|---|---|"]
    for span in SPANS:
        rows = [c for c in comparisons if c.span == span]
        if not rows:
            lines.append(f"| {span} | 0 | not measured yet | — | — |")
            continue
        n, med, worst = summarize([c.error for c in rows])
        cells = []
        for peer in PEERS:
            pn, pmed, pworst = summarize([c.peer_error(peer) for c in rows])
            cells.append(f"{_pct(pmed)} / {_pct(pworst)} ({pn})" if pn else "no figure")
        lines.append(f"| {span} | {n} | **{_pct(med)} / {_pct(worst)}** | {cells[0]} | {cells[1]} |")
    return lines


def render_markdown(comparisons: list[SpeedComparison], command: str) -> str:
    status = PER_GPU[REFERENCE].status
    lines = ["# Speed on the H200: estimated against measured (holdouts)", "",
             f"Written by `{command}`. The speed model's rates: {status}.", "",
             "Holdouts only: no row here was used to set a rate (`python -m validation.speed_fit` reads the "
             "calibration cases alone). Error = (estimate − measured) / measured, on seconds.", ""]
    lines += summary_table(comparisons)
    lines += ["", "## Sets", ""]
    sources = {c.source for c in comparisons}
    for title, pattern in EXPECTED_SETS:
        hits = sorted(s for s in sources if Path(s).match(pattern))
        n = len({c.case for c in comparisons if c.source in hits})
        lines.append(f"- {title} (`{pattern}`): " + (f"{n} timed cases" if n else "not measured yet"))
    others = sorted(s for s in sources if not any(Path(s).match(p) for _, p in EXPECTED_SETS))
    for s in others:
        lines.append(f"- `{s}`: {len({c.case for c in comparisons if c.source == s})} timed cases")
    lines += ["", "## Cases", "", "| case | span | measured | estimated | error | gpu_poor | error | llmfit | error |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        lines.append(f"| {c.case} | {c.span} | {_s(c.measured_s)} | {_s(c.estimated_s)} | {_pct(c.error, True)} | "
                     f"{_s(c.peers.get('gpu_poor'))} | {_pct(c.peer_error('gpu_poor'), True)} | "
                     f"{_s(c.peers.get('llmfit'))} | {_pct(c.peer_error('llmfit'), True)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.report_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; do not write REPORT_SPEED.md")
    args = parser.parse_args(argv)
    comparisons = holdout_comparisons()
    for line in summary_table(comparisons):
        print(line)
    if not args.no_write:
        REPORT_PATH.write_text(render_markdown(comparisons, "python -m validation.report_speed"))
        print(f"wrote {REPORT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

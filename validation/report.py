"""Score the estimator (and the peers) against the measured cases.

    python -m validation.report            # prints the summary, writes validation/REPORT.md and the plot

It reads every `validation/results/*.jsonl`, runs `estimator.estimate` on each measured case and
compares both figures of SPEC: peak allocated (`torch.cuda.max_memory_allocated`) and device total
(what nvidia-smi shows). The peers are scored against the device total, the figure they claim.
Error is (estimate − measured) / measured. Cases that ran out of memory on the 80 GB card are
listed apart: their measured figure is not a peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from estimator.inventory_types import JobRefused
from estimator import Job, estimate, inventory_from_config
from estimator.catalog import find_entry
from validation.peers import PEERS, peer_figures

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPORT_PATH = Path(__file__).resolve().parent / "REPORT.md"
PLOT_PATH = Path(__file__).resolve().parent / "accuracy.png"
DATA_PATH = Path(__file__).resolve().parent / "accuracy.json"  # what the app's accuracy page reads
H200_PATH = Path(__file__).resolve().parent / "REPORT_H200.md"
# The H200 sets: SPEC's plain loop (calibration reruns, device-total holdouts) and the Trainer's.
EDGE_PATH = Path(__file__).resolve().parent / "results_h200" / "h200-edge.jsonl"
H200_SETS = (
    ("plain loop: calibration reruns", Path(__file__).resolve().parent / "results_h200" / "h200-calibration.jsonl"),
    ("plain loop: device-total holdouts", Path(__file__).resolve().parent / "results_h200" / "h200-device.jsonl"),
    ("plain loop: device-total holdouts, round b", Path(__file__).resolve().parent / "results_h200" / "h200-device-b.jsonl"),
    ("plain loop: device-total holdouts, round c (MoE decodes)", Path(__file__).resolve().parent / "results_h200" / "h200-device-c.jsonl"),
    ("plain loop: device-total holdouts, round d (traced training steps)", Path(__file__).resolve().parent / "results_h200" / "h200-device-d.jsonl"),
    ("plain loop: QLoRA, round e", Path(__file__).resolve().parent / "results_h200" / "h200-device-e.jsonl"),
    ("plain loop: expandable segments, round f (holdouts)", Path(__file__).resolve().parent / "results_h200" / "h200-device-f.jsonl"),
    ("Trainer holdouts", Path(__file__).resolve().parent / "results_trainer" / "h200-trainer.jsonl"),
    ("Trainer: QLoRA, round e", Path(__file__).resolve().parent / "results_trainer" / "h200-trainer-e.jsonl"),
    ("Trainer and SFTTrainer: reference histories, round f (Liger, TRL; not holdouts)",
     Path(__file__).resolve().parent / "results_trainer" / "h200-references-f.jsonl"),
    ("TRL SFTTrainer holdouts", Path(__file__).resolve().parent / "results_trainer" / "h200-sft.jsonl"),
    ("plain loop: new families, round a (issue 13)", Path(__file__).resolve().parent / "results_h200" / "h200-families.jsonl"),
    ("plain loop: new families, round b (issue 13)", Path(__file__).resolve().parent / "results_h200" / "h200-families-b.jsonl"),
    ("plain loop: MoE training, round g (holdouts)", Path(__file__).resolve().parent / "results_h200" / "h200-moe-g.jsonl"),
    ("plain loop: decodes, round j (holdouts)", Path(__file__).resolve().parent / "results_h200" / "h200-device-j.jsonl"),
    ("TRL SFTTrainer: round h (holdouts)", Path(__file__).resolve().parent / "results_trainer" / "h200-sft-h.jsonl"),
)
# The sets whose table also shows the trainable-parameter counts, PEFT's against ours (issue 13).
TRAINABLE_SETS = ("plain loop: new families, round a (issue 13)", "plain loop: new families, round b (issue 13)",
                  "plain loop: MoE training, round g (holdouts)")
GIB = 1024**3


@dataclass(frozen=True)
class Comparison:
    case: str
    model: str
    mode: str
    holdout: bool
    status: str
    measured_peak: int | None
    estimated_peak: int | None  # None where the estimator refuses the job (`refused`)
    measured_device: int | None
    estimated_device: int | None
    peers: dict[str, int | None] = field(default_factory=dict)
    # Trainable parameters: PEFT's (or the Trainer's) count on the real model, as the harness
    # recorded it, and the estimator's. None where the row has no count.
    measured_trainable: int | None = None
    estimated_trainable: int | None = None
    # The estimator's refusal (its one-line reason), where it refuses the job instead of estimating it
    refused: str | None = None

    @property
    def trainable_equal(self) -> bool | None:
        """Whether our trainable-parameter count is PEFT's, on a training row that recorded one."""
        if self.mode == "inference" or self.measured_trainable is None or self.estimated_trainable is None:
            return None
        return self.measured_trainable == self.estimated_trainable

    @property
    def peak_error(self) -> float | None:
        return _err(self.estimated_peak, self.measured_peak) if self.status == "ok" and not self.refused else None

    @property
    def device_error(self) -> float | None:
        return _err(self.estimated_device, self.measured_device) if self.status == "ok" and not self.refused else None

    def peer_error(self, name: str) -> float | None:
        value = self.peers.get(name)
        if self.status != "ok" or value is None:
            return None
        return _err(value, self.measured_device)


def _err(estimate_bytes: int | None, measured: int | None) -> float | None:
    if estimate_bytes is None or not measured:
        return None
    return (estimate_bytes - measured) / measured


def load_rows(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every measured row; a later line for the same case replaces an earlier one."""
    rows: dict[str, dict] = {}
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
            if "case" not in row or ("job" not in row and "estimator_job" not in row) or "model" not in row:
                raise ValueError(f"{path}:{number}: a result needs case, model and job")
            rows[row["case"]] = row
    return list(rows.values())


def job_of(row: dict) -> Job:
    """The estimator's job for a measured row: SPEC's plain loop ("job"), or a Trainer run
    ("estimator_job", written by validation.trainer_run) estimated as the Trainer runs it."""
    if "job" in row:
        return Job.from_dict(row["job"])
    return Job.from_dict(dict(row["estimator_job"], trainer=True))


def compare(row: dict) -> Comparison:
    """Today's estimate of a measured row, from the very config its checkpoint was built from: the
    catalog's, with the row's `config_overrides` applied by the harness's own function.

    A row is estimated once per process (the report, the H200 report, the tight band's check and
    the accuracy page's data all compare the same rows; traced MoE steps take seconds each): the
    result depends only on the row and on the estimator's code and catalog, which do not change
    while a process runs."""
    return _compare(json.dumps(row, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _compare(row_json: str) -> Comparison:
    from validation.measure import case_config

    row = json.loads(row_json)
    job = job_of(row)
    entry = find_entry(row["model"])
    if entry is None:
        raise ValueError(f"{row['case']}: model {row['model']!r} is not in the catalog")
    try:
        config = case_config(row["model"], row.get("config_overrides"))
    except ValueError as err:
        raise ValueError(f"{row['case']}: {err}") from None
    inv = inventory_from_config(config)
    try:
        result = estimate(inv, job)
    except JobRefused as err:  # the estimator refuses the job (what PEFT refuses or cannot run)
        return Comparison(case=row["case"], model=row["model"], mode=job.mode.value, holdout=bool(row.get("holdout", False)),
                          status=row.get("status", "error"), measured_peak=row.get("peak_allocated_bytes"), estimated_peak=None,
                          measured_device=row.get("device_total_bytes"), estimated_device=None,
                          measured_trainable=row.get("params_trainable"), refused=str(err))
    peers = peer_figures(inv, job)
    return Comparison(
        case=row["case"],
        model=row["model"],
        mode=job.mode.value,
        holdout=bool(row.get("holdout", False)),
        status=row.get("status", "error"),
        measured_peak=row.get("peak_allocated_bytes"),
        estimated_peak=result.peak_allocated_bytes,
        measured_device=row.get("device_total_bytes"),
        estimated_device=result.device_total_bytes,
        peers={name: getattr(peers, name) for name in PEERS},
        measured_trainable=row.get("params_trainable"),
        estimated_trainable=result.params_trainable,
    )


def summarize(errors: list[float | None]) -> tuple[int, float | None, float | None]:
    """(count, median |error|, worst |error|) over the errors that exist."""
    values = [abs(e) for e in errors if e is not None]
    if not values:
        return 0, None, None
    return len(values), statistics.median(values), max(values)


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value * 100:+.1f}%" if signed else f"{value * 100:.1f}%"


def _gib(value: int | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def summary_rows(comparisons: list[Comparison]) -> list[dict]:
    """Median and worst |error| per job and overall, for us and each peer."""
    out = []
    groups = [("all", comparisons)]
    groups += [(mode, [c for c in comparisons if c.mode == mode]) for mode in ("inference", "full", "lora", "qlora")]
    groups += [("calibration", [c for c in comparisons if not c.holdout]), ("holdout", [c for c in comparisons if c.holdout])]
    for name, group in groups:
        ok = [c for c in group if c.status == "ok" and not c.refused]
        row = {"group": name, "cases": len(ok)}
        row["peak"] = summarize([c.peak_error for c in ok])
        row["device"] = summarize([c.device_error for c in ok])
        for peer in PEERS:
            row[peer] = summarize([c.peer_error(peer) for c in ok])
        out.append(row)
    return out


def render_markdown(comparisons: list[Comparison], command: str) -> str:
    ok = [c for c in comparisons if c.status == "ok" and not c.refused]
    failed = [c for c in comparisons if c.status != "ok" and not c.refused]
    lines = [
        "# Validation report",
        "",
        f"Generated by `{command}` from `validation/results/*.jsonl` ({len(comparisons)} cases, {len(ok)} measured to completion).",
        "Measured on an NVIDIA H100 80GB HBM3 (driver 580.159.04, torch 2.11.0+cu130, transformers 5.17.0,",
        "peft 0.21.2, accelerate 1.15.0, bitsandbytes 0.50.2) by `python -m validation.measure`.",
        "Error = (estimate − measured) / measured. Peers are scored against the measured device total.",
        "",
        "## Summary: median and worst |error|",
        "",
        "| group | cases | peak allocated (median / worst) | device total (median / worst) | can-it-run-llm | accelerate | gpu_poor |",
        "|---|---:|---|---|---|---|---|",
    ]
    for row in summary_rows(comparisons):
        def cell(stat):
            n, med, worst = stat
            return "—" if n == 0 else f"{_pct(med)} / {_pct(worst)}" + (f" (n={n})" if n != row["cases"] else "")

        lines.append(
            f"| {row['group']} | {row['cases']} | {cell(row['peak'])} | {cell(row['device'])} | "
            + " | ".join(cell(row[p]) for p in PEERS)
            + " |"
        )
    lines += [
        "",
        "## Every case (GiB)",
        "",
        "| case | set | measured peak | estimated | error | measured device | estimated | error | can-it-run-llm | accelerate | gpu_poor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in ok:
        lines.append(
            f"| {c.case} | {'holdout' if c.holdout else 'calibration'} | {_gib(c.measured_peak)} | {_gib(c.estimated_peak)} | "
            f"{_pct(c.peak_error, True)} | {_gib(c.measured_device)} | {_gib(c.estimated_device)} | {_pct(c.device_error, True)} | "
            + " | ".join(_pct(c.peer_error(p), True) for p in PEERS)
            + " |"
        )
    if failed:
        lines += [
            "",
            "## Cases that did not complete",
            "",
            "Out of memory on the 80 GB card: the estimator should say they do not fit.",
            "",
            "| case | status | estimated device total (GiB) | predicted not to fit on 79.6 GiB |",
            "|---|---|---:|---|",
        ]
        for c in failed:
            lines.append(f"| {c.case} | {c.status} | {_gib(c.estimated_device)} | {'yes' if c.estimated_device > 81559 * 1024**2 else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def edge_rows(path: Path = EDGE_PATH) -> list[dict]:
    """The edge searches (python -m validation.edge): today's estimator against the measured boundary.

    Each row gets `estimated` (today's largest fitting size: the search started from the estimate
    of the day it ran, kept as `predicted`), its error against the largest size that ran, and
    today's verdicts at the largest size that ran and at the smallest that failed."""
    if not path.exists():
        return []
    return [dict(row) for row in _edge_rows(Path(path).read_text())]


@functools.lru_cache(maxsize=None)
def _edge_rows(text: str) -> tuple[dict, ...]:
    """edge_rows of a file's text, once per process (each row bisects today's estimator)."""
    import gpu_db
    from estimator.fit import fit as fit_job
    from validation.edge import EdgeCase, predicted_boundary

    rows = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["case"]] = row
    out = []
    for row in rows.values():
        job = Job.from_dict(row["job"])
        case = EdgeCase(row["case"], row["model"], job, row["search"], row["gpu"])
        inv = inventory_from_config(find_entry(row["model"]).config())
        estimated = predicted_boundary(case, inv)
        ran, failed_at = row.get("largest_ok"), row.get("smallest_failed")
        error = (estimated - ran) / ran if ran else None
        gpu = gpu_db.find_gpu(row["gpu"])

        def verdict(size):
            if size is None:
                return None
            return fit_job(estimate(inv, replace(job, **{row["search"]: size})), gpu, num_gpus=1).verdict.value

        out.append({**row, "estimated": estimated, "error": error,
                    "verdict_ran": verdict(ran), "verdict_failed": verdict(failed_at)})
    return tuple(out)


def edge_ok(row: dict) -> bool:
    """Issue 12's bar for one search: the estimate within 3% of the boundary, or the boundary inside
    the tight band (the largest size that ran is called tight); and a size that failed never "fits"."""
    if row["error"] is None:
        return False
    never_fits = row["verdict_failed"] != "fits"
    return never_fits and (abs(row["error"]) <= 0.03 or row["verdict_ran"] == "tight")


def render_edges(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Edge searches (python -m validation.edge)", "",
             "The largest size that ran, bisected one process per probe, against today's estimator's largest fitting",
             "size (error = (estimated − measured) / measured; positive means the estimate would let a run fail), and",
             "today's verdicts at the largest size that ran and at the smallest that failed. The search started",
             "from the estimate of its day (\"at the run\").", "",
             "| search | allocator | estimated | at the run | ran | failed | error | verdict ran / failed | bar | probes |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        alloc = "expandable" if r["job"].get("expandable_segments") else "default"
        err = _pct(r["error"], True) if r["error"] is not None else "—"
        lines.append(f"| {r['case']} ({r['search']}) | {alloc} | {r['estimated']:,} | {r['predicted']:,} | "
                     f"{r['largest_ok'] or 0:,} | {r['smallest_failed'] or 0:,} | {err} | "
                     f"{r['verdict_ran']} / {r['verdict_failed']} | {'met' if edge_ok(r) else 'missed'} | {len(r['probes'])} |")
    met = sum(1 for r in rows if edge_ok(r))
    lines += ["", f"{met} of {len(rows)} meet issue 12's bar (within 3%, or the boundary inside the tight band, "
              "and no failed size called \"fits\")."]
    return lines


def render_h200(sets: list[tuple[str, list[Comparison]]], command: str) -> str:
    """The H200 report: each set's summary, then every case."""
    lines = [
        "# Validation report: H200",
        "",
        f"Generated by `{command}`. Measured on an NVIDIA H200 (driver 580.159.04, torch 2.11.0+cu130,",
        "transformers 5.17.0, accelerate 1.15.0, peft 0.21.2, bitsandbytes 0.50.2, liger-kernel 0.8.5).",
        "Plain-loop rows by `python -m validation.measure` (SPEC's step and generate()), Trainer rows by",
        "`python -m validation.trainer_run` (transformers.Trainer, max_steps=3), one process per case; device",
        "total is NVML's used memory over a baseline read before CUDA starts, under PyTorch's default allocator.",
        "Error = (estimate − measured) / measured.",
        "",
        "## Summary: median and worst |error|",
        "",
        "| set | cases | peak allocated (median / worst) | device total (median / worst) |",
        "|---|---:|---|---|",
    ]
    everything = [c for _, group in sets for c in group]
    for name, group in sets + [("all", everything)]:
        ok = [c for c in group if c.status == "ok" and not c.refused]
        if name != "all" and _mixed(group):  # a round with reference histories: its holdouts are scored
            ok, name = [c for c in ok if c.holdout], f"{name}, holdouts"
        peak, device = summarize([c.peak_error for c in ok]), summarize([c.device_error for c in ok])
        lines.append(f"| {name} | {len(ok)} | {_pct(peak[1])} / {_pct(peak[2])} | {_pct(device[1])} / {_pct(device[2])} |")
    for name, group in sets:
        refusals: list[str] = []
        trainable = name in TRAINABLE_SETS
        lines += ["", f"## {name} (GiB)", "",
                  "| case | measured peak | estimated | error | measured device | estimated | error |"
                  + (" trainable: PEFT / ours |" if trainable else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---|" if trainable else "")]
        for c in group:
            extra = f" {_trainable_cell(c)} |" if trainable else ""
            if _mixed(group) and not c.holdout:  # its rules were read off this history: not scored
                c = dataclasses.replace(c, case=f"{c.case} (reference)")
            if c.refused:  # the estimator refuses it; the row says whether the run failed too
                lines.append(f"| {c.case} | {c.status} | refused | | | refused | |{extra}")
                refusals.append(f"- {c.case} ({c.status} on the GPU): {c.refused}")
                continue
            if c.status != "ok":
                lines.append(f"| {c.case} | {c.status} | {_gib(c.estimated_peak)} | | | {_gib(c.estimated_device)} | |{extra}")
                continue
            lines.append(f"| {c.case} | {_gib(c.measured_peak)} | {_gib(c.estimated_peak)} | {_pct(c.peak_error, True)} | "
                         f"{_gib(c.measured_device)} | {_gib(c.estimated_device)} | {_pct(c.device_error, True)} |{extra}")
        if refusals:
            lines += ["", "Refused by the estimator:", *refusals]
        if trainable:
            checked = [c for c in group if c.trainable_equal is not None and c.mode in ("lora", "qlora")]
            equal = sum(1 for c in checked if c.trainable_equal)
            lines += ["", f"Trainable parameters on the LoRA and QLoRA rows: ours equal PEFT's on {equal} of {len(checked)}."]
    lines += render_edges(edge_rows())
    lines.append("")
    return "\n".join(lines)


def _mixed(group: list[Comparison]) -> bool:
    """Whether a set holds both holdouts and reference cases (a round whose references the
    estimator's rules were read off, beside its holdouts)."""
    return any(c.holdout for c in group) and not all(c.holdout for c in group)


def _trainable_cell(c: Comparison) -> str:
    """PEFT's count / ours, and whether they are equal; blank for inference."""
    if c.trainable_equal is None:
        return ""
    mark = "equal" if c.trainable_equal else f"**differ** ({c.estimated_trainable - c.measured_trainable:+,})"
    return f"{c.measured_trainable:,} / {c.estimated_trainable:,} {mark}"


def h200_sets() -> list[tuple[str, list[Comparison]]]:
    out = []
    for name, path in H200_SETS:
        if path.exists():
            rows = {}
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows[row["case"]] = row
            out.append((name, [compare(row) for row in rows.values()]))
    return out


def write_plot(comparisons: list[Comparison], path: Path = PLOT_PATH) -> Path:
    """Estimated against measured peak allocated, ours and the peers', as a PNG (plotly + kaleido)."""
    import plotly.graph_objects as go

    ok = [c for c in comparisons if c.status == "ok" and not c.refused]
    fig = go.Figure()
    top = max(max(c.measured_device or 0, c.estimated_device) for c in ok) / GIB * 1.1
    fig.add_trace(go.Scatter(x=[0.5, top], y=[0.5, top], mode="lines", name="exact", line=dict(color="gray", dash="dot")))
    fig.add_trace(
        go.Scatter(
            x=[c.measured_peak / GIB for c in ok],
            y=[c.estimated_peak / GIB for c in ok],
            mode="markers",
            name="this estimator (peak allocated)",
            marker=dict(size=8, color="#1f77b4"),
            text=[c.case for c in ok],
        )
    )
    colors = {"can_it_run_llm": "#d62728", "accelerate": "#ff7f0e", "gpu_poor": "#2ca02c"}
    for peer in PEERS:
        pts = [(c.measured_device / GIB, c.peers[peer] / GIB) for c in ok if c.peers.get(peer)]
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", name=f"{peer} (vs device total)",
                marker=dict(size=6, color=colors[peer], symbol="x"),
            )
        )
    fig.update_layout(
        title="Estimated vs measured GPU memory, H100 80GB (GiB, log scale)",
        xaxis=dict(title="measured (GiB)", type="log"),
        yaxis=dict(title="estimated (GiB)", type="log"),
        width=900,
        height=650,
        template="plotly_white",
    )
    fig.write_image(str(path))
    return path


def accuracy_data(comparisons: list[Comparison]) -> dict:
    """The report's figures as plain data, for the app's accuracy page: every comparison with its
    errors, the summary rows, and the peers' formulas as text (so the page needs no harness code)."""
    import inspect

    from validation import peers

    rows = []
    for c in comparisons:
        row = dataclasses.asdict(c)
        # The page shows memory; the trainable-count check is REPORT_H200's (TRAINABLE_SETS).
        row.pop("measured_trainable"), row.pop("estimated_trainable")
        row.update(peak_error=c.peak_error, device_error=c.device_error,
                   peer_errors={p: c.peer_error(p) for p in PEERS})
        rows.append(row)
    formulas = [{"name": fn.__name__, "doc": inspect.getdoc(fn)}
                for fn in (peers.can_it_run_llm, peers.accelerate_estimate, peers.gpu_poor, peers.automodel_params)]
    return {
        "comparisons": rows,
        "summary": summary_rows(comparisons),
        "peers": list(PEERS),
        "peers_doc": inspect.getdoc(peers),
        "peer_formulas": formulas,
        "gpu_poor_source": inspect.getsource(peers.gpu_poor),
        "command": "python -m validation.report",
    }


def write_data(comparisons: list[Comparison], path: Path = DATA_PATH) -> Path:
    path.write_text(json.dumps(accuracy_data(comparisons), indent=1, sort_keys=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS_DIR), help="folder of measured JSON lines")
    parser.add_argument("--out", default=str(REPORT_PATH), help="where to write the markdown report")
    parser.add_argument("--plot", default=str(PLOT_PATH), help="where to write the PNG plot ('' to skip)")
    parser.add_argument("--data", default=str(DATA_PATH), help="where to write the app's accuracy data as JSON ('' to skip)")
    parser.add_argument("--h200", default=str(H200_PATH), help="where to write the H200 report ('' to skip)")
    args = parser.parse_args(argv)
    comparisons = [compare(row) for row in load_rows(Path(args.results))]
    if not comparisons:
        print(f"no results in {args.results}", file=sys.stderr)
        return 2
    text = render_markdown(comparisons, "python -m validation.report")
    Path(args.out).write_text(text)
    if args.data:
        write_data(comparisons, Path(args.data))
    if args.h200:
        sets = h200_sets()
        Path(args.h200).write_text(render_h200(sets, "python -m validation.report"))
        for name, group in sets:
            ok = [c for c in group if c.status == "ok" and not c.refused]
            p, d = summarize([c.peak_error for c in ok]), summarize([c.device_error for c in ok])
            print(f"H200 {name:34s} n={len(ok):3d}  peak median {_pct(p[1]):>6s} worst {_pct(p[2]):>6s}   device median {_pct(d[1]):>6s} worst {_pct(d[2]):>6s}")
    for row in summary_rows(comparisons):
        n, med, worst = row["peak"]
        _, dmed, dworst = row["device"]
        peers = "  ".join(f"{p}={_pct(row[p][1])}" for p in PEERS)
        print(f"{row['group']:12s} n={n:3d}  peak median {_pct(med):>6s} worst {_pct(worst):>6s}   device median {_pct(dmed):>6s} worst {_pct(dworst):>6s}   peers(median): {peers}")
    if args.plot:
        try:
            write_plot(comparisons, Path(args.plot))
        except Exception as err:  # noqa: BLE001 - kaleido needs Chrome; the tables matter more than the picture
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            print(f"wrote {args.out}; skipped the plot, which needs kaleido and Chrome ({type(err).__name__}: {reason})")
        else:
            print(f"wrote {args.out} and {args.plot}")
    else:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

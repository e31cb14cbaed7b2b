"""Presentation: every way an answer is written out, in one place. SPEC's JSON object, the CLI's
text, the headline sentence (the CLI and the app say the same thing), the which-GPUs table, and the
breakdown as rows and CSV.

Nothing here computes memory: it formats `Estimate` and `Fit` objects. Sizes are shown in GiB
(1024³ bytes), and every table says so.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import re

from estimator.estimate import Estimate
from estimator.fit import MAX_GPUS, Fit, Verdict

GIB = 1024**3


_LONG_QUOTED = re.compile(r"'[^']{81,}'|\"[^\"]{81,}\"")
_LONG_WORD = re.compile(r"\S{201,}")
MAX_MESSAGE_CHARS = 900  # with "error: " in front, the line stays under 1,000 characters


def one_line(err: BaseException) -> str:
    """Messages from libraries can span lines; SPEC's bad-input contract is one line, and a short
    one: argparse echoes what it refuses, so a quoted value over 80 characters, or a word over 200,
    is cut (a 100 KB argument is not written back)."""
    text = " ".join(str(err).split())
    text = _LONG_QUOTED.sub(lambda m: f"{m[0][:61]}… ({len(m[0]) - 2:,} characters){m[0][0]}", text)
    text = _LONG_WORD.sub(lambda m: f"{m[0][:60]}… ({len(m[0]):,} characters)", text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


# -------------------------------------------------------------------------------------------------
# The answer for one GPU
# -------------------------------------------------------------------------------------------------
def headline(fit: Fit, num_gpus: int | None = None) -> tuple[str, str]:
    """(status, sentence): status is "fits", "tight", "needs" or "no"; the sentence is the answer in GiB.

    `num_gpus` is the count the user asked for, if any (else the fewest that fit are shown). A tight
    answer fits, with less headroom than the band, and says what makes it safe.
    """
    used = fit.per_gpu.needed_bytes / GIB  # with expandable segments, what it runs in (fit.EXPANDABLE_NOTE)
    cap = fit.capacity_bytes / GIB
    if fit.gpus_needed is None and num_gpus is None or fit.verdict is Verdict.CANNOT_RUN:
        if fit.verdict is Verdict.CANNOT_RUN:
            return "no", f"Does not run on {fit.gpu_name}: {fit.reason}"
        return "no", f"Does not fit on {fit.gpu_name} with {fit.strategy.value}, even on {MAX_GPUS} GPUs: {fit.reason}"
    if num_gpus is not None and num_gpus != fit.gpus_needed:
        needs = f"needs {fit.gpus_needed}" if fit.gpus_needed else f"no count up to {MAX_GPUS} fits"
        verdict = {"fits": "fits", "tight": "tight"}.get(fit.verdict.value, f"does not fit ({needs})")
        status = "needs" if not fit.fits else "tight" if fit.verdict is Verdict.TIGHT else "fits"
        return status, f"On {num_gpus} × {fit.gpu_name} with {fit.strategy.value}: {used:.1f} of {cap:.1f} GiB per GPU; {verdict}" + _tight(fit)
    if fit.gpus_needed == 1:
        return ("tight" if fit.verdict is Verdict.TIGHT else "fits"), f"Fits on 1 × {fit.gpu_name}: {used:.1f} of {cap:.1f} GiB" + _tight(fit)
    return "needs", (f"Needs {fit.gpus_needed} × {fit.gpu_name} with {fit.strategy.value}: {used:.1f} of {cap:.1f} GiB on the fullest GPU"
                     + _tight(fit))


def _tight(fit: Fit) -> str:
    if fit.verdict is not Verdict.TIGHT:
        return ""
    from estimator.calibration import TIGHT_BAND_FRACTION

    return (f" (tight: {fit.headroom_bytes / GIB:.1f} GiB of headroom, inside the {TIGHT_BAND_FRACTION:.0%} band the estimate's "
            "error can take; the suggestions say what makes it safe)")


def describe_fit(fit: Fit, num_gpus: int | None = None) -> list[str]:
    """The headline, the per-GPU breakdown when more than one GPU is involved, and the notes."""
    lines = [headline(fit, num_gpus)[1]]
    if fit.per_gpu.num_gpus > 1 or fit.gpus_needed != 1:
        lines.append(f"per GPU with {fit.per_gpu.num_gpus} GPUs (GiB):")
        for name, value in fit.per_gpu.breakdown.items():
            if value:
                lines.append(f"  {name.replace('_', ' '):24s}{value / GIB:8.2f}")
    lines.extend(f"note: {n}" for n in fit.notes)
    return lines


def suggestion_line(s, capacity_bytes: int) -> str:
    """"turn on gradient checkpointing: 15.9 of 24.0 GiB (--gradient-checkpointing)"."""
    each = " per GPU" if s.gpus > 1 else ""
    return f"{s.change}: {s.device_total_bytes / GIB:.1f} of {capacity_bytes / GIB:.1f} GiB{each} ({' '.join(s.options)})"


def fit_dict(fit: Fit) -> dict:
    """A `Fit` as JSON-able values (the `"fit"` object of SPEC's JSON)."""
    return {
        "gpu": fit.gpu_name,
        "capacity_bytes": fit.capacity_bytes,
        "strategy": fit.strategy.value,
        "gpus_needed": fit.gpus_needed,
        "per_gpu": {
            "num_gpus": fit.per_gpu.num_gpus,
            "peak_allocated_bytes": fit.per_gpu.peak_allocated_bytes,
            "device_total_bytes": fit.per_gpu.device_total_bytes,
            "needed_bytes": fit.per_gpu.needed_bytes,
            "breakdown": {c.value: v for c, v in fit.per_gpu.breakdown.items()},
        },
        "reason": fit.reason,
        "verdict": fit.verdict.value,
        "headroom_bytes": fit.headroom_bytes,
        "notes": list(fit.notes),
    }


# -------------------------------------------------------------------------------------------------
# Every GPU
# -------------------------------------------------------------------------------------------------
def _short_reason(f: Fit) -> str:
    """The reason in a table cell: its first sentence, without the GPU's name, at most 100 characters."""
    text = (f.reason or f"more than {MAX_GPUS} GPUs").removeprefix(f.gpu_name).strip()
    text = text.split(". ")[0]
    if f.verdict is Verdict.CANNOT_RUN and ":" in text:
        text = text.split(":")[0]  # "has no bf16", "cannot run this job"
    return text if len(text) <= 100 else text[:97] + "..."


def which_gpus_lines(fits: list[Fit], speeds: dict | None = None) -> list[str]:
    """One row per GPU; a GPU with no count says why (its platform cannot run the job, or no count fits).
    With `speeds` (GPU name → `Speed`), a tokens/s column: training tokens/s, or decode tokens/s."""
    width = max([len("GPU")] + [len(f.gpu_name) for f in fits])
    rate = f" {'tokens/s':>10s}" if speeds else ""
    lines = [f"{'GPU':{width}s} {'usable GiB':>10s} {'GPUs needed':>12s}{rate}  {'verdict':12s}  strategy"]
    for f in fits:
        count = str(f.gpus_needed) if f.gpus_needed is not None else "—"
        why = ""
        if f.gpus_needed is None:
            why = f"  {_short_reason(f)}"
        cell = ""
        if speeds:
            value = speed_rate(speeds.get(f.gpu_name)) if f.verdict is not Verdict.CANNOT_RUN else None
            cell = f" {value:10,.0f}" if value is not None else f" {'n/a':>10s}"
        lines.append(f"{f.gpu_name:{width}s} {f.capacity_bytes / GIB:10.1f} {count:>12s}{cell}  {f.verdict.value:12s}  {f.strategy.value}{why}")
    return lines


# -------------------------------------------------------------------------------------------------
# Speed (estimator/speed.py)
# -------------------------------------------------------------------------------------------------
def speed_rate(s) -> float | None:
    """The one rate a list sorts by: training tokens/s, or decode tokens/s (all sequences)."""
    if s is None:
        return None
    return s.tokens_per_second if s.tokens_per_second is not None else s.decode_tokens_per_second


def sort_by_speed(fits: list[Fit], speeds: dict) -> list[Fit]:
    """Fastest first among the GPUs that run the job; those with no figure, or that cannot run it, last."""
    def key(f: Fit):
        rate = speed_rate(speeds.get(f.gpu_name)) if f.verdict is not Verdict.CANNOT_RUN else None
        return (rate is None, -(rate or 0.0), f.gpus_needed is None, f.gpu_name.lower())
    return sorted(fits, key=key)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def speed_lines(s, job, gpus: int = 1) -> list[str]:
    """The speed block of the CLI's text (and the app's): per GPU, with the constants' status."""
    lines = [f"speed on one {s.gpu} (estimated):"]
    if s.step_seconds is not None:
        per_step = job.batch_size * job.seq_len * job.gradient_accumulation_steps
        lines.append(f"  {'step':24s}{_duration(s.step_seconds):>12s}   ({per_step:,} tokens: batch x sequence x accumulation)")
        lines.append(f"  {'training tokens/s':24s}{s.tokens_per_second:12,.0f}")
    else:
        lines.append(f"  {'prefill':24s}{_duration(s.prefill_seconds):>12s}   ({job.batch_size} x {job.prompt_len:,} prompt tokens)")
        lines.append(f"  {'decode tokens/s':24s}{s.decode_tokens_per_second:12,.1f}   "
                     f"({s.decode_tokens_per_second / job.batch_size:,.1f} per sequence; one step {_duration(s.decode_step_seconds)})")
        lines.append(f"  {'one generate() call':24s}{_duration(s.generate_seconds):>12s}")
    if s.gpu_hours is not None:
        what = "training tokens" if s.step_seconds is not None else "generated tokens"
        lines.append(f"  {'GPU-hours':24s}{s.gpu_hours:12,.2f}   (for {s.tokens:,} {what})")
    if s.cost is not None:
        lines.append(f"  {'cost':24s}{s.cost:12,.2f}   (GPU-hours x the price given)")
    if not s.constants_status.startswith("fitted"):
        lines.append("  (the speed model's rates are priors, not fitted on measured steps yet)")
    if gpus > 1:
        lines.append("  (speed is one GPU's; multi-GPU speed is not modelled)")
    return lines


def speed_notes(s, gpus: int = 1) -> list[str]:
    notes = []
    if s is not None and not s.constants_status.startswith("fitted"):
        notes.append("speed: the rates (efficiencies and overheads) are priors, not fitted on measured steps yet")
    if s is not None and gpus > 1:
        notes.append("speed is one GPU's running the job (its per-device batch); multi-GPU speed is not modelled")
    return notes


# -------------------------------------------------------------------------------------------------
# SPEC's JSON object and the CLI's text
# -------------------------------------------------------------------------------------------------
def json_object(name: str, origin: str, url: str, result: Estimate, fit: Fit | None = None,
                notes=(), which: list[Fit] | None = None, speed=None, speeds: dict | None = None) -> dict:
    """SPEC's JSON object (the CLI's --json, the app's download): the estimate, where the model came
    from, and `gpus_needed` (None without a GPU, and for the which-GPUs list). With a GPU, SPEC's speed
    keys that apply (`Speed.to_dict`): top level for one GPU, per GPU in the which-GPUs list."""
    out = result.to_dict()
    out["model"] = name
    out["source"] = {"origin": origin, "url": url}
    out["notes"] = list(notes) + [n for n in out["notes"] if n not in notes]
    out["gpus_needed"] = fit.gpus_needed if fit is not None else None
    if fit is not None:
        out["verdict"] = fit.verdict.value  # SPEC: whenever --gpu is given
        out["headroom_bytes"] = fit.headroom_bytes
        out["fit"] = fit_dict(fit)
        if speed is not None:
            out.update(speed.to_dict())
            out["notes"] += [n for n in speed_notes(speed, fit.per_gpu.num_gpus) if n not in out["notes"]]
    elif which is not None:
        speeds = speeds or {}
        out["fit"] = {"gpus": [dict(fit_dict(f), **(speeds[f.gpu_name].to_dict() if speeds.get(f.gpu_name) else {}))
                               for f in which]}
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def render_text(name: str, source, result: Estimate, fit: Fit | None = None, which: list[Fit] | None = None,
                num_gpus: int | None = None, extra_notes=(), suggestions=None, speed=None, speeds=None) -> str:
    """The CLI's answer for people: the job, the breakdown at the peak, the fit, the notes."""
    job = result.job
    lines = [f"{name}  ({source.origin}: {source.source})"]
    shown = ", ".join(f"{k}={v}" for k, v in job.to_dict().items() if k in job.relevant_fields())
    lines.append(f"job: {shown}")
    lines.append(f"parameters: {result.params_total:,} total, {result.params_trainable:,} trainable")
    lines.append("")
    lines.append(f"memory at the peak ({result.peak_phase.replace('_', ' ')}), GiB = 1024^3 bytes:")
    for component, value in result.breakdown.items():
        if value:
            lines.append(f"  {component.replace('_', ' '):24s}{_gib(value)}")
    lines.append(f"  {'peak allocated':24s}{_gib(result.peak_allocated_bytes)}   (torch.cuda.max_memory_allocated)")
    lines.append(f"  {'device total':24s}{_gib(result.device_total_bytes)}   (what nvidia-smi shows)")
    if fit is not None:
        lines.append("")
        lines.extend(describe_fit(fit, num_gpus))
        if suggestions:
            lines.append("what would make it fit, cheapest first:")
            lines.extend("  " + suggestion_line(s, fit.capacity_bytes) for s in suggestions)
        elif suggestions is not None and fit.verdict is not Verdict.CANNOT_RUN and fit.gpus_needed != 1:
            lines.append("what would make it fit: no change of batch, loss, optimizer, mode, weights or GPU count found")
        if speed is not None:
            lines.append("")
            lines.extend(speed_lines(speed, job, fit.per_gpu.num_gpus))
    elif which is not None:
        lines.append("")
        lines.extend(which_gpus_lines(which, speeds))
        if speeds:
            lines.append("note: tokens/s is one GPU's estimate: training tokens/s, or decode tokens/s (all sequences) for inference")
    for note in tuple(source.notes) + tuple(extra_notes) + tuple(n for n in result.notes if n not in source.notes):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# The breakdown as rows, CSV and JSON (the app's downloads)
# -------------------------------------------------------------------------------------------------
def breakdown_rows(result: Estimate, fit: Fit | None) -> list[dict]:
    """One row per component: bytes and GiB for the whole job on one GPU, and per GPU under the fit."""
    rows = []
    per = fit.per_gpu.breakdown if fit is not None else {}
    for name, value in result.breakdown.items():
        row = {"component": name.value, "one_gpu_bytes": int(value), "one_gpu_gib": round(value / GIB, 4)}
        if fit is not None:
            row["per_gpu_bytes"] = int(per.get(name, 0))
            row["per_gpu_gib"] = round(per.get(name, 0) / GIB, 4)
        rows.append(row)
    total = {"component": "device_total", "one_gpu_bytes": result.device_total_bytes, "one_gpu_gib": round(result.device_total_bytes / GIB, 4)}
    peak = {"component": "peak_allocated", "one_gpu_bytes": result.peak_allocated_bytes, "one_gpu_gib": round(result.peak_allocated_bytes / GIB, 4)}
    if fit is not None:
        total.update(per_gpu_bytes=fit.per_gpu.device_total_bytes, per_gpu_gib=round(fit.per_gpu.device_total_bytes / GIB, 4))
        peak.update(per_gpu_bytes=fit.per_gpu.peak_allocated_bytes, per_gpu_gib=round(fit.per_gpu.peak_allocated_bytes / GIB, 4))
    return rows + [peak, total]


def breakdown_csv(result: Estimate, fit: Fit | None) -> str:
    rows = breakdown_rows(result, fit)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def export_json(name: str, origin: str, url: str, result: Estimate, fit: Fit | None) -> str:
    """The CLI's --json object (SPEC's keys), plus the model's source: no token, nothing secret."""
    return json.dumps(json_object(name, origin, url, result, fit), indent=2, default=_json_default)


def _json_default(value):
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# -------------------------------------------------------------------------------------------------
# Memory against batch size and sequence length (the app's plot and the CLI's --plot)
# -------------------------------------------------------------------------------------------------
def sweep_values(current: int, upper: int, start: int = 1) -> list[int]:
    """Powers of two from `start` to at least 4 × `current` (capped at `upper`), with `current` itself."""
    values, v = [], start
    while v <= min(upper, max(4 * current, 8 * start)):
        values.append(v)
        v *= 2
    return sorted(set(values) | {current})


def sweep(estimate_of, job, field: str, values: list[int]) -> list[tuple[int, int, int]]:
    """(value, peak allocated bytes, device total bytes) of `job` with `field` set to each value."""
    out = []
    for v in values:
        try:
            r = estimate_of(job.with_(**{field: v}))
        except ValueError:
            continue
        out.append((v, r.peak_allocated_bytes, r.device_total_bytes))
    return out


def memory_plot(estimate_of, job, capacity_bytes: int, gpu_name: str) -> dict:
    """A plotly figure (a plain dict): device total and peak allocated against the batch size and
    against the sequence (or prompt) length, each with the card's capacity as a dashed line and the
    tight band (calibration.TIGHT_BAND_FRACTION of the card) shaded below it."""
    from estimator.calibration import TIGHT_BAND_FRACTION
    from estimator.job import FIELD_LIMITS

    length = "seq_len" if job.is_training else "prompt_len"
    panels = [("batch_size", "batch size (sequences)", sweep_values(job.batch_size, FIELD_LIMITS["batch_size"])),
              (length, "sequence length (tokens)" if job.is_training else "prompt length (tokens)",
               sweep_values(getattr(job, length), FIELD_LIMITS[length], start=128))]
    traces, layout = [], {"height": 360, "margin": {"l": 10, "r": 10, "t": 40, "b": 10}, "template": "plotly_white",
                          "legend": {"orientation": "h", "y": -0.25}, "shapes": [], "annotations": []}
    for i, (field, title, values) in enumerate(panels, start=1):
        points = sweep(estimate_of, job, field, values)
        axis = "" if i == 1 else str(i)
        for name, index, dash in (("device total", 2, "solid"), ("peak allocated", 1, "dot")):
            traces.append({"type": "scatter", "mode": "lines+markers", "name": name, "legendgroup": name, "showlegend": i == 1,
                           "x": [p[0] for p in points], "y": [p[index] / GIB for p in points], "xaxis": f"x{axis}", "yaxis": f"y{axis}",
                           "line": {"dash": dash, "color": "#4c78a8" if index == 2 else "#f58518"},
                           "hovertemplate": f"{field}=%{{x}}: %{{y:.2f}} GiB<extra>{name}</extra>"})
        layout[f"xaxis{axis}"] = {"title": {"text": title}, "type": "log", "tickvals": values, "ticktext": [f"{v:,}" for v in values],
                                  "domain": [0.0, 0.47] if i == 1 else [0.53, 1.0], "anchor": f"y{axis}"}
        layout[f"yaxis{axis}"] = {"title": {"text": "GiB (1024³ bytes)"} if i == 1 else {}, "anchor": f"x{axis}", "rangemode": "tozero"}
        layout["shapes"].append({"type": "line", "xref": f"x{axis} domain", "x0": 0, "x1": 1, "yref": f"y{axis}",
                                 "y0": capacity_bytes / GIB, "y1": capacity_bytes / GIB, "line": {"dash": "dash", "color": "#555"}})
        layout["shapes"].append({"type": "rect", "xref": f"x{axis} domain", "x0": 0, "x1": 1, "yref": f"y{axis}",
                                 "y0": (1 - TIGHT_BAND_FRACTION) * capacity_bytes / GIB, "y1": capacity_bytes / GIB,
                                 "fillcolor": "#f58518", "opacity": 0.15, "line": {"width": 0}, "layer": "below"})
        layout["annotations"].append({"xref": f"x{axis} domain", "x": 0, "yref": f"y{axis}", "y": capacity_bytes / GIB,
                                      "text": f"{gpu_name}: {capacity_bytes / GIB:.1f} GiB (shaded: tight)", "showarrow": False,
                                      "xanchor": "left", "yanchor": "bottom"})
    layout["title"] = {"text": "Memory of this job against its batch and length (one GPU; the rest as set)"}
    return {"data": traces, "layout": layout}


def write_plot_html(figure: dict, path: str) -> None:
    """The figure as a self-contained HTML file (plotly writes it without a browser)."""
    try:
        import plotly.io as pio
    except ImportError:
        raise ValueError("--plot needs plotly: pip install .[app]") from None
    pio.write_html(figure, path, include_plotlyjs=True, full_html=True)

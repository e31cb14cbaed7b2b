"""Fit the speed model's rates (estimator/speed.py) on the speed calibration set, and only on it.

    python -m validation.speed_fit                 # prints the fit from the timed calibration rows
    python -m validation.speed_fit --write         # and rewrites calibration.yaml's speed block

The calibration set is the cases of `validation/cases_h200_calibration.yaml` (the 13 memory
calibration reruns) and `validation/cases_h200_speed_calibration.yaml` (six larger models), as
timed by `python -m validation.measure` into `validation/results_h200/*.jsonl`. Rows of any other
case are never read here: they are the speed holdouts (`python -m validation.report_speed`).

The model is linear in the inverse efficiencies and the overheads, so the fit is least squares on
relative error (each observation divided by its measured seconds, so a 5 ms decode step and a 5 s
training step count alike), constrained to non-negative values (every subset of the parameters is
tried and the best non-negative solution kept). In order, each step fixing what it found:

1. inference, unquantized rows: the prefill and the mean decode step of each case, three
   parameters (1 / compute efficiency, 1 / bandwidth efficiency, per-layer overhead);
2. the 4-bit rows' residuals: bitsandbytes 4-bit's per-call overhead (one parameter);
3. the LLM.int8 rows' residuals: its per-call overhead (one parameter);
4. training rows (the mean step after the first): three parameters (1 / compute efficiency,
   1 / bandwidth efficiency, per-layer-pass overhead), with the bitsandbytes overheads of 2–3.

A step with fewer observations than parameters keeps the prior values and says so. No constant is
per case or per model.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import gpu_db
from estimator import inventory_from_config
from estimator.catalog import find_entry
from estimator.regime import regime_of, sizes_of
from estimator.speed import (DATA_PATH, PER_GPU, REFERENCE, RATE_FIELDS, SpeedConstants, Work, inference_seconds,
                             inference_work, peaks, training_seconds, training_work)
from validation.cases import load_cases
from validation.report import job_of, load_rows

HERE = Path(__file__).resolve().parent
CALIBRATION_CASES = (HERE / "cases_h200_calibration.yaml", HERE / "cases_h200_speed_calibration.yaml")
RESULTS_DIR = HERE / "results_h200"


def calibration_ids(paths=CALIBRATION_CASES) -> set[str]:
    return {case.id for path in paths for case in load_cases(path)}


@dataclass(frozen=True)
class Observation:
    """One timed span of one case: what the model counts for it, and the measured seconds."""

    case: str
    kind: str  # "prefill", "decode" or "training"
    quantizer: str | None  # "4bit", "int8" or None
    work: Work
    peaks: object
    measured_s: float

    def features(self) -> np.ndarray:
        """Seconds at unit rates: FLOPs / peak, bytes / bandwidth, layer passes, bnb calls."""
        w, p = self.work, self.peaks
        return np.array([w.flops / p.flops_per_s, w.bytes / p.bytes_per_s, w.layer_passes, w.bnb_4bit_calls,
                         w.bnb_int8_calls])


def _gpu_of(row: dict):
    name = (row.get("gpu") or {}).get("name")
    return gpu_db.find_gpu(name) if name else gpu_db.find_gpu(REFERENCE)


def observations(rows: list[dict]) -> list[Observation]:
    """The timed spans of `rows` (rows without timing, or that did not finish, are skipped)."""
    out = []
    for row in rows:
        if row.get("status") != "ok":
            continue
        entry = find_entry(row["model"])
        if entry is None:
            continue
        job = job_of(row)
        inv = inventory_from_config(entry.config())
        regime, sizes = regime_of(job), sizes_of(job)
        p = peaks(_gpu_of(row), regime.compute)
        if p is None:
            continue
        q = None if regime.quantizer is None else ("4bit" if regime.quantizer.is_4bit else "int8")
        if regime.training:
            times = row.get("step_seconds") or []
            if not times:
                continue
            w = training_work(inv, regime, sizes)
            work = w.micro_batch.times(w.micro_batches) + w.optimizer_step
            out.append(Observation(row["case"], "training", q, work, p, statistics.fmean(times)))
            continue
        w = inference_work(inv, regime, sizes)
        if row.get("prefill_seconds") is not None:
            out.append(Observation(row["case"], "prefill", q, w.prefill, p, float(row["prefill_seconds"])))
        decode = row.get("decode_token_seconds") or []
        if decode:
            out.append(Observation(row["case"], "decode", q, w.decode_step, p, statistics.fmean(decode)))
    return out


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ‖a·x − b‖ with x ≥ 0, by trying every subset of the columns (there are at most three)."""
    n = a.shape[1]
    best, best_cost = np.zeros(n), float(np.sum(b**2))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            x_sub, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(x_sub < 0):
                continue
            x = np.zeros(n)
            x[list(cols)] = x_sub
            cost = float(np.sum((a @ x - b) ** 2))
            if cost < best_cost - 1e-15:
                best, best_cost = x, cost
    return best


def _relative(obs: list[Observation], columns: list[int], fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows divided by the measured time; `fixed` (per-feature known rates) subtracted first."""
    a = np.array([o.features()[columns] / o.measured_s for o in obs])
    b = np.array([1.0 - float(o.features() @ fixed) / o.measured_s for o in obs])
    return a, b


@dataclass(frozen=True)
class FitStep:
    name: str
    observations: int
    parameters: tuple[str, ...]
    values: tuple[float, ...] | None  # None: too few observations, the prior kept


def fit(obs: list[Observation], prior: SpeedConstants) -> tuple[SpeedConstants, list[FitStep]]:
    """The four steps of the module's docstring; returns the new constants and what each step did."""
    c = prior
    steps = []

    def solve(name, chosen, columns, fixed, params):
        if len(chosen) < len(columns):
            steps.append(FitStep(name, len(chosen), params, None))
            return None
        a, b = _relative(chosen, columns, fixed)
        x = nonnegative_lstsq(a, b)
        steps.append(FitStep(name, len(chosen), params, tuple(float(v) for v in x)))
        return x

    inference = [o for o in obs if o.kind != "training"]
    x = solve("inference (unquantized)", [o for o in inference if o.quantizer is None], [0, 1, 2], np.zeros(5),
              ("1/inference_compute_efficiency", "1/inference_bandwidth_efficiency", "inference_layer_overhead_s"))
    if x is not None and x[0] > 0 and x[1] > 0:
        c = replace(c, inference_compute_efficiency=1 / x[0], inference_bandwidth_efficiency=1 / x[1],
                    inference_layer_overhead_s=x[2])
    base = np.array([1 / c.inference_compute_efficiency, 1 / c.inference_bandwidth_efficiency,
                     c.inference_layer_overhead_s, 0.0, 0.0])
    x = solve("bitsandbytes 4-bit", [o for o in inference if o.quantizer == "4bit"], [3], base, ("bnb_4bit_call_overhead_s",))
    if x is not None:
        c = replace(c, bnb_4bit_call_overhead_s=x[0])
    x = solve("LLM.int8", [o for o in inference if o.quantizer == "int8"], [4], base, ("bnb_int8_call_overhead_s",))
    if x is not None:
        c = replace(c, bnb_int8_call_overhead_s=x[0])
    fixed = np.array([0.0, 0.0, 0.0, c.bnb_4bit_call_overhead_s, c.bnb_int8_call_overhead_s])
    x = solve("training", [o for o in obs if o.kind == "training"], [0, 1, 2], fixed,
              ("1/training_compute_efficiency", "1/training_bandwidth_efficiency", "training_layer_pass_overhead_s"))
    if x is not None and x[0] > 0 and x[1] > 0:
        c = replace(c, training_compute_efficiency=1 / x[0], training_bandwidth_efficiency=1 / x[1],
                    training_layer_pass_overhead_s=x[2])
    return c, steps


def predicted_s(o: Observation, c: SpeedConstants) -> float:
    return (training_seconds if o.kind == "training" else inference_seconds)(o.work, o.peaks, c)


def render_block(c: SpeedConstants, reference: str = REFERENCE, others: dict | None = None) -> str:
    """calibration.yaml's `speed:` block with `c` in it (other GPUs' blocks kept)."""
    blocks = dict(others if others is not None else PER_GPU)
    blocks[c.gpu] = c
    lines = ["speed:", f"  reference: {reference}", "  gpus:"]
    for name, k in blocks.items():
        lines.append(f"    {name}:")
        lines.append(f'      status: "{k.status}"')
        for field_name in RATE_FIELDS:
            lines.append(f"      {field_name}: {getattr(k, field_name):.6g}")
    return "\n".join(lines) + "\n"


def write_constants(c: SpeedConstants, path: Path = DATA_PATH) -> None:
    """Replace the `speed:` block (the file's last) with one holding `c`."""
    text = path.read_text()
    head, marker, _ = text.partition("\nspeed:\n")
    if not marker:
        raise ValueError(f"{path} has no speed block")
    path.write_text(head + "\n" + render_block(c))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.speed_fit", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of timed calibration rows (*.jsonl)")
    parser.add_argument("--gpu", default=REFERENCE, help="whose constants are fitted (rows must be of that GPU)")
    parser.add_argument("--write", action="store_true", help="rewrite calibration.yaml's speed block with the fit")
    args = parser.parse_args(argv)
    ids = calibration_ids()
    rows = [r for r in load_rows(args.results) if r["case"] in ids]
    gpu = gpu_db.find_gpu(args.gpu)
    rows = [r for r in rows if _gpu_of(r).name == gpu.name]
    obs = observations(rows)
    timed = sorted({o.case for o in obs})
    print(f"{len(ids)} calibration cases; {len(rows)} rows on {gpu.name} in {args.results}; {len(timed)} timed")
    if not obs:
        print("no timed calibration rows yet: nothing fitted (run validation.measure on the calibration cases first)")
        return 1
    prior = PER_GPU.get(gpu.name, replace(PER_GPU[REFERENCE], gpu=gpu.name))
    fitted, steps = fit(obs, prior)
    for s in steps:
        shown = "too few observations: prior kept" if s.values is None else ", ".join(
            f"{n} = {v:.4g}" for n, v in zip(s.parameters, s.values))
        print(f"  {s.name} ({s.observations} observations): {shown}")
    print(f"{'case':60s} {'span':9s} {'measured':>10s} {'fitted':>10s} {'error':>7s}")
    errors = []
    for o in obs:
        est = predicted_s(o, fitted)
        err = (est - o.measured_s) / o.measured_s
        errors.append(abs(err))
        print(f"{o.case[:60]:60s} {o.kind:9s} {o.measured_s:10.4f} {est:10.4f} {err:+7.1%}")
    print(f"calibration |error|: median {statistics.median(errors):.1%}, worst {max(errors):.1%} (in-sample)")
    for name in RATE_FIELDS:
        print(f"  {name}: {getattr(fitted, name):.6g}")
    if args.write:
        stamp = datetime.date.today().isoformat()
        fitted = replace(fitted, status=f"fitted: {len(timed)} timed calibration cases in {args.results.name}/, {stamp}")
        write_constants(fitted)
        print(f"wrote {DATA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The measured constants (estimator/calibration.yaml) against the committed rows they come from."""

from __future__ import annotations

import glob
import json
import statistics
from pathlib import Path

import pytest

from estimator import calibration

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024**2


def _rows(pattern: str) -> list[dict]:
    paths = sorted(glob.glob(str(ROOT / pattern)))
    assert paths, f"no results at {pattern}"
    return [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]


def _over_reserved_mib(rows: list[dict], mode: str, weights: str | None = None) -> list[float]:
    out = []
    for r in rows:
        job = r["job"]
        if r.get("status") != "ok" or job["mode"] != mode or (weights and job.get("weights") != weights):
            continue
        if mode != "inference" and "paged" in job["optimizer"]:
            continue  # paged state lives outside the allocator: its own term
        out.append((r["device_total_bytes"] - r["peak_reserved_bytes"]) / MIB)
    assert out, (mode, weights)
    return out


@pytest.mark.parametrize("gpu", sorted(calibration.PER_GPU))
def test_each_gpu_constant_is_what_its_rows_show(gpu):
    c = calibration.PER_GPU[gpu]
    rows = _rows(c.results)
    assert abs(statistics.median(r["context_bytes"] for r in rows) / MIB - c.cuda_context_bytes / MIB) <= 0.5
    assert {r["blas_workspace_allocated_bytes"] for r in rows} == {c.cublas_workspace_bytes}
    present = {r["job"].get("weights") for r in rows if r["job"]["mode"] == "inference"} - {"int8"}
    inference = [x for w in sorted(present) for x in _over_reserved_mib(rows, "inference", w)]
    fixed = (c.cuda_context_bytes + c.cublas_handles_bytes) / MIB
    assert min(inference) <= fixed <= max(inference)
    fp32 = statistics.median(_over_reserved_mib(rows, "inference", "fp32"))
    training = statistics.median(_over_reserved_mib(rows, "full") + _over_reserved_mib(rows, "lora"))
    assert abs(training - fp32 - c.autograd_thread_bytes / MIB) <= 2
    int8 = statistics.median(_over_reserved_mib(rows, "inference", "int8"))
    assert abs(int8 - fixed - c.bnb_int8_kernels_bytes / MIB) <= 4


def test_the_estimate_uses_the_reference_gpu():
    ref = calibration.PER_GPU[calibration.REFERENCE]
    assert calibration.CUDA_CONTEXT_BYTES == ref.cuda_context_bytes
    assert calibration.CUBLAS_HANDLES_BYTES == ref.cublas_handles_bytes
    assert {"H100 SXM 80GB", "H200 SXM 141GB"} <= set(calibration.PER_GPU)


def test_the_tight_band_is_the_cap_the_residuals_exceed():
    """The band's width (calibration.yaml): at most 5% of the card, fixed at that cap when the p90
    under-estimate of the non-edge cases (measured at >= 20% of their card) was above it, and not
    re-fixed since; today's p90, recomputed, is what calibration.yaml says, and the band covers it."""
    from validation import report

    assert 0 < calibration.TIGHT_BAND_FRACTION <= 0.05
    h100 = [(c, 85_017_493_504) for c in (report.compare(r) for r in report.load_rows())]
    sets = report.h200_sets()
    # the sets measured when the band was fixed (the families rounds and rounds c to j came later)
    later = ("new families", "round c", "round d", "round e", "round f", "round g", "round h", "round j")
    then = [name for name, _ in sets if not any(k in name for k in later)]

    def p90(names):
        h200 = [(c, 150_109_880_320) for name, group in sets if name in names for c in group]
        under = sorted(max(0.0, -c.device_error) for c, cap in h100 + h200
                       if c.status == "ok" and c.device_error is not None and c.measured_device >= 0.2 * cap)
        assert len(under) >= 40
        return under[int(0.9 * len(under))]

    # calibration.yaml quotes 8.1% when the band was fixed, 5.1% once training's step was traced,
    # 0.7% (1.0% with every set since) with QLoRA traced, and 0.5% over every set since MoE and
    # SFTTrainer steps are traced and inference peaks are the written stream's (2026-12-02): the
    # band was not re-fixed on them
    assert p90(then) == pytest.approx(0.007, abs=0.002)
    assert p90([name for name, _ in sets]) == pytest.approx(0.005, abs=0.002)
    assert p90([name for name, _ in sets]) <= calibration.TIGHT_BAND_FRACTION

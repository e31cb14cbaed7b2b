"""The solvers: the largest size that fits, found exactly with a logarithmic number of estimates."""

from __future__ import annotations

import pytest

import gpu_db
from estimator import Job, estimate
from estimator.catalog import find_entry
from estimator.fit import Strategy, fit
from estimator.inventory import inventory_from_config
from estimator.limits import largest_fitting, largest_true


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 7, 8, 9, 100, 1023, 1024, 5000])
@pytest.mark.parametrize("start", [1, 5, 64, 4096])
def test_largest_true_matches_brute_force(limit, start):
    calls = []

    def pred(n):
        calls.append(n)
        return n <= limit

    assert largest_true(pred, upper=5000, start=start) == min(limit, 5000)
    assert len(calls) <= 2 * 13 + 2  # logarithmic, not linear



def test_the_library_solver_finds_the_edge_and_refuses_other_fields():
    inv = inventory_from_config(find_entry("Qwen/Qwen3-0.6B").config())
    gpu = gpu_db.find_gpu("L4")
    job = Job(mode="full", gradient_checkpointing=True)
    limit = largest_fitting(lambda j: estimate(inv, j), job, "batch_size", gpu, Strategy.SINGLE)
    assert 0 < limit.value < limit.upper and limit.reason is None

    def fits(n: int) -> bool:
        return fit(estimate(inv, job.with_(batch_size=n)), gpu, Strategy.SINGLE).gpus_needed == 1

    assert fits(limit.value) and not fits(limit.value + 1)
    with pytest.raises(ValueError, match="can solve for"):
        largest_fitting(lambda j: estimate(inv, j), job, "lora_r", gpu, Strategy.SINGLE)

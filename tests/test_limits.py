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


@pytest.mark.parametrize("repo, job, field", [
    ("meta-llama/Llama-3.2-1B", Job(mode="inference", weights="nf4", batch_size=16, prompt_len=1024, new_tokens=64), "batch_size"),
    ("Qwen/Qwen3-4B", Job(mode="inference", weights="nf4", batch_size=4, prompt_len=512, new_tokens=32), "batch_size"),
    ("Qwen/Qwen3-4B", Job(mode="inference", batch_size=1, prompt_len=512, new_tokens=16), "prompt_len"),
    ("meta-llama/Llama-3.2-1B", Job(mode="lora", batch_size=2, seq_len=1024), "batch_size"),
])
def test_the_bounded_search_ends_on_an_edge_the_full_estimate_confirms(repo, job, field):
    """largest_fitting with a lower bound (estimate(..., replay=False)) searches the bound first and
    checks below it with the full estimate. Its answer fits, one more does not, and nothing above
    the bound's own answer fits. Where the device total is monotone that is the plain search's
    answer; the replayed allocator can make it jump where one more token needs a new segment
    (Qwen3-4B's config turns the KV cache off, and every step regrows its largest tensors), and
    then either search may stop at a different edge."""
    from estimator.catalog import find_entry

    inv = inventory_from_config(find_entry(repo).config())
    gpu = gpu_db.find_gpu("H100 SXM 80GB")
    cap = gpu.usable_by_default_bytes
    full = lambda n: estimate(inv, job.with_(**{field: n})).device_total_bytes  # noqa: E731
    bound = lambda n: estimate(inv, job.with_(**{field: n}), replay=False).device_total_bytes  # noqa: E731
    bounded = largest_fitting(lambda j: estimate(inv, j), job, field, gpu, Strategy.SINGLE,
                              lower_bound_of=lambda j: estimate(inv, j, replay=False)).value
    assert bounded > 0 and full(bounded) <= cap < full(bounded + 1)
    assert bound(bounded) <= full(bounded)
    plain = largest_fitting(lambda j: estimate(inv, j), job, field, gpu, Strategy.SINGLE).value
    if all(full(n) <= full(n + 1) for n in range(min(plain, bounded), max(plain, bounded) + 1)):
        assert bounded == plain

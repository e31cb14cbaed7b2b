"""The largest batch, or the longest sequence or prompt, that still fits a GPU: exact, by search.

Peak allocated memory is monotone in the batch and the lengths (more never needs less; tests check
it), so an exponential search from the job's own value, then bisection, finds the largest integer
that fits in O(log n) estimates. The device total is nearly so: the replayed caching allocator can
jump where one more token makes a tensor outgrow its cached segment, and then the search stops at
an edge where the size fits and the next one does not, as a real run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from estimator.estimate import Estimate
from estimator.fit import Strategy, fit, per_gpu, unsupported_reason
from estimator.job import FIELD_LIMITS, Job
from estimator.regime import regime_of

SOLVABLE = ("batch_size", "seq_len", "prompt_len", "new_tokens")


def largest_true(predicate: Callable[[int], bool], upper: int, start: int = 1, start_ok: bool | None = None) -> int:
    """The largest n in [1, upper] with predicate(n) true, for a predicate true up to some n and false after.

    Exponential search from `start` (doubling up while it holds, halving down while it fails),
    then bisection of the bracket: O(log n) calls. 0 when predicate(1) is false.
    """
    start = min(max(int(start), 1), upper)
    ok = predicate(start) if start_ok is None else start_ok
    if ok:
        lo, hi = start, None
        while hi is None:
            if lo >= upper:
                return upper
            probe = min(lo * 2, upper)
            if predicate(probe):
                lo = probe
            else:
                hi = probe
    else:
        hi, lo = start, None
        while lo is None:
            if hi <= 1:
                return 0
            probe = max(hi // 2, 1)
            if predicate(probe):
                lo = probe
            else:
                hi = probe
    while hi - lo > 1:  # predicate(lo) holds, predicate(hi) fails
        mid = (lo + hi) // 2
        if predicate(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Limit:
    """The largest value of one job field that still fits, with what it was solved for."""

    field: str
    value: int  # 0: not even 1 fits
    upper: int  # the search's cap (Job's own limit)
    gpu_name: str
    num_gpus: int
    strategy: Strategy
    reason: str | None = None  # why the GPU cannot run the job at all

    @property
    def at_cap(self) -> bool:
        return self.value >= self.upper


def fits_on(estimate_of: Callable[[Job], Estimate], gpu, strategy: Strategy, num_gpus: int) -> Callable[[Job], bool]:
    """Whether a job fits `num_gpus` × `gpu`: one GPU means no distributed wrapper (`fit` with
    `single`, since DDP's buckets would only add memory); more means the fullest GPU under `strategy`."""
    capacity = int(gpu.usable_by_default_bytes)
    if num_gpus == 1:
        return lambda j: fit(estimate_of(j), gpu, Strategy.SINGLE).gpus_needed == 1
    return lambda j: per_gpu(estimate_of(j), strategy, num_gpus).needed_bytes <= capacity


def largest_fitting(estimate_of: Callable[[Job], Estimate], job: Job, field_name: str, gpu, strategy: Strategy,
                    num_gpus: int = 1, lower_bound_of: Callable[[Job], Estimate] | None = None) -> Limit:
    """The largest `field_name` (one of SOLVABLE) with which `job` fits `num_gpus` × `gpu`.

    `estimate_of(job)` gives a job's estimate on the model (the app passes a cached one). Starts
    from the job's own value. A GPU that cannot run the job at all (bf16, bitsandbytes) gives 0 and
    `fit`'s reason.

    `lower_bound_of(job)`, when given, is a cheap estimate whose device total never exceeds
    `estimate_of`'s (`estimate(..., replay=False)`): on one GPU the search then runs on the bound
    and checks the few sizes below it with the full estimate (`_refine`); the answer is the same.
    """
    if field_name not in SOLVABLE:
        raise ValueError(f"can solve for {', '.join(SOLVABLE)}; not {field_name!r}")
    upper = FIELD_LIMITS[field_name]
    reason = unsupported_reason(regime_of(job), gpu)
    if reason:
        return Limit(field_name, 0, upper, gpu.name, num_gpus, strategy, reason)
    ok = fits_on(estimate_of, gpu, strategy, num_gpus)
    start = getattr(job, field_name)
    if lower_bound_of is None or num_gpus != 1:
        value = largest_true(lambda n: ok(job.with_(**{field_name: n})), upper, start=start)
    else:
        value = _refine(estimate_of, lower_bound_of, job, field_name, gpu, upper, start)
    return Limit(field_name, value, upper, gpu.name, num_gpus, strategy)


def _refine(estimate_of, lower_bound_of, job: Job, field_name: str, gpu, upper: int, start: int) -> int:
    """The largest size that fits one GPU, searched on the lower bound first: no size above the
    bound's answer fits. Below it the full estimate is bracketed (a size that fits, one that
    fails), and each next size to try is where the bound plus the allocator reserve, interpolated
    between the bracket's ends, meets the capacity, alternating with plain bisection so the bracket
    always halves at least every other step. The reserve changes slowly with the size, so this
    usually needs two or three full estimates."""
    capacity = int(gpu.usable_by_default_bytes)
    at = lambda n: job.with_(**{field_name: n})  # noqa: E731
    single = lambda e: fit(e, gpu, Strategy.SINGLE).gpus_needed == 1  # noqa: E731
    bound = lambda n: lower_bound_of(at(n))  # noqa: E731
    top = largest_true(lambda n: single(bound(n)), upper, start=start)
    if top == 0:
        return 0
    full = estimate_of(at(top))
    if single(full):
        return top
    if top == 1:
        return 0
    reserve = lambda n, e: e.device_total_bytes - bound(n).device_total_bytes  # noqa: E731
    hi, r_hi = top, reserve(top, full)
    guess = largest_true(lambda m: bound(m).device_total_bytes + r_hi <= capacity and single(bound(m)), top - 1, start=top - 1)
    lo = r_lo = None
    if guess >= 1:
        e = estimate_of(at(guess))
        if single(e):
            lo, r_lo = guess, reserve(guess, e)
        else:
            hi, r_hi = guess, reserve(guess, e)
    if lo is None:  # nothing known to fit: search the full estimate below the smallest failure
        return largest_true(lambda n: single(estimate_of(at(n))), hi - 1, start=max(min(guess, hi - 1), 1))
    interpolate = True
    while hi - lo > 1:
        if interpolate:
            slope = (r_hi - r_lo) / (hi - lo)
            m = largest_true(lambda n: bound(n).device_total_bytes + r_lo + slope * (n - lo) <= capacity, hi - 1, start=lo)
            m = min(max(m, lo + 1), hi - 1)
        else:
            m = (lo + hi) // 2
        interpolate = not interpolate
        e = estimate_of(at(m))
        if single(e):
            lo, r_lo = m, reserve(m, e)
        else:
            hi, r_hi = m, reserve(m, e)
    return lo

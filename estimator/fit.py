"""How many GPUs a job needs, strategy by strategy, with the per-GPU breakdown.

Each strategy rescales the single-GPU phases term by term (activations are never divided by data
parallelism) and every GPU pays the same device-total model as a single one: its allocator reserve
and its own CUDA context. The per-GPU device total must fit the memory the driver reports.

Training (every GPU runs its own micro-batch of B sequences):
- `ddp`: everything replicated, plus DDP's gradient buckets (torch DistributedDataParallel copies
  gradients into flat bucket buffers as large as the gradients, unless gradient_as_bucket_view).
- `zero1`: optimizer state sharded over n GPUs (DeepSpeed ZeRO-1, FSDP has no exact analogue).
- `zero2`: optimizer state and gradients sharded (DeepSpeed ZeRO-2: full weights replicated).
  FSDP's SHARD_GRAD_OP differs (fp32 shards, gathered half-precision weights held through the
  step), so it is not aliased here.
- `zero3`: parameters too (ZeRO-3, FSDP FULL_SHARD); each GPU all-gathers one decoder layer at a
  time, prefetching the next, and reduce-scatters that layer's gradients (computed in the compute
  dtype, copied to fp32 for the reduce): two layers of weights in the compute dtype plus one
  layer of gradients in both dtypes stay as gather buffers, and the root unit (embeddings, final
  norm, lm_head) stays gathered from forward to backward.
- `zero3_offload`: ZeRO-3 with optimizer state and its step on the CPU.

Inference:
- `single`: one GPU.
- `pipeline`: `device_map="auto"`: whole decoder layers per GPU in order, embeddings on the first,
  final norm and `lm_head` on the last, the KV cache following its layers, and each GPU keeping the
  working set of the layer it runs.
- `tensor_parallel`: weights and KV cache split by heads (n must divide the attention heads),
  activations replicated.

These multi-GPU figures are estimates that no multi-GPU measurement has checked yet.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from estimator import calibration
from estimator.dtypes import tensor_bytes
from estimator.estimate import ALLOCATED, Component, Estimate, Parts, device_overheads
from estimator.inventory_types import Inventory
from estimator.job import Job
from estimator.regime import Regime, Sizes, sizes_of
from estimator.terms import activations as act
from estimator.terms import kv_cache, logits, weights

MAX_GPUS = 64
GIB = 1024**3
MULTI_GPU_NOTE = "multi-GPU figures are estimates: no multi-GPU run has measured them yet"


class Strategy(str, enum.Enum):
    SINGLE = "single"
    DDP = "ddp"
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    ZERO3 = "zero3"
    ZERO3_OFFLOAD = "zero3_offload"
    PIPELINE = "pipeline"
    TENSOR_PARALLEL = "tensor_parallel"

    @property
    def for_training(self) -> bool:
        return self in (Strategy.DDP, Strategy.ZERO1, Strategy.ZERO2, Strategy.ZERO3, Strategy.ZERO3_OFFLOAD)


TRAINING_STRATEGIES = (Strategy.DDP, Strategy.ZERO1, Strategy.ZERO2, Strategy.ZERO3, Strategy.ZERO3_OFFLOAD)
INFERENCE_STRATEGIES = (Strategy.SINGLE, Strategy.PIPELINE, Strategy.TENSOR_PARALLEL)


def default_strategy(job: Job) -> Strategy:
    return Strategy.ZERO3 if job.is_training else Strategy.PIPELINE


def parse_strategy(text: str | None, job: Job) -> Strategy:
    if text is None:
        return default_strategy(job)
    aliases = {"fsdp": "zero3", "fsdp_full_shard": "zero3", "full_shard": "zero3", "deepspeed_zero2": "zero2",
               "device_map": "pipeline", "auto": "pipeline", "tp": "tensor_parallel", "offload": "zero3_offload"}
    key = aliases.get(text.strip().lower().replace("-", "_"), text.strip().lower().replace("-", "_"))
    try:
        strategy = Strategy(key)
    except ValueError:
        allowed = TRAINING_STRATEGIES if job.is_training else INFERENCE_STRATEGIES
        raise ValueError(f"unknown strategy {text!r}; for {job.mode.value} use one of {', '.join(s.value for s in allowed)}") from None
    if job.is_training and strategy not in TRAINING_STRATEGIES + (Strategy.SINGLE,):
        raise ValueError(f"{strategy.value} is an inference strategy; for training use {', '.join(s.value for s in TRAINING_STRATEGIES)}")
    if not job.is_training and strategy.for_training:
        raise ValueError(f"{strategy.value} is a training strategy; for inference use {', '.join(s.value for s in INFERENCE_STRATEGIES)}")
    return strategy


@dataclass(frozen=True)
class PerGPU:
    """The worst GPU's memory under a strategy at a given count."""

    num_gpus: int
    breakdown: dict[str, int]
    peak_allocated_bytes: int
    device_total_bytes: int
    # What the GPU must have for the job to run, where that is less than what it holds with room to
    # spare (expandable segments: near capacity the allocator unmaps its free pages); None: the same
    required_bytes: int | None = None

    @property
    def needed_bytes(self) -> int:
        """What the fullest GPU must have for the job to run: the verdict's and the counts' figure."""
        return self.device_total_bytes if self.required_bytes is None else self.required_bytes


EXPANDABLE_NOTE = ("with expandable segments the step holds {held:.1f} GiB where memory is plentiful (freed blocks "
                   "no later request fits stay mapped), but near a card's capacity the allocator unmaps them and "
                   "retries: it runs in {needed:.1f} GiB, the figure the verdict and the headroom use")


class Verdict(str, enum.Enum):
    """The answer for the GPU count shown (`Fit.per_gpu.num_gpus`), against what one process can
    allocate (`GPU.usable_by_default_bytes`): "tight" fits, but with less headroom than the band
    (calibration.TIGHT_BAND_FRACTION of the card), inside which the estimate's own error lies."""

    FITS = "fits"
    TIGHT = "tight"
    DOES_NOT_FIT = "does_not_fit"
    CANNOT_RUN = "cannot_run"  # the platform lacks something the job needs (bf16, bitsandbytes…)


def verdict_for(device_total_bytes: int, capacity_bytes: int) -> Verdict:
    headroom = capacity_bytes - device_total_bytes
    if headroom < 0:
        return Verdict.DOES_NOT_FIT
    if headroom < calibration.TIGHT_BAND_FRACTION * capacity_bytes:
        return Verdict.TIGHT
    return Verdict.FITS


@dataclass(frozen=True)
class Fit:
    gpu_name: str
    capacity_bytes: int
    strategy: Strategy
    gpus_needed: int | None  # None: no count up to MAX_GPUS fits
    per_gpu: PerGPU  # at gpus_needed, or at the count asked for, or at MAX_GPUS when nothing fits
    reason: str | None = None  # why nothing fits, or why the platform cannot run the job
    notes: tuple[str, ...] = field(default=())
    verdict: Verdict = Verdict.FITS  # at per_gpu's count

    @property
    def headroom_bytes(self) -> int:
        """Capacity less what the fullest GPU needs at per_gpu's count (its device total, or with
        expandable segments the smaller figure it runs in: `PerGPU.needed_bytes`); negative exactly
        when it does not fit."""
        return self.capacity_bytes - self.per_gpu.needed_bytes

    @property
    def fits(self) -> bool:
        """It runs at per_gpu's count: fits or tight."""
        return self.verdict in (Verdict.FITS, Verdict.TIGHT)


# -------------------------------------------------------------------------------------------------
# Per-GPU memory for a strategy and a count
# -------------------------------------------------------------------------------------------------
def _finish(result: Estimate, n: int, phases: list[Parts], paged: int) -> PerGPU:
    worst = max(phases, key=lambda row: sum(row.values()))
    # the single-GPU job's own peak: a traced training step stands for it, not for a strategy's share
    own = result.traced and n == 1 and worst == result.phase_parts.get(result.peak_phase)
    inv, regime, sizes = result.inventory, result.regime, sizes_of(result.job)
    reserve, context = device_overheads(inv, regime, sizes, worst, replay=result.replayed, traced=own)
    breakdown = {c: 0 for c in Component}
    breakdown.update({c: int(v) for c, v in worst.items()})
    breakdown.update({Component.CUDA_CONTEXT: context, Component.ALLOCATOR_RESERVE: reserve,
                      Component.PAGED_OPTIMIZER_STATE: int(paged)})
    total = sum(breakdown.values())
    required = None
    if regime.expandable_segments:
        least, _ = device_overheads(inv, regime, sizes, worst, replay=result.replayed, traced=own, constrained=True)
        required = total - reserve + least if least < reserve else None
    return PerGPU(n, breakdown, sum(worst.values()), total, required)


def _largest_layer_params(inv: Inventory) -> int:
    return max((inv.layer_param_numel(i) for i in range(inv.num_layers)), default=0)


def per_gpu(result: Estimate, strategy: Strategy, n: int) -> PerGPU:
    """The fullest GPU's memory when `result`'s job runs on `n` GPUs with `strategy`."""
    inv, regime = result.inventory, result.regime
    assert inv is not None
    paged = result.breakdown[Component.PAGED_OPTIMIZER_STATE]
    phases = [dict(row) for row in result.phase_parts.values()]
    if n == 1 and strategy in (Strategy.SINGLE, Strategy.PIPELINE, Strategy.TENSOR_PARALLEL):
        return _finish(result, 1, phases, paged)
    if strategy is Strategy.PIPELINE:
        return _pipeline(result, n)
    if strategy is Strategy.TENSOR_PARALLEL:
        return _tensor_parallel(result, n)
    shard = lambda v: int(math.ceil(v / n))  # noqa: E731
    compute_bytes, grad_bytes = int(regime.compute), int(regime.gradient)
    layer_params, root_params = inv.derived(("layer_and_root_params",), lambda: _layer_and_root_params(inv))
    out = []
    for row in phases:
        row = dict(row)
        grads_in_phase = row[Component.GRADIENTS] > 0
        if strategy is Strategy.DDP:
            row[Component.TEMPORARIES] += _grads_total(result)  # bucket buffers, allocated once, kept
        if strategy in (Strategy.ZERO1, Strategy.ZERO2, Strategy.ZERO3):
            row[Component.OPTIMIZER_STATE] = shard(row[Component.OPTIMIZER_STATE])
            if row[Component.TEMPORARIES] and grads_in_phase:
                row[Component.TEMPORARIES] = shard(row[Component.TEMPORARIES])
        if strategy is Strategy.ZERO3_OFFLOAD:
            row[Component.OPTIMIZER_STATE] = 0
            if grads_in_phase:
                row[Component.TEMPORARIES] = 0
        if strategy in (Strategy.ZERO2, Strategy.ZERO3, Strategy.ZERO3_OFFLOAD):
            row[Component.GRADIENTS] = shard(row[Component.GRADIENTS])
        if strategy in (Strategy.ZERO3, Strategy.ZERO3_OFFLOAD) and n > 1:
            # FSDP's mixed precision gathers each unit in the compute dtype and frees it after use,
            # so the whole-model autocast copies become the per-layer gather buffers below.
            row[Component.AUTOCAST_WEIGHT_COPIES] = 0
            row[Component.WEIGHTS] = shard(row[Component.WEIGHTS])
            row[Component.LORA_ADAPTERS] = shard(row[Component.LORA_ADAPTERS])
            layer_grads = layer_params * (compute_bytes + grad_bytes) if regime.base_trainable else 0
            row[Component.TEMPORARIES] += 2 * layer_params * compute_bytes + layer_grads + root_params * compute_bytes
        out.append(row)
    if strategy in (Strategy.ZERO1, Strategy.ZERO2, Strategy.ZERO3):
        paged = shard(paged)
    elif strategy is Strategy.ZERO3_OFFLOAD:
        paged = 0
    return _finish(result, n, out, paged)


def _layer_and_root_params(inv: Inventory) -> tuple[int, int]:
    """The largest decoder layer's parameters, and those outside the layer stack."""
    return _largest_layer_params(inv), sum(p.numel for p in inv.params if p.layer is None)


def _grads_total(result: Estimate) -> int:
    return max((row[Component.GRADIENTS] for row in result.phase_parts.values()), default=0)


def _pipeline(result: Estimate, n: int) -> PerGPU:
    """device_map="auto": contiguous layers per GPU; the fullest GPU decides."""
    inv = result.inventory
    assert inv is not None
    regime, sizes = result.regime, sizes_of(result.job)
    stages = inv.derived(("pipeline", regime, sizes), lambda: _pipeline_sizes(inv, regime, sizes))
    # Contiguous stages with the smallest possible fullest stage (the linear partition problem),
    # the embedding going with the first layers and the final norm and lm_head with the last.
    runs = [stages.first_bytes] + [w + kv for w, kv in zip(stages.layer_weight_bytes, stages.layer_kv_bytes)] + [stages.last_bytes]
    load = _min_max_partition(runs, n)
    kv_share = int(load * sum(stages.layer_kv_bytes) / max(sum(runs), 1))  # the fullest stage's KV, pro rata
    worst = {c: 0 for c in ALLOCATED}
    worst[Component.WEIGHTS] = load - kv_share
    worst[Component.KV_CACHE] = kv_share
    worst[Component.TEMPORARIES] = stages.working_bytes
    worst[Component.LOGITS] = stages.logits_bytes
    return _finish(result, n, [worst], 0)


def _min_max_partition(sizes: list[int], n: int) -> int:
    """The smallest possible largest sum when `sizes` is cut into at most n contiguous runs.

    Bisection on the answer with a greedy check; never grows with n, so fewer stages never look
    better than more.
    """
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        runs, current = 1, 0
        for size in sizes:
            if current + size > mid:
                runs += 1
                current = size
            else:
                current += size
        if runs <= n:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class PipelineStages:
    """What `device_map="auto"` places, in bytes: each decoder layer's weights and final KV cache;
    the embedding's share (first GPU) and the final norm's and lm_head's (last GPU; a tied lm_head
    is the embedding); one layer's working set; the logits."""

    layer_weight_bytes: tuple[int, ...]
    layer_kv_bytes: tuple[int, ...]
    first_bytes: int
    last_bytes: int
    working_bytes: int
    logits_bytes: int


def _pipeline_sizes(inv: Inventory, regime: Regime, sizes: Sizes) -> PipelineStages:
    placed = {p.name: p for p in weights.placements(inv, regime)}
    dtype = regime.compute
    per_layer_w = [0] * inv.num_layers
    first_w = inv.buffer_bytes
    last_w = 0
    for p in inv.params:
        size = placed[p.name].bytes if p.name in placed else 0
        if p.layer is not None and p.layer < inv.num_layers:
            per_layer_w[p.layer] += size
        elif p.kind == "embedding":
            first_w += size
        else:
            last_w += size
    final = sizes.final_len
    per_layer_kv = tuple(
        kv_cache.layer_cache_bytes(
            inv, sizes.batch, final if t == "full_attention" or not inv.sliding_window else min(final, inv.sliding_window), dtype
        )
        for t in inv.layer_types
    )
    working = act.prefill_working_bytes(inv, regime, sizes)
    head = logits.generate_logits_bytes(sizes.batch, inv.vocab_size, dtype)
    return PipelineStages(tuple(per_layer_w), per_layer_kv, first_w, last_w, working, head)


def _tensor_parallel(result: Estimate, n: int) -> PerGPU:
    inv = result.inventory
    assert inv is not None
    rows = []
    kv_split = min(n, inv.num_kv_heads)  # beyond the KV heads, KV heads are replicated
    norms = sum(tensor_bytes(p.numel, result.regime.compute) for p in inv.params if p.kind == "norm")
    for row in result.phase_parts.values():
        row = dict(row)
        row[Component.WEIGHTS] = int((row[Component.WEIGHTS] - norms) / n + norms)
        row[Component.KV_CACHE] = int(row[Component.KV_CACHE] / kv_split)
        rows.append(row)
    return _finish(result, n, rows, 0)


def _valid_counts(inv: Inventory, strategy: Strategy, gpu=None) -> list[int]:
    if strategy is Strategy.SINGLE or (gpu is not None and getattr(gpu, "unified_memory", False) and str(getattr(gpu.vendor, "value", gpu.vendor)) == "apple"):
        return [1]  # a Mac has one GPU, and no NCCL to spread a job over several
    if strategy is Strategy.TENSOR_PARALLEL:
        return [n for n in range(1, MAX_GPUS + 1) if inv.num_heads % n == 0]
    if strategy is Strategy.PIPELINE:
        return list(range(1, min(MAX_GPUS, max(inv.num_layers, 1)) + 1))
    return list(range(1, MAX_GPUS + 1))


def fit(result: Estimate, gpu, strategy: Strategy | None = None, num_gpus: int | None = None) -> Fit:
    """The smallest count of `gpu` that runs `result`'s job with `strategy`, and its per-GPU figures."""
    inv, job = result.inventory, result.job
    assert inv is not None
    strategy = strategy or default_strategy(job)
    capacity = int(gpu.usable_by_default_bytes)
    notes: list[str] = []
    reason = unsupported_reason(result.regime, gpu)
    if reason:
        shown = per_gpu(result, strategy, num_gpus or 1)
        return Fit(gpu.name, capacity, strategy, None, shown, reason, tuple(notes), verdict=Verdict.CANNOT_RUN)
    counts = _valid_counts(inv, strategy, gpu)
    needed, chosen = _smallest_fitting(result, strategy, counts, capacity)
    if needed is None:
        chosen = per_gpu(result, strategy, counts[-1])
        reason = _why_not(result, strategy, capacity, counts[-1], chosen)
    if num_gpus is not None:
        if num_gpus not in counts:
            raise ValueError(f"{strategy.value} cannot use {num_gpus} GPUs for this model (valid counts: {_ranges(counts)})")
        chosen = per_gpu(result, strategy, num_gpus)
    if (needed or 1) > 1 or (num_gpus or 1) > 1:
        notes.append(MULTI_GPU_NOTE)
    if chosen.required_bytes is not None:
        notes.append(EXPANDABLE_NOTE.format(held=chosen.device_total_bytes / GIB, needed=chosen.required_bytes / GIB))
    verdict = verdict_for(chosen.needed_bytes, capacity)
    return Fit(gpu.name, capacity, strategy, needed, chosen, reason, tuple(notes), verdict=verdict)


def _smallest_fitting(result: Estimate, strategy: Strategy, counts: list[int], capacity: int) -> tuple[int | None, PerGPU | None]:
    """Bisection over the valid counts: per-GPU memory never grows with more GPUs (sharding divides
    state, pipeline stages hold fewer layers, replication stays flat)."""
    def fits(n: int) -> PerGPU | None:
        figures = per_gpu(result, strategy, n)
        return figures if figures.needed_bytes <= capacity else None

    first = fits(counts[0])
    if first is not None:
        return counts[0], first
    if fits(counts[-1]) is None:
        return None, None
    lo, hi = 0, len(counts) - 1  # counts[lo] does not fit, counts[hi] does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(counts[mid]) is None:
            lo = mid
        else:
            hi = mid
    return counts[hi], per_gpu(result, strategy, counts[hi])


def _ranges(counts: list[int]) -> str:
    return ", ".join(str(c) for c in counts[:12]) + (" …" if len(counts) > 12 else "")


def _why_not(result: Estimate, strategy: Strategy, capacity: int, n: int, figures: PerGPU) -> str:
    inv = result.inventory
    assert inv is not None
    fixed = figures.breakdown[Component.CUDA_CONTEXT]
    if n == 1:
        return f"it needs {figures.needed_bytes / GIB:.1f} GiB and this GPU has {capacity / GIB:.1f} GiB; a single machine of this kind has one GPU"
    if strategy in (Strategy.PIPELINE,):
        return (
            f"split as finely as it goes ({n} GPUs), the fullest GPU still needs {figures.needed_bytes / GIB:.1f} GiB, "
            f"more than the {capacity / GIB:.1f} GiB this GPU has (one layer and its working set do not fit)"
        )
    acts = figures.breakdown[Component.ACTIVATIONS] + figures.breakdown[Component.LOGITS] + figures.breakdown[Component.TEMPORARIES]
    if acts + fixed > capacity:
        hint = "lower the batch size or sequence length"
        if not result.job.gradient_checkpointing:
            hint += ", or turn on gradient checkpointing"
        return f"activations and logits alone take {acts / GIB:.1f} GiB per GPU and no strategy divides them; {hint}"
    return f"with {n} GPUs the fullest still needs {figures.needed_bytes / GIB:.1f} GiB of {capacity / GIB:.1f} GiB"


def unsupported_reason(regime: Regime, gpu) -> str | None:
    """Why `gpu`'s platform cannot run a job of `regime` at all (no bf16, no bitsandbytes…), or None."""
    for feature in regime.features:
        ok, why = gpu.supports(feature)
        if ok:
            continue
        if feature == "bf16":
            return f"{gpu.name} has no bf16: {why.strip()} (use fp16 for this GPU)"
        return f"{gpu.name} cannot run this job: {why}"
    return None


def which_gpus(result: Estimate, gpus, strategy: Strategy | None = None, sort: str = "count") -> list[Fit]:
    """Every GPU with the count it needs; those that can't run the job last."""
    fits = [fit(result, gpu, strategy) for gpu in gpus]
    key = {
        "count": lambda f: (f.gpus_needed is None, f.gpus_needed or 0, -f.capacity_bytes),
        "memory": lambda f: (-f.capacity_bytes, f.gpu_name),
        "name": lambda f: f.gpu_name.lower(),
    }.get(sort)
    if sort == "bandwidth":
        by_name = {g.name: g for g in gpus}
        fits.sort(key=lambda f: -by_name[f.gpu_name].memory_bandwidth_gb_s)
    else:
        fits.sort(key=key)
    return fits

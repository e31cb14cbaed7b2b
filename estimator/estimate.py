"""`estimate(model, job)`: the memory of one job, term by term, at its peak.

The peak is a peak, not a sum: each term is alive only in some phases of the step, so the job is
modelled as a few phases, each the sum of what is alive in it, and the peak is the largest. For a
training step (SPEC: the maximum over three steps, so the optimizer state from step 1 is there):

- forward end: weights, optimizer state, every saved activation, autocast's weight copies and the
  loss's forward buffers;
- backward start: the same activations with the loss's backward buffers instead;
- backward through the top layer: the loss's buffers gone, lm_head's gradient made, the layer's
  gradients of its intermediates (and, with checkpointing, the layer recomputed);
- backward end: weights, optimizer state and every gradient (plus, for tied embeddings, the
  embedding's gradient before it is added to lm_head's);
- optimizer step: weights, state, gradients and the step's temporaries.

For inference (`generate`): the prefill, with the prompt's KV cache and one layer's working set,
and the last decoding step, with the full cache and the append's transient copy.

"weights" includes cuBLAS's workspace (calibration.CUBLAS_WORKSPACE_BYTES), which the first matmul
allocates through the caching allocator and keeps. Device total = the allocator's reserve over the
peak + the CUDA context and libraries + paged optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from estimator import calibration
from estimator.dtypes import tensor_bytes
from estimator.inventory import Inventory, inventory_from_config
from estimator.job import Attention, Job, Mode
from estimator.terms import activations as act
from estimator.terms import kv_cache, logits, optimizer, weights

# Component names, in display order. The breakdown always holds every one of them (0 when absent).
COMPONENTS = (
    "weights",
    "lora_adapters",
    "gradients",
    "optimizer_state",
    "activations",
    "autocast_weight_copies",
    "logits",
    "kv_cache",
    "temporaries",
    "cuda_context",
    "allocator_reserve",
    "paged_optimizer_state",
)
ALLOCATED = COMPONENTS[:9]


@dataclass(frozen=True)
class Estimate:
    job: Job
    params_total: int
    params_trainable: int
    peak_allocated_bytes: int
    device_total_bytes: int
    peak_phase: str
    breakdown: dict[str, int]  # at the peak phase; sums to device_total_bytes
    phases: dict[str, int]  # peak allocated bytes of each phase
    notes: tuple[str, ...] = field(default=())
    phase_components: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)  # allocator terms per phase
    inventory: Inventory | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "device_total_bytes": self.device_total_bytes,
            "breakdown": dict(self.breakdown),
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "job": self.job.to_dict(),
            "notes": list(self.notes),
        }


def _phase(**parts: int) -> dict[str, int]:
    row = {name: 0 for name in ALLOCATED}
    for name, value in parts.items():
        row[name] += int(value)
    return row


def estimate(model: Inventory | dict, job: Job) -> Estimate:
    """Estimate `job` on `model` (an `Inventory`, or a config.json dict)."""
    inv = model if isinstance(model, Inventory) else inventory_from_config(model)
    placed = weights.placements(inv, job)
    base = weights.weights_bytes(placed) + inv.buffer_bytes
    adapters = weights.adapter_bytes(placed)
    train = weights.trainable(placed)
    notes = list(inv.notes)
    if job.mode is Mode.INFERENCE:
        phases = _inference_phases(inv, job, base)
        paged = 0
    else:
        phases, paged = _training_phases(inv, job, placed, train, base, adapters)
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    at_peak = phases[peak_phase]
    peak_allocated = sum(at_peak.values())
    reserve, context = device_overheads(inv, job, at_peak)
    breakdown = dict(at_peak)
    breakdown.update(cuda_context=context, allocator_reserve=reserve, paged_optimizer_state=paged)
    breakdown = {name: int(breakdown.get(name, 0)) for name in COMPONENTS}
    return Estimate(
        job=job,
        params_total=inv.params_total,
        params_trainable=sum(p.numel for p in train),
        peak_allocated_bytes=peak_allocated,
        device_total_bytes=sum(breakdown.values()),
        peak_phase=peak_phase,
        breakdown=breakdown,
        phases={name: sum(row.values()) for name, row in phases.items()},
        notes=tuple(notes),
        phase_components={name: dict(row) for name, row in phases.items()},
        inventory=inv,
    )


def device_overheads(inv: Inventory, job: Job, at_peak: dict[str, int]) -> tuple[int, int]:
    """(allocator reserve, CUDA context and libraries) for a phase's allocator terms."""
    static = at_peak["weights"] + at_peak["lora_adapters"] + at_peak["optimizer_state"]
    reserve = _allocator_reserve(inv, job, sum(at_peak.values()) - static)
    context = calibration.CUDA_CONTEXT_BYTES + calibration.CUBLAS_HANDLES_BYTES
    if job.is_training:
        context += calibration.AUTOGRAD_THREAD_BYTES
    if job.mode is Mode.INFERENCE and job.weights.value == "int8":
        context += calibration.BNB_INT8_KERNELS_BYTES
    return reserve, context


def _allocator_reserve(inv: Inventory, job: Job, dynamic: int) -> int:
    """Reserved-but-free memory at the peak (the caching allocator keeps freed blocks cached).

    Training: the loss's backward needs two fp32 N×V blocks while only the fp32 upcast's block has
    been freed; the half-precision logits' block is too small to host the other, so it stays
    cached and a new segment is reserved. Inference: the KV cache's growth by concatenation leaves
    blocks too small to reuse (calibration.KV_CAT_FRAGMENTATION). Beyond that, freed temporaries of
    other sizes leave holes in proportion to the memory that comes and goes
    (calibration.ALLOCATOR_FRAGMENTATION).
    """
    hole = 0
    dtype = weights.compute_dtype(job)
    if job.is_training and dtype != "fp32":
        hole = tensor_bytes(job.batch_size * job.seq_len * inv.vocab_size, dtype)
    if job.mode is Mode.INFERENCE and inv.use_cache:
        final = kv_cache.cache_bytes(inv, job.batch_size, job.prompt_len + job.new_tokens - 1, dtype)
        hole = int(calibration.KV_CAT_FRAGMENTATION * final)
    return int(hole + calibration.ALLOCATOR_FRAGMENTATION * max(dynamic, 0))


# -------------------------------------------------------------------------------------------------
# Inference
# -------------------------------------------------------------------------------------------------
def _inference_phases(inv: Inventory, job: Job, base: int) -> dict[str, dict[str, int]]:
    dtype = weights.compute_dtype(job)
    b, p, n = job.batch_size, job.prompt_len, job.new_tokens
    last = logits.generate_logits_bytes(b, inv.vocab_size, dtype)
    if not inv.use_cache:  # no KV cache: every step is a prefill of the sequence so far
        step = _phase(weights=base + calibration.CUBLAS_WORKSPACE_BYTES, temporaries=act.prefill_working_bytes(inv, job, dtype), logits=last)
        return {"prefill": step}
    prefill = _phase(
        weights=base + calibration.CUBLAS_WORKSPACE_BYTES,
        kv_cache=kv_cache.cache_bytes(inv, b, p, dtype, after_prefill=True),
        temporaries=act.prefill_working_bytes(inv, job, dtype),
        logits=last,
    )
    final_len = p + n - 1
    decode = _phase(
        weights=base + calibration.CUBLAS_WORKSPACE_BYTES,
        kv_cache=kv_cache.cache_bytes(inv, b, final_len, dtype),
        temporaries=kv_cache.append_transient_bytes(inv, b, final_len, dtype)
        + act.decode_working_bytes(inv, job, dtype),
        logits=last,
    )
    return {"prefill": prefill, "decode": decode}


# -------------------------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------------------------
def _training_phases(inv, job, placed, train, base, adapters):
    targets = weights.lora_targets(inv, job)
    quantized = frozenset(p.name.removesuffix(".weight") for p in placed if p.kind == "quantized")
    tokens = job.batch_size * job.seq_len
    memo = inv.memo()
    key = ("optimizer", job.mode, job.precision, job.base_dtype, job.quant, job.double_quant, job.lora_r, job.lora_targets, job.optimizer)
    if key not in memo:
        shapes = {p.name: p.shape for p in inv.params}
        for lin in targets:
            shapes[lin.name + ".lora_A"] = (job.lora_r, lin.in_features)
            shapes[lin.name + ".lora_B"] = (lin.out_features, job.lora_r)
        memo[key] = (optimizer.optimizer_memory(job.optimizer, train, shapes), optimizer.gradient_bytes(train))
    opt, grads = memo[key]
    key = ("saved", job.mode, job.precision, job.base_dtype, job.quant, job.lora_r, job.lora_targets, job.lora_dropout, job.attn, job.seq_len)
    if key not in memo:
        memo[key] = act.saved_activations(inv, job, frozenset(lin.name for lin in targets), quantized)
    saved = memo[key]
    outside = saved.outside * tokens
    if job.gradient_checkpointing:
        layers = saved.checkpointed_input * tokens * inv.num_layers
        top = max(range(inv.num_layers), key=lambda i: saved.layers[i]) if inv.num_layers else 0
        recompute = saved.layers[top] * tokens + saved.layer_weight_copies_bytes[top] if inv.num_layers else 0
        copies_backward = saved.lm_head_copy_bytes
    else:
        layers = sum(saved.layers) * tokens
        recompute = 0
        copies_backward = saved.weight_copies_saved_bytes
    # autocast's cache holds every trainable fp32 weight's copy until the forward ends
    copies_forward = max(saved.weight_copies_cached_bytes, copies_backward)
    activations_total = int(layers + outside)

    logits_dtype = weights.compute_dtype(job)
    lg = logits.training_logits(tokens, inv.vocab_size, logits_dtype, inv.final_logit_softcapping is not None)

    static = dict(
        weights=base + calibration.CUBLAS_WORKSPACE_BYTES, lora_adapters=adapters, optimizer_state=opt.state_bytes
    )
    forward_end = _phase(
        **static, activations=activations_total, autocast_weight_copies=copies_forward, logits=lg.forward_peak_bytes
    )
    backward_start = _phase(
        **static, activations=activations_total, autocast_weight_copies=copies_backward, logits=lg.backward_peak_bytes
    )
    # The top layer's backward: the loss's buffers are gone, the lm_head's gradient exists, and the
    # layer's gradients of its intermediates (three of the widest, as the gated product's backward
    # holds them) are alive; with checkpointing, the recomputed layer's activations too.
    prefix = _lm_head_prefix(inv)
    lm_grads = sum(tensor_bytes(p.numel, p.dtype) for p in train if p.name.startswith(prefix))
    layer_backward = _phase(
        **static,
        activations=activations_total,
        autocast_weight_copies=copies_backward,
        gradients=lm_grads,
        temporaries=int(recompute + act.backward_working_bytes(inv, job) * tokens),
    )
    tied_transient = 0
    if inv.tied_embeddings:
        embed = [p for p in train if p.kind == "base" and p.name in _embedding_names(inv)]
        tied_transient = sum(tensor_bytes(p.numel, p.dtype) for p in embed)
    backward_end = _phase(**static, gradients=grads, temporaries=tied_transient)
    step = _phase(**static, gradients=grads, temporaries=opt.step_temp_bytes)
    phases = {
        "forward_end": forward_end,
        "backward_start": backward_start,
        "backward_layers": layer_backward,
        "backward_end": backward_end,
        "optimizer_step": step,
    }
    return phases, opt.paged_bytes


def _lm_head_prefix(inv: Inventory) -> str:
    lm = inv.lm_head
    return (lm.name + ".") if lm is not None else "\0"


def _embedding_names(inv: Inventory) -> set[str]:
    return {p.name for p in inv.params if p.kind == "embedding"}

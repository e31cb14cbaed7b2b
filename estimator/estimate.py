"""`estimate(model, job)`: the memory of one job, term by term, at its peak.

The peak is a peak, not a sum: each term is alive only in some phases of the step, so the job is
modelled as a few phases, each the sum of what is alive in it, and the peak is the largest. For a
training step (SPEC: the maximum over three steps, so the optimizer state from step 1 is there):

- forward end: weights, optimizer state, every saved activation, autocast's weight copies and the
  loss's forward buffers;
- backward start: the same activations with the loss's backward buffers instead;
- backward through the top layer: the loss's buffers gone, lm_head's gradient made, the layer's
  gradients of its intermediates (and, with checkpointing, the layer recomputed);
- the top layer's forward peak (LoRA's fp32 input casts and dropout outputs at an adapter's
  matmul): with checkpointing when the backward recomputes it ("recompute_layer"), without in the
  forward of the last layer ("forward_layers");
- backward end: weights, optimizer state and every gradient (plus, for tied embeddings, the
  embedding's gradient before it is added to lm_head's);
- optimizer step: weights, state, gradients and the step's temporaries.

With gradient accumulation (G > 1), micro-batches 2..G repeat the forward and backward phases with
every gradient alive ("accumulating_…"), and the Trainer's G micro-batches of inputs stay on the GPU.

For inference (`generate`): the prefill, with the prompt's KV cache and one layer's working set,
and the last decoding step, with the full cache and the append's transient copy.

"weights" includes cuBLAS's workspace (calibration.CUBLAS_WORKSPACE_BYTES), which the first matmul
allocates through the caching allocator and keeps. Device total = the allocator's reserve over the
peak + the CUDA context and libraries + paged optimizer state. Where a training step is traced
(estimator/train_trace.py), the reserve is what the traced step's replayed reserved peak adds over
the phase model's peak allocated.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

from estimator import calibration, stream, train_trace
from estimator.dtypes import FP32, tensor_bytes
from estimator.inventory import Inventory, inventory_from_config
from estimator.job import Attention, Job, Loss
from estimator.regime import Regime, Sizes, regime_of, sizes_of
from estimator.terms import activations as act
from estimator.terms import kv_cache, logits, optimizer, weights


class Component(enum.StrEnum):
    """One term of the breakdown, in display order. `allocated`: inside PyTorch's caching
    allocator, so it counts in `max_memory_allocated()`; the rest count in the device total only.
    A `Component` hashes and compares as its name, so `breakdown["weights"]` works too."""

    WEIGHTS = "weights"
    LORA_ADAPTERS = "lora_adapters"
    GRADIENTS = "gradients"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATIONS = "activations"
    AUTOCAST_WEIGHT_COPIES = "autocast_weight_copies"
    # lora.ParamWrapper's merged experts and routers (W + the adapter's update, rebuilt per forward)
    MERGED_ADAPTER_WEIGHTS = "merged_adapter_weights"
    LOGITS = "logits"
    KV_CACHE = "kv_cache"
    TEMPORARIES = "temporaries"
    CUDA_CONTEXT = "cuda_context"
    ALLOCATOR_RESERVE = "allocator_reserve"
    PAGED_OPTIMIZER_STATE = "paged_optimizer_state"

    @property
    def allocated(self) -> bool:
        return self not in (Component.CUDA_CONTEXT, Component.ALLOCATOR_RESERVE, Component.PAGED_OPTIMIZER_STATE)


ALLOCATED = tuple(c for c in Component if c.allocated)

Parts = dict[Component, int]  # allocated components and their bytes, every one present (0 when absent)


def parts(**values: int) -> Parts:
    """A row of allocated components from keyword values; the rest are 0."""
    row = {c: 0 for c in ALLOCATED}
    for name, value in values.items():
        row[Component(name)] += int(value)
    return row


@dataclass(frozen=True)
class Estimate:
    job: Job
    params_total: int
    params_trainable: int
    peak_allocated_bytes: int
    device_total_bytes: int
    peak_phase: str
    breakdown: dict[Component, int]  # at the peak phase, every component; sums to device_total_bytes
    phases: dict[str, int]  # peak allocated bytes of each phase
    notes: tuple[str, ...] = field(default=())
    phase_parts: dict[str, Parts] = field(default_factory=dict, repr=False)  # allocated components per phase
    inventory: Inventory | None = field(default=None, repr=False, compare=False)
    replayed: bool = field(default=True, repr=False)  # False: the replayed allocator reserve left out (a lower bound)
    traced: bool = field(default=True, repr=False)  # False: a training step's reserve by the formula, not its trace

    @functools.cached_property
    def regime(self) -> Regime:
        """The job's regime (derived once: fit's per-GPU searches read it many times)."""
        return regime_of(self.job)

    def to_dict(self) -> dict:
        return {
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "device_total_bytes": self.device_total_bytes,
            "breakdown": {c.value: v for c, v in self.breakdown.items()},
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "job": self.job.to_dict(),
            "notes": list(self.notes),
        }


def estimate(model: Inventory | dict, job: Job, *, replay: bool = True, trace: bool = True) -> Estimate:
    """Estimate `job` on `model` (an `Inventory`, or a config.json dict).

    `replay=False` leaves the replayed allocator reserve out (generate()'s written stream, or a
    traced training step: the costly part): a lower bound of the device total, which the solvers
    use to bracket their searches. `trace=False` sizes a training step's reserve by the formula
    (the logits' hole and a measured fraction) instead of tracing the step (estimator.train_trace,
    about a second per job): the app's overview figures use it, its headline does not."""
    inv = model if isinstance(model, Inventory) else inventory_from_config(model)
    job = attention_as_loaded(inv, job)
    regime, sizes = regime_of(job), sizes_of(job)
    placed = weights.placements(inv, regime)
    base = weights.weights_bytes(placed) + inv.buffer_bytes
    adapters = weights.adapter_bytes(placed)
    if regime.training:
        phases, paged = _training_phases(inv, regime, sizes, base, adapters)
    else:
        phases, paged = _inference_phases(inv, regime, sizes, base), 0
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    at_peak = phases[peak_phase]
    if not regime.training and replay:
        _stream_temporaries(inv, regime, sizes, at_peak)
    reserve, context = device_overheads(inv, regime, sizes, at_peak, replay=replay, traced=trace)
    breakdown = {c: 0 for c in Component}
    breakdown.update(at_peak)
    breakdown.update({Component.CUDA_CONTEXT: context, Component.ALLOCATOR_RESERVE: reserve,
                      Component.PAGED_OPTIMIZER_STATE: int(paged)})
    return Estimate(
        job=job,
        params_total=inv.params_total,
        params_trainable=sum(p.numel for p in weights.trainable(placed)),
        peak_allocated_bytes=sum(at_peak.values()),
        device_total_bytes=sum(breakdown.values()),
        peak_phase=peak_phase,
        breakdown=breakdown,
        phases={name: sum(row.values()) for name, row in phases.items()},
        notes=tuple(inv.notes) + _notes(inv, regime, sizes) + _trace_notes(inv, regime, sizes, replay and trace),
        phase_parts={name: dict(row) for name, row in phases.items()},
        inventory=inv,
        replayed=replay,
        traced=trace,
    )


def attention_as_loaded(inv: Inventory, job: Job) -> Job:
    """The job with the attention transformers actually runs for this model.

    transformers 5.17 tries sdpa, its default, and falls back to eager when the class does not
    support it (`PreTrainedModel.get_correct_attn_implementation`: `_sdpa_can_dispatch` raises for
    `_supports_sdpa = False`, as on GptOssForCausalLM, whose attention sinks SDPA cannot take).
    A `Job` cannot tell the default from an explicit sdpa, so the library follows the default's
    fallback; the CLI refuses an explicit `--attn sdpa` as transformers does (`sdpa_refusal`)."""
    if job.attn is Attention.SDPA and not inv.supports_sdpa:
        return job.with_(attn=Attention.EAGER)
    return job


def sdpa_refusal(inv: Inventory) -> str:
    """transformers' refusal of attn_implementation="sdpa" for a class without SDPA, on one line."""
    return (f"transformers 5.17 refuses attn_implementation=sdpa for {inv.architecture}: it does not support an attention "
            "implementation through torch.nn.functional.scaled_dot_product_attention yet (_supports_sdpa is False, "
            "PreTrainedModel._sdpa_can_dispatch); leave --attn out (transformers then runs eager) or give --attn eager")


def _mxfp4_notes(inv: Inventory, regime: Regime) -> list[str]:
    """Which MXFP4 path is estimated, and what the other one needs (see Job.mxfp4)."""
    if inv.quant_method != "mxfp4" or not inv.prequantized:
        return []
    if regime.training:
        return ["MXFP4 cannot be trained as stored (transformers' Mxfp4HfQuantizer.is_trainable is False), so training "
                "is sized on the dequantized path (Mxfp4Config(dequantize=True)): experts unquantized at the training dtype"]
    from dataclasses import replace

    other = replace(regime, mxfp4_dequantized=not regime.mxfp4_dequantized)
    here_gib = weights.weights_bytes(weights.placements(inv, regime)) / 2**30
    there_gib = weights.weights_bytes(weights.placements(inv, other)) / 2**30
    needs = ("a CUDA GPU of compute capability >= 7.5, Triton >= 3.4, the kernels package (0.16 <= version < 0.17) "
             "and the Hub, from which transformers fetches kernels-community/gpt-oss-triton-kernels")
    if regime.mxfp4_dequantized:
        return [f"MXFP4 dequantized (--mxfp4 dequantized): transformers' path without its MXFP4 kernels, or with "
                f"Mxfp4Config(dequantize=True): the experts are dequantized to bf16 on load, {here_gib:.1f} GiB of weights; "
                f"with the kernels ({needs}) they stay MXFP4: {there_gib:.1f} GiB (--mxfp4 kernels)"]
    return [f"MXFP4 as stored (--mxfp4 kernels): the experts' 4-bit blocks and E8M0 scales, {here_gib:.1f} GiB of weights, "
            f"run by Triton's matmul_ogs with no dequantized copy; this needs {needs}; without any of them transformers "
            f"warns and dequantizes the experts to bf16 on load: {there_gib:.1f} GiB (--mxfp4 dequantized)"]


def _trace_notes(inv: Inventory, regime: Regime, sizes: Sizes, traced: bool) -> tuple[str, ...]:
    """Where a traceable training step's trace failed (its result is cached: device_overheads ran it)."""
    if not traced or not regime.training or regime.expandable_segments:
        return ()
    failure = train_trace.trace_failure(inv, regime, sizes)
    if not failure:
        return ()
    return (f"the training step could not be traced on fake tensors ({failure}); its allocator reserve is the "
            "formula's (the logits' hole and a measured fraction), not a replay",)


def _notes(inv: Inventory, regime: Regime, sizes: Sizes) -> tuple[str, ...]:
    """What in this answer would surprise, said where it applies."""
    notes = _mxfp4_notes(inv, regime)
    if regime.attn is Attention.EAGER and not inv.supports_sdpa:
        notes.append(f"{inv.architecture} has no sdpa in transformers 5.17 (_supports_sdpa is False), so its default "
                     "attention is eager, which is estimated (its S x S scores are materialized)")
    length = sizes.seq_len if regime.training else sizes.prompt_len + sizes.new_tokens
    if inv.max_positions and length > inv.max_positions:
        scaling = f"; its RoPE scaling is {inv.rope_scaling}" if inv.rope_scaling else "; its config names no RoPE scaling"
        notes.append(f"{length:,} tokens is beyond the {inv.max_positions:,} positions the model was trained for "
                     f"(max_position_embeddings{scaling}): memory is as estimated, quality is not promised")
    experts = sum(p.numel for p in inv.params if len(p.shape) == 3)
    if regime.quantizer is not None and experts:
        kept = "and QLoRA's preparation casts them to fp32" if regime.training else f"in {regime.storage.name}"
        notes.append(f"bitsandbytes quantizes linears only: this model's {experts / 1e9:.1f} B parameters in 3-D expert "
                     f"tensors stay unquantized, {kept}, which is why 4-bit saves less than it would")
    if not regime.training and not inv.use_cache and sizes.new_tokens > 1:
        notes.append("this config sets use_cache=false, so generate() recomputes the whole sequence at every new token: "
                     "each step's tensors are a token larger than the last ones, and the caching allocator keeps "
                     "reserving fresh segments (see the allocator reserve); model.generate(..., use_cache=True) "
                     "keeps a KV cache instead")
    if weights.param_targets(inv, regime):
        notes.append("PEFT's all-linear adapts this model's routed experts and router as parameters (lora.ParamWrapper): "
                     "their adapters, gradients and optimizer state are counted, and so is the merged copy of each "
                     "wrapped parameter that ParamWrapper builds in every forward and the backward keeps")
    return tuple(notes)


def device_overheads(inv: Inventory, regime: Regime, sizes: Sizes, at_peak: Parts, *, replay: bool = True,
                     traced: bool = True, constrained: bool = False) -> tuple[int, int]:
    """(allocator reserve, CUDA context and libraries) for a phase's allocated components.
    `traced=False`: no traced training step stands for them (a strategy's per-GPU share, or an
    estimate made with `trace=False`), so training's reserve is the formula's. `constrained`: the
    reserve the job needs to run on a card that has little room to spare, where that is less than
    what it holds with room to spare (expandable segments: see `_allocator_reserve`)."""
    static = at_peak[Component.WEIGHTS] + at_peak[Component.LORA_ADAPTERS] + at_peak[Component.OPTIMIZER_STATE]
    allocated = sum(at_peak.values())
    reserve = _allocator_reserve(inv, regime, sizes, allocated - static, allocated, replay=replay, traced=traced,
                                 constrained=constrained)
    context = calibration.CUDA_CONTEXT_BYTES + calibration.CUBLAS_HANDLES_BYTES
    if regime.training:
        context += calibration.AUTOGRAD_THREAD_BYTES
    if regime.quantizer is not None and not regime.training:
        context += regime.quantizer.kernels_bytes
    return reserve, context


def fused_loss(inv: Inventory, regime: Regime) -> bool:
    """A fused loss replaces lm_head and the loss (no N×V logits): Liger's fused linear
    cross-entropy (for the model types Liger patches) or TRL's chunked head."""
    if not regime.training or inv.lm_head is None:
        return False
    return regime.loss is Loss.CHUNKED or (regime.loss is Loss.LIGER and regime.liger_kernels and act.liger_patches(inv))


EXPANDABLE_PAGE_BYTES = 20 * 1024**2  # CUDACachingAllocator.cpp: kLargeBuffer, the large pool's page


def _expandable_reserve(dynamic: int) -> int:
    """Reserved-but-free memory with expandable segments: one mapping per stream and pool that grows
    by whole pages, in which freed blocks coalesce with their neighbours and any later request can
    reuse them. Holes a request cannot fit do stay mapped while memory is plentiful (a replay of
    the step shows them), but when mapping a new page fails, the out-of-memory retry unmaps every
    whole free page, the holes' included (CUDACachingAllocator.cpp: `release_cached_blocks` →
    `unmap_block`), and maps what the request needs: what decides whether the step runs is its
    allocated peak in whole pages. What stays is the last page of the large pool's mapping, partly
    used, and a 2 MiB page of the small pool (requests up to 1 MiB). (A traced step's replay under
    expandable segments reaches its boundary 6–14% early on the three measured edge searches.)"""
    rounding = -dynamic % EXPANDABLE_PAGE_BYTES if dynamic > 0 else 0
    return int(rounding + 2 * 1024**2)


def _allocator_reserve(inv: Inventory, regime: Regime, sizes: Sizes, dynamic: int, allocated: int, *,
                       replay: bool = True, traced: bool = True, constrained: bool = False) -> int:
    """Reserved-but-free memory at the peak (the caching allocator keeps freed blocks cached).

    Inference: generate()'s requests, tensor by tensor in the order the libraries make them, are
    replayed through the caching allocator's rules (estimator.stream); the reserve is the replay's
    reserved peak less its allocated peak. That is where tensors that grow every step (the KV
    cache's torch.cat, or the whole sequence without a cache) strand their earlier segments.

    Training, where the step can be traced (estimator.train_trace: the load and SPEC's steps, or
    the Trainer's, run on fake tensors, every request replayed through the caching allocator): the
    device holds the replay's reserved peak, so the reserve is what that adds over the phase
    model's peak allocated (never below zero). Elsewhere (bitsandbytes' quantized linears, Liger,
    TRL's SFTTrainer, MoE blocks, a strategy's per-GPU share, `trace=False`, a trace that failed):
    the loss's backward needs two fp32 N×V blocks while
    only the fp32 upcast's block has been freed; the half-precision logits' block is too small to
    host the other, so it stays cached and a new segment is reserved (not with a fused or chunked
    head, which has no N×V buffers). Beyond that, freed temporaries of other sizes leave holes in
    proportion to the memory that comes and goes (calibration.ALLOCATOR_FRAGMENTATION).

    `replay=False` gives the solvers' lower bound: no replayed reserve (0), for inference and for a
    traceable training step alike (a bound of the estimate with the same `traced`).
    With expandable segments, a traced step's replay under them gives what the device holds when
    memory is plentiful: freed blocks that no later request fits stay mapped. Near the card's
    capacity the out-of-memory retry unmaps them, so what the job needs to run (`constrained`, the
    verdict's figure) is page rounding (`_expandable_reserve`); that is also the reserve wherever
    the step is not traced, and for inference.
    """
    if regime.expandable_segments:
        rounding = _expandable_reserve(dynamic)
        if constrained or not replay or not (regime.training and traced) or train_trace.untraced_reason(inv, regime):
            return rounding
        step = train_trace.step_reserve(inv, regime, sizes)
        return rounding if step is None else max(step[0] - allocated, rounding)
    if regime.training and traced and train_trace.untraced_reason(inv, regime) is None:
        if not replay:
            return 0
        step = train_trace.step_reserve(inv, regime, sizes)
        if step is not None:
            return max(step[0] - allocated, 0)
    if not regime.training:
        if not replay:  # the lower bound the solvers search first
            return 0
        reserved, peak = stream.generate_reserve(inv, regime, sizes)
        return max(reserved - peak, 0)
    hole = 0
    if regime.compute != FP32 and not fused_loss(inv, regime):
        hole = tensor_bytes(sizes.training_tokens * inv.vocab_size, regime.compute)
    return int(hole + calibration.ALLOCATOR_FRAGMENTATION * max(dynamic, 0))


# -------------------------------------------------------------------------------------------------
# Inference
# -------------------------------------------------------------------------------------------------
def _stream_temporaries(inv: Inventory, regime: Regime, sizes: Sizes, at_peak: Parts) -> None:
    """generate()'s written request stream (estimator.stream, replayed for the allocator reserve)
    also gives its peak allocated: the weights and workspace, then every tensor generate() holds at
    its fullest, the temporaries the phase terms do not list included (the H200 histories' dynamic
    peaks are matched to a few MiB, where the terms alone run 1-3% low). Where the stream's peak is
    the larger, the difference joins the peak phase's temporaries, so the peak allocated is the
    stream's and the listed terms keep their sizes. (LLM.int8's outlier path is not in the stream:
    its terms stay as they are.)"""
    _, dynamic = stream.generate_reserve(inv, regime, sizes)
    unlisted = at_peak[Component.WEIGHTS] + dynamic - sum(at_peak.values())
    if unlisted > 0:
        at_peak[Component.TEMPORARIES] += unlisted


def _inference_phases(inv: Inventory, regime: Regime, sizes: Sizes, base: int) -> dict[str, Parts]:
    dtype = regime.compute
    b = sizes.batch
    resident = base + calibration.CUBLAS_WORKSPACE_BYTES
    last = logits.generate_logits_bytes(b, inv.vocab_size, dtype)
    prefill_working = act.prefill_working_bytes(inv, regime, sizes)
    if not inv.use_cache:  # no KV cache: every step is a prefill of the sequence so far
        return {"prefill": parts(weights=resident, temporaries=prefill_working, logits=last)}
    prefill = parts(
        weights=resident,
        kv_cache=kv_cache.cache_bytes(inv, b, sizes.prompt_len, dtype, after_prefill=True),
        temporaries=prefill_working,
        logits=last,
    )
    final_len = sizes.final_len
    decode = parts(
        weights=resident,
        kv_cache=kv_cache.cache_bytes(inv, b, final_len, dtype),
        temporaries=kv_cache.append_transient_bytes(inv, b, final_len, dtype)
        + act.decode_working_bytes(inv, regime, sizes),
        logits=last,
    )
    return {"prefill": prefill, "decode": decode}


# -------------------------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------------------------
def _training_phases(inv: Inventory, regime: Regime, sizes: Sizes, base: int, adapters: int) -> tuple[dict[str, Parts], int]:
    """The five phases of one training step (see the module's docstring), and the paged state's bytes."""
    train = weights.trainable(weights.placements(inv, regime))
    opt, grads = optimizer.optimizer_and_gradients(inv, regime)
    saved = act.saved_activations(inv, regime, sizes)
    tokens = sizes.training_tokens
    outside = saved.outside * tokens
    if regime.gradient_checkpointing:
        layers = saved.checkpointed_input * tokens * inv.num_layers
        top = max(range(inv.num_layers), key=lambda i: saved.layers[i]) if inv.num_layers else 0
        recompute = saved.layers[top] * tokens + saved.layer_weight_copies_bytes[top] if inv.num_layers else 0
        copies_backward = saved.lm_head_copy_bytes
    else:
        layers = sum(saved.layers) * tokens
        recompute = 0
        copies_backward = saved.weight_copies_saved_bytes
    # lora.ParamWrapper's merged parameters (terms/activations.Flow.merged_by_layer): saved by every
    # layer's forward, or with checkpointing rebuilt by the layer being recomputed only
    merged_layers = saved.layer_merged_bytes or (0.0,)
    merged = int(max(merged_layers) if regime.gradient_checkpointing else sum(merged_layers))
    # autocast's cache holds every trainable fp32 weight's copy until the forward ends
    copies_forward = max(saved.weight_copies_cached_bytes, copies_backward)
    activations_total = int(layers + outside)

    if fused_loss(inv, regime) and regime.loss is Loss.CHUNKED:
        # the scored tokens: every position but the last has a next-token label
        scored = sizes.batch * (sizes.seq_len - 1)
        matmul = regime.compute if regime.autocast else saved.head_input
        lg = logits.chunked_logprob(scored, inv.vocab_size, inv.hidden_size, saved.head_input, matmul,
                                    regime.storage, regime.base_trainable, entropy=regime.sft)
    elif fused_loss(inv, regime):
        matmul = regime.compute if regime.autocast else regime.storage
        lg = logits.fused_linear_cross_entropy(tokens, inv.vocab_size, inv.hidden_size, regime.residual, matmul,
                                               regime.storage, regime.base_trainable)
    else:
        lg = logits.training_logits(tokens, inv.vocab_size, regime.compute, inv.final_logit_softcapping is not None)
    # The batch on the GPU: SPEC's loop keeps one int64 [B, S] (labels are the same tensor); the
    # Trainer fetches every micro-batch of a step up front (Trainer.get_batch_samples), each an int64
    # input_ids and labels [B, S], alive until the optimizer step; SFTTrainer's collator
    # (DataCollatorForLanguageModeling.torch_call) adds an int64 attention_mask of ones.
    per_micro_batch = 3 if regime.sft else 2
    inputs = (sizes.accumulation * per_micro_batch if regime.trainer else 1) * tensor_bytes(tokens, "int64")

    static = dict(weights=base + calibration.CUBLAS_WORKSPACE_BYTES, lora_adapters=adapters, optimizer_state=opt.state_bytes)
    activations_total += inputs
    saved_merged = 0 if regime.gradient_checkpointing else merged
    forward_end = parts(**static, activations=activations_total, autocast_weight_copies=copies_forward,
                        merged_adapter_weights=saved_merged, logits=lg.forward_peak_bytes)
    backward_start = parts(**static, activations=activations_total, autocast_weight_copies=copies_backward,
                           merged_adapter_weights=saved_merged, logits=lg.backward_peak_bytes)
    # The top layer's backward: the loss's buffers are gone, the lm_head's gradient exists, and the
    # layer's gradients of its intermediates (three of the widest, as the gated product's backward
    # holds them) are alive; with checkpointing, the recomputed layer's activations too.
    prefix = (inv.lm_head.name + ".") if inv.lm_head is not None else None
    lm_grads = sum(tensor_bytes(p.numel, p.dtype) for p in train if prefix and p.name.startswith(prefix))
    layer_backward = parts(
        **static,
        activations=activations_total,
        autocast_weight_copies=copies_backward,
        merged_adapter_weights=merged,
        gradients=lm_grads,
        temporaries=int(recompute + act.backward_working_bytes(inv, regime) * tokens + act.merged_backward_extra(inv, regime)),
    )
    # The forward's own peak inside a layer (the adapters' fp32 input casts and dropout outputs,
    # Trace._lora_transient): with checkpointing it recurs when the backward recomputes the top
    # layer (torch/utils/checkpoint.py, non-reentrant: the first unpack of a saved tensor reruns the
    # layer's forward, whose saved tensors are kept for the backward as they are recomputed), on
    # top of every layer's checkpointed input and the gradient of the layer's output (the head's
    # and the final norm's saved tensors are freed by then); without it, it comes in the forward of
    # the last layer with every earlier layer's activations saved.
    layers_forward = None
    head = saved.head_saved * tokens
    if regime.gradient_checkpointing and inv.num_layers:
        peak_layer = max(range(inv.num_layers), key=lambda i: saved.layers[i] + saved.layer_transients[i])
        layer_forward = (saved.layers[peak_layer] + saved.layer_transients[peak_layer] + saved.layer_output) * tokens
        layers_forward = ("recompute_layer", parts(
            **static, activations=activations_total - head, autocast_weight_copies=copies_backward, gradients=lm_grads,
            merged_adapter_weights=int(saved.layer_merged_bytes[peak_layer]) if saved.layer_merged_bytes else 0,
            temporaries=int(layer_forward + saved.layer_weight_copies_bytes[peak_layer])))
    elif inv.num_layers and any(saved.layer_transients):
        so_far = [sum(saved.layers[:i + 1]) for i in range(inv.num_layers)]
        above = max(so_far[i] + saved.layer_transients[i] for i in range(inv.num_layers)) - so_far[-1]
        layers_forward = ("forward_layers", parts(
            **static, activations=activations_total - head, autocast_weight_copies=copies_forward,
            merged_adapter_weights=merged, temporaries=int(above * tokens)))
    tied_transient = 0
    if inv.tied_embeddings:  # the embedding's gradient before it is added to lm_head's
        embeddings = {p.name for p in inv.params if p.kind == "embedding"}
        tied_transient = sum(tensor_bytes(p.numel, p.dtype) for p in train if p.kind == "base" and p.name in embeddings)
    backward_end = parts(**static, activations=inputs, gradients=grads, temporaries=tied_transient)
    step = parts(**static, activations=inputs, gradients=grads, temporaries=opt.step_temp_bytes)
    phases = {
        "forward_end": forward_end,
        "backward_start": backward_start,
        "backward_layers": layer_backward,
        **dict([layers_forward] if layers_forward else []),
        "backward_end": backward_end,
        "optimizer_step": step,
    }
    if sizes.accumulation > 1:
        # Micro-batches after the first run with every gradient of the step so far alive
        # (accumulated in place), and each new gradient arrives as a temporary that AccumulateGrad
        # adds into the kept one: at the end of the backward, the largest trainable tensor's.
        largest = max((tensor_bytes(p.numel, p.dtype) for p in train), default=0)
        for name in ("forward_end", "backward_start", "backward_layers", "recompute_layer", "forward_layers"):
            if name not in phases:
                continue
            phases["accumulating_" + name] = {c: v + (grads if c is Component.GRADIENTS else 0) for c, v in phases[name].items()}
        phases["accumulating_backward_end"] = parts(**static, activations=inputs, gradients=grads,
                                                    temporaries=max(largest, tied_transient))
    return phases, opt.paged_bytes

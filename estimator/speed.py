"""How long a job takes on one GPU: prefill seconds and decode tokens/s for `generate()`, seconds
per optimizer step and tokens/s for training, and GPU-hours for a number of tokens (issue 16).

Every figure is the sum of four costs, each a count derived from the job times one rate:

    seconds = FLOPs / (peak FLOP/s · compute efficiency)             matmuls and attention
            + bytes / (bandwidth · bandwidth efficiency)             weights, KV cache, optimizer
            + layer passes · per-layer overhead                      PyTorch eager's launches and host work
            + bitsandbytes linear calls · that scheme's per-call overhead

The counts are mechanisms (below); the rates are `SpeedConstants`, kept in `calibration.yaml`'s
`speed` section and fitted by `python -m validation.speed_fit` on the speed calibration set only.
The sum (not a max, as a roofline would take) is what a loop that synchronizes every step sees:
the harness's probes synchronize after each step and each decoded token, so host time and kernel
time do not overlap there.

FLOPs (the formula of Kaplan et al. 2020, Table 1, and of PaLM, arXiv 2204.02311, Appendix B, as
nanoGPT writes it: `flops_per_token = 6*N + 12*L*H*Q*T`, here split by pass):
- a matmul of a weight with n parameters costs 2·n FLOPs per token forward; its backward costs 2·n
  for the input's gradient and 2·n for the weight's. Full fine-tuning pays both (4·N·T); LoRA and
  QLoRA freeze the base, whose linears still pass the input's gradient down to the adapters below
  (2·N·T) but compute no weight gradient. The adapters add 2·r·(in + out) per token forward and
  twice that backward.
- attention (QKᵀ and PV) costs 4·d per query-key pair per layer forward (d = heads · head_dim),
  twice that backward. SDPA's flash and memory-efficient kernels skip the masked half of a causal
  S×S (S²/2 pairs); eager attention and the math fallback (fp32) compute all S² pairs.
- gradient checkpointing recomputes each decoder layer's forward once in the backward.
- generate()'s prefill runs lm_head on the last position only (`logits_to_keep=1`).
- MoE experts: a token runs top_k of E experts (FLOPs × k/E); a decode step reads the experts any
  of its B tokens chose, E·(1 − (1 − k/E)^B) per layer in expectation.

Bytes:
- decode reads every weight once per step as stored (4-bit codes and absmax, int8 and its scales),
  except an untied input embedding, of which it reads B rows. bitsandbytes' 4-bit matmul of one
  row (`bnb.matmul_4bit`'s gemv path, batch 1) reads the codes directly; with more rows it first
  dequantizes the weight to bf16 (writes 2 bytes per weight, which the matmul reads again).
- the KV cache: attention reads it once per step, and DynamicCache's `torch.cat` append reads it
  and writes it one token longer (transformers/cache_utils.py), so 3 × the cache per step.
- training reads the weights in the compute dtype once per pass (forward, backward, recompute);
  autocast casts fp32 weights to bf16 in each forward (reads 4, writes 2 bytes); 4-bit weights are
  dequantized once per pass; full fine-tuning writes each weight gradient (and reads it back while
  accumulating). The optimizer step reads and writes the parameters and the states and reads the
  gradients; the Trainer's gradient clipping (max_grad_norm 1.0 by default) reads the gradients
  for the norm and reads and writes them to scale.

Per-GPU rule: a GPU with its own fitted constants uses them; any other card uses the reference
GPU's efficiencies applied to its own peak figures (gpu_db), and the reference's overheads
unchanged (they are host-side: Python, the dispatcher and kernel launches). Speed is per GPU:
multi-GPU speed (communication, pipeline bubbles) is not modelled (issue 7 is blocked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from estimator.dtypes import BF16, FP16, FP32, DType
from estimator.inventory_types import Inventory
from estimator.job import Attention, Job
from estimator.optimizers import OptimizerMemory
from estimator.regime import Regime, Sizes, regime_of, sizes_of
from estimator.terms import kv_cache, optimizer, weights

DATA_PATH = Path(__file__).resolve().parent / "calibration.yaml"
SECONDS_PER_HOUR = 3600.0

# A backward pass launches about twice the forward's kernels (each matmul has two backward
# matmuls, each elementwise op a backward op), so it counts as two layer passes.
BACKWARD_LAYER_PASSES = 2
# DynamicCache's torch.cat append reads the cache and writes it again, beside attention's read.
KV_TRAFFIC_PER_STEP = 3
# bitsandbytes' dequantize_4bit writes the weight in bf16, which the matmul then reads.
DEQUANT_BYTES_PER_WEIGHT = 2 * BF16


@dataclass(frozen=True)
class SpeedConstants:
    """One GPU's speed rates (calibration.yaml, `speed`): each a measured figure, not a derived one.

    Efficiencies are fractions of the card's datasheet peak (gpu_db); overheads are seconds.
    """

    gpu: str
    status: str  # "fitted: <rows>" or "prior: <why>" (not fitted yet)
    inference_compute_efficiency: float
    """generate(): achieved matmul and attention FLOP/s over the dense peak of the compute dtype."""
    inference_bandwidth_efficiency: float
    """generate(): achieved bytes/s over the datasheet bandwidth, for weights and KV cache."""
    inference_layer_overhead_s: float
    """generate(): seconds per decoder layer per forward that no FLOP or byte accounts for: the
    eager dispatcher and ~30 kernel launches (norms, projections, RoPE, SDPA, residuals)."""
    bnb_4bit_call_overhead_s: float
    """bitsandbytes 4-bit: extra seconds per quantized linear per forward (its own kernels' launches
    and the Python of `Linear4bit.forward` / `matmul_4bit`)."""
    bnb_int8_call_overhead_s: float
    """LLM.int8: extra seconds per quantized linear per forward (input quantization, outlier
    extraction at threshold 6.0, the int8 matmul and the dequantization, each its own kernel)."""
    training_compute_efficiency: float
    """training: achieved FLOP/s over the dense peak, forward, backward and recomputation."""
    training_bandwidth_efficiency: float
    """training: achieved bytes/s over the datasheet bandwidth for weight reads, casts,
    dequantization, gradient writes and the optimizer step."""
    training_layer_pass_overhead_s: float
    """training: seconds per decoder layer per pass (a backward counts as two passes) not
    accounted for by FLOPs or bytes: launches and autograd's host work."""

    @property
    def fitted(self) -> bool:
        return self.status.startswith("fitted")


RATE_FIELDS = tuple(f.name for f in fields(SpeedConstants) if f.name not in ("gpu", "status"))


def load_constants(path: Path = DATA_PATH) -> tuple[str, dict[str, SpeedConstants]]:
    """(reference GPU, speed constants per GPU) from calibration.yaml's `speed` section."""
    data = yaml.safe_load(path.read_text())["speed"]
    per_gpu = {name: SpeedConstants(name, str(row["status"]), *(float(row[k]) for k in RATE_FIELDS))
               for name, row in data["gpus"].items()}
    return data["reference"], per_gpu


REFERENCE, PER_GPU = load_constants()


def constants_for(gpu_name: str) -> SpeedConstants:
    """The GPU's own constants where they were fitted on it, else the reference GPU's (see the rule above)."""
    return PER_GPU.get(gpu_name, PER_GPU[REFERENCE])


# -------------------------------------------------------------------------------------------------
# Work: what a pass costs in counts
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """The counts of one timed span (a prefill, one decode step, a micro-batch, an optimizer step)."""

    flops: float = 0.0
    bytes: float = 0.0
    layer_passes: float = 0.0
    bnb_4bit_calls: float = 0.0
    bnb_int8_calls: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Work)))

    def times(self, k: float) -> "Work":
        return Work(*(getattr(self, f.name) * k for f in fields(Work)))


@dataclass(frozen=True)
class Peaks:
    """The card's datasheet peaks for this job: FLOP/s of its compute dtype, bytes/s."""

    flops_per_s: float
    bytes_per_s: float


def peaks(gpu, compute: DType) -> Peaks | None:
    """The dense FLOP/s the job's matmuls run at (bf16/fp16 tensor cores, plain FP32 for fp32), and
    the bandwidth; None where gpu_db has no figure for that dtype."""
    tflops = {BF16: gpu.bf16_tflops_dense, FP16: gpu.fp16_tflops_dense, FP32: getattr(gpu, "fp32_tflops", None)}.get(compute)
    if not tflops or not gpu.memory_bandwidth_gb_s:
        return None
    return Peaks(tflops * 1e12, gpu.memory_bandwidth_gb_s * 1e9)


def inference_seconds(work: Work, p: Peaks, c: SpeedConstants) -> float:
    return (work.flops / (p.flops_per_s * c.inference_compute_efficiency)
            + work.bytes / (p.bytes_per_s * c.inference_bandwidth_efficiency)
            + work.layer_passes * c.inference_layer_overhead_s
            + work.bnb_4bit_calls * c.bnb_4bit_call_overhead_s + work.bnb_int8_calls * c.bnb_int8_call_overhead_s)


def training_seconds(work: Work, p: Peaks, c: SpeedConstants) -> float:
    return (work.flops / (p.flops_per_s * c.training_compute_efficiency)
            + work.bytes / (p.bytes_per_s * c.training_bandwidth_efficiency)
            + work.layer_passes * c.training_layer_pass_overhead_s
            + work.bnb_4bit_calls * c.bnb_4bit_call_overhead_s + work.bnb_int8_calls * c.bnb_int8_call_overhead_s)


# ---- the model's matmul parameters ---------------------------------------------------------------
@dataclass(frozen=True)
class MatmulParams:
    """Parameters that take part in matmuls, split as the FLOP and byte counts need them."""

    layers: int  # linears inside the decoder layers (2-D weights)
    lm_head: int
    experts: int  # 3-D expert tensors (a token runs top_k / num_experts of them)
    expert_fraction: float  # top_k / num_experts
    num_experts: int
    attn_width: int  # heads · head_dim (the query side of QKᵀ and the output side of PV)

    @property
    def dense_per_token(self) -> float:
        """2-D matmul parameters one token runs through, lm_head included (FLOPs = 2 × this)."""
        return self.layers + self.lm_head + self.experts * self.expert_fraction


def matmul_params(inv: Inventory) -> MatmulParams:
    lm = inv.lm_head
    lm_params = lm.weight_params if lm is not None else 0
    layers = sum(lin.weight_params for lin in inv.linears if lin is not lm and lin.role != "lm_head")
    experts = sum(p.numel for p in inv.params if len(p.shape) == 3)
    fraction = (inv.moe.top_k / inv.moe.num_experts) if inv.moe is not None and inv.moe.num_experts else 1.0
    return MatmulParams(layers, lm_params, experts, fraction, inv.moe.num_experts if inv.moe else 0,
                        inv.num_heads * inv.head_dim)


def _causal_skipping(regime: Regime) -> bool:
    """SDPA's flash/memory-efficient kernels (and FlashAttention-2) skip masked blocks; eager and the
    math fallback (fp32) compute the whole S×S."""
    return regime.attn is not Attention.EAGER and regime.compute != FP32


def attention_pairs(inv: Inventory, regime: Regime, queries: int, keys_before: int) -> float:
    """Query-key pairs computed over all layers when `queries` new positions attend to the
    `keys_before` already cached ones and to each other (causally)."""
    total = 0.0
    for kind in inv.layer_types or ("full_attention",) * inv.num_layers:
        window = inv.sliding_window if kind in ("sliding_attention", "chunked_attention") and inv.sliding_window else None
        keys = keys_before + queries
        if queries == 1:
            total += min(keys, window) if window else keys
            continue
        if not _causal_skipping(regime):
            total += queries * keys  # the full matrix, masked after it is computed
            continue
        causal = queries * keys_before + queries * (queries + 1) / 2
        total += min(causal, queries * window) if window else causal
    return total


def _read_weight_bytes(inv: Inventory, regime: Regime, batch: int) -> float:
    """Bytes of weights one decode step reads: all as stored, but B rows of an untied input embedding."""
    placed = weights.placements(inv, regime)
    embedding_names = {p.name for p in inv.params if p.kind == "embedding"}
    total = 0.0
    mp = matmul_params(inv)
    expert_names = {p.name for p in inv.params if len(p.shape) == 3}
    read_fraction = 1.0
    if mp.num_experts and mp.expert_fraction < 1:
        read_fraction = 1 - (1 - mp.expert_fraction) ** batch
    shapes = {p.name: p.shape for p in inv.params}
    for p in placed:
        if p.kind == "adapter":
            continue
        if p.name in embedding_names and not inv.tied_embeddings:
            total += p.bytes * min(1.0, batch / shapes[p.name][0]) if shapes.get(p.name) else 0
        elif p.name in expert_names:
            total += p.bytes * read_fraction
        else:
            total += p.bytes
    return total


def _quantized_linears(inv: Inventory, regime: Regime) -> tuple[int, int]:
    """(weights in bitsandbytes linears, how many linears) for this regime."""
    if regime.quantizer is None:
        return 0, 0
    linears = [lin for lin in inv.linears if lin.bnb_quantized]
    return sum(lin.weight_params for lin in linears), len(linears)


def _bnb_calls(regime: Regime, count: int) -> Work:
    if regime.quantizer is None or not count:
        return Work()
    return Work(bnb_4bit_calls=count) if regime.quantizer.is_4bit else Work(bnb_int8_calls=count)


# -------------------------------------------------------------------------------------------------
# Inference: generate()
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferenceWork:
    prefill: Work
    decode_step: Work  # one step at the mean cache length
    decode_steps: int  # N − 1: the first new token comes out of the prefill


def inference_work(inv: Inventory, regime: Regime, sizes: Sizes) -> InferenceWork:
    b, prompt, new = sizes.batch, sizes.prompt_len, sizes.new_tokens
    mp = matmul_params(inv)
    dtype = regime.compute
    q_params, q_count = _quantized_linears(inv, regime)
    dequant_4bit = regime.quantizer is not None and regime.quantizer.is_4bit

    # prefill: every prompt token through the layers, lm_head on the last position only
    flops = 2 * (mp.layers + mp.experts * mp.expert_fraction) * b * prompt + 2 * mp.lm_head * b
    flops += 4 * mp.attn_width * b * attention_pairs(inv, regime, prompt, 0)
    weight_bytes = _read_weight_bytes(inv, regime, b * prompt)
    if dequant_4bit:
        weight_bytes += DEQUANT_BYTES_PER_WEIGHT * q_params  # many rows: dequantize, then a bf16 matmul
    kv_written = kv_cache.cache_bytes(inv, b, prompt, dtype, after_prefill=True) if inv.use_cache else 0
    prefill = Work(flops=flops, bytes=weight_bytes + kv_written, layer_passes=inv.num_layers) + _bnb_calls(regime, q_count)

    steps = max(new - 1, 0)
    if not inv.use_cache:  # every step is a prefill of the sequence so far (config use_cache: false)
        mean_len = prompt + steps / 2
        step_flops = 2 * (mp.layers + mp.experts * mp.expert_fraction) * b * mean_len + 2 * mp.lm_head * b
        step_flops += 4 * mp.attn_width * b * attention_pairs(inv, regime, int(mean_len), 0)
        step = Work(flops=step_flops, bytes=weight_bytes, layer_passes=inv.num_layers) + _bnb_calls(regime, q_count)
        return InferenceWork(prefill, step, steps)
    # a decode step at the mean position: the cache holds prompt + t − 1 tokens at step t = 1..N−1
    held = prompt + (steps - 1) / 2 if steps else prompt
    step_flops = 2 * mp.dense_per_token * b + 4 * mp.attn_width * b * attention_pairs(inv, regime, 1, int(round(held)))
    step_bytes = _read_weight_bytes(inv, regime, b)
    if dequant_4bit and b > 1:
        step_bytes += DEQUANT_BYTES_PER_WEIGHT * q_params
    step_bytes += KV_TRAFFIC_PER_STEP * kv_cache.cache_bytes(inv, b, int(round(held)), dtype)
    step = Work(flops=step_flops, bytes=step_bytes, layer_passes=inv.num_layers) + _bnb_calls(regime, q_count)
    return InferenceWork(prefill, step, steps)


# -------------------------------------------------------------------------------------------------
# Training: one optimizer step
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingWork:
    micro_batch: Work  # forward + backward (+ recomputation) of one micro-batch
    optimizer_step: Work  # the optimizer's update (and the Trainer's clipping)
    micro_batches: int  # gradient accumulation steps


def _adapter_params(inv: Inventory, regime: Regime) -> int:
    """LoRA's A and B parameters on the linears (and parameters) PEFT adapts."""
    return sum(p.numel for p in weights.placements(inv, regime) if p.kind == "adapter")


def training_work(inv: Inventory, regime: Regime, sizes: Sizes) -> TrainingWork:
    b, s = sizes.batch, sizes.seq_len
    tokens = b * s
    mp = matmul_params(inv)
    layer_params = mp.layers + mp.experts * mp.expert_fraction
    pairs = attention_pairs(inv, regime, s, 0)
    attn_forward = 4 * mp.attn_width * b * pairs
    adapters = _adapter_params(inv, regime)

    forward = 2 * (layer_params + mp.lm_head) * tokens + attn_forward + 2 * adapters * tokens
    input_grads = 2 * (layer_params + mp.lm_head) * tokens
    weight_grads = 2 * (layer_params + mp.lm_head) * tokens if regime.base_trainable else 0.0
    backward = input_grads + weight_grads + 2 * attn_forward + 4 * adapters * tokens
    recompute = (2 * layer_params * tokens + attn_forward + 2 * adapters * tokens) if regime.gradient_checkpointing else 0.0
    passes = 2 + (1 if regime.gradient_checkpointing else 0)  # weight reads: forward, backward, recompute

    placed = weights.placements(inv, regime)
    q_params, q_count = _quantized_linears(inv, regime)
    matmul_weights = layer_params + mp.lm_head
    unquantized = matmul_weights - q_params
    weight_read = passes * unquantized * regime.compute  # 4-bit weights: read as dequantized below
    cast = 0.0
    if regime.autocast and regime.storage != regime.compute:
        cast = (1 + (1 if regime.gradient_checkpointing else 0)) * unquantized * (regime.storage + regime.compute)
    dequant = 0.0
    if regime.quantizer is not None and regime.quantizer.is_4bit:
        packed = sum(p.bytes for p in placed if p.kind == "quantized")
        dequant = passes * (packed + DEQUANT_BYTES_PER_WEIGHT * q_params)
    _, grad_bytes = optimizer.optimizer_and_gradients(inv, regime)
    grad_traffic = grad_bytes * (2 if sizes.accumulation > 1 else 1)  # written; read back to accumulate
    micro = Work(flops=forward + backward + recompute, bytes=weight_read + cast + dequant + grad_traffic,
                 layer_passes=inv.num_layers * (1 + BACKWARD_LAYER_PASSES + (1 if regime.gradient_checkpointing else 0)))
    micro = micro + _bnb_calls(regime, q_count * passes)

    opt, grads = optimizer.optimizer_and_gradients(inv, regime)
    trainable_bytes = sum(p.bytes for p in weights.trainable(placed))
    step_bytes = _optimizer_bytes(opt, trainable_bytes, grads)
    if regime.trainer:
        step_bytes += 3 * grads  # clip_grad_norm_: read for the norm, read and write to scale
    return TrainingWork(micro, Work(bytes=step_bytes), sizes.accumulation)


def _optimizer_bytes(opt: OptimizerMemory, trainable_bytes: int, grad_bytes: int) -> float:
    """The optimizer step's traffic: parameters read and written, gradients read, states read and written."""
    return 2 * trainable_bytes + grad_bytes + 2 * (opt.state_bytes + opt.paged_bytes)


# -------------------------------------------------------------------------------------------------
# The answer
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    """Speed of one job on one GPU. Inference fills the prefill and decode fields, training the
    step fields; `gpu_hours` and `cost` need a token count (and a price)."""

    gpu: str
    constants_status: str
    prefill_seconds: float | None = None
    decode_step_seconds: float | None = None
    decode_tokens_per_second: float | None = None  # all B sequences together
    generate_seconds: float | None = None  # one generate() call: prefill + (N − 1) steps
    step_seconds: float | None = None
    tokens_per_second: float | None = None  # training tokens (B·S·G per step) per second
    tokens: int | None = None
    gpu_hours: float | None = None
    cost: float | None = None

    def to_dict(self) -> dict:
        """SPEC's speed keys, those that apply."""
        keys = ("step_seconds", "tokens_per_second", "prefill_seconds", "decode_tokens_per_second", "gpu_hours", "cost")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class SpeedUnavailable(ValueError):
    """The GPU lacks a figure the estimate needs (no peak for the compute dtype, no bandwidth)."""


def validate_tokens_and_price(tokens: int | None, price: float | None) -> None:
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"tokens must be a whole number of at least 1; got {tokens!r}")
    if price is not None and (not isinstance(price, (int, float)) or isinstance(price, bool)
                              or not math.isfinite(price) or price < 0):
        raise ValueError(f"price must be a finite number of at least 0 (per GPU-hour); got {price!r}")


def speed(inv: Inventory, job: Job, gpu, tokens: int | None = None, price: float | None = None,
          constants: SpeedConstants | None = None) -> Speed:
    """The job's speed on `gpu` (a gpu_db.GPU). `tokens`: training tokens for a training job, tokens
    generated for inference (in calls of B × new_tokens); `price`: per GPU-hour."""
    validate_tokens_and_price(tokens, price)
    regime, sizes = regime_of(job), sizes_of(job)
    c = constants or constants_for(gpu.name)
    p = peaks(gpu, regime.compute)
    if p is None:
        raise SpeedUnavailable(f"{gpu.name} has no {regime.compute.name} FLOP/s or bandwidth figure in gpu_db; "
                               "no speed estimate for this job on it")
    if regime.training:
        w = training_work(inv, regime, sizes)
        step = w.micro_batches * training_seconds(w.micro_batch, p, c) + training_seconds(w.optimizer_step, p, c)
        per_step = sizes.batch * sizes.seq_len * sizes.accumulation
        hours = None
        if tokens is not None:
            hours = math.ceil(tokens / per_step) * step / SECONDS_PER_HOUR
        return Speed(gpu.name, c.status, step_seconds=step, tokens_per_second=per_step / step, tokens=tokens,
                     gpu_hours=hours, cost=hours * price if hours is not None and price is not None else None)
    w = inference_work(inv, regime, sizes)
    prefill = inference_seconds(w.prefill, p, c)
    decode_step = inference_seconds(w.decode_step, p, c)
    call = prefill + w.decode_steps * decode_step
    hours = None
    if tokens is not None:
        hours = math.ceil(tokens / (sizes.batch * sizes.new_tokens)) * call / SECONDS_PER_HOUR
    return Speed(gpu.name, c.status, prefill_seconds=prefill, decode_step_seconds=decode_step,
                 decode_tokens_per_second=sizes.batch / decode_step, generate_seconds=call, tokens=tokens,
                 gpu_hours=hours, cost=hours * price if hours is not None and price is not None else None)


def speed_of(result, gpu, tokens: int | None = None, price: float | None = None) -> Speed | None:
    """`speed` for an `Estimate` (its inventory and job); None when the GPU lacks the figures."""
    try:
        return speed(result.inventory, result.job, gpu, tokens, price)
    except SpeedUnavailable:
        return None

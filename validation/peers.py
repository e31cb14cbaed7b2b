"""The peers' published formulas, written from ../shared/PEERS.md, to score them on our measured cases.

Sources (formulas only; no code copied):
- can-it-run-llm: Hugging Face Space Vokturz/can-it-run-llm (GPL-3.0; only its maths is used here).
- accelerate `estimate-memory`: huggingface/accelerate, src/accelerate/commands/estimate.py (v0.29+).
- gpu_poor: RahulSChand/gpu_poor, src/App.js.

Each function returns the bytes the tool would report for a job, or None where the tool has no
figure (accelerate has none for LoRA, QLoRA or quantized training). The tools print GiB labelled
"GB"; we compare in bytes. They estimate what must fit on the GPU, so they are scored against the
measured device total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from estimator.inventory import Inventory
from estimator.regime import regime_of
from estimator.job import Job, Mode

MB = 1024**2  # gpu_poor's "MB" (it divides bytes by 1024²)

# The dtype divisor m: size = 4·P / m.
_DIVISOR = {"fp32": 1, "bf16": 2, "fp16": 2, "int8": 4, "int4": 8}


def automodel_params(inv: Inventory) -> int:
    """P as the peers count it: `AutoModel` on the meta device, i.e. without an untied lm_head."""
    lm = inv.lm_head
    if lm is None or inv.tied_embeddings:
        return inv.params_total
    return inv.params_total - lm.weight_params - (lm.out_features if lm.bias else 0)


def _peer_dtype(job: Job) -> str:
    """The dtype tab a user would read for this job."""
    if job.mode is Mode.INFERENCE:
        return {"nf4": "int4", "fp4": "int4"}.get(job.weights.value, job.weights.value)
    if job.mode is Mode.QLORA:
        return "int4"
    return regime_of(job).storage.name  # full fine-tuning and LoRA: the weights as loaded


def can_it_run_llm(inv: Inventory, job: Job, lora_percent: float = 2.0) -> int:
    """1.2×size for inference, 4×size for Adam training, 1.2×(size + P·pct/100·2·4) for (Q)LoRA."""
    p = automodel_params(inv)
    size = 4 * p / _DIVISOR[_peer_dtype(job)]
    if job.mode is Mode.INFERENCE:
        return int(1.2 * size)
    if job.mode is Mode.FULL:
        return int(4 * size)
    return int(1.2 * (size + p * lora_percent / 100 * 2 * 4))


def accelerate_estimate(inv: Inventory, job: Job) -> int | None:
    """The model size; for Adam training 16 (fp32) or 8 (fp16/bf16) bytes per parameter."""
    p = automodel_params(inv)
    dtype = _peer_dtype(job)
    size = 4 * p / _DIVISOR[dtype]
    if job.mode is Mode.INFERENCE:
        return int(size)
    if job.mode is Mode.FULL:
        if dtype == "fp32":
            return int(4 * size)
        if dtype in ("bf16", "fp16"):
            return int(4 * size)  # 2·S where S = 4·P: 8 bytes per parameter
        return None
    return None


def _gpu_poor_params(inv: Inventory) -> int:
    """2·V·h + L·(4h² + 3hi): embeddings and lm_head, attention as 4h², the MLP as 3hi."""
    h, i, layers = inv.hidden_size, inv.intermediate_size or 4 * inv.hidden_size, inv.num_layers
    return 2 * inv.vocab_size * h + layers * (4 * h * h + 3 * h * i)


def gpu_poor(inv: Inventory, job: Job) -> int:
    """gpu_poor's total: weights, KV cache or activations, adapters, and a fixed 650 MB."""
    p = _gpu_poor_params(inv)
    h, layers, heads = inv.hidden_size, inv.num_layers, inv.num_heads
    i = inv.intermediate_size or 4 * h
    b = job.batch_size
    fp16_weights = 2 * p
    overhead = 650 * MB
    if job.mode is Mode.INFERENCE:
        dtype = _peer_dtype(job)
        weights = {"int8": fp16_weights / 2 + 0.06 * fp16_weights, "int4": fp16_weights / 4 + 0.06 * fp16_weights}.get(
            dtype, fp16_weights
        )
        s = job.prompt_len + job.new_tokens
        kv = b * 2 * s * 2 * 2 * h * layers  # twice the true size on purpose ("HF takes double"), h not KV heads
        activations = b * (10 * s * h + 2 * heads * s * s)
        return int(weights + kv + activations + overhead)
    s = job.seq_len
    activations = (32 * s * h + 12 * s * i + 8 * heads * s * s + 8 * s) * layers * b
    if job.gradient_checkpointing:
        activations *= 0.15
    if job.mode is Mode.FULL:
        return int(fp16_weights + 3 * p * 2 + activations + overhead)
    adapter_params = layers * 8 * h * 2 * 4  # rank 8 on q, k, v, o, whatever the job's rank
    adapter = adapter_params * 2 + adapter_params * 3 * 2
    if job.mode is Mode.LORA:
        return int(fp16_weights + adapter + activations + overhead)
    weights = p * 0.5 - p * 2 / 64 + 0.06 * fp16_weights
    extra = 0.75 * layers * (15 * h + 6 * i) * 50 * math.sqrt(s / 50) * b
    return int(weights + adapter + activations + extra + overhead)


@dataclass(frozen=True)
class PeerFigures:
    can_it_run_llm: int | None
    accelerate: int | None
    gpu_poor: int | None


PEERS = ("can_it_run_llm", "accelerate", "gpu_poor")


def peer_figures(inv: Inventory, job: Job) -> PeerFigures:
    return PeerFigures(can_it_run_llm(inv, job), accelerate_estimate(inv, job), gpu_poor(inv, job))


# -------------------------------------------------------------------------------------------------
# The peers' speed figures (issue 16), written from their source; no code copied.
# - gpu_poor: RahulSChand/gpu_poor, src/App.js at commit 24f6c5f5477f769b412a8892930f09817569af35
#   (the last to touch it; snapshot ad2fc0ef0e6ceeb7684363504eecc3342a5e7dc4):
#   `token_per_second_logic_GPU` (inference) and `token_per_second_logic_Train` (training).
# - llmfit: AlexsJones/llmfit, llmfit-core/src/fit.rs `estimate_tps` at commit
#   e1379a96df718b033d86fa93b385da8a9d4e707a (snapshot 3f44fd30a43d2619146f7bc0aa66c90aa54d78e6):
#   decode tok/s = bandwidth_GB_s / (params_B · bytes_per_param(quant)) · efficiency 0.55 · the run
#   mode's factor (1.0 on one GPU). It has no prefill or training figure.
# -------------------------------------------------------------------------------------------------
GPU_POOR_TERA = 1e12  # App.js: `const tera = 1000000000 * 1000`
GPU_POOR_COMPUTE_EFFICIENCY = 0.85  # App.js: `tera * gpu_compute * 0.85`
# gpu_poor's src/gpu_config.json lists no H200; its H100-SXM5 entry gives 51.7 TFLOP/s (the CUDA
# cores' FP32 figure, not tensor cores), which the H200's GH100 shares. We give it the H200's
# bandwidth (4,800 GB/s) and that compute figure: what a user of gpu_poor would enter for an H200.
GPU_POOR_COMPUTE_TFLOPS = {"H200 SXM 141GB": 51.7, "H100 SXM 80GB": 51.7}


@dataclass(frozen=True)
class PeerSpeed:
    """A peer's speed figures for a job, in our units; None where the peer has no such figure."""

    prefill_seconds: float | None = None
    decode_step_seconds: float | None = None  # one generate step (B tokens)
    step_seconds: float | None = None  # one optimizer step


def _gpu_poor_quant(job: Job) -> str:
    if job.mode is Mode.QLORA:
        return "qlora"
    if job.mode is Mode.INFERENCE:
        return {"int8": "bnb_int8", "nf4": "bnb_q4", "fp4": "bnb_q4"}.get(job.weights.value, "no_quant")
    return "no_quant"


def gpu_poor_speed(inv: Inventory, job: Job, gpu) -> PeerSpeed:
    """gpu_poor's "Token/s", "Prompt process Time (s)" and "ms per iteration(forward + backward)",
    as App.js computes them with its "HuggingFace" inference type (`inf`, extraFactor 2.0) and the
    user's prompt length, tokens to generate and batch size; for training the sequence length is the
    prompt plus one generated token (both must be positive), and an accumulation of G is G iterations."""
    p = _gpu_poor_params(inv)  # computeModelSize: 2·V·h + L·(4h² + 3hi)
    h, layers = inv.hidden_size, inv.num_layers
    bw = gpu.memory_bandwidth_gb_s
    compute = GPU_POOR_COMPUTE_TFLOPS.get(gpu.name, gpu.bf16_tflops_dense)
    quant = _gpu_poor_quant(job)
    b = job.batch_size
    if job.mode is Mode.INFERENCE:
        prompt, new = job.prompt_len, job.new_tokens
        total = prompt + new
        transfer = p / {"bnb_int8": 2.0, "bnb_q4": 4.0}.get(quant, 1.0)  # memoryTransfer, in parameters
        prompt_flops = b * (2 * prompt * transfer + 2 * layers * h * h * 2 * prompt)
        prompt_s = prompt_flops / (GPU_POOR_TERA * compute * GPU_POOR_COMPUTE_EFFICIENCY)
        # finalPromptTime: ×1.8, plus 2·transfer bytes in MB × 0.008/100 (added as it is, in its units)
        prompt_s = prompt_s * 1.8 + (2 * transfer / MB) * (0.008 / 100)
        extra = 2.0  # trnType "inf" (HuggingFace)
        kv = 2 * 2 * layers * h * total
        memory_s = (2 * transfer * extra + kv * extra) / 1024**3 / bw
        flops_s = b * (2 * transfer + total * h * 2 * layers * 2 * 2) / (GPU_POOR_TERA * compute * GPU_POOR_COMPUTE_EFFICIENCY)
        bnb = {"bnb_int8": 4.5, "bnb_q4": 3.0}.get(quant, 1.0)
        per_token_s = max(memory_s, flops_s) * bnb  # "ms per token"; Token/s = 1 / this
        return PeerSpeed(prefill_seconds=prompt_s * bnb, decode_step_seconds=per_token_s)
    total = job.seq_len
    flops = 2 * b * total * p + total * h * 2 * layers * b
    flops *= 2  # "Backward pass *2"
    if job.optimizer.value != "sgd" and job.optimizer.value != "sgd_no_momentum":
        flops *= 1.15  # adam_opt
    flops *= {"qlora": 1.75}.get(quant, 1.0)
    if job.mode is Mode.FULL:
        flops *= 3  # "move the weights back to GPU for update ... Total 3x"
    seconds = flops / (GPU_POOR_TERA * compute * GPU_POOR_COMPUTE_EFFICIENCY)
    if job.gradient_checkpointing:
        seconds *= 1.65
    return PeerSpeed(step_seconds=seconds * job.gradient_accumulation_steps)


LLMFIT_EFFICIENCY = 0.55  # fit.rs default_efficiency()
# models.rs quant_bytes_per_param: F16/BF16 2.0, Q8_0 1.0, 4-bit 0.5; it has no fp32 (its default
# for an unknown quant is 0.5, which we do not apply to fp32: no figure).
_LLMFIT_BYTES = {"bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5, "fp4": 0.5}


def llmfit_speed(inv: Inventory, job: Job, gpu) -> PeerSpeed:
    """llmfit's decode tok/s for one sequence (llama.cpp-style, batch 1) as the step time; it has no
    figure for prefill, training or fp32 weights, and ignores the batch."""
    if job.mode is not Mode.INFERENCE or job.weights.value not in _LLMFIT_BYTES or inv.moe is not None:
        return PeerSpeed()  # (its MoE paths, tiered by expert count, are not written here)
    params_b = inv.params_total / 1e9
    tps = gpu.memory_bandwidth_gb_s / (params_b * _LLMFIT_BYTES[job.weights.value]) * LLMFIT_EFFICIENCY
    return PeerSpeed(decode_step_seconds=1.0 / tps)

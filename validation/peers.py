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

"""Where every parameter lives on the GPU, at which dtype, and whether it trains.

Mechanisms, each from the libraries' source:
- Plain dtypes: `from_pretrained(dtype=...)` stores every parameter at that dtype.
- bitsandbytes 4-bit (`bitsandbytes/functional.py: quantize_4bit`): two 4-bit codes per byte, one
  fp32 absmax per block of 64 weights and a 16-entry fp32 code table per layer. With double
  quantization (`compress_statistics`) the absmax is itself quantized to uint8 in blocks of 256,
  keeping one fp32 offset, one fp32 absmax per 256 blocks, and a shared 256-entry dynamic map.
- bitsandbytes LLM.int8 (`int8_vectorwise_quant`): one int8 per weight plus one fp32 scale per
  output row (SCB).
- Which linears are quantized: transformers' `replace_with_bnb_linear` converts exactly
  `nn.Linear` and GPT-2's `Conv1D` outside its skip list (output embeddings, tied weights, the last
  parameter's module, `_keep_in_fp32_modules`); the inventory records that decision per linear.
  MoE experts stored as 3-D `nn.Parameter`s are not linears, so they stay in bf16.
- Pre-quantized checkpoints (GPTQ, AWQ, FP8, compressed-tensors, bitsandbytes-saved): inference
  loads them as stored; `estimator/prequantized.py` gives each replaced tensor's stored bytes.
- QLoRA: `peft.prepare_model_for_kbit_training` casts every parameter that is not `Params4bit`
  from fp16/bf16 to fp32 (embeddings, norms, `lm_head`, biases, unquantized experts).
- LoRA (`peft/tuners/lora/layer.py`): A is r × in and B is out × r per adapted linear; with
  `autocast_adapter_dtype=True` (the default) adapters of a bf16/fp16 base are kept in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from estimator.dtypes import block, tensor_bytes
from estimator.inventory import Inventory, Linear
from estimator.job import Job, Mode, Precision

BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes Params4bit default blocksize
BNB_NESTED_BLOCKSIZE = 256  # double quantization's blocksize for the absmax
BNB_4BIT_CODE_ENTRIES = 16  # nf4/fp4 code table, fp32, one per quantized layer


@dataclass(frozen=True)
class Placed:
    """One stored tensor group: a parameter (or a LoRA adapter matrix) as it sits on the GPU."""

    name: str
    numel: int
    dtype: str  # storage dtype of the trainable/compute view ("fp32", "bf16", "nf4", "int8"…)
    bytes: int  # allocated bytes, quantization state included
    trainable: bool
    kind: str  # "base" | "quantized" | "adapter"


def _plain_dtype(job: Job) -> str:
    if job.mode is Mode.INFERENCE:
        return job.weights.value if job.weights.value in ("fp32", "bf16", "fp16") else "bf16"
    if job.mode is Mode.FULL:
        return "fp32" if job.precision.is_amp else job.precision.value
    if job.mode is Mode.LORA:
        return job.base_dtype.value
    return "fp32"  # qlora: prepare_model_for_kbit_training upcasts all non-4-bit parameters


def quantized_4bit_bytes(numel: int, rows: int, double_quant: bool) -> int:
    """Allocated bytes of one 4-bit linear: packed codes, absmax (possibly quantized), code table."""
    blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
    total = block(math.ceil(numel / 2)) + tensor_bytes(BNB_4BIT_CODE_ENTRIES, "fp32")
    if double_quant:
        total += block(blocks)  # uint8 absmax
        total += tensor_bytes(1, "fp32")  # offset
        total += tensor_bytes(math.ceil(blocks / BNB_NESTED_BLOCKSIZE), "fp32")  # nested absmax
    else:
        total += tensor_bytes(blocks, "fp32")
    return total


def int8_bytes(numel: int, rows: int) -> int:
    """LLM.int8 weight: int8 per weight, fp32 scale per output row (SCB)."""
    return block(numel) + tensor_bytes(rows, "fp32")


def lora_targets(inv: Inventory, job: Job) -> tuple[Linear, ...]:
    """The linears PEFT adapts: `all-linear` as PEFT resolves it, else names matched as suffixes."""
    if not job.uses_lora:
        return ()
    if job.lora_targets == ("all-linear",):
        return tuple(lin for lin in inv.linears if lin.peft_all_linear)
    chosen = []
    for lin in inv.linears:
        if any(lin.name == t or lin.name.endswith("." + t) for t in job.lora_targets):
            chosen.append(lin)
    if not chosen:
        names = sorted({lin.name.rsplit(".", 1)[-1] for lin in inv.linears if lin.peft_all_linear})
        raise ValueError(
            f"no linear layer matches lora targets {','.join(job.lora_targets)}; this model's linears are: {', '.join(names)}"
        )
    return tuple(chosen)


def adapter_dtype(job: Job) -> str:
    """PEFT keeps adapters in fp32 for a half-precision base (autocast_adapter_dtype=True)."""
    return "fp32"


def placements(inv: Inventory, job: Job) -> tuple[Placed, ...]:
    """Every parameter and adapter as stored for this job (memoized per inventory)."""
    key = ("placements", job.mode, _plain_dtype(job), job.weights, job.quant, job.double_quant, job.lora_r, job.lora_targets)
    memo = inv.memo()
    if key not in memo:
        memo[key] = _placements(inv, job)
    return memo[key]


def _placements(inv: Inventory, job: Job) -> tuple[Placed, ...]:
    dtype = _plain_dtype(job)
    quant = None
    if job.mode is Mode.INFERENCE and job.weights.value in ("int8", "nf4", "fp4"):
        quant = job.weights.value
    elif job.mode is Mode.QLORA:
        quant = job.quant.value
    double_quant = job.double_quant  # on by default (SPEC); --no-double-quant turns it off
    base_trainable = job.mode is Mode.FULL

    rows_of = {lin.name + ".weight": lin.out_features for lin in inv.linears}
    stored = dict(inv.prequantized)
    replaced_bias = {name.removesuffix(".weight") + ".bias" for name in stored}
    out: list[Placed] = []
    for p in inv.params:
        if stored and job.mode is Mode.INFERENCE and (p.name in stored or p.name in replaced_bias):
            # A pre-quantized checkpoint loads as stored, whatever --weights says; its bias is in the sum.
            size = stored.get(p.name, 0)
            out.append(Placed(p.name, p.numel, "prequantized", block(size) if size else 0, False, "quantized"))
        elif quant is not None and p.in_quantized_linear:
            rows = rows_of.get(p.name, p.shape[0])
            if quant == "int8":
                size = int8_bytes(p.numel, rows)
            else:
                size = quantized_4bit_bytes(p.numel, rows, double_quant)
            out.append(Placed(p.name, p.numel, quant, size, False, "quantized"))
        else:
            out.append(Placed(p.name, p.numel, dtype, tensor_bytes(p.numel, dtype), base_trainable, "base"))
    if job.uses_lora:
        a_dtype = adapter_dtype(job)
        for lin in lora_targets(inv, job):
            a = job.lora_r * lin.in_features
            b = lin.out_features * job.lora_r
            out.append(Placed(lin.name + ".lora_A", a, a_dtype, tensor_bytes(a, a_dtype), True, "adapter"))
            out.append(Placed(lin.name + ".lora_B", b, a_dtype, tensor_bytes(b, a_dtype), True, "adapter"))
    return tuple(out)


def weights_bytes(placed: tuple[Placed, ...]) -> int:
    """Base model weights as stored (quantization state included), adapters excluded."""
    return sum(p.bytes for p in placed if p.kind != "adapter")


def adapter_bytes(placed: tuple[Placed, ...]) -> int:
    return sum(p.bytes for p in placed if p.kind == "adapter")


def trainable(placed: tuple[Placed, ...]) -> tuple[Placed, ...]:
    return tuple(p for p in placed if p.trainable)


def compute_dtype(job: Job) -> str:
    """The dtype matmuls run in: autocast's for amp/LoRA/QLoRA, else the weights' own."""
    if job.mode is Mode.INFERENCE:
        return job.weights.value if job.weights.value in ("fp32", "bf16", "fp16") else "bf16"
    if job.mode is Mode.FULL:
        return {Precision.AMP_BF16: "bf16", Precision.AMP_FP16: "fp16"}.get(job.precision, job.precision.value)
    return "bf16"

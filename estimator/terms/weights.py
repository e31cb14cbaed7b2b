"""Where every parameter lives on the GPU, at which dtype, and whether it trains.

Mechanisms, each from the libraries' source:
- Plain dtypes: `from_pretrained(dtype=...)` stores every parameter at that dtype.
- bitsandbytes 4-bit and LLM.int8: each quantized weight's stored bytes come from its entry in
  `estimator/quantizers.py`.
- Which linears are quantized: transformers' `replace_with_bnb_linear` converts exactly
  `nn.Linear` and GPT-2's `Conv1D` outside its skip list (output embeddings, tied weights, the last
  parameter's module, `_keep_in_fp32_modules`); the inventory records that decision per linear.
  MoE experts stored as 3-D `nn.Parameter`s are not linears, so they stay in bf16.
- Pre-quantized checkpoints (GPTQ, AWQ, FP8, compressed-tensors, bitsandbytes-saved, MXFP4):
  inference loads them as stored; `estimator/prequantized.py` gives each replaced tensor's stored
  bytes.
- MXFP4 dequantized (`Regime.mxfp4_dequantized`: transformers without its MXFP4 kernels, or
  training): `Mxfp4Dequantize` turns each expert's blocks and scales into a bf16 tensor
  (`integrations/mxfp4.py: _convert_moe_packed_tensors`, `dtype=torch.bfloat16`), whatever dtype
  the model loads in, since the loader passes renamed (deserialized) keys through with
  `_dtype = None`; the experts' biases and every other parameter load at the load dtype. Training
  keeps today's sizing at the regime's storage dtype (the bf16 dequantization under an fp32 load
  is not modelled there).
- QLoRA: `peft.prepare_model_for_kbit_training` casts every parameter that is not `Params4bit`
  from fp16/bf16 to fp32 (embeddings, norms, `lm_head`, biases, unquantized experts).
- LoRA (`peft/tuners/lora/layer.py`): A is r × in and B is out × r per adapted linear; with
  `autocast_adapter_dtype=True` (the default) adapters of a bf16/fp16 base are kept in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.dtypes import BF16, DType, block, tensor_bytes
from estimator.inventory_types import Inventory, JobRefused, Linear
from estimator.regime import Regime

PREQUANTIZED = DType(1.0, "prequantized")  # a checkpoint's own format: bytes come from its header


@dataclass(frozen=True)
class Placed:
    """One stored tensor group: a parameter (or a LoRA adapter matrix) as it sits on the GPU."""

    name: str
    numel: int
    dtype: DType  # storage dtype of the trainable/compute view (fp32, bf16, nf4, int8…)
    bytes: int  # allocated bytes, quantization state included
    trainable: bool
    kind: str  # "base" | "quantized" | "adapter"


def lora_targets(inv: Inventory, regime: Regime) -> tuple[Linear, ...]:
    """The linears PEFT adapts: `all-linear` as PEFT resolves it, else names matched as suffixes
    (parameters PEFT adapts directly are `param_targets`)."""
    if regime.adapter is None:
        return ()
    targets = regime.adapter.targets
    if targets == ("all-linear",):
        if inv.peft_all_linear_error:
            raise JobRefused(
                f"PEFT cannot run this job: its all-linear LoRA wraps a layer whose forward then fails "
                f"({inv.peft_all_linear_error}); name the modules in --lora-targets, for example q_proj,k_proj,v_proj,o_proj"
            )
        return tuple(lin for lin in inv.linears if lin.peft_all_linear)
    chosen = [lin for lin in inv.linears if any(lin.name == t or lin.name.endswith("." + t) for t in targets)]
    if not chosen:
        names = sorted({lin.name.rsplit(".", 1)[-1] for lin in inv.linears if lin.peft_all_linear})
        raise ValueError(
            f"no linear layer matches lora targets {','.join(targets)}; this model's linears are: {', '.join(names)}"
        )
    return tuple(chosen)


def placements(inv: Inventory, regime: Regime) -> tuple[Placed, ...]:
    """Every parameter and adapter as stored for this regime (computed once per inventory and regime)."""
    return inv.derived(("placements", regime), lambda: _placements(inv, regime))


def _placements(inv: Inventory, regime: Regime) -> tuple[Placed, ...]:
    storage = regime.storage
    quantizer = regime.quantizer
    rows_of = {lin.name + ".weight": lin.out_features for lin in inv.linears}
    # A pre-quantized checkpoint loads as stored for inference, whatever --weights says; MXFP4's
    # experts only when its kernels run (else they are dequantized to bf16 on load).
    mxfp4_dequantized = inv.quant_method == "mxfp4" and regime.mxfp4_dequantized
    stored = dict(inv.prequantized) if not regime.training and not mxfp4_dequantized else {}
    dequantized = {name for name, _ in inv.prequantized} if mxfp4_dequantized and not regime.training else set()
    replaced_bias = {name.removesuffix(".weight") + ".bias" for name in stored}
    out: list[Placed] = []
    for p in inv.params:
        if stored and (p.name in stored or p.name in replaced_bias):
            size = stored.get(p.name, 0)  # its bias is in the weight's sum
            out.append(Placed(p.name, p.numel, PREQUANTIZED, block(size) if size else 0, False, "quantized"))
        elif p.name in dequantized and len(p.shape) == 3:  # Mxfp4Dequantize's bf16 output
            out.append(Placed(p.name, p.numel, BF16, tensor_bytes(p.numel, BF16), False, "base"))
        elif quantizer is not None and p.in_quantized_linear:
            size = quantizer.stored_bytes(p.numel, rows_of.get(p.name, p.shape[0]), regime.double_quant)
            out.append(Placed(p.name, p.numel, quantizer.storage, size, False, "quantized"))
        else:
            out.append(Placed(p.name, p.numel, storage, tensor_bytes(p.numel, storage), regime.base_trainable, "base"))
    if regime.adapter is not None:
        r, a_dtype = regime.adapter.r, regime.adapter.dtype
        shapes = [(lin.name, lin.in_features, lin.out_features, r) for lin in lora_targets(inv, regime)]
        shapes += [(t.name, t.in_features, t.out_features, t.rows_per_rank * r) for t in param_targets(inv, regime)]
        for name, in_features, out_features, rows in shapes:
            a, b = rows * in_features, out_features * rows
            out.append(Placed(name + ".lora_A", a, a_dtype, tensor_bytes(a, a_dtype), True, "adapter"))
            out.append(Placed(name + ".lora_B", b, a_dtype, tensor_bytes(b, a_dtype), True, "adapter"))
    return tuple(out)


def param_targets(inv: Inventory, regime: Regime):
    """The parameters PEFT's all-linear wraps directly (`lora.ParamWrapper`: 3-D experts, routers).

    PEFT refuses them with dropout (`lora/layer.py`: "lora.ParamWrapper does not work with
    lora_dropout != 0"), and so does this: a ValueError with PEFT's reason and what to change."""
    if regime.adapter is None or regime.adapter.targets != ("all-linear",) or not inv.peft_param_targets:
        return ()
    if regime.adapter.dropout:
        raise JobRefused(
            "PEFT refuses this job: lora.ParamWrapper does not work with lora_dropout != 0 (PEFT 0.21.2's all-linear "
            "adapts this model's routed experts and router as parameters); use --lora-dropout 0, or name the "
            "attention modules in --lora-targets"
        )
    return inv.peft_param_targets


def weights_bytes(placed: tuple[Placed, ...]) -> int:
    """Base model weights as stored (quantization state included), adapters excluded."""
    return sum(p.bytes for p in placed if p.kind != "adapter")


def adapter_bytes(placed: tuple[Placed, ...]) -> int:
    return sum(p.bytes for p in placed if p.kind == "adapter")


def trainable(placed: tuple[Placed, ...]) -> tuple[Placed, ...]:
    return tuple(p for p in placed if p.trainable)

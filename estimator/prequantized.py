"""Checkpoints that are already quantized: what their quantized linears take, tensor by tensor.

A `config.json` with a `quantization_config` describes weights stored in a packed format, not in
`torch_dtype`. This module turns that block plus the model's inventory into the tensors each
quantized linear stores, from the formats as their libraries write them:

- **GPTQ** (AutoGPTQ `nn_modules/qlinear/qlinear_cuda_old.py: QuantLinear`, kept by GPTQModel):
  `qweight` int32 [in·bits/32, out], `qzeros` int32 [⌈in/g⌉, out·bits/32], `scales` fp16
  [⌈in/g⌉, out], `g_idx` int32 [in] (registered whether or not `desc_act` reorders it), and an
  fp16 `bias`. Only the linears inside the decoder layers are quantized (optimum's
  `GPTQQuantizer.convert_model` walks the block list), `lm_head` only with `"lm_head": true`.
- **AWQ** (AutoAWQ `awq/modules/linear/gemm.py: WQLinear_GEMM`): `qweight` int32
  [in, out·bits/32], `qzeros` int32 [in/g, out·bits/32], `scales` fp16 [in/g, out], fp16 `bias`.
  The GEMV layout (`gemv.py`) is out-major and pads the group count to a multiple of 8.
- **bitsandbytes**, saved after quantizing (transformers' bnb serialization): 4-bit keeps two codes
  per byte, one absmax per 64 weights (fp32, or uint8 plus an fp32 absmax per 256 blocks and a
  256-entry map with double quantization) and the 16-entry code map; 8-bit keeps int8 weights and
  one fp32 scale (SCB) per output row. The small JSON `quant_state` blob is not counted.
- **FP8** (`quant_method: fp8`, transformers `integrations/finegrained_fp8.py: FP8Linear`): one
  byte per weight (`e4m3`/`e5m2`) and one `weight_scale_inv` per `weight_block_size` block, fp32
  as `FP8Linear` allocates it (some checkpoints store it in bf16; the difference is 2 bytes per
  16,384 weights), or one per tensor without blocks. DeepSeek-V3 is the block-wise [128, 128] case.
- **compressed-tensors** (`compressors/quantized_compressors/pack_quantized.py` and friends):
  `config_groups` name the weights' `num_bits`, `type`, `strategy` and `group_size`;
  `pack-quantized` packs 32/bits codes per int32 (`weight_packed` [out, ⌈in·bits/32⌉],
  `weight_shape` int64 [2], zero points packed along the output dim when asymmetric),
  `float-quantized` stores fp8 weights, `int-quantized`/`naive-quantized` int8 ones,
  `nvfp4-pack-quantized` two fp4 codes per byte with an fp8 scale per 16 weights.
- **MXFP4** (`quant_method: mxfp4`, gpt-oss; transformers 5.17 `integrations/mxfp4.py`,
  `quantizers/quantizer_mxfp4.py`): `replace_with_mxfp4_linear` swaps every `GptOssExperts`
  outside `modules_to_not_convert` (and `_keep_in_fp32_modules`) for `Mxfp4GptOssExperts`, whose
  `gate_up_proj` / `down_proj` are `<proj>_blocks` uint8 [experts, out, in/32, 16] (two 4-bit e2m1
  codes per byte) and `<proj>_scales` uint8 [experts, out, in/32] (one E8M0 exponent per 32
  weights): 4.25 bits a weight, kept as loaded (`Mxfp4Deserialize`, swizzled for the Triton
  `matmul_ogs` kernel). Its biases are allocated fp32 (`Mxfp4GptOssExperts.__init__`) and the
  loader keeps the empty parameter's dtype (`core_model_loading.convert_and_load_state_dict_in_model`,
  "Handle dtype casting"), so they load as fp32 from the bf16 checkpoint. Attention, router,
  embeddings and `lm_head` stay at the load dtype. This is the path with the kernels; without them
  transformers dequantizes the experts to bf16 on load (`Mxfp4HfQuantizer.validate_environment`
  sets `dequantize=True`), which `Regime.mxfp4_dequantized` selects (estimator/terms/weights.py).

Which linears a format quantizes follows the library that loads it; `modules_to_not_convert`,
`llm_int8_skip_modules`, `ignore` and `ignored_layers` are honoured with transformers' matching
rule (`quantizers_utils.should_convert_module`: a name prefix, a regex from the start, or a suffix).
MoE experts that transformers stores as one 3-D parameter per projection are sized as that many
linears and keyed by the parameter's name.

Pure functions of the config and the inventory: no I/O. Unknown or malformed quantization
configs give `None` (and `describe_quantization` says why) rather than an exception.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from estimator.dtypes import BF16, BY_SAFETENSORS, FP16, FP32, TORCH_NAMES
from estimator.inventory_types import Inventory, Linear, Param
from estimator.quantizers import BNB_4BIT_BLOCKSIZE, BNB_4BIT_CODE_ENTRIES, BNB_NESTED_BLOCKSIZE, BNB_NESTED_MAP_ENTRIES

# Bytes per element of each safetensors dtype come from the one table (estimator/dtypes.py), and
# bitsandbytes' block sizes from its quantizer entry (estimator/quantizers.py).
SAFETENSORS_DTYPE_BYTES: dict[str, float] = {code: float(d) for code, d in BY_SAFETENSORS.items()}
_TORCH_TO_SAFETENSORS = {name: d.safetensors for name, d in {**TORCH_NAMES, **{d.name: d for d in (BF16, FP16, FP32)}}.items()}

AWQ_PACK = 32  # AWQ and GPTQ pack 32/bits codes into each int32
MXFP4_GROUP = 32  # OCP microscaling: one E8M0 scale per 32 fp4 values (transformers' Mxfp4GptOssExperts: hidden // 32)


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as the checkpoint stores it; `dtype` is a safetensors dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.ceil(self.numel * SAFETENSORS_DTYPE_BYTES[self.dtype])


# Bounds on what a safetensors header may claim. The largest real tensors hold a few billion
# elements (a 256k × 16k embedding is 4.2e9) and the largest checkpoints about 1e12 (Kimi K2), so
# these are far beyond any real model but keep every figure an exact, finite int.
MAX_TENSOR_ELEMENTS = 1 << 42  # 4.4e12
MAX_CHECKPOINT_ELEMENTS = 1 << 46  # 7.0e13
MAX_TENSOR_DIMS = 16
MAX_HEADER_BYTES = 25_000_000  # huggingface_hub's SAFETENSORS_MAX_HEADER_LENGTH


class SafetensorsHeaderError(ValueError):
    """A safetensors header that is not one: the message says what is wrong, on one line."""


def _refuse_constant(name: str):
    raise SafetensorsHeaderError(f"it holds {name}, which no size can be")


def _size(value: Any, what: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SafetensorsHeaderError(f"{what} is {str(value)[:40]!r}, not a whole number")
    if value < 0:
        raise SafetensorsHeaderError(f"{what} is negative ({value:,})")
    if value > limit:
        raise SafetensorsHeaderError(f"{what} is beyond any real checkpoint ({str(value)[:24]}…, at most {limit:,})")
    return value


def safetensors_header_counts(raw: bytes) -> dict[str, int]:
    """Stored element counts per dtype from one safetensors header, checked; else SafetensorsHeaderError.

    `raw` is the JSON that follows the file's 8-byte length (safetensors' README, "Format"):
    `{name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}, "__metadata__": {...}}`.
    Every shape and offset must be a non-negative whole number within the bounds above (JSON's
    1e200, Infinity, NaN and negative sizes are refused), `begin <= end`, and `end - begin` must be
    the tensor's bytes (numel × the dtype's size), as the safetensors library itself requires.
    """
    if len(raw) > MAX_HEADER_BYTES:
        raise SafetensorsHeaderError(f"it is {len(raw):,} bytes long (at most {MAX_HEADER_BYTES:,})")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except SafetensorsHeaderError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise SafetensorsHeaderError(f"it is not JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"it is a JSON {type(header).__name__}, not an object")
    counts: dict[str, int] = {}
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shown = f"tensor {name[:60]!r}"
        if not isinstance(entry, dict):
            raise SafetensorsHeaderError(f"{shown} is not an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or not dtype or len(dtype) > 16:
            raise SafetensorsHeaderError(f"{shown} has no dtype")
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS:
            raise SafetensorsHeaderError(f"{shown} has no shape list of at most {MAX_TENSOR_DIMS} sizes")
        numel = 1
        for dim in shape:
            numel *= _size(dim, f"a size of {shown}", MAX_TENSOR_ELEMENTS)
            _size(numel, f"the element count of {shown}", MAX_TENSOR_ELEMENTS)
        offsets = entry.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise SafetensorsHeaderError(f"{shown} has no data_offsets [begin, end]")
        limit = MAX_TENSOR_ELEMENTS * 8
        begin, end = (_size(v, f"an offset of {shown}", MAX_CHECKPOINT_ELEMENTS * 8) for v in offsets)
        if end < begin or end - begin > limit:
            raise SafetensorsHeaderError(f"{shown} has data_offsets [{begin:,}, {end:,}], which end before they begin or span too much")
        size = SAFETENSORS_DTYPE_BYTES.get(dtype.upper())
        if size is not None and end - begin != math.ceil(numel * size):
            raise SafetensorsHeaderError(f"{shown} has {numel:,} {dtype} elements but data_offsets spanning {end - begin:,} bytes")
        total = _size(total + numel, "the header's element count", MAX_CHECKPOINT_ELEMENTS)
        counts[dtype] = counts.get(dtype, 0) + numel
    return counts


def safetensors_bytes(params_by_dtype: dict[str, int]) -> int:
    """Bytes of weights given stored element counts per safetensors dtype (as the Hub's header reports).

    Unknown dtypes count 2 bytes an element, the usual half precision. Counts must be whole numbers
    within MAX_CHECKPOINT_ELEMENTS (SafetensorsHeaderError otherwise), so the result is a finite int.
    """
    total = 0.0
    for dtype, count in params_by_dtype.items():
        count = _size(count, f"the {str(dtype)[:16]} element count", MAX_CHECKPOINT_ELEMENTS)
        total += count * SAFETENSORS_DTYPE_BYTES.get(str(dtype).upper(), 2)
    return math.ceil(total)


def checkpoint_dtype(config: dict, default: str = "BF16") -> str:
    """The safetensors dtype of the unquantized tensors: config's `dtype` / `torch_dtype`."""
    for source in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else None):
        if not isinstance(source, dict):
            continue
        for key in ("dtype", "torch_dtype"):
            value = source.get(key)
            if isinstance(value, str) and value.lower().removeprefix("torch.") in _TORCH_TO_SAFETENSORS:
                return _TORCH_TO_SAFETENSORS[value.lower().removeprefix("torch.")]
    return default


# -------------------------------------------------------------------------------------------------
# Reading the quantization_config
# -------------------------------------------------------------------------------------------------
def quantization_config(config: Any) -> dict | None:
    """The `quantization_config` block (top level, else the text config's), or None."""
    if not isinstance(config, dict):
        return None
    block = config.get("quantization_config")
    if block is None and isinstance(config.get("text_config"), dict):
        block = config["text_config"].get("quantization_config")
    return block if isinstance(block, dict) else None


def quant_method(config: Any) -> str | None:
    """`gptq`, `awq`, `bitsandbytes`, `fp8`, `compressed-tensors`… as the config names it, lower-cased."""
    block = quantization_config(config)
    if block is None:
        return None
    method = block.get("quant_method")
    if isinstance(method, str) and method.strip():
        return method.strip().lower().replace("_", "-")
    if block.get("load_in_4bit") or block.get("load_in_8bit") or block.get("_load_in_4bit") or block.get("_load_in_8bit"):
        return "bitsandbytes"
    return None


class _Malformed(ValueError):
    pass


def _int(block: dict, *keys: str, default: int | None = None, allow_negative_one: bool = False) -> int:
    for key in keys:
        if key in block and block[key] is not None:
            value = block[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise _Malformed(f"{key} must be a whole number, got {value!r}")
            if value == -1 and allow_negative_one:
                return -1
            if value < 1:
                raise _Malformed(f"{key} must be positive, got {value}")
            return value
    if default is None:
        raise _Malformed(f"{' or '.join(keys)} is missing")
    return default


def _names(block: dict, *keys: str) -> list[str]:
    out: list[str] = []
    for key in keys:
        value = block.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _Malformed(f"{key} must be a list of module names")
        for item in value:
            if isinstance(item, (list, tuple)):  # GPTQ's modules_in_block_to_quantize is a list of lists
                out.extend(str(x) for x in item)
            elif isinstance(item, str):
                out.append(item)
            else:
                raise _Malformed(f"{key} must hold module names, got {item!r}")
    return out


def _skipped(name: str, patterns: list[str]) -> bool:
    """transformers' `should_convert_module` rule, negated: prefix + dot, regex from the start, or suffix."""
    for key in patterns:
        if not key:
            continue
        if name == key or name.endswith(key) or name.startswith(key + "."):
            return True
        try:
            if re.match(f"{key}\\.", name) or re.match(key, name):
                return True
        except re.error:
            continue
    return False


def _ct_matches(name: str, target: str) -> bool:
    """compressed-tensors' target rule: `re:` regexes match the module name, else a name or a suffix."""
    if target.startswith("re:"):
        try:
            return re.match(target[3:], name) is not None
        except re.error:
            return False
    return name == target or name.endswith("." + target)


# -------------------------------------------------------------------------------------------------
# One linear per format: (in, out, bias) → stored tensors
# -------------------------------------------------------------------------------------------------
Layout = Callable[[str, int, int, bool], list[StoredTensor]]


def _gptq_layout(bits: int, group: int, dtype: str) -> Layout:
    def layout(name: str, n_in: int, n_out: int, bias: bool) -> list[StoredTensor]:
        g = max(1, n_in if group == -1 else group)
        groups = math.ceil(n_in / g)
        out = [
            StoredTensor(f"{name}.qweight", (math.ceil(n_in * bits / 32), n_out), "I32"),
            StoredTensor(f"{name}.qzeros", (groups, math.ceil(n_out * bits / 32)), "I32"),
            StoredTensor(f"{name}.scales", (groups, n_out), "F16"),
            StoredTensor(f"{name}.g_idx", (n_in,), "I32"),
        ]
        if bias:
            out.append(StoredTensor(f"{name}.bias", (n_out,), "F16"))
        return out

    return layout


def _awq_layout(bits: int, group: int, gemv: bool) -> Layout:
    pack = AWQ_PACK // bits

    def layout(name: str, n_in: int, n_out: int, bias: bool) -> list[StoredTensor]:
        g = max(1, n_in if group == -1 else group)
        if gemv:
            # awq/modules/linear/gemv.py: calculate_zeros_width pads the group count
            multiplier = 1 if g >= 128 else {64: 2, 32: 4}.get(g, 1)
            width = math.ceil(math.ceil(n_in / g) / pack)
            width = math.ceil(width / multiplier) * multiplier
            out = [
                StoredTensor(f"{name}.qweight", (n_out, math.ceil(n_in / pack)), "I32"),
                StoredTensor(f"{name}.qzeros", (n_out, width), "I32"),
                StoredTensor(f"{name}.scales", (n_out, width * pack), "F16"),
            ]
        else:
            groups = math.ceil(n_in / g)
            out = [
                StoredTensor(f"{name}.qweight", (n_in, math.ceil(n_out / pack)), "I32"),
                StoredTensor(f"{name}.qzeros", (groups, math.ceil(n_out / pack)), "I32"),
                StoredTensor(f"{name}.scales", (groups, n_out), "F16"),
            ]
        if bias:
            out.append(StoredTensor(f"{name}.bias", (n_out,), "F16"))
        return out

    return layout


def _bnb4_layout(double_quant: bool, dtype: str) -> Layout:
    def layout(name: str, n_in: int, n_out: int, bias: bool) -> list[StoredTensor]:
        numel = n_in * n_out
        blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
        out = [
            StoredTensor(f"{name}.weight", (math.ceil(numel / 2), 1), "U8"),
            StoredTensor(f"{name}.weight.quant_map", (BNB_4BIT_CODE_ENTRIES,), "F32"),
        ]
        if double_quant:
            out += [
                StoredTensor(f"{name}.weight.absmax", (blocks,), "U8"),
                StoredTensor(f"{name}.weight.nested_absmax", (math.ceil(blocks / BNB_NESTED_BLOCKSIZE),), "F32"),
                StoredTensor(f"{name}.weight.nested_quant_map", (BNB_NESTED_MAP_ENTRIES,), "F32"),
            ]
        else:
            out.append(StoredTensor(f"{name}.weight.absmax", (blocks,), "F32"))
        if bias:
            out.append(StoredTensor(f"{name}.bias", (n_out,), dtype))
        return out

    return layout


def _bnb8_layout(dtype: str) -> Layout:
    def layout(name: str, n_in: int, n_out: int, bias: bool) -> list[StoredTensor]:
        out = [StoredTensor(f"{name}.weight", (n_out, n_in), "I8"), StoredTensor(f"{name}.SCB", (n_out,), "F32")]
        if bias:
            out.append(StoredTensor(f"{name}.bias", (n_out,), dtype))
        return out

    return layout


def _fp8_layout(weight_dtype: str, block: tuple[int, int] | None, scale_dtype: str, static: bool, dtype: str) -> Layout:
    def layout(name: str, n_in: int, n_out: int, bias: bool) -> list[StoredTensor]:
        out = [StoredTensor(f"{name}.weight", (n_out, n_in), weight_dtype)]
        if block is None:
            out.append(StoredTensor(f"{name}.weight_scale_inv", (), "F32"))
        else:
            grid = (math.ceil(n_out / block[0]), math.ceil(n_in / block[1]))
            out.append(StoredTensor(f"{name}.weight_scale_inv", grid, scale_dtype))
        if static:
            out.append(StoredTensor(f"{name}.activation_scale", (), "F32"))
        if bias:
            out.append(StoredTensor(f"{name}.bias", (n_out,), dtype))
        return out

    return layout


def _fbgemm_fp8_layout(dtype: str) -> Layout:
    def layout(name: str, n_in: int, n_out: int, bias: bool) -> list[StoredTensor]:
        out = [StoredTensor(f"{name}.weight", (n_out, n_in), "F8_E4M3"), StoredTensor(f"{name}.weight_scale", (n_out, 1), "F32")]
        if bias:
            out.append(StoredTensor(f"{name}.bias", (n_out,), dtype))
        return out

    return layout


def _ct_scale_shape(strategy: str, n_in: int, n_out: int, group: int | None, block: tuple[int, int] | None) -> tuple[int, ...]:
    if strategy in ("group", "tensor_group"):
        return (n_out, math.ceil(n_in / max(1, group or n_in)))
    if strategy == "channel":
        return (n_out, 1)
    if strategy == "block" and block is not None:
        return (math.ceil(n_out / block[0]), math.ceil(n_in / block[1]))
    return (1,)


def _ct_layout(fmt: str, args: dict, input_args: dict | None, dtype: str) -> Layout:
    """compressed-tensors: one scheme's weights (`QuantizationArgs`) in one storage format."""
    bits = _int(args, "num_bits", default=8)
    kind = str(args.get("type") or "int").lower()
    strategy = str(args.get("strategy") or "tensor").lower()
    group = args.get("group_size") if isinstance(args.get("group_size"), int) and args.get("group_size") > 0 else None
    block_raw = args.get("block_structure")
    block = tuple(int(x) for x in block_raw) if isinstance(block_raw, (list, tuple)) and len(block_raw) == 2 else None
    if block is not None and any(x < 1 for x in block):
        raise _Malformed("block_structure must hold two positive sizes")
    symmetric = args.get("symmetric", True) is not False
    actorder = str(args.get("actorder") or "").lower()
    scale_dtype = _TORCH_TO_SAFETENSORS.get(str(args.get("scale_dtype") or "").lower().removeprefix("torch."), dtype)
    static_input = isinstance(input_args, dict) and not input_args.get("dynamic", False)

    def layout(name: str, n_in: int, n_out: int, bias: bool) -> list[StoredTensor]:
        scale = _ct_scale_shape(strategy, n_in, n_out, group, block)
        out: list[StoredTensor] = []
        if fmt == "pack-quantized":
            pack = 32 // bits
            out += [
                StoredTensor(f"{name}.weight_packed", (n_out, math.ceil(n_in / pack)), "I32"),
                StoredTensor(f"{name}.weight_shape", (2,), "I64"),
                StoredTensor(f"{name}.weight_scale", scale, scale_dtype),
            ]
            if not symmetric and strategy in ("group", "channel"):
                out.append(StoredTensor(f"{name}.weight_zero_point", (math.ceil(scale[0] / pack), scale[1]), "I32"))
        elif fmt == "nvfp4-pack-quantized":
            out += [
                StoredTensor(f"{name}.weight_packed", (n_out, math.ceil(n_in / 2)), "U8"),
                StoredTensor(f"{name}.weight_scale", (n_out, math.ceil(n_in / (group or 16))), "F8_E4M3"),
                StoredTensor(f"{name}.weight_global_scale", (1,), "F32"),
            ]
            if isinstance(input_args, dict):
                out.append(StoredTensor(f"{name}.input_global_scale", (1,), "F32"))
        else:  # float-quantized, int-quantized, naive-quantized: one code per weight, unpacked
            weight_dtype = "F8_E4M3" if kind == "float" else "I8"
            out += [StoredTensor(f"{name}.weight", (n_out, n_in), weight_dtype), StoredTensor(f"{name}.weight_scale", scale, scale_dtype)]
            if not symmetric:
                out.append(StoredTensor(f"{name}.weight_zero_point", scale, "I8"))
        if actorder == "group" and strategy == "group":
            out.append(StoredTensor(f"{name}.weight_g_idx", (n_in,), "I32"))
        if static_input and fmt != "nvfp4-pack-quantized":
            out.append(StoredTensor(f"{name}.input_scale", (1,), scale_dtype))
        if bias:
            out.append(StoredTensor(f"{name}.bias", (n_out,), dtype))
        return out

    return layout


# -------------------------------------------------------------------------------------------------
# Which modules each format quantizes, and with which layout
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    description: str
    pick: Callable[[Linear], Layout | None]  # the layout of a linear, None when it stays unquantized
    pick_expert: Callable[[Param], Layout | None]  # the same for a 3-D MoE expert parameter
    default_dtype: str = "BF16"
    # A format that stores expert parameters in its own layout (MXFP4): every expert parameter's
    # tensors as loaded, or None where it stays as it is. Used instead of pick_expert.
    expert_tensors: Callable[[Param], tuple[StoredTensor, ...] | None] | None = None


def _in_layers(lin: Linear) -> bool:
    return lin.layer is not None and lin.role != "router"


def _plan(config: dict) -> _Plan | str | None:
    """The plan for this config; a string says why it cannot be sized; None when not quantized."""
    block = quantization_config(config)
    if block is None:
        return None
    method = quant_method(config)
    if method is None:
        return "quantization_config names no quant_method, so the stored weights cannot be sized"
    dtype = checkpoint_dtype(config, "F16" if method in ("gptq", "awq") else "BF16")
    never: Callable[[Param], Layout | None] = lambda p: None  # noqa: E731
    try:
        if method == "gptq":
            bits = _int(block, "bits", "w_bit")
            if bits not in (2, 3, 4, 8):
                raise _Malformed(f"GPTQ stores 2, 3, 4 or 8 bits, not {bits}")
            group = _int(block, "group_size", default=128, allow_negative_one=True)
            skip = _names(block, "modules_to_not_convert")
            only = _names(block, "modules_in_block_to_quantize")
            quantize_head = block.get("lm_head") is True
            layout = _gptq_layout(bits, group, dtype)

            def pick(lin: Linear) -> Layout | None:
                if lin.role == "lm_head":
                    return layout if quantize_head else None
                if not _in_layers(lin) or _skipped(lin.name, skip):
                    return None
                if only and not any(lin.name.endswith("." + m) or lin.name.endswith(m) for m in only):
                    return None
                return layout

            def pick_expert(p: Param) -> Layout | None:
                if _skipped(p.name, skip) or (only and not any("experts" in m for m in only)):
                    return None
                return layout

            act = ", act-order" if block.get("desc_act") else ""
            sym = "symmetric" if block.get("sym", True) else "asymmetric"
            g = "per column" if group == -1 else f"groups of {group}"
            return _Plan(f"GPTQ {bits}-bit, {g}{act}, {sym}: int32-packed codes, fp16 scales, g_idx", pick, pick_expert, dtype)

        if method == "awq":
            bits = _int(block, "bits", "w_bit")
            if bits not in (2, 3, 4, 8):
                raise _Malformed(f"AWQ stores 4-bit codes (2, 3 and 8 in some forks), not {bits}")
            group = _int(block, "group_size", "q_group_size", default=128, allow_negative_one=True)
            version = str(block.get("version") or "gemm").lower()
            skip = _names(block, "modules_to_not_convert")
            layout = _awq_layout(bits, group, gemv=version == "gemv")

            def skipped(name: str) -> bool:
                # AutoAWQ's exclude_layers_to_not_quantize skips any name containing a key; transformers
                # then loads what was stored
                return _skipped(name, skip) or any(key and key in name for key in skip)

            def pick(lin: Linear) -> Layout | None:
                return layout if _in_layers(lin) and not skipped(lin.name) else None

            def pick_expert(p: Param) -> Layout | None:
                return None if skipped(p.name) else layout

            zero = ", zero point" if block.get("zero_point", True) else ""
            return _Plan(f"AWQ {bits}-bit {version.upper()}, groups of {group}{zero}: int32-packed codes, fp16 scales", pick, pick_expert, dtype)

        if method == "bitsandbytes":
            four = bool(block.get("load_in_4bit") or block.get("_load_in_4bit"))
            eight = bool(block.get("load_in_8bit") or block.get("_load_in_8bit"))
            if four == eight:
                raise _Malformed("a bitsandbytes config must set exactly one of load_in_4bit and load_in_8bit")
            skip = _names(block, "llm_int8_skip_modules", "modules_to_not_convert")
            if four:
                double = bool(block.get("bnb_4bit_use_double_quant", False))
                kind = str(block.get("bnb_4bit_quant_type") or "fp4").lower()
                layout = _bnb4_layout(double, dtype)
                text = f"bitsandbytes 4-bit {kind}{' with double quantization' if double else ''}: two codes per byte, absmax per {BNB_4BIT_BLOCKSIZE}"
            else:
                layout = _bnb8_layout(dtype)
                text = "bitsandbytes LLM.int8: int8 weights, one fp32 scale per output row"

            def pick(lin: Linear) -> Layout | None:
                return layout if lin.bnb_quantized and not _skipped(lin.name, skip) else None

            return _Plan(text, pick, never, dtype)

        if method in ("fp8", "fbgemm-fp8"):
            skip = _names(block, "modules_to_not_convert", "ignored_layers")
            if method == "fbgemm-fp8":
                layout = _fbgemm_fp8_layout(dtype)
                text = "FBGEMM FP8: e4m3 weights, one fp32 scale per output row"
                expert_layout: Layout | None = None
            else:
                fmt = str(block.get("fmt") or "e4m3").lower()
                weight_dtype = "F8_E5M2" if fmt == "e5m2" else "F8_E4M3"
                raw = block.get("weight_block_size")
                if raw is None:
                    grid = None
                elif isinstance(raw, (list, tuple)) and len(raw) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in raw):
                    grid = (int(raw[0]), int(raw[1]))
                else:
                    raise _Malformed(f"weight_block_size must be two positive sizes, got {raw!r}")
                scale_dtype = "F8_E8M0" if str(block.get("scale_fmt") or "").lower() == "ue8m0" else "F32"
                static = str(block.get("activation_scheme") or "dynamic").lower() == "static"
                layout = _fp8_layout(weight_dtype, grid, scale_dtype, static, dtype)
                expert_layout = layout
                where = f"one {'ue8m0' if scale_dtype == 'F8_E8M0' else 'fp32'} scale per {grid[0]}×{grid[1]} block" if grid else "one fp32 scale per tensor"
                text = f"FP8 {fmt}: one byte per weight, {where}"

            def pick(lin: Linear) -> Layout | None:
                return layout if lin.bnb_quantized and not _skipped(lin.name, skip) else None

            def pick_expert(p: Param) -> Layout | None:
                return expert_layout if expert_layout is not None and not _skipped(p.name, skip) else None

            return _Plan(text, pick, pick_expert, dtype)

        if method == "compressed-tensors":
            groups = block.get("config_groups")
            if not isinstance(groups, dict) or not groups:
                raise _Malformed("config_groups is missing")
            global_fmt = str(block.get("format") or "").lower()
            ignore = [str(x) for x in _names(block, "ignore")]
            schemes: list[tuple[list[str], Layout, str]] = []
            for group_name, scheme in groups.items():
                if not isinstance(scheme, dict):
                    raise _Malformed(f"config group {group_name!r} is not an object")
                targets = _names(scheme, "targets") or ["Linear"]
                weights = scheme.get("weights")
                if not isinstance(weights, dict):
                    continue  # activation-only schemes leave the stored weights alone
                fmt = str(scheme.get("format") or global_fmt or "").lower()
                if fmt in ("", "mixed-precision"):
                    fmt = "pack-quantized" if str(weights.get("type") or "int") == "int" and _int(weights, "num_bits", default=8) < 8 else (
                        "float-quantized" if str(weights.get("type")) == "float" else "int-quantized"
                    )
                if fmt not in ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized", "nvfp4-pack-quantized"):
                    return f"compressed-tensors format {fmt!r} is not one the estimator can size"
                bits = _int(weights, "num_bits", default=8)
                if not 1 <= bits <= 8:
                    raise _Malformed(f"num_bits must be 1 to 8, got {bits}")
                layout = _ct_layout(fmt, weights, scheme.get("input_activations"), dtype)
                kind = "fp" if str(weights.get("type")) == "float" else "int"
                strategy = str(weights.get("strategy") or "tensor")
                size = f" {weights.get('group_size')}" if strategy == "group" else ""
                schemes.append((targets, layout, f"{fmt} {kind}{bits} per {strategy}{size}"))
            if not schemes:
                return None

            def choose(name: str, is_linear: bool) -> Layout | None:
                if any(_ct_matches(name, i) for i in ignore):
                    return None
                chosen = None
                for targets, layout, _ in schemes:  # later groups override earlier ones, as they are applied in order
                    if any((t == "Linear" and is_linear) or _ct_matches(name, t) for t in targets):
                        chosen = layout
                return chosen

            text = "compressed-tensors " + "; ".join(sorted({s[2] for s in schemes}))
            return _Plan(text, lambda lin: choose(lin.name, True), lambda p: choose(p.name, True), dtype)
        if method == "mxfp4":
            if str(config.get("model_type") or "") != "gpt_oss":
                return ("MXFP4 in transformers 5.17 converts only gpt-oss' experts (GptOssExperts), "
                        f"not a {config.get('model_type')!r} model's, so the stored weights cannot be sized")
            skip = _names(block, "modules_to_not_convert")
            never_linear: Callable[[Linear], Layout | None] = lambda lin: None  # noqa: E731

            def expert_tensors(p: Param) -> tuple[StoredTensor, ...] | None:
                module, _, leaf = p.name.rpartition(".")
                if not module.endswith(".experts") or _skipped(module, skip):
                    return None
                if leaf in ("gate_up_proj", "down_proj") and len(p.shape) == 3:
                    experts, n_in, n_out = p.shape  # GptOssExperts holds them transposed: [experts, in, out]
                    groups = math.ceil(n_in / MXFP4_GROUP)
                    return (StoredTensor(f"{p.name}_blocks", (experts, n_out, groups, MXFP4_GROUP // 2), "U8"),
                            StoredTensor(f"{p.name}_scales", (experts, n_out, groups), "U8"))
                if leaf in ("gate_up_proj_bias", "down_proj_bias"):
                    return (StoredTensor(p.name, p.shape, "F32"),)
                return None

            return _Plan("MXFP4 experts (gpt-oss): two e2m1 codes per byte, one E8M0 scale per 32 weights (4.25 bits), "
                         "fp32 expert biases; attention, router, embeddings and lm_head unquantized",
                         never_linear, never, dtype, expert_tensors)
    except _Malformed as err:
        return f"the {method} quantization_config is malformed ({err}), so the stored weights cannot be sized"
    return f"quant_method {method!r} is not one the estimator can size (it knows gptq, awq, bitsandbytes, fp8, fbgemm_fp8, compressed-tensors, mxfp4)"


# -------------------------------------------------------------------------------------------------
# Public API
# -------------------------------------------------------------------------------------------------
def describe_quantization(config: dict) -> str | None:
    """One line on the checkpoint's stored quantization; None when the config has none.

    For a method this module cannot size (or a malformed block) the line says so, and
    `prequantized_linear_bytes` returns None for it.
    """
    plan = _plan(config) if isinstance(config, dict) else None
    if plan is None:
        return None
    if isinstance(plan, str):
        return plan + "; its weights are sized as if unquantized"
    return "pre-quantized checkpoint: " + plan.description


def _expert_params(inv: Inventory) -> list[Param]:
    return [p for p in inv.params if p.kind == "expert" and len(p.shape) == 3 and p.layer is not None]


def prequantized_linear_tensors(config: dict, inv: Inventory) -> dict[str, tuple[StoredTensor, ...]] | None:
    """Every quantized linear's stored tensors (weight codes, scales, zeros, g_idx, bias), by linear name.

    MoE experts held as one 3-D parameter `[experts, out, in]` are keyed by that parameter's name and
    stored as `experts` linears (a fused gate_up counts as its two halves: same bytes, twice the g_idx).
    None when the config is not pre-quantized or its method cannot be sized.
    """
    plan = _plan(config) if isinstance(config, dict) else None
    if plan is None or isinstance(plan, str):
        return None
    out: dict[str, tuple[StoredTensor, ...]] = {}
    for lin in inv.linears:
        layout = plan.pick(lin)
        if layout is not None:
            out[lin.name] = tuple(layout(lin.name, lin.in_features, lin.out_features, lin.bias))
    if plan.expert_tensors is not None:
        for p in inv.params:
            group = plan.expert_tensors(p) if p.kind == "expert" and p.layer is not None else None
            if group:
                out[p.name] = group
        return out
    for p in _expert_params(inv):
        layout = plan.pick_expert(p)
        if layout is None:
            continue
        experts, n_out, n_in = p.shape
        halves = 2 if "gate_up" in p.name.rsplit(".", 1)[-1] and n_out % 2 == 0 else 1
        one = layout(p.name, n_in, n_out // halves, False)
        out[p.name] = tuple(
            StoredTensor(t.name, (experts * halves,) + t.shape, t.dtype) for t in one
        )
    return out


def prequantized_linear_bytes(config: dict, inv: Inventory) -> dict[str, int] | None:
    """Stored bytes of every quantized linear weight, scales/zeros/g_idx (and its bias) included.

    Keyed by linear name (e.g. "model.layers.0.mlp.up_proj"); bytes are the checkpoint's, without
    the CUDA allocator's rounding. None when the config is not pre-quantized or cannot be sized.
    """
    tensors = prequantized_linear_tensors(config, inv)
    if tensors is None:
        return None
    return {name: sum(t.nbytes for t in group) for name, group in tensors.items()}


def quantized_param_names(config: dict, inv: Inventory) -> frozenset[str] | None:
    """Names of the inventory's parameters that the quantized tensors replace (weights and biases)."""
    tensors = prequantized_linear_tensors(config, inv)
    if tensors is None:
        return None
    names: set[str] = set()
    param_names = {p.name for p in inv.params}
    for key in tensors:
        if key in param_names:
            names.add(key)
        else:
            names.update((key + ".weight", key + ".bias"))
    return frozenset(names)


def checkpoint_bytes(config: dict, inv: Inventory) -> int | None:
    """Bytes of the whole checkpoint: quantized linears as stored, every other parameter at `checkpoint_dtype`.

    Tied weights count once, as the checkpoint stores them once; non-persistent buffers (rotary
    frequencies) are not stored. None when the config is not pre-quantized or cannot be sized.
    """
    tensors = prequantized_linear_tensors(config, inv)
    plan = _plan(config)
    if tensors is None or plan is None or isinstance(plan, str):
        return None
    replaced = quantized_param_names(config, inv) or frozenset()
    per = SAFETENSORS_DTYPE_BYTES[plan.default_dtype]
    rest = sum(math.ceil(p.numel * per) for p in inv.params if p.name not in replaced)
    return rest + sum(t.nbytes for group in tensors.values() for t in group)

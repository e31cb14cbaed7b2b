"""Writes the safetensors headers under tests/data/prequantized/ (run from the repository root).

The Hub was not reachable when these files were made, so each header is derived, tensor by
tensor, from the model's real config.json and the format its quantizer writes. This script
deliberately does not use `estimator`: it lists each architecture's tensors by hand, so the test
compares two independent derivations of the same published format.

- GPTQ: AutoGPTQ `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`, `QuantLinear.__init__`:
  qweight int32 [in // 32 * bits, out], qzeros int32 [ceil(in / g), out // 32 * bits],
  scales fp16 [ceil(in / g), out], g_idx int32 [in] (always registered), bias fp16 [out].
- AWQ: AutoAWQ `awq/modules/linear/gemm.py`, `WQLinear_GEMM.__init__`: qweight int32
  [in, out // 8], qzeros int32 [in // g, out // 8], scales fp16 [in // g, out], bias fp16 [out].
- FP8 (Qwen3-FP8 release): weight F8_E4M3 [out, in], weight_scale_inv BF16 [ceil(out / 128),
  ceil(in / 128)]. The dtype and one shape are read from a header dump quoted in
  https://github.com/modular/modular/issues/7142 ("Qwen/Qwen3-1.7B-FP8 ... 196 scale tensors,
  all BF16, blockwise (e.g. model.layers.0.mlp.down_proj.weight_scale_inv shape [16, 48]), with
  weights in F8_E4M3"); 196 = 28 layers x 7 linears, so lm_head (tied) is not quantized.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
BYTES = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "F8_E4M3": 1, "I64": 8, "U8": 1, "I8": 1}


def dense_tensors(cfg: dict, qk_norm: bool, qkv_bias: bool):
    """(name, shape, role) of a Llama-like decoder; role 'linear' marks the quantizable ones."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or h // heads
    yield "model.embed_tokens.weight", (vocab, h), "plain"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), "plain"
        yield p + "post_attention_layernorm.weight", (h,), "plain"
        for name, n_in, n_out, bias in (
            ("self_attn.q_proj", h, heads * head_dim, qkv_bias),
            ("self_attn.k_proj", h, kv * head_dim, qkv_bias),
            ("self_attn.v_proj", h, kv * head_dim, qkv_bias),
            ("self_attn.o_proj", heads * head_dim, h, False),
            ("mlp.gate_proj", h, inter, False),
            ("mlp.up_proj", h, inter, False),
            ("mlp.down_proj", inter, h, False),
        ):
            yield p + name, (n_in, n_out, bias), "linear"
        if qk_norm:
            yield p + "self_attn.q_norm.weight", (head_dim,), "plain"
            yield p + "self_attn.k_norm.weight", (head_dim,), "plain"
    yield "model.norm.weight", (h,), "plain"
    if not cfg.get("tie_word_embeddings", False):
        yield "lm_head.weight", (vocab, h), "plain"


def gptq(name, n_in, n_out, bias, bits=4, g=128):
    out = {
        name + ".qweight": ("I32", [n_in // 32 * bits, n_out]),
        name + ".qzeros": ("I32", [math.ceil(n_in / g), n_out // 32 * bits]),
        name + ".scales": ("F16", [math.ceil(n_in / g), n_out]),
        name + ".g_idx": ("I32", [n_in]),
    }
    if bias:
        out[name + ".bias"] = ("F16", [n_out])
    return out


def awq(name, n_in, n_out, bias, g=128):
    out = {
        name + ".qweight": ("I32", [n_in, n_out // 8]),
        name + ".qzeros": ("I32", [n_in // g, n_out // 8]),
        name + ".scales": ("F16", [n_in // g, n_out]),
    }
    if bias:
        out[name + ".bias"] = ("F16", [n_out])
    return out


def fp8(name, n_in, n_out, bias):
    out = {
        name + ".weight": ("F8_E4M3", [n_out, n_in]),
        name + ".weight_scale_inv": ("BF16", [math.ceil(n_out / 128), math.ceil(n_in / 128)]),
    }
    if bias:
        out[name + ".bias"] = ("BF16", [n_out])
    return out


def write(folder: str, source: str, plain_dtype: str, quantize, qk_norm: bool, qkv_bias: bool) -> None:
    cfg = json.loads((HERE / folder / "config.json").read_text())
    tensors: dict[str, tuple[str, list[int]]] = {}
    for name, shape, role in dense_tensors(cfg, qk_norm, qkv_bias):
        if role == "linear":
            tensors.update(quantize(name, *shape))
        else:
            tensors[name] = (plain_dtype, list(shape))
    offset = 0
    lines = [f'"__metadata__":{json.dumps({"format": "pt", "derived_from": source}, separators=(",", ":"))}']
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        size = math.prod(shape) * BYTES[dtype]
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        lines.append(f"{json.dumps(name)}:{json.dumps(entry, separators=(',', ':'))}")
        offset += size
    (HERE / folder / "header.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    write("TheBloke--Llama-2-13B-GPTQ", "AutoGPTQ QuantLinear buffers (qlinear_cuda_old.py) applied to the config", "F16", gptq, False, False)
    write("Qwen--Qwen2.5-7B-Instruct-AWQ", "AutoAWQ WQLinear_GEMM buffers (gemm.py) applied to the config", "F16", awq, False, True)
    write("Qwen--Qwen3-1.7B-FP8", "block-wise fp8 layout of modular/modular#7142's header dump applied to the config", "BF16", fp8, True, False)

"""Pre-quantized checkpoints: GPTQ, AWQ and FP8 sized within 2% of their safetensors headers.

The three headers under tests/data/prequantized/ are derived, not downloaded (the Hub was not
reachable): `derive_headers.py` lists each architecture's tensors by hand from the real config
and writes the quantizer's buffers as its library's source declares them (AutoGPTQ's
`QuantLinear`, AutoAWQ's `WQLinear_GEMM`, and the Qwen3-FP8 layout quoted from a header dump in
modular/modular#7142). That is a second derivation, independent of `estimator.prequantized`
(which works from the meta-device inventory); the GPTQ one is also checked against the file size
TheBloke published for it. The smaller formats (bitsandbytes, compressed-tensors, GEMV AWQ, the
skip lists) are checked on hand-worked examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from estimator import prequantized as pq
from estimator.catalog import find_entry
from estimator.inventory import inventory_from_config

DATA = Path(__file__).resolve().parent / "data" / "prequantized"


def _load(folder: str) -> tuple[dict, dict]:
    config = json.loads((DATA / folder / "config.json").read_text())
    header = json.loads((DATA / folder / "header.json").read_text())
    header.pop("__metadata__", None)
    return config, header


def _header_bytes(tensors: dict) -> int:
    return sum(math.ceil(math.prod(t["shape"]) * pq.SAFETENSORS_DTYPE_BYTES[t["dtype"]]) for t in tensors.values())


def _offsets_consistent(tensors: dict) -> bool:
    return all(t["data_offsets"][1] - t["data_offsets"][0] == _header_bytes({"x": t}) for t in tensors.values())


CHECKPOINTS = [
    # (folder, expected description fragment, published total bytes or None, its source)
    (
        "TheBloke--Llama-2-13B-GPTQ",
        "GPTQ 4-bit, groups of 128",
        7.26e9,
        # README table of TheBloke/Llama-2-13B-GPTQ at b7db471d1789802a3a8e3b93cdd66a9f046f17c3:
        # "| main | 4 | 128 | False | 7.26 GB | True | AutoGPTQ | Most compatible option. ..."
        "https://huggingface.co/TheBloke/Llama-2-13B-GPTQ/blob/b7db471d1789802a3a8e3b93cdd66a9f046f17c3/README.md",
    ),
    ("Qwen--Qwen2.5-7B-Instruct-AWQ", "AWQ 4-bit GEMM, groups of 128", None, None),
    ("Qwen--Qwen3-1.7B-FP8", "FP8 e4m3: one byte per weight, one fp32 scale per 128×128 block", None, None),
]


@pytest.mark.parametrize("folder,described,published,source", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_checkpoint_is_sized_within_two_percent_of_its_header(folder, described, published, source):
    config, header = _load(folder)
    assert _offsets_consistent(header)
    truth = _header_bytes(header)
    inv = inventory_from_config(config)

    per_linear = pq.prequantized_linear_bytes(config, inv)
    assert per_linear, "every one of these checkpoints has quantized linears"
    replaced = pq.quantized_param_names(config, inv)
    dtype_bytes = pq.SAFETENSORS_DTYPE_BYTES[pq.checkpoint_dtype(config)]
    rest = sum(p.numel * dtype_bytes for p in inv.params if p.name not in replaced)
    ours = sum(per_linear.values()) + rest

    assert abs(ours - truth) / truth < 0.02, (ours, truth)
    assert pq.checkpoint_bytes(config, inv) == ours
    assert described in pq.describe_quantization(config)

    # Linear by linear: the header's tensors under each quantized linear add up to ours (FP8 scales
    # are fp32 as FP8Linear loads them, bf16 in this checkpoint: 2 bytes per 16,384 weights).
    for name, size in per_linear.items():
        stored = _header_bytes({k: v for k, v in header.items() if k.startswith(name + ".")})
        assert stored and abs(size - stored) / stored < 1e-3, (name, size, stored)
    # ...and nothing quantized in the header is missed (lm_head and norms stay plain).
    quantized_in_header = {k.rsplit(".", 1)[0] for k in header if k.endswith((".qweight", ".weight_scale_inv"))}
    assert quantized_in_header == set(per_linear)

    if published is not None:
        # A published file size (GB = 1e9 bytes, two decimals) checks the derived header itself.
        assert abs(truth - published) / published < 0.005, (truth, published, source)


def test_gptq_layout_matches_autogptq_buffers():
    """One Llama-2-13B down_proj (13824 → 5120), 4-bit, group 128, by hand."""
    config, _ = _load("TheBloke--Llama-2-13B-GPTQ")
    inv = inventory_from_config(config)
    tensors = {t.name.rsplit(".", 1)[-1]: t for t in pq.prequantized_linear_tensors(config, inv)["model.layers.0.mlp.down_proj"]}
    assert tensors["qweight"].shape == (13824 * 4 // 32, 5120) and tensors["qweight"].dtype == "I32"
    assert tensors["qzeros"].shape == (108, 5120 * 4 // 32)
    assert tensors["scales"].shape == (108, 5120) and tensors["scales"].dtype == "F16"
    assert tensors["g_idx"].shape == (13824,)
    assert "model.layers.0.mlp.down_proj" in pq.prequantized_linear_bytes(config, inv)
    assert "lm_head" not in pq.prequantized_linear_bytes(config, inv)


def test_gptq_lm_head_and_desc_act_and_per_column_groups():
    config, _ = _load("TheBloke--Llama-2-13B-GPTQ")
    config = dict(config, quantization_config=dict(config["quantization_config"], lm_head=True, desc_act=True, group_size=-1))
    inv = inventory_from_config(config)
    sizes = pq.prequantized_linear_bytes(config, inv)
    assert "lm_head" in sizes
    scales = {t.name: t for t in pq.prequantized_linear_tensors(config, inv)["model.layers.0.mlp.down_proj"]}
    assert scales["model.layers.0.mlp.down_proj.scales"].shape == (1, 5120)
    assert "act-order" in pq.describe_quantization(config)


def _small(entry: str = "HuggingFaceTB/SmolLM2-135M") -> dict:
    config = find_entry(entry).config()
    config.update(num_hidden_layers=2)
    return config


def test_awq_gemv_pads_the_group_count():
    """awq/modules/linear/gemv.py: qzeros width = ceil(ceil(in/g)/8), rounded to the multiplier."""
    config = _small()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemv", "zero_point": True}
    inv = inventory_from_config(config)
    down = {t.name.rsplit(".", 1)[-1]: t for t in pq.prequantized_linear_tensors(config, inv)["model.layers.0.mlp.down_proj"]}
    # SmolLM2-135M down_proj: 1536 → 576; 1536/64 = 24 groups → 3 int32 columns → ×2 multiplier → 4
    assert down["qweight"].shape == (576, 1536 // 8)
    assert down["qzeros"].shape == (576, 4)
    assert down["scales"].shape == (576, 32)


def test_bitsandbytes_saved_4bit_and_8bit():
    config = _small()
    inv = inventory_from_config(config)
    q = next(lin for lin in inv.linears if lin.name == "model.layers.0.self_attn.q_proj")  # 576 × 576
    n = q.in_features * q.out_features
    blocks = math.ceil(n / 64)

    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    sizes = pq.prequantized_linear_bytes(config, inv)
    assert sizes[q.name] == n // 2 + blocks + 16 * 4 + math.ceil(blocks / 256) * 4 + 256 * 4
    assert "lm_head" not in sizes and set(sizes) == {lin.name for lin in inv.linears if lin.bnb_quantized}
    assert "nf4 with double quantization" in pq.describe_quantization(config)

    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    assert pq.prequantized_linear_bytes(config, inv)[q.name] == n // 2 + blocks * 4 + 16 * 4

    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_skip_modules": ["mlp.down_proj"]}
    sizes = pq.prequantized_linear_bytes(config, inv)
    assert sizes[q.name] == n + q.out_features * 4
    assert not any(name.endswith("down_proj") for name in sizes)


def test_fp8_deepseek_style_blocks_and_experts():
    """DeepSeek-V2-Lite's shape with DeepSeek-V3's fp8 block: experts stored as fp8 too."""
    config = find_entry("deepseek-ai/DeepSeek-V2-Lite").config()
    config.update(num_hidden_layers=2)
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    inv = inventory_from_config(config)
    tensors = pq.prequantized_linear_tensors(config, inv)
    experts = tensors["model.layers.1.mlp.experts.down_proj"]  # [64, 2048, 1408]
    weight, scale = experts
    assert weight.shape == (64, 2048, 1408) and weight.dtype == "F8_E4M3"
    assert scale.shape == (64, 16, 11) and scale.dtype == "F32"
    gate_up = tensors["model.layers.1.mlp.experts.gate_up_proj"]  # [64, 2·1408, 2048], two halves
    assert gate_up[0].numel == 64 * 2816 * 2048 and gate_up[1].shape == (128, 11, 16)
    kv_a = {t.name: t for t in tensors["model.layers.0.self_attn.kv_a_proj_with_mqa"]}
    assert kv_a["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 16)  # ceil(576/128)
    assert "lm_head" not in tensors


def test_compressed_tensors_w4a16_and_fp8_dynamic():
    config = _small()
    inv = inventory_from_config(config)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True, "actorder": None},
                "input_activations": None,
            }
        },
    }
    tensors = pq.prequantized_linear_tensors(config, inv)
    down = {t.name.rsplit(".", 1)[-1]: t for t in tensors["model.layers.0.mlp.down_proj"]}  # 1536 → 576
    assert down["weight_packed"].shape == (576, 1536 // 8) and down["weight_packed"].dtype == "I32"
    assert down["weight_scale"].shape == (576, 12) and down["weight_scale"].dtype == "BF16"
    assert down["weight_shape"].shape == (2,)
    assert "weight_zero_point" not in down and "lm_head" not in tensors

    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(symmetric=False, actorder="group")
    down = {t.name.rsplit(".", 1)[-1]: t for t in pq.prequantized_linear_tensors(config, inv)["model.layers.0.mlp.down_proj"]}
    assert down["weight_zero_point"].shape == (576 // 8, 12) and down["weight_g_idx"].shape == (1536,)

    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "ignore": ["lm_head", "re:.*down_proj$"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
            }
        },
    }
    tensors = pq.prequantized_linear_tensors(config, inv)
    up = {t.name.rsplit(".", 1)[-1]: t for t in tensors["model.layers.0.mlp.up_proj"]}
    assert up["weight"].dtype == "F8_E4M3" and up["weight_scale"].shape == (1536, 1)
    assert "input_scale" not in up
    assert not any(name.endswith("down_proj") for name in tensors)
    assert "float-quantized fp8 per channel" in pq.describe_quantization(config)


def test_awq_modules_to_not_convert_are_substrings_as_autoawq_matches_them():
    config = _small()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64, "modules_to_not_convert": ["self_attn", "model.layers.1"]}
    sizes = pq.prequantized_linear_bytes(config, inventory_from_config(config))
    assert sizes and all(".mlp." in name and name.startswith("model.layers.0.") for name in sizes)


@pytest.mark.parametrize(
    "block",
    [
        {"quant_method": "hqq", "nbits": 4},
        {"quant_method": "gptq", "bits": "four"},
        {"quant_method": "gptq", "bits": 5},
        {"quant_method": "fp8", "weight_block_size": [0, 128]},
        {"quant_method": "bitsandbytes"},
        {"quant_method": "compressed-tensors", "config_groups": "nope"},
        {"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}}}},
        {"bits": 4},
    ],
)
def test_unknown_or_malformed_methods_give_none_and_a_note(block):
    config = _small()
    config["quantization_config"] = block
    inv = inventory_from_config(_small())
    assert pq.prequantized_linear_bytes(config, inv) is None
    assert pq.checkpoint_bytes(config, inv) is None
    note = pq.describe_quantization(config)
    assert note and "sized as if unquantized" in note and "\n" not in note


def test_unquantized_config_has_no_description():
    config = _small()
    inv = inventory_from_config(config)
    assert pq.describe_quantization(config) is None
    assert pq.prequantized_linear_bytes(config, inv) is None
    assert pq.describe_quantization("not a dict") is None  # type: ignore[arg-type]


def test_safetensors_bytes_counts_each_dtype():
    assert pq.safetensors_bytes({"BF16": 10, "F8_E4M3": 4, "I32": 2, "F32": 1}) == 20 + 4 + 8 + 4
    assert pq.safetensors_bytes({"F4": 3}) == 2

"""Inventories: exact parameter counts, which linears bitsandbytes and PEFT touch, bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from estimator import UnsupportedModelError, inventory_from_config
from estimator.catalog import find_entry, load_catalog
from estimator.inventory import build_inventory, config_key, inventory_from_dict, inventory_to_dict

# Published totals (tied weights once): the Hub's safetensors figures / model cards, as quoted in
# the issue and in the catalog's published_params sources.
PUBLISHED = {
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "openai-community/gpt2": 124_439_808,
    "google/gemma-2-2b-it": 2_614_341_888,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "Qwen/Qwen1.5-MoE-A2.7B-Chat": 14_315_784_192,
}


def inv_of(repo: str):
    return inventory_from_config(find_entry(repo).config())


@pytest.mark.parametrize("repo,count", sorted(PUBLISHED.items()))
def test_parameter_counts_are_exact(repo, count):
    assert inv_of(repo).params_total == count


@pytest.mark.parametrize("entry", [e for e in load_catalog() if e.published_params], ids=lambda e: e.name)
def test_catalog_published_counts(entry):
    assert inventory_from_config(entry.config()).params_total == entry.published_params


@pytest.mark.slow
@pytest.mark.parametrize("entry", load_catalog(), ids=lambda e: e.name)
def test_prebuilt_inventory_matches_a_fresh_build(entry):
    """The shipped store is current: `python -m estimator.catalog.prebuild` rewrites it."""
    config = entry.config()
    fresh = build_inventory(config)
    assert inventory_from_config(config) == fresh, "stale prebuilt inventory: run python -m estimator.catalog.prebuild"
    assert inventory_from_dict(inventory_to_dict(fresh)) == fresh
    assert len(config_key(config)) == 24


def test_tied_embeddings_counted_once():
    inv = inv_of("meta-llama/Llama-3.2-1B")
    assert inv.tied_embeddings
    embed = [p for p in inv.params if p.kind == "embedding"]
    assert len(embed) == 1 and embed[0].numel == 128_256 * 2048
    assert inv.lm_head is not None and inv.lm_head.out_features == 128_256


def test_gpt2_conv1d_is_a_linear():
    inv = inv_of("openai-community/gpt2")
    c_attn = [l for l in inv.linears if l.name.endswith("h.0.attn.c_attn")][0]
    assert (c_attn.in_features, c_attn.out_features, c_attn.bias) == (768, 2304, True)
    assert c_attn.bnb_quantized and c_attn.peft_all_linear


def test_bitsandbytes_keeps_lm_head_and_peft_skips_it():
    inv = inv_of("meta-llama/Llama-3.1-8B")
    assert not inv.lm_head.bnb_quantized
    assert not inv.lm_head.peft_all_linear
    per_layer = [l for l in inv.linears if l.layer == 0]
    assert {l.name.rsplit(".", 1)[1] for l in per_layer} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(l.bnb_quantized and l.peft_all_linear for l in per_layer)


def test_fused_moe_experts_are_not_linears():
    """transformers 5 stores experts as 3-D parameters: bitsandbytes leaves them in bf16."""
    inv = inv_of("mistralai/Mixtral-8x7B-v0.1")
    experts = [p for p in inv.params if p.kind == "expert"]
    assert experts and not any(p.in_quantized_linear for p in experts)
    assert inv.moe is not None and inv.moe.num_experts == 8 and inv.moe.top_k == 2
    assert sum(p.numel for p in experts) > 0.9 * inv.params_total


def test_gqa_and_head_dims():
    inv = inv_of("meta-llama/Llama-3.1-8B")
    assert (inv.num_heads, inv.num_kv_heads, inv.head_dim) == (32, 8, 128)


def test_sliding_window_layers():
    inv = inv_of("google/gemma-2-2b-it")
    assert inv.sliding_window == 4096
    assert set(inv.layer_types) == {"sliding_attention", "full_attention"}
    assert inv.norm_places == ("pre_attn", "post_attn", "pre_mlp", "post_mlp") and inv.norm_style == "gemma"


def test_qk_norm_is_not_a_sandwich():
    inv = inv_of("Qwen/Qwen3-8B")
    assert inv.qk_norm and inv.norm_places == ("pre_attn", "pre_mlp")


def test_a_multimodal_config_is_sized_as_auto_model_for_causal_lm_builds_it():
    """gemma3 is built whole (see below); LLaVA, which AutoModelForCausalLM maps to no class of its
    own, is sized by its language model, and the note says why no tower is counted."""
    gemma = inv_of("google/gemma-3-4b-it")
    assert gemma.text_only_of == "gemma3" and gemma.architecture.endswith("ForConditionalGeneration")
    llama = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256}
    llava = {"model_type": "llava", "text_config": llama,
             "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 16}}
    inv = inventory_from_config(llava)
    assert inv.text_only_of == "llava" and inv.architecture == "LlamaForCausalLM"
    assert inv.params_total == inventory_from_config(llama).params_total
    assert any("builds no vision tower" in n for n in inv.notes)


def test_non_causal_model_is_refused():
    bert = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "vocab_size": 100}
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        inventory_from_config(bert)


def test_unknown_model_type_is_refused_without_remote_code():
    with pytest.raises(UnsupportedModelError, match="trust_remote_code"):
        inventory_from_config({"model_type": "my_secret_arch", "hidden_size": 8})


def test_malformed_config_is_refused():
    with pytest.raises(UnsupportedModelError):
        inventory_from_config({"model_type": "llama", "hidden_size": "big"})
    with pytest.raises(UnsupportedModelError):
        inventory_from_config({"hidden_size": 64})


@pytest.mark.slow
def test_every_catalog_models_lora_count_equals_peft():
    """Issue 13: our trainable-parameter count equals what PEFT 0.21.2 builds, for all-linear at r=16
    (dropout 0, which PEFT needs where it wraps expert parameters), on every catalog model."""
    import peft
    import torch
    import transformers

    from estimator import Job, estimate
    from estimator.catalog import load_catalog
    from estimator.inventory import _make_config, _text_config

    transformers.logging.set_verbosity_error()
    for entry in load_catalog():
        config = entry.config()
        full = _make_config(config) if "text_config" in config else None  # what AutoModelForCausalLM builds, as users load it
        built = full if full is not None and type(full) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING else _make_config(_text_config(config)[0])
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(built)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                             target_modules="all-linear", task_type="CAUSAL_LM"))
        theirs = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        inv = inventory_from_config(config)
        if inv.peft_all_linear_error:  # PEFT builds it but its forward fails (Llama 4): refused, tests/test_meta_trace.py
            with pytest.raises(ValueError, match="PEFT cannot run this job"):
                estimate(inv, Job(mode="lora", lora_dropout=0.0))
            continue
        ours = estimate(inv, Job(mode="lora", lora_dropout=0.0)).params_trainable
        assert ours == theirs, entry.name


def test_peft_refusals_are_ours_too():
    """PEFT's ParamWrapper refuses dropout; so does the CLI, with PEFT's reason and the way out."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "estimator", "DeepSeek-V2-Lite", "--mode", "lora"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "lora.ParamWrapper does not work with lora_dropout != 0" in out.stderr and "--lora-dropout 0" in out.stderr
    inv = inventory_from_config(find_entry("deepseek-ai/DeepSeek-V2-Lite").config())
    from estimator import Job, estimate

    ok = estimate(inv, Job(mode="lora", lora_dropout=0.0))
    assert ok.params_trainable == 358_994_944  # what PEFT 0.21.2 trains (the 359 M)
    assert any("ParamWrapper" in n for n in ok.notes)
    named = estimate(inv, Job(mode="lora", lora_targets=("q_proj", "o_proj")))  # named modules: no ParamWrapper
    assert named.params_trainable < 20_000_000


def test_gemma3_is_built_whole_as_auto_model_for_causal_lm_builds_it():
    """Issue 13: transformers 5 maps gemma3 to Gemma3ForConditionalGeneration; its vision tower is
    loaded, so it is counted (4,300,079,472 parameters, the transformers build the catalog notes)."""
    inv = inventory_from_config(find_entry("google/gemma-3-4b-it").config())
    assert inv.architecture == "Gemma3ForConditionalGeneration" and inv.params_total == 4_300_079_472
    assert inv.num_layers == 34 and all(lin.layer is None for lin in inv.linears if "vision" in lin.name)
    assert any("vision tower and projector" in n for n in inv.notes)

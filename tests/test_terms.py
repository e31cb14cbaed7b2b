"""Each memory term against hand-computed bytes, and the activation trace against measured censuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from estimator import Job, inventory_from_config
from estimator.catalog import find_entry
from estimator.dtypes import BF16, FP32, block, nbytes, tensor_bytes
from estimator.regime import regime_of
from estimator.terms import activations as act
from estimator.terms import kv_cache, logits, weights

MIB = 1024**2
RESULTS = Path(__file__).resolve().parent.parent / "validation" / "results"


def inv_of(repo: str):
    return inventory_from_config(find_entry(repo).config())


# ---------------------------------------------------------------- dtypes and the allocator's block
def test_four_bit_never_floors():
    assert nbytes(3, "nf4") == 2  # 1.5 bytes round up, never `//`
    assert block(1) == 512 and block(512) == 512 and block(513) == 1024
    assert tensor_bytes(1, "fp32") == 512


# ---------------------------------------------------------------- weights
def test_qlora_upcasts_everything_not_4bit():
    inv = inv_of("meta-llama/Llama-3.1-8B")
    placed = weights.placements(inv, regime_of(Job(mode="qlora")))
    embed = [p for p in placed if p.name == "model.embed_tokens.weight"][0]
    lm = [p for p in placed if p.name == "lm_head.weight"][0]
    assert embed.dtype == lm.dtype == FP32
    # "for Llama-3-8B, embeddings plus lm_head become 4.2 GB"
    assert embed.bytes + lm.bytes == pytest.approx(2 * 128_256 * 4096 * 4, rel=1e-6)
    assert round((embed.bytes + lm.bytes) / 1e9, 1) == 4.2


def test_lora_adapters_match_peft_counts():
    """peft reported 41,943,040 trainable parameters for r=16 all-linear on Llama-3.1-8B (h100 run)."""
    inv = inv_of("meta-llama/Llama-3.1-8B")
    placed = weights.placements(inv, regime_of(Job(mode="lora", lora_r=16)))
    assert sum(p.numel for p in placed if p.trainable) == 41_943_040
    qv = weights.placements(inv, regime_of(Job(mode="lora", lora_r=8, lora_targets=("q_proj", "v_proj"))))
    assert sum(p.numel for p in qv if p.trainable) == 3_407_872
    assert all(p.dtype == FP32 for p in placed if p.kind == "adapter")


def test_unknown_lora_target_is_an_error():
    with pytest.raises(ValueError, match="no linear layer matches"):
        weights.lora_targets(inv_of("meta-llama/Llama-3.2-1B"), regime_of(Job(mode="lora", lora_targets=("c_attn",))))


# ---------------------------------------------------------------- KV cache and logits
def test_kv_cache_by_hand_llama_8b():
    inv = inv_of("meta-llama/Llama-3.1-8B")
    # 32 layers × (K + V) × 8 KV heads × 4096 tokens × 128 × 2 bytes = 512 MiB
    assert kv_cache.cache_bytes(inv, 1, 4096, BF16) == 512 * MIB


def test_sliding_window_cache_is_capped_after_the_prefill():
    inv = inv_of("google/gemma-2-2b-it")
    long = kv_cache.cache_bytes(inv, 1, 8192, BF16)
    full = sum(1 for t in inv.layer_types if t == "full_attention")
    per_token = 2 * inv.num_kv_heads * inv.head_dim * 2
    assert long == full * per_token * 8192 + (inv.num_layers - full) * per_token * 4096
    assert kv_cache.cache_bytes(inv, 1, 8192, BF16, after_prefill=True) == inv.num_layers * per_token * 8192


def test_logits_backward_holds_three_fp32_copies():
    lg = logits.training_logits(2048, 128_256, BF16, softcap=False)
    nv = 2048 * 128_256
    assert lg.backward_peak_bytes == 3 * 4 * nv
    assert lg.forward_peak_bytes == 2 * nv + 4 * nv + 4 * nv
    # fp32 logits are not copied by `.float()`: the logits and log_softmax's output only
    assert logits.training_logits(2048, 128_256, FP32, softcap=False).forward_peak_bytes == 4 * nv + 4 * nv


# ---------------------------------------------------------------- the activation trace vs the census
def _census(case: str) -> dict:
    for path in sorted(RESULTS.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["case"] == case:
                return row
    pytest.fail(f"{case} not in validation/results: the measured census this test reads has moved")


def _layer0_activation_bytes(row: dict, inv, job: Job) -> int:
    """Census rows of layer 0, less autocast's copies of fp32 weights (amp only: the rows a linear
    saves shaped like its own transposed weight)."""
    copies = set()
    if job.mode.value == "full" and job.precision.is_amp:
        copies = {(l.name.split(".")[-1], f"{l.in_features}x{l.out_features}") for l in inv.linears if l.layer == 0}
    total = 0
    for r in row["saved_tensors"]["rows"]:
        if r["kind"] != "act" or ".N." not in r["module"] + ".":
            continue
        if (r["module"].split(".")[-1], r["shape"]) in copies:
            continue
        total += r["bytes"]
    return total


@pytest.mark.parametrize(
    "case,repo,layer",
    [
        ("llama-3.2-1b-full-amp_bf16-b2-s2048-adamw_fused", "meta-llama/Llama-3.2-1B", 0),
        ("llama-3.2-1b-full-fp32-b1-s2048-sgd", "meta-llama/Llama-3.2-1B", 0),
        ("gemma-2-2b-it-full-amp_bf16-b1-s1024-adamw_fused", "google/gemma-2-2b-it", 0),
        ("qwen3-0.6b-full-amp_bf16-b8-s1024-adamw_fused", "Qwen/Qwen3-0.6B", 0),
        ("llama-3.2-1b-qlora-b4-s2048-r16", "meta-llama/Llama-3.2-1B", 0),
        ("mistral-7b-v0.1-lora-b2-s1024-r32-eager", "mistralai/Mistral-7B-v0.1", 0),
        ("phi-3-mini-4k-instruct-lora-b2-s2048-r16", "microsoft/Phi-3-mini-4k-instruct", 0),
        ("gpt2-full-amp_fp16-b16-s1024-adafactor", "openai-community/gpt2", 0),
    ],
)
def test_trace_matches_the_measured_census_of_layer_0(case, repo, layer):
    """What autograd actually saved in layer 0 (python -m validation.measure --diag) vs the trace."""
    row = _census(case)
    inv = inv_of(repo)
    job = Job.from_dict(row["job"])
    f = act.flow_of(inv, regime_of(job))
    if job.mode.value == "qlora":  # the trace's 4-bit linears are those transformers converts
        assert f.quantized == frozenset(l.name for l in inv.linears if l.bnb_quantized)
    tr = act.Trace(f, inv, job.seq_len)
    x = tr.new(inv.hidden_size, f.residual, f.base_trainable)
    act.trace_layer(tr, x, layer)
    estimated = sum(tr.saved.values()) * job.batch_size * job.seq_len
    measured = _layer0_activation_bytes(row, inv, job)
    assert estimated == pytest.approx(measured, rel=0.03)

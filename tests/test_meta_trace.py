"""The meta-device live-bytes trace (estimator/meta_trace.py) and what the inventory reads with it:
MoE blocks' inference working sets as transformers 5.17 writes them, and PEFT's all-linear failing
in the forward (Llama 4's router)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from estimator.meta_trace import forward_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "estimator" / "catalog" / "configs"


class _TwoAlive(torch.nn.Module):
    """a = 2x and b = exp(a) alive together, then an in-place add and a view: neither allocates."""

    def forward(self, x):
        a = x * 2
        b = a.exp()
        b.add_(1)
        return b.view(-1)


class _Fixed(torch.nn.Module):
    """One [T, h] temporary, freed, then a [64, 64] fp32 buffer that does not grow with T."""

    def forward(self, x):
        t = x + 1
        del t
        return torch.zeros((64, 64), dtype=torch.float32, device=x.device)


def test_two_temporaries_alive_together_worked_by_hand():
    traced = forward_bytes(_TwoAlive(), hidden=32)
    assert traced.per_token == 2 * 32 * 2  # a and b, bf16; the in-place add and the view are not allocations
    assert traced.fixed == 0


def test_a_freed_temporary_and_a_fixed_buffer_worked_by_hand():
    traced = forward_bytes(_Fixed(), hidden=32)
    # the peak is the larger of the freed [T, 32] bf16 temporary and the 16 KiB buffer: at T = 64 the
    # temporary is 4 KiB and at 128 8 KiB, so the buffer is the peak at both (no slope)
    assert traced.per_token == 0 and traced.fixed == 64 * 64 * 4


def _moe(name: str, **small):
    from estimator.inventory import build_inventory

    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    text = raw.get("text_config", raw) if "text_config" in raw else raw
    text.update(small)
    return build_inventory(raw)


def test_grouped_mm_block_holds_topk_copies_and_two_gate_up_outputs():
    """transformers 5.17 grouped_mm_experts_forward (integrations/moe.py) at its peak, the masked_fill
    after the gate_up grouped_mm: each token's k gathered copies (k·h), the gate_up output and its
    out-of-place masked copy (2 · k·2I), in bf16; the router's and the sort's few bytes aside."""
    inv = _moe("mistralai--Mixtral-8x7B-v0.1", num_hidden_layers=1)
    m, h = inv.moe, inv.hidden_size
    by_hand = m.top_k * (h + 4 * m.expert_intermediate_size) * 2
    assert by_hand <= m.forward_bytes_per_token <= by_hand * 1.001
    assert m.forward_bytes_per_token > 1.4 * 3 * m.top_k * m.expert_intermediate_size * 2  # the old top-k formula's


def test_llama4_block_runs_every_expert_over_every_token():
    """Llama4TextMoe (models/llama4/modeling_llama4.py) repeats the hidden states once per expert
    and runs a dense bmm: at its peak, E·h routed inputs, the E·2I gate_up output, its activation
    and the product (E·I each), in bf16."""
    inv = _moe("meta-llama--Llama-4-Scout-17B-16E-Instruct", num_hidden_layers=1, no_rope_layers=[1])
    m, h = inv.moe, inv.hidden_size
    by_hand = m.num_experts * (h + 4 * m.expert_intermediate_size) * 2
    assert by_hand <= m.forward_bytes_per_token <= by_hand * 1.001
    assert m.top_k == 1  # so a top-k working set would be sixteen times too small


def test_prefill_working_set_uses_the_traced_block():
    from estimator import Job
    from estimator.regime import regime_of, sizes_of
    from estimator.terms.activations import moe_forward_bytes, prefill_working_bytes

    inv = _moe("Qwen--Qwen3-30B-A3B", num_hidden_layers=2)
    job = Job(mode="inference", batch_size=2, prompt_len=256, new_tokens=8)
    regime, sizes = regime_of(job), sizes_of(job)
    working = prefill_working_bytes(inv, regime, sizes)
    assert working >= moe_forward_bytes(inv, 2, 512)  # the MoE block's own, plus the residual stream


def test_peft_all_linear_that_fails_in_the_forward_is_refused():
    """PEFT 0.21.2 wraps Llama 4's router (an nn.Linear whose forward returns a tuple) and its
    lora.Linear then reads `.dtype` of the tuple: the first forward fails. Shown here with PEFT on a
    small real Llama 4 on the CPU, then the CLI refusing the job (exit 2, one line, the way out)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    peft = pytest.importorskip("peft")

    raw = json.loads((CONFIGS / "meta-llama--Llama-4-Scout-17B-16E-Instruct.json").read_text())
    text = dict(raw["text_config"], num_hidden_layers=1, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, vocab_size=128, no_rope_layers=[1])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0))
    with pytest.raises(AttributeError, match="'tuple' object has no attribute 'dtype'"):
        wrapped(input_ids=torch.zeros((1, 8), dtype=torch.long))

    out = subprocess.run([sys.executable, "-m", "estimator", "meta-llama/Llama-4-Scout-17B-16E-Instruct", "--mode", "lora",
                          "--lora-dropout", "0"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "'tuple' object has no attribute 'dtype'" in out.stderr and "--lora-targets" in out.stderr
    named = subprocess.run([sys.executable, "-m", "estimator", "meta-llama/Llama-4-Scout-17B-16E-Instruct", "--mode", "lora",
                            "--lora-targets", "q_proj,k_proj,v_proj,o_proj", "--json"], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
    assert named.returncode == 0, named.stderr


def test_models_peft_runs_on_are_not_refused():
    for name in ("Qwen--Qwen3-30B-A3B", "mistralai--Mixtral-8x7B-v0.1", "deepseek-ai--DeepSeek-V2-Lite"):
        assert _moe(name, num_hidden_layers=2).peft_all_linear_error is None, name


def test_eager_attention_per_score_as_each_model_writes_it():
    """Per score (one head, one query, one key), worked by hand from transformers 5.17:
    - Llama's eager_attention_forward saves its fp32 softmax (4) and the bf16 cast (2) = 6; at its
      peak without grad it holds the masked bf16 scores (2), softmax(dtype=float32)'s fp32 copy of
      them (4; ATen fuses the upcast for fp16 on CUDA only) and the fp32 softmax (4) = 10;
    - gpt-oss' softmax stays in the scores' dtype and drops the sink column by a view: it saves the
      bf16 probabilities (2) only."""
    from estimator.inventory import build_inventory

    llama = build_inventory(json.loads((CONFIGS / "meta-llama--Llama-3.2-1B.json").read_text()))
    assert (llama.eager_saved_per_score, llama.eager_working_per_score) == (6.0, 10.0)
    oss = json.loads((CONFIGS / "openai--gpt-oss-20b.json").read_text())
    oss.update(num_hidden_layers=2, layer_types=oss["layer_types"][:2])
    assert build_inventory(oss).eager_saved_per_score == 2.0


def test_linear_attention_layers_use_their_traced_working_set():
    """Qwen3-Next's gated delta net (transformers' reference PyTorch path, as the H200 ran it) holds
    far more per token in the prefill than softmax attention's projections: the prefill working set
    takes the traced block. (On the H200 its two measured prefills went from -4.0% and -1.2% to
    +0.2% and +0.0% on peak allocated; both were read before this was written.)"""
    from estimator import Job
    from estimator.regime import regime_of, sizes_of
    from estimator.terms.activations import prefill_working_bytes
    from validation.measure import case_config
    from estimator.inventory import build_inventory

    inv = build_inventory(case_config("Qwen/Qwen3-Next-80B-A3B-Thinking", {"num_hidden_layers": 4}))
    assert inv.linear_attention_bytes_per_token > 30 * 2 * inv.hidden_size  # over thirty h-wide bf16 tensors
    job = Job(mode="inference", batch_size=1, prompt_len=1024, new_tokens=4)
    working = prefill_working_bytes(inv, regime_of(job), sizes_of(job))
    assert working >= inv.linear_attention_bytes_per_token * 1024
    dense = build_inventory(json.loads((CONFIGS / "meta-llama--Llama-3.2-1B.json").read_text()))
    assert dense.linear_attention_bytes_per_token == 0

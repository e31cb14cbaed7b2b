"""gpt-oss' MXFP4: both of transformers 5.17's load paths, worked by hand from the catalog config.

openai/gpt-oss-20b: hidden H = 2,880, expert width I = 2,880, E = 32 experts, 24 layers, vocab
201,088, 64 query heads and 8 kv heads of 64 (attention biases, 64 sinks per layer).

- Experts (transformers `GptOssExperts`): gate_up_proj [E, H, 2I], down_proj [E, I, H] and their
  biases [E, 2I], [E, H].
- With the kernels (`Mxfp4GptOssExperts`): `<proj>_blocks` uint8 [E, out, in/32, 16] and
  `<proj>_scales` uint8 [E, out, in/32], so 17 bytes per 32 weights; biases fp32.
- Dequantized (`Mxfp4Dequantize`): the experts in bf16.
- Everything else (attention, router, embeddings, lm_head, norms) in bf16 either way.
"""

from __future__ import annotations

import pytest

from estimator import Job, estimate
from estimator.cli import main
from estimator.dtypes import block
from estimator.regime import regime_of
from estimator.sources import resolve
from estimator.terms import weights

H, I, E, LAYERS, VOCAB = 2_880, 2_880, 32, 24, 201_088
Q, KV = 64 * 64, 8 * 64


def _by_hand() -> tuple[int, int]:
    """(weights with the kernels, weights dequantized), each tensor rounded to the allocator's 512 B."""
    def bf16(*shape: int) -> int:
        n = 1
        for d in shape:
            n *= d
        return block(2 * n)

    attention = (bf16(Q, H) + bf16(Q) + 2 * (bf16(KV, H) + bf16(KV)) + bf16(H, Q) + bf16(H) + bf16(64))
    router = bf16(E, H) + bf16(E)
    norms = 2 * bf16(H)
    shared = LAYERS * (attention + router + norms) + 2 * bf16(VOCAB, H) + bf16(H)  # embeddings, lm_head (untied), final norm
    gate_up = block(E * 2 * I * (H // 32) * 16) + block(E * 2 * I * (H // 32))  # blocks + scales
    down = block(E * H * (I // 32) * 16) + block(E * H * (I // 32))
    fp32_biases = block(4 * E * 2 * I) + block(4 * E * H)
    kernels = shared + LAYERS * (gate_up + down + fp32_biases)
    dequantized = shared + LAYERS * (bf16(E, H, 2 * I) + bf16(E, I, H) + bf16(E, 2 * I) + bf16(E, H))
    return kernels, dequantized


@pytest.fixture(scope="module")
def oss20b():
    return resolve("openai/gpt-oss-20b").config


def _weights(config, **job) -> int:
    result = estimate(config, Job(**job))
    return weights.weights_bytes(weights.placements(result.inventory, regime_of(result.job)))


def test_gpt_oss_20b_weights_as_stored_and_dequantized_are_exact(oss20b):
    kernels, dequantized = _by_hand()
    assert _weights(oss20b) == kernels == 13_774_583_808
    assert _weights(oss20b, mxfp4="dequantized") == dequantized == 41_829_562_368
    # 4.25 bits a weight: the experts' 19.1 B weights in 10.15 GB
    assert LAYERS * E * 3 * H * I * 17 // 32 == 10_152_345_600


def test_dequantized_experts_are_bf16_whatever_the_load_dtype(oss20b):
    """Mxfp4Dequantize returns bf16 (`_convert_moe_packed_tensors(dtype=torch.bfloat16)`); the rest loads in fp32."""
    result = estimate(oss20b, Job(weights="fp32", mxfp4="dequantized"))
    placed = {p.name: p for p in weights.placements(result.inventory, regime_of(result.job))}
    assert placed["model.layers.0.mlp.experts.gate_up_proj"].dtype.name == "bf16"
    assert placed["model.layers.0.mlp.experts.gate_up_proj_bias"].dtype.name == "fp32"
    assert placed["model.embed_tokens.weight"].dtype.name == "fp32"


def test_the_notes_say_which_path_and_what_the_other_needs(oss20b):
    stored = estimate(oss20b, Job())
    [note] = [n for n in stored.notes if n.startswith("MXFP4 as stored")]
    assert "12.8 GiB" in note and "compute capability >= 7.5" in note and "kernels package" in note
    assert "39.0 GiB (--mxfp4 dequantized)" in note
    bf16 = estimate(oss20b, Job(mxfp4="dequantized"))
    [note] = [n for n in bf16.notes if n.startswith("MXFP4 dequantized")]
    assert "39.0 GiB" in note and "12.8 GiB (--mxfp4 kernels)" in note
    trained = estimate(oss20b, Job(mode="lora", lora_dropout=0.0))
    assert any("Mxfp4HfQuantizer.is_trainable" in n for n in trained.notes)
    assert estimate(oss20b, Job(mode="lora", lora_dropout=0.0, mxfp4="kernels")).peak_allocated_bytes == trained.peak_allocated_bytes


def test_gpt_oss_120b_both_paths():
    config = resolve("openai/gpt-oss-120b").config
    kernels, dequantized = _weights(config), _weights(config, mxfp4="dequantized")
    assert 60e9 < kernels < 66e9 and 230e9 < dequantized < 236e9  # the Hub's checkpoint is 65.3 GB as stored
    assert kernels < dequantized / 3.5


def test_default_attention_on_gpt_oss_is_eager_and_says_so(oss20b):
    result = estimate(oss20b, Job())
    assert result.job.attn.value == "eager"
    assert any("_supports_sdpa is False" in n for n in result.notes)
    assert estimate(oss20b, Job(attn="eager")).peak_allocated_bytes == result.peak_allocated_bytes


def test_cli_refuses_an_explicit_sdpa_on_gpt_oss(capsys):
    assert main(["openai/gpt-oss-20b", "--attn", "sdpa"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: transformers 5.17 refuses attn_implementation=sdpa")
    assert "GptOssForCausalLM" in err and "--attn eager" in err and "…" not in err


def test_cli_switch_and_json(capsys):
    import json

    assert main(["openai/gpt-oss-20b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["job"]["mxfp4"] == "kernels" and out["job"]["attn"] == "eager"
    assert main(["openai/gpt-oss-20b", "--json", "--mxfp4", "dequantized"]) == 0
    dq = json.loads(capsys.readouterr().out)
    assert dq["breakdown"]["weights"] - out["breakdown"]["weights"] == 41_829_562_368 - 13_774_583_808
    assert main(["Llama-3.2-1B", "--json", "--mxfp4", "dequantized"]) == 0
    assert "--mxfp4 applies only to checkpoints stored in MXFP4 (gpt-oss); ignored" in json.loads(capsys.readouterr().out)["notes"]

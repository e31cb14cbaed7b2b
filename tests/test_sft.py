"""TRL 1.16's SFTTrainer (issue 11, part 3): `Job.sft`, TRL's chunked head (`--loss chunked`) and
SFTConfig files. The round trips through a real `SFTConfig` need trl, which is not a dependency of
the estimator: they are skipped without it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from estimator import Job
from estimator.dtypes import BF16, FP32
from estimator.job import Loss
from estimator.regime import regime_of
from estimator.terms import logits
from estimator.training_args import MAPPED, NEUTRAL, NO_MEMORY_EFFECT, SFT_ONLY, from_training_args, is_sft_config

from cli_json import assert_same_estimate, cli_json


# ---- the job and its regime ----------------------------------------------------------------------
def test_sft_is_a_trainer_whose_loss_is_the_chunked_head():
    job = Job(mode="full", sft=True)
    assert job.trainer and job.loss is Loss.CHUNKED
    assert Job.from_dict(job.to_dict()) == job
    liger = Job(mode="lora", sft=True, loss="liger")
    assert liger.loss is Loss.LIGER  # the user's use_liger_kernel=True is kept
    regime = regime_of(liger)
    assert regime.loss is Loss.CHUNKED and regime.liger_kernels and regime.sft  # kernels, without Liger's fused loss


def test_sft_qlora_adapters_are_bf16_and_lora_ones_stay_fp32():
    """SFTTrainer.__init__ casts a quantized model's trainable parameters to bf16."""
    assert regime_of(Job(mode="qlora", sft=True)).adapter.dtype == BF16
    assert regime_of(Job(mode="qlora", trainer=True)).adapter.dtype == FP32
    assert regime_of(Job(mode="lora", sft=True)).adapter.dtype == FP32


# ---- the chunked head's term -----------------------------------------------------------------------
def b(nbytes: int) -> int:
    """The caching allocator's 512-byte block rounding, which every tensor's bytes get."""
    return -(-nbytes // 512) * 512


def test_chunked_head_by_hand():
    """Llama-3.2-1B's head (V 128,256, H 2,048), bf16 weights trained under bf16 autocast, B·(S−1) = 8,188."""
    n, v, h = 8_188, 128_256, 2_048
    got = logits.chunked_logprob(n, v, h, BF16, BF16, BF16, weight_trains=True, entropy=True)
    kept = b(n * h * 2) + b(n * 8) + b(n * 4) + b(n * 4)  # gathered hidden, labels, log_z, entropy
    tile = 4_096 * 32_768 * 2
    assert got.forward_peak_bytes == kept + 7 * b(4 * n) + tile
    converted = n * h * 2 + v * h * 2  # grad_hidden and grad_weight back to bf16
    assert got.backward_peak_bytes == kept + b(4 * n) + 4 * n * h + 4 * v * h + tile + converted


def test_lora_recompute_peak_by_hand():
    """Qwen2.5-0.5B, SFTTrainer LoRA (bf16 base under autocast, fp32 adapters, dropout 0.05, r 16),
    checkpointing: the top layer's recompute peaks at down_proj's `lora_A` matmul. Besides what the
    layer saves, alive per token (I = 4,864, H = 896): the product `act(gate) * up` the caller
    holds (2·I), peft's fp32 cast of it (4·I) and dropout's fp32 output (4·I), the base layer's
    result (2·H), the residual and the normed MLP input (2·H each): 54,016 bytes; of the layer's
    saved tensors only lora_B's input (r bf16 = 32 bytes) is not made yet. Measured on the H200
    (validation/results_trainer/h200-sft.jsonl, b8 s1024): 2.40 GiB; 2.17 before this term."""
    from estimator import estimate
    from estimator.catalog import find_entry
    from estimator.inventory import inventory_from_config
    from estimator.regime import sizes_of
    from estimator.terms import activations as act

    inv = inventory_from_config(find_entry("Qwen/Qwen2.5-0.5B").config())
    job = Job(mode="lora", sft=True, batch_size=8, seq_len=1024, gradient_checkpointing=True,
              precision="bf16_autocast", lora_r=16)
    regime, sizes = regime_of(job), sizes_of(job)
    saved = act.saved_activations(inv, regime, sizes)
    i, h = 4864, 896
    assert saved.layer_transients[-1] == 2 * i + 4 * i + 4 * i + 3 * 2 * h - 16 * 2 == 53_984
    result = estimate(inv, job)
    assert result.peak_phase == "recompute_layer"
    tokens = 8 * 1024
    layer = (saved.layers[-1] + 53_984 + 2 * h) * tokens  # + the gradient handed to the layer's output
    assert result.phase_parts["recompute_layer"]["temporaries"] == layer
    assert abs(result.peak_allocated_bytes / 2_574_827_008 - 1) < 0.03  # measured peak allocated


def test_chunked_head_tile_is_32768_wide_whatever_the_vocabulary_and_casts_fp32_weights():
    small = logits.chunked_logprob(100, 1_000, 64, FP32, BF16, FP32, weight_trains=False, entropy=False)
    kept = 100 * 64 * 4 + b(100 * 8) + b(100 * 4)
    tile = 100 * 32_768 * 2  # min(N, 4096) rows
    casts = 100 * 64 * 2 + 1_000 * 64 * 2  # the hidden chunk and the (only) weight chunk, in bf16
    assert small.forward_peak_bytes == kept + 7 * b(4 * 100) + tile + casts


def test_sft_never_builds_the_logits():
    """The chunked head's buffers do not grow with the N×V logits: at 4× the tokens, standard
    cross-entropy's logits term grows 4×, the chunked head's far less."""
    def run(*flags):
        code, out, err = cli_json("Llama-3.2-1B", "--mode", "lora", "--seq-len", "1024", *flags)
        assert code == 0, err
        return out

    std1, std4 = run("--trainer", "--batch-size", "1"), run("--trainer", "--batch-size", "4")
    sft1, sft4 = run("--sft", "--batch-size", "1"), run("--sft", "--batch-size", "4")
    assert std4["breakdown"]["logits"] > 3.9 * std1["breakdown"]["logits"]
    assert sft4["peak_allocated_bytes"] < std4["peak_allocated_bytes"]
    assert sft1["peak_allocated_bytes"] <= sft4["peak_allocated_bytes"]  # monotone in the batch
    assert sft4["job"]["sft"] is True and sft4["job"]["trainer"] is True and sft4["job"]["loss"] == "chunked"


def test_loss_chunked_is_an_option_and_sft_liger_is_below_sft():
    code, chunked, err = cli_json("Qwen2.5-0.5B", "--mode", "lora", "--loss", "chunked", "--batch-size", "8", "--seq-len", "1024")
    assert code == 0, err
    assert chunked["job"]["loss"] == "chunked" and chunked["job"]["sft"] is False
    code, sft, _ = cli_json("Qwen2.5-0.5B", "--mode", "lora", "--sft", "--batch-size", "8", "--seq-len", "1024")
    code, sft_liger, _ = cli_json("Qwen2.5-0.5B", "--mode", "lora", "--sft", "--loss", "liger", "--batch-size", "8", "--seq-len", "1024")
    assert sft_liger["peak_allocated_bytes"] < sft["peak_allocated_bytes"]  # Liger's norms and SwiGLU save less


# ---- SFTConfig files ------------------------------------------------------------------------------
def test_an_sft_config_dict_takes_sftconfigs_defaults():
    assert is_sft_config({"max_length": 2048}) and not is_sft_config({"per_device_train_batch_size": 2})
    job, _ = from_training_args({"per_device_train_batch_size": 2, "packing": False}, load_dtype="bf16")
    # SFTConfig: gradient_checkpointing True, bf16 = not fp16, max_length 1024
    assert job == Job(mode="full", batch_size=2, seq_len=1024, gradient_checkpointing=True, precision="bf16_autocast", sft=True)
    job, notes = from_training_args({"max_length": None, "completion_only_loss": True}, load_dtype="bf16",
                                    overrides={"seq_len": 512})
    assert job.seq_len == 512 and any("upper bound" in n for n in notes)


def test_sft_yaml_equals_the_flags(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("per_device_train_batch_size: 2\ngradient_accumulation_steps: 2\nmax_length: 2048\n")
    code, from_file, err = cli_json("Llama-3.2-1B", "--mode", "full", "--training-args", str(path))
    assert code == 0, err
    code, from_flags, err = cli_json("Llama-3.2-1B", "--mode", "full", "--batch-size", "2", "--gradient-accumulation-steps", "2",
                                 "--seq-len", "2048", "--precision", "bf16_autocast", "--gradient-checkpointing", "--sft")
    assert code == 0, err
    assert_same_estimate(from_file, from_flags)


def test_sft_keys_with_unmodelled_memory_are_refused_with_one_line(tmp_path):
    for text, word in (("packing: true\n", "packing"), ("padding_free: true\n", "padding_free"),
                       ("activation_offloading: true\n", "activation_offloading"), ("loss_type: kl\n", "loss_type")):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        code, _, err = cli_json("Llama-3.2-1B", "--mode", "full", "--training-args", str(path))
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1


# ---- a real SFTConfig (trl installed) ---------------------------------------------------------------
def test_every_sftconfig_key_is_sorted_into_one_kind():
    trl = pytest.importorskip("trl")
    keys = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    assert keys <= MAPPED | NO_MEMORY_EFFECT | set(NEUTRAL), sorted(keys - (MAPPED | NO_MEMORY_EFFECT | set(NEUTRAL)))
    from transformers import TrainingArguments

    assert SFT_ONLY == keys - {f.name for f in dataclasses.fields(TrainingArguments)}


def test_sftconfig_round_trip_equals_the_flags(tmp_path):
    trl = pytest.importorskip("trl")
    config = trl.SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, max_length=2048, use_liger_kernel=True)
    path = tmp_path / "sft.json"
    path.write_text(config.to_json_string())
    peft = pytest.importorskip("peft")
    lora = tmp_path / "adapter_config.json"
    lora.write_text(json.dumps(peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                               task_type="CAUSAL_LM").to_dict(), default=list))
    code, from_file, err = cli_json("Qwen2-1.5B-Instruct", "--training-args", str(path), "--training-args", str(lora))
    assert code == 0, err
    code, from_flags, err = cli_json("Qwen2-1.5B-Instruct", "--mode", "lora", "--batch-size", "4", "--gradient-accumulation-steps", "2",
                                 "--seq-len", "2048", "--gradient-checkpointing", "--loss", "liger", "--sft")
    assert code == 0, err
    assert_same_estimate(from_file, from_flags)

"""--training-args and Job.from_training_args: the Trainer's own names, mapped exactly (issue 11)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from estimator import Job
from estimator.training_args import MAPPED, NEUTRAL, NO_MEMORY_EFFECT, TrainingArgsError, from_training_args

from cli_json import assert_same_estimate, cli_json


def _args(tmp_path, **kwargs):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], **kwargs)
    path = tmp_path / "args.json"
    path.write_text(args.to_json_string())
    return path


def test_every_pinned_key_is_sorted_into_one_kind():
    """A key of the pinned TrainingArguments left unsorted would be refused as unknown."""
    from transformers import TrainingArguments

    keys = {f.name for f in dataclasses.fields(TrainingArguments)}
    kinds = [MAPPED, NO_MEMORY_EFFECT, set(NEUTRAL)]
    assert keys <= set().union(*kinds), sorted(keys - set().union(*kinds))
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(kinds[a]) & set(kinds[b])


def test_cli_round_trip_equals_the_flags(tmp_path):
    """TrainingArguments written by to_json_string() give the same estimate as the equivalent flags."""
    path = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=4, bf16=True,
                 gradient_checkpointing=True, optim="adamw_torch")
    # Llama-3.2-1B's config says torch_dtype bfloat16: dtype="auto" loads bf16, so bf16=True is bf16_autocast
    code, from_file, err = cli_json("Llama-3.2-1B", "--mode", "full", "--training-args", str(path))
    assert code == 0, err
    code, from_flags, err = cli_json("Llama-3.2-1B", "--mode", "full", "--batch-size", "4", "--gradient-accumulation-steps", "4",
                                 "--precision", "bf16_autocast", "--gradient-checkpointing", "--optimizer", "adamw", "--trainer")
    assert code == 0, err
    assert_same_estimate(from_file, from_flags)


def test_a_flag_beside_the_file_wins(tmp_path):
    path = _args(tmp_path, per_device_train_batch_size=8, bf16=True, optim="sgd")
    code, data, err = cli_json("Llama-3.2-1B", "--mode", "full", "--training-args", str(path), "--batch-size", "2",
                           "--precision", "amp_bf16")
    assert code == 0, err
    assert data["job"]["batch_size"] == 2 and data["job"]["precision"] == "amp_bf16"
    assert data["job"]["optimizer"] == "sgd_no_momentum"  # the Trainer's sgd keeps no momentum


def test_lora_and_bnb_configs_make_a_qlora_job(tmp_path):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype="bfloat16")
    (tmp_path / "adapter_config.json").write_text(json.dumps(lora.to_dict(), default=list))
    (tmp_path / "bnb.json").write_text(bnb.to_json_string())
    path = _args(tmp_path, per_device_train_batch_size=2, bf16=True)
    code, data, err = cli_json("Llama-3.2-1B", "--training-args", str(path), "--training-args", str(tmp_path / "adapter_config.json"),
                           "--training-args", str(tmp_path / "bnb.json"))
    assert code == 0, err
    job = data["job"]
    assert (job["mode"], job["lora_r"], job["lora_targets"], job["quant"], job["double_quant"]) == ("qlora", 8, "q_proj,v_proj", "nf4", True)


@pytest.mark.parametrize("kwargs, word", [
    ({"torch_compile": True}, "torch_compile"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ({"optim": "adamw_torch_4bit"}, "optim"),
    ({"auto_find_batch_size": True}, "auto_find_batch_size"),
])
def test_unmodelled_keys_are_one_line_naming_the_key(tmp_path, kwargs, word):
    path = _args(tmp_path, **kwargs)
    code, _, err = cli_json("Llama-3.2-1B", "--mode", "full", "--training-args", str(path))
    assert code == 2 and err.count("\n") == 1 and word in err and "Traceback" not in err


def test_unknown_keys_and_bad_files_are_refused(tmp_path):
    with pytest.raises(TrainingArgsError, match="per_device_batch_size"):
        from_training_args({"per_device_batch_size": 4})
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    code, _, err = cli_json("Llama-3.2-1B", "--training-args", str(bad))
    assert code == 2 and "not a mapping" in err
    code, _, err = cli_json("Llama-3.2-1B", "--training-args", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err


def test_library_mapping_of_precisions_and_sft_keys():
    job, _ = from_training_args({"bf16": True}, load_dtype="fp32")
    assert job.precision.value == "amp_bf16"
    job, _ = from_training_args({"bf16": False}, load_dtype="bf16")
    assert job.precision.value == "bf16"
    job, _ = from_training_args({"max_length": 4096, "bf16": True, "gradient_checkpointing": True}, load_dtype="bf16")
    assert job.seq_len == 4096 and job.gradient_checkpointing and job.sft and job.loss.value == "chunked"
    for loss_type in ("nll", "dft", "chunked_nll"):  # dft reweights per-token vectors; chunked_nll is nll's alias
        assert from_training_args({"loss_type": loss_type}, load_dtype="bf16")[0].sft
    with pytest.raises(TrainingArgsError, match="loss_type"):
        from_training_args({"loss_type": "kl"})
    with pytest.raises(TrainingArgsError, match="needs bf16=True"):  # LoRA without autocast is not modelled
        from_training_args({}, {"r": 4, "target_modules": "all-linear"}, load_dtype="bf16")
    job, _ = from_training_args({"bf16": True}, {"r": 4, "target_modules": "all-linear"}, load_dtype="fp16")
    assert job == Job(mode="lora", lora_r=4, base_dtype="fp16", trainer=True)

"""The Trainer harness without a GPU: its cases, the TrainingArguments it builds, the estimator
mapping, the H200 calibration selection, the deadline, and a CPU dry run through the real Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from estimator import Job
from estimator.catalog import find_entry
from validation import measure
from validation.cases import load_cases
from validation.trainer_cases import (
    ARG_DEFAULTS,
    HARNESS_ARGS,
    OPTIMIZERS,
    TrainerCase,
    bnb_config_kwargs,
    estimator_job,
    expand_trainer_cases,
    load_trainer_cases,
    lora_config_kwargs,
    new_job_terms,
    training_arguments_kwargs,
)

ROOT = Path(__file__).resolve().parent.parent
TRAINER_CASES = ROOT / "validation" / "cases_trainer.yaml"
H200_CALIBRATION = ROOT / "validation" / "cases_h200_calibration.yaml"


@pytest.fixture(scope="module")
def cases() -> list[TrainerCase]:
    return load_trainer_cases(TRAINER_CASES)


def _case(**fields) -> TrainerCase:
    return expand_trainer_cases([{"model": "Qwen/Qwen2.5-0.5B", "mode": "full", "seq_len": 64, **fields}])[0]


# ---------------------------------------------------------------------------------------------
# The committed Trainer cases
# ---------------------------------------------------------------------------------------------
def test_trainer_cases_load_unique_and_held_out(cases):
    assert len(cases) >= 24
    assert len({c.id for c in cases}) == len(cases)
    assert all(c.holdout for c in cases), "every Trainer case is written down before it is measured"
    for c in cases:
        assert find_entry(c.model) is not None, c.model
    header = TRAINER_CASES.read_text().splitlines()[:12]
    assert any(line.startswith("# HOLDOUT: written down and committed BEFORE") for line in header)


def test_trainer_cases_cover_the_matrix(cases):
    modes_by_accumulation = {(c.mode, c.gradient_accumulation_steps) for c in cases}
    for mode in ("full", "lora", "qlora"):
        for steps in (1, 2, 4, 8):
            assert (mode, steps) in modes_by_accumulation, (mode, steps)
    full = [c for c in cases if c.mode == "full"]
    assert {c.load_dtype for c in full} == {"bf16", "fp32"}
    assert {estimator_job(c)["precision"] for c in full} >= {"amp_bf16", "bf16", "bf16_autocast"}
    assert {c.args["optim"] for c in cases} == set(OPTIMIZERS)
    assert {bool(c.args["gradient_checkpointing"]) for c in cases} == {True, False}
    for mode in ("full", "lora", "qlora"):
        assert {bool(c.args["use_liger_kernel"]) for c in cases if c.mode == mode} == {True, False}, mode
    assert any(c.mode == "lora" and c.load_dtype == "fp32" for c in cases)
    assert any(c.args["max_grad_norm"] == 0 for c in cases) and any(c.args["max_grad_norm"] > 0 for c in cases)


def test_trainer_cases_stay_small(cases):
    """Each case is meant to run in well under a minute on an H200: at most 3B and 16k tokens a micro-batch."""
    allowed = {"Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2-1.5B-Instruct", "meta-llama/Llama-3.2-3B"}
    assert {c.model for c in cases} <= allowed
    assert all(c.batch_size * c.seq_len <= 16_384 for c in cases)


# ---------------------------------------------------------------------------------------------
# TrainingArguments, built for real
# ---------------------------------------------------------------------------------------------
def test_every_case_builds_real_training_arguments(cases, tmp_path):
    from transformers import TrainingArguments

    for c in cases:
        kwargs = training_arguments_kwargs(c, str(tmp_path))
        args = TrainingArguments(**kwargs, use_cpu=True)  # use_cpu only because this machine has no GPU
        assert args.optim.value == c.args["optim"], c.id
        assert args.per_device_train_batch_size == c.batch_size
        assert args.gradient_accumulation_steps == c.gradient_accumulation_steps
        assert args.bf16 is c.args["bf16"] and args.fp16 is False
        assert args.gradient_checkpointing is c.args["gradient_checkpointing"]
        assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
        assert args.max_grad_norm == c.args["max_grad_norm"]
        assert args.use_liger_kernel is c.args["use_liger_kernel"]
        assert args.max_steps == 3 and args.report_to == []
        assert args.save_strategy == "no" and args.logging_strategy == "no"
        assert args.dataloader_num_workers == 0 and args.remove_unused_columns is False and args.disable_tqdm
        assert args.use_cache is False  # the Trainer sets config.use_cache from this, as SPEC's setup does
        assert c.samples == c.batch_size * c.gradient_accumulation_steps * 3


def test_kwargs_are_the_case_plus_the_harness():
    c = _case(args={"per_device_train_batch_size": 2, "optim": "sgd"})
    kwargs = training_arguments_kwargs(c, "/x")
    assert kwargs == {**ARG_DEFAULTS, "per_device_train_batch_size": 2, "optim": "sgd",
                      "gradient_checkpointing_kwargs": {"use_reentrant": False}, **HARNESS_ARGS, "output_dir": "/x"}
    kwargs["report_to"].append("wandb")
    assert HARNESS_ARGS["report_to"] == []  # no shared mutable default


def test_trainer_optimizer_names_are_transformers_own():
    from transformers.training_args import OptimizerNames

    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}
    assert ARG_DEFAULTS["optim"] == OptimizerNames.ADAMW_TORCH_FUSED.value


def test_lora_and_bnb_configs_match_the_plain_loop():
    import torch
    from peft import LoraConfig

    c = expand_trainer_cases([{"model": "m/x", "mode": "qlora", "lora_r": 8, "lora_targets": ["q_proj", "v_proj"],
                               "double_quant": False, "seq_len": 8}])[0]
    job = Job(mode="qlora", lora_r=8, lora_targets=("q_proj", "v_proj"), double_quant=False)
    assert LoraConfig(**lora_config_kwargs(c)) == measure._lora_config(job)
    ours = dict(bnb_config_kwargs(c), bnb_4bit_compute_dtype=torch.bfloat16)
    loop = measure.from_pretrained_kwargs(job)["quantization_config"]
    from transformers import BitsAndBytesConfig

    assert BitsAndBytesConfig(**ours).to_dict() == loop.to_dict()
    full = _case()
    assert lora_config_kwargs(full) is None and bnb_config_kwargs(full) is None
    lora = expand_trainer_cases([{"model": "m/x", "mode": "lora", "seq_len": 8}])[0]
    assert lora_config_kwargs(lora)["target_modules"] == "all-linear" and bnb_config_kwargs(lora) is None


# ---------------------------------------------------------------------------------------------
# The same job in the estimator's terms
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "load_dtype, bf16, precision",
    [("fp32", True, "amp_bf16"), ("fp32", False, "fp32"), ("bf16", False, "bf16"), ("bf16", True, "bf16_autocast")],
)
def test_full_precision_mapping(load_dtype, bf16, precision):
    job = estimator_job(_case(load_dtype=load_dtype, args={"bf16": bf16}))
    assert job["precision"] == precision
    assert ("precision=bf16_autocast" in new_job_terms(job)) is (precision == "bf16_autocast")


@pytest.mark.parametrize("optim, ours", sorted(OPTIMIZERS.items()))
def test_optimizer_mapping(optim, ours):
    expected = {"adamw_torch_fused": "adamw_fused", "adamw_torch": "adamw", "adamw_bnb_8bit": "adamw_8bit",
                "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
                "paged_adamw_32bit": "paged_adamw_32bit", "adafactor": "adafactor", "sgd": "sgd_no_momentum"}
    assert ours == expected[optim]
    assert estimator_job(_case(args={"optim": optim}))["optimizer"] == ours


def test_estimator_job_fields_are_todays_job_fields(cases):
    """Apart from the Additions' new names, an estimator_job is a valid estimator.Job."""
    for c in cases:
        job = estimator_job(c)
        assert job["batch_size"] == c.batch_size and job["seq_len"] == c.seq_len
        assert job["gradient_accumulation_steps"] == c.gradient_accumulation_steps
        assert job["loss"] == ("liger" if c.args["use_liger_kernel"] else "standard")
        today = {k: v for k, v in job.items() if k not in ("gradient_accumulation_steps", "loss")}
        if today.get("precision") == "bf16_autocast":
            today["precision"] = "bf16"
        if today["optimizer"] == "sgd_no_momentum":
            today["optimizer"] = "sgd"
        built = Job.from_dict(today)
        assert set(today) <= set(built.relevant_fields()), c.id
        if c.mode == "lora":
            assert built.base_dtype.value == c.load_dtype
        if c.mode != "full":
            assert built.lora_r == c.lora["lora_r"] and built.lora_targets == c.lora["lora_targets"]


def test_new_terms_are_listed():
    job = estimator_job(_case(load_dtype="bf16", args={"optim": "sgd", "gradient_accumulation_steps": 4, "use_liger_kernel": True}))
    assert sorted(new_job_terms(job)) == ["gradient_accumulation_steps=4", "loss=liger", "optimizer=sgd_no_momentum", "precision=bf16_autocast"]
    assert new_job_terms(estimator_job(_case(load_dtype="fp32"))) == []


# ---------------------------------------------------------------------------------------------
# Case parsing
# ---------------------------------------------------------------------------------------------
def test_ids_are_derived_and_round_trip():
    c = expand_trainer_cases([{"model": "meta-llama/Llama-3.2-1B", "mode": "qlora", "lora_r": 64, "seq_len": 2048,
                               "args": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                                        "optim": "paged_adamw_8bit", "gradient_checkpointing": True,
                                        "use_liger_kernel": True, "max_grad_norm": 0.0}}])[0]
    assert c.id == "llama-3.2-1b-trainer-qlora-b2-g4-s2048-r64-paged_adamw_8bit-gc-liger-clip0"
    assert TrainerCase.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(
    "item, message",
    [
        ({"mode": "full"}, "needs a model"),
        ({"model": "m/x", "mode": "full", "args": {"learning_rate": 1.0}}, "args may set only"),
        ({"model": "m/x", "mode": "full", "args": {"optim": "lion_8bit"}}, "optim must be one of"),
        ({"model": "m/x", "mode": "qlora", "load_dtype": "fp32"}, "qlora loads"),
        ({"model": "m/x", "mode": "lora", "args": {"bf16": False}}, "keep bf16"),
        ({"model": "m/x", "mode": "full", "lora_r": 8}, "do not apply"),
        ({"model": "m/x", "mode": "full", "args": {"gradient_accumulation_steps": 0}}, "at least 1"),
        ({"model": "m/x", "mode": "inference"}, "mode must be one of"),
        ({"model": "m/x", "mode": "full", "batch_size": 4}, "unknown field"),
    ],
)
def test_bad_trainer_cases_are_refused(item, message):
    with pytest.raises(ValueError, match=message):
        expand_trainer_cases([item])


def test_duplicate_trainer_ids_are_refused():
    with pytest.raises(ValueError, match="duplicate case id"):
        expand_trainer_cases([{"model": "m/x", "mode": "full"}, {"model": "m/x", "mode": "full"}])


# ---------------------------------------------------------------------------------------------
# The H200 calibration rerun
# ---------------------------------------------------------------------------------------------
def test_h200_calibration_is_a_subset_of_the_calibration_cases():
    rerun = load_cases(H200_CALIBRATION)
    committed = {c.id: c for c in load_cases(ROOT / "validation" / "cases.yaml")}
    assert 12 <= len(rerun) <= 16
    for c in rerun:
        assert c.id in committed, c.id  # same ids as the H100 measurements
        assert committed[c.id] == c and not c.holdout
        assert not any(size in c.model for size in ("7B", "8B")), c.model
    inference = {c.job.weights.value for c in rerun if c.job.mode.value == "inference"}
    assert {"bf16", "nf4", "int8"} <= inference
    assert {c.job.mode.value for c in rerun} == {"inference", "full", "lora", "qlora"}


def test_measure_accepts_the_h200_selection():
    out = subprocess.run(
        [sys.executable, "-m", "validation.measure", "--cases", str(H200_CALIBRATION), "--list"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == len(load_cases(H200_CALIBRATION))


# ---------------------------------------------------------------------------------------------
# The runner without a GPU
# ---------------------------------------------------------------------------------------------
def test_deadline():
    d = measure.Deadline(None, 60, 600)
    assert d.may_start() and d.timeout_s() == 600
    d = measure.Deadline(time.time() + 30, 60, 600)
    assert not d.may_start()
    d = measure.Deadline(time.time() + 100, 60, 600)
    assert d.may_start() and 60 <= d.timeout_s() <= 65
    assert not d.cut_short({"status": "error"}, 65)  # plenty of time left: a real failure, recorded
    assert not measure.Deadline(time.time() + 10, 60, 600).cut_short({"status": "ok"}, 5)
    assert measure.Deadline(time.time() + 10, 60, 600).cut_short({"status": "error"}, 5)


def test_trainer_run_lists_cases_without_a_gpu(tmp_path):
    out_file = tmp_path / "done.jsonl"
    first = load_trainer_cases(TRAINER_CASES)[0].id
    out_file.write_text(json.dumps({"case": first, "status": "ok"}) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "validation.trainer_run", "--list", "--skip-done", "--out", str(out_file), "--only", "*-qlora-*"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines and all("-trainer-qlora-" in line for line in lines) and first not in lines


@pytest.mark.parametrize("name", ["box.sh", "box_trainer.sh", "box_sft.sh", "box_env.sh"])
def test_box_scripts_are_valid_bash(name):
    """The box scripts run as commands; box_env.sh, which they source, is not one."""
    script = ROOT / "validation" / name
    assert os.access(script, os.X_OK) == (name != "box_env.sh")
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_trainer_dry_run_on_cpu(tmp_path):
    """The Trainer harness end to end on the CPU (counters read 0): checkpoint, fork, the real Trainer
    with gradient accumulation, LoRA with checkpointing, and the callback's phases."""
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "- {model: HuggingFaceTB/SmolLM2-135M, mode: full, load_dtype: fp32, seq_len: 16,"
        " args: {per_device_train_batch_size: 2, gradient_accumulation_steps: 2, optim: adamw_torch_fused}}\n"
        "- {model: HuggingFaceTB/SmolLM2-135M, mode: lora, lora_r: 4, seq_len: 16,"
        " args: {per_device_train_batch_size: 1, optim: sgd, gradient_checkpointing: true, max_grad_norm: 0.0}}\n"
    )
    out_file = tmp_path / "out.jsonl"
    env = dict(os.environ, CANIRUN_MEASURE_DEVICE="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "validation.trainer_run", "--cases", str(cases), "--out", str(out_file), "--work", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    full, lora = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert full["status"] == "ok", full.get("error")
    assert lora["status"] == "ok", lora.get("error")
    assert full["steps_done"] == 3 and [len(s["micro"]) for s in full["steps"]] == [2, 2, 2]
    assert len(full["step_seconds"]) == 2
    assert full["training_args"]["gradient_accumulation_steps"] == 2 and full["training_args"]["max_steps"] == 3
    assert full["accelerate_mixed_precision"] == "bf16" and full["optimizer"]["defaults"]["fused"] is True
    assert full["params_total"] == full["params_trainable"] == 134_515_008
    assert full["estimator_job"]["precision"] == "amp_bf16"
    assert lora["params_total"] == 134_515_008 and 0 < lora["params_trainable"] < 10_000_000
    assert lora["optimizer"]["class"] == "torch.optim.sgd.SGD" and lora["optimizer"]["defaults"]["momentum"] == 0
    assert lora["gradient_checkpointing_on"] is True and lora["estimator_job"]["optimizer"] == "sgd_no_momentum"
    assert "job" not in full  # validation.report must not score these with today's Job
    assert {"num_alloc_retries", "num_ooms", "context_bytes", "device_total_bytes", "versions", "gpu"} <= set(full)


@pytest.mark.cuda
def test_trainer_case_on_a_gpu(tmp_path):
    """One real case on a CUDA GPU: the peak is the step's, above the static memory."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "- {model: HuggingFaceTB/SmolLM2-135M, mode: full, load_dtype: fp32, seq_len: 256,"
        " args: {per_device_train_batch_size: 2, gradient_accumulation_steps: 2}}\n"
    )
    out_file = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "validation.trainer_run", "--cases", str(cases), "--out", str(out_file), "--work", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out_file.read_text().splitlines()[0])
    assert row["status"] == "ok", row.get("error")
    assert row["peak_allocated_bytes"] > row["static_after_setup_bytes"] > 134_515_008 * 4
    assert row["device_total_bytes"] >= row["peak_reserved_bytes"] >= row["peak_allocated_bytes"]


# ---------------------------------------------------------------------------------------------
# SFTTrainer cases (trl 1.16.0)
# ---------------------------------------------------------------------------------------------
SFT_CASES = ROOT / "validation" / "cases_sft.yaml"


def test_sft_cases_are_held_out_sft_and_valid_jobs():
    from validation.trainer_cases import SFT_ARG_DEFAULTS

    cases = load_trainer_cases(SFT_CASES)
    assert len(cases) == 8 and all(c.holdout and c.trainer == "sft" for c in cases)
    assert {c.mode for c in cases} == {"full", "lora", "qlora"}
    assert {c.gradient_accumulation_steps for c in cases} == {1, 2, 4}
    assert {c.args["max_length"] for c in cases} == {1024, 2048} and any(c.args["use_liger_kernel"] for c in cases)
    assert SFT_ARG_DEFAULTS["gradient_checkpointing"] and SFT_ARG_DEFAULTS["bf16"]
    for c in cases:
        assert c.seq_len == c.args["max_length"] and c.id.split("-sft-")[1]
        job = Job.from_dict(estimator_job(c))
        assert job.sft and job.trainer and job.seq_len == c.seq_len
        assert "gradient_checkpointing_kwargs" not in training_arguments_kwargs(c, "/tmp/x")  # SFTConfig's default
        assert TrainerCase.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_sft_only_keys_need_an_sft_case():
    with pytest.raises(ValueError, match="max_length"):
        _case(args={"max_length": 64})
    with pytest.raises(ValueError, match="truncate"):
        expand_trainer_cases([{"trainer": "sft", "model": "Qwen/Qwen2.5-0.5B", "mode": "full", "seq_len": 128,
                               "args": {"max_length": 64}}])


def test_every_sft_case_builds_a_real_sftconfig(tmp_path):
    trl = pytest.importorskip("trl")
    for c in load_trainer_cases(SFT_CASES):
        config = trl.SFTConfig(**dict(training_arguments_kwargs(c, str(tmp_path)), use_cpu=True))
        assert config.max_length == c.seq_len and config.gradient_checkpointing == c.args["gradient_checkpointing"] and config.bf16
        assert config.loss_type == "nll" and not config.packing and not config.padding_free


def test_the_local_tokenizer_has_the_vocabulary_and_pad_and_eos():
    pytest.importorskip("tokenizers")
    from validation.trainer_run import local_tokenizer

    tok = local_tokenizer(1_000)
    assert len(tok) == 1_000 and tok.pad_token_id == 1 and tok.eos_token_id == 2
    assert tok("t5 t999")["input_ids"] == [5, 999]


@pytest.mark.slow
def test_sft_dry_run_on_cpu(tmp_path):
    """SFTTrainer end to end on the CPU: the pre-tokenized data set is not re-tokenized (its columns
    stay input_ids and labels), TRL's fused head is installed, accumulation and checkpointing run."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "- {trainer: sft, model: HuggingFaceTB/SmolLM2-135M, mode: full, load_dtype: fp32,"
        " args: {per_device_train_batch_size: 2, gradient_accumulation_steps: 2, max_length: 16}}\n"
        "- {trainer: sft, model: HuggingFaceTB/SmolLM2-135M, mode: lora, lora_r: 4, args: {per_device_train_batch_size: 1, max_length: 16}}\n"
    )
    out_file = tmp_path / "out.jsonl"
    env = dict(os.environ, CANIRUN_MEASURE_DEVICE="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "validation.trainer_run", "--cases", str(cases), "--out", str(out_file), "--work", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    full, lora = [json.loads(line) for line in out_file.read_text().splitlines()]
    for row in (full, lora):
        assert row["status"] == "ok", row.get("error")
        assert row["trainer"] == "sft" and row["sft"]["fused_lm_head"] is True
        assert row["sft"]["train_columns"] == ["input_ids", "labels"] and row["gradient_checkpointing_on"] is True
        assert row["estimator_job"]["sft"] is True and row["versions"]["trl"] == "1.16.0"
    assert [len(s["micro"]) for s in full["steps"]] == [2, 2, 2] and full["sft"]["train_rows"] == 12
    assert full["accelerate_mixed_precision"] == "bf16" and full["estimator_job"]["precision"] == "amp_bf16"

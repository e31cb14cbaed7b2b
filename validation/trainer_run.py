"""Measure training through the real `transformers.Trainer` (SPEC's Additions; issue 11).

    python -m validation.trainer_run --cases validation/cases_trainer.yaml --out validation/results_trainer/h200.jsonl

The plain loop of `validation.measure` is SPEC's one training step; this is what users run. Each
case loads the model as SPEC says (`from_pretrained(ckpt, dtype=<load dtype>, device_map={"": 0})`,
bitsandbytes 4-bit + `prepare_model_for_kbit_training` for qlora, `get_peft_model` with SPEC's
LoraConfig for lora/qlora), builds `Trainer(model, args=TrainingArguments(**kwargs), train_dataset=…)`
on random token ids of length S with labels = input_ids, and trains `max_steps=3`. The kwargs are
`validation.trainer_cases.training_arguments_kwargs(case)` and are recorded with the result.

What the Trainer does between our hooks (transformers 5.17, trainer.py `_run_epoch`), and where a
`TrainerCallback` samples memory and resets the peak counter:

    train(): liger patch, gradient_checkpointing_enable, optimizer + accelerate.prepare, zero_grad
    on_train_begin                      <- reset: everything above is setup, not a step
    per optimizer step: fetch G micro-batches, then for each: on_step_begin (first only) <- sample
        forward + backward (under accelerate's autocast when bf16=True)
        not last: on_substep_end        <- sample: a micro-batch's peak, gradients of earlier ones alive
        last: clip_grad_norm_ (max_grad_norm 0 still computes the norm, with max_norm=inf),
              on_pre_optimizer_step <- sample
              optimizer.step(), on_optimizer_step <- sample
              lr_scheduler.step(), model.zero_grad(), on_step_end <- sample, step time

The peak allocated is the maximum over all these samples (every reset is preceded by a sample, so
nothing is lost); peak reserved likewise; the device total is NVML's used memory over a baseline read
before CUDA starts in the case's process (`validation.measure.DeviceProbe`).

The machinery is validation.measure's: catalog checkpoints with random bf16 weights, one forked
(or fresh) process per case from a parent that never touches CUDA (it does not even import the
Trainer: that imports peft and bitsandbytes, and bitsandbytes asks CUDA for the device's
capability), JSON lines with `--skip-done`, `--only`, `--stop-at`, and a model's checkpoint deleted
after its cases.

A case with `trainer: sft` runs through TRL 1.16.0's `SFTTrainer(model, args=SFTConfig(**kwargs),
train_dataset=…, processing_class=…, peft_config=None, callbacks=[…])` instead, with the same
loading, preparation, callback and probes. Neither the GPU box nor this machine reaches the Hub, so
the processing class is built here: a `tokenizers` WordLevel model with one token per id of the
config's vocabulary (`<unk>`, `<pad>`, `</s>`, then `t3`…), wrapped in `PreTrainedTokenizerFast`
with pad and eos set. The data set is pre-tokenized (`datasets.Dataset.from_dict` with `input_ids`
and `labels` of length S, random ids): SFTTrainer's `_prepare_dataset` sees `input_ids` and does
not tokenize, finds `labels` and builds none, and its `max_length` truncation keeps every token
(S <= max_length); packing stays off. Its collator adds an attention mask of ones.

Rows carry `estimator_job` (the case in the estimator's Job terms, see trainer_cases.estimator_job),
not `job`: validation.report scores `job` rows with today's estimator, whose Job cannot take the
Trainer's new terms. Keep these results out of validation/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from validation import measure
from validation.cases import select
from validation.measure import DeviceProbe, _cuda
from validation.trainer_cases import (
    TrainerCase,
    bnb_config_kwargs,
    estimator_job,
    load_trainer_cases,
    lora_config_kwargs,
    new_job_terms,
    training_arguments_kwargs,
)

_LOAD_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def case_header(case: TrainerCase) -> dict:
    """What a result row says about its case, before anything runs (also for rows that fail early)."""
    job = estimator_job(case)
    kwargs = training_arguments_kwargs(case, output_dir="<tmp>")
    if measure.DEVICE != "cuda":
        kwargs["use_cpu"] = True
    return {
        "case": case.id,
        "model": case.model,
        "holdout": case.holdout,
        "kind": "trainer",
        "trainer": case.trainer,
        "mode": case.mode,
        "load_dtype": case.load_dtype,
        "seq_len": case.seq_len,
        "training_args": kwargs,
        "lora_config": lora_config_kwargs(case),
        "bnb_config": bnb_config_kwargs(case),
        "estimator_job": job,
        "estimator_job_new_terms": new_job_terms(job),
        "trainer_case": case.to_dict(),
    }


# ---------------------------------------------------------------------------------------------
# In the case's process
# ---------------------------------------------------------------------------------------------
def load_model(case: TrainerCase, ckpt: Path):
    """`from_pretrained(ckpt, dtype=<load dtype>, device_map={"": 0})`, 4-bit for qlora."""
    import torch
    import transformers

    kwargs: dict = {
        "device_map": {"": 0 if measure.DEVICE == "cuda" else "cpu"},
        "attn_implementation": "sdpa",
        "dtype": getattr(torch, _LOAD_DTYPES[case.load_dtype]),
    }
    bnb = bnb_config_kwargs(case)
    if bnb is not None:
        bnb = dict(bnb, bnb_4bit_compute_dtype=getattr(torch, bnb["bnb_4bit_compute_dtype"]))
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**bnb)
    return transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), **kwargs)


def prepare_model(case: TrainerCase, model):
    """SPEC's qlora preparation, then SPEC's LoRA adapters; a full job's model is left as loaded.

    The Trainer itself turns on gradient checkpointing (from `args.gradient_checkpointing`) and
    sets `config.use_cache = args.use_cache` (False)."""
    if case.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(case.args["gradient_checkpointing"]),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = lora_config_kwargs(case)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**lora))
    return model


def random_tokens(rows: int, seq_len: int, vocab: int):
    """A torch Dataset of `rows` random token sequences, each `{"input_ids": ids, "labels": ids}`."""
    import torch

    class RandomTokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            generator = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)

        def __len__(self) -> int:
            return rows

        def __getitem__(self, index: int) -> dict:
            ids = self.ids[index]
            return {"input_ids": ids, "labels": ids.clone()}

    return RandomTokens()


def local_tokenizer(vocab: int):
    """A tokenizer of exactly `vocab` ids, built offline: `<unk>` 0, `<pad>` 1, `</s>` 2, `t3`…`t{vocab-1}`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<pad>", "</s>"]
    words = {token: i for i, token in enumerate(special)}
    words.update({f"t{i}": i for i in range(len(special), vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def pretokenized_dataset(rows: int, seq_len: int, vocab: int):
    """A `datasets.Dataset` of `rows` random token sequences (the same ids as `random_tokens`), with
    `labels` = `input_ids`, so SFTTrainer neither tokenizes nor builds labels."""
    import datasets

    ids = random_tokens(rows, seq_len, vocab).ids.tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": [list(row) for row in ids]})


def _fused_head(model) -> bool:
    """Whether TRL's fused LM head is installed on the (base) model: `add_fused_lm_head` rebinds forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = base.__dict__.get("forward")
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)  # functools.wraps keeps forward's name
    return code is not None and code.co_name == "_fused_forward"


def memory_callback(probe: DeviceProbe):
    """A TrainerCallback that samples memory at each phase boundary and then resets the peak."""
    from transformers import TrainerCallback

    class MemoryCallback(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.step: dict | None = None
            self.train_begin: dict | None = None
            self.step_end_times: list[float] = []
            self.peaks: list[int] = []
            self.reserved_peaks: list[int] = []
            self.t_begin = 0.0

        def _mark(self, name: str) -> dict:
            sample = probe.sample(name)  # synchronizes first
            _cuda().reset_peak_memory_stats()
            return sample

        def _in_step(self, name: str) -> dict:
            sample = self._mark(f"step{len(self.steps)}_{name}")
            self.peaks.append(sample["max_allocated"])
            self.reserved_peaks.append(sample["max_reserved"])
            return sample

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = self._mark("train_begin")
            self.t_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            # Covers the time since the last step ended: the next G micro-batches are fetched then.
            sample = self._in_step("begin")
            self.step = {"start_allocated": sample["allocated"], "fetch_peak": sample["max_allocated"], "micro": []}

        def _micro(self):
            sample = self._in_step(f"micro{len(self.step['micro'])}")
            self.step["micro"].append(
                {"peak": sample["max_allocated"], "after": sample["allocated"], "reserved": sample["reserved"]}
            )

        def on_substep_end(self, args, state, control, **kwargs):
            self._micro()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self._micro()  # the last micro-batch, plus gradient clipping when max_grad_norm > 0

        def on_optimizer_step(self, args, state, control, **kwargs):
            sample = self._in_step("optimizer")
            self.step.update(optimizer_peak=sample["max_allocated"], after_optimizer=sample["allocated"])

        def on_step_end(self, args, state, control, **kwargs):
            sample = self._in_step("end")
            self.step_end_times.append(time.perf_counter())
            self.step.update(end_peak=sample["max_allocated"], after_zero_grad=sample["allocated"], reserved=sample["reserved"])
            self.steps.append(self.step)
            self.step = None

        def step_seconds(self) -> list[float]:
            """Wall time of each optimizer step after the first (end to end, so it includes fetching)."""
            times = self.step_end_times
            return [round(b - a, 4) for a, b in zip(times, times[1:])]

    return MemoryCallback()


def _liger_patched(model) -> int:
    """How many modules Liger re-bound (it binds its kernels' forward onto module instances)."""
    count = 0
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if forward is not None and str(getattr(forward, "__module__", "")).startswith("liger_kernel"):
            count += 1
    return count


def _optimizer_info(trainer) -> dict:
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    defaults = {k: v for k, v in getattr(opt, "defaults", {}).items() if isinstance(v, (bool, int, float, str, type(None)))}
    return {"class": f"{type(opt).__module__}.{type(opt).__name__}", "defaults": defaults}


def _versions() -> dict:
    import importlib.metadata as md

    out = measure._versions()
    for name in ("liger_kernel", "triton", "nvidia-ml-py", "trl", "datasets", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _build_trainer(case: TrainerCase, model, kwargs: dict, callback):
    """`Trainer(...)` on the torch data set, or for an sft case `SFTTrainer(...)` on the pre-tokenized one."""
    vocab = model.config.get_text_config().vocab_size
    if case.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(model, args=SFTConfig(**kwargs), train_dataset=pretokenized_dataset(case.samples, case.seq_len, vocab),
                          processing_class=local_tokenizer(vocab), peft_config=None, callbacks=[callback])
    from transformers import Trainer, TrainingArguments

    return Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=random_tokens(case.samples, case.seq_len, vocab),
                   callbacks=[callback])


def run_trainer(case: TrainerCase, ckpt: Path, probe: DeviceProbe, result: dict, work: Path) -> None:
    model = load_model(case, ckpt)
    probe.sample("loaded")
    result["params_total"] = measure._count_params(model)
    model = prepare_model(case, model)
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        result["params_trainable"] = int(trainable)
        result["peft_params_all"] = int(total)
    else:
        result["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    probe.sample("prepared")
    output_dir = tempfile.mkdtemp(prefix="trainer-", dir=work)
    try:
        kwargs = dict(result["training_args"], output_dir=output_dir)
        callback = memory_callback(probe)
        trainer = _build_trainer(case, model, kwargs, callback)
        if case.trainer == "sft":
            result["sft"] = {
                "fused_lm_head": _fused_head(trainer.model),
                "liger_kernel_config": trainer.args.liger_kernel_config,
                "train_columns": list(trainer.train_dataset.column_names),
                "train_rows": len(trainer.train_dataset),
                "adapter_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
                "gradient_checkpointing_kwargs": trainer.args.gradient_checkpointing_kwargs,
            }
        setup = probe.sample("trainer_built")
        result["trainer_built_allocated_bytes"] = setup["allocated"]
        t0 = time.perf_counter()
        try:
            trainer.train()
        finally:
            result["train_seconds"] = round(time.perf_counter() - t0, 3)
            result["steps"] = callback.steps
            result["step_seconds"] = callback.step_seconds()
            if callback.peaks:
                result["peak_allocated_bytes"] = max(callback.peaks)
                result["peak_reserved_bytes"] = max(callback.reserved_peaks)
            if callback.train_begin is not None:
                result["static_after_setup_bytes"] = callback.train_begin["allocated"]
        result["steps_done"] = trainer.state.global_step
        result["optimizer"] = _optimizer_info(trainer)
        result["accelerate_mixed_precision"] = str(trainer.accelerator.mixed_precision)
        result["liger_patched_modules"] = _liger_patched(trainer.model)
        result["gradient_checkpointing_on"] = any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules())
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def measure_trainer_case(case: TrainerCase, ckpt: Path, work: Path) -> dict:
    """Run one case in this (fresh) process and return its result row."""
    result = case_header(case)
    return measure.record_case(result, lambda probe: run_trainer(case, ckpt, probe, result, work), _versions)


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.trainer_run", description=__doc__.split("\n\n")[0])
    measure.add_run_arguments(parser, "validation/cases_trainer.yaml", "validation/results_trainer/measured.jsonl")
    args = parser.parse_args(argv)
    if args.run_one:
        spec = json.loads(Path(args.run_one).read_text())
        work = Path(spec["ckpt"]).parent
        row = measure_trainer_case(TrainerCase.from_dict(spec["case"]), Path(spec["ckpt"]), work)
        Path(args.result).write_text(json.dumps(row))
        return 0
    return measure.run_cases(select(load_trainer_cases(args.cases), args.only), args, measure_one=measure_trainer_case,
                             module="validation.trainer_run", header=case_header)


if __name__ == "__main__":
    sys.exit(main())

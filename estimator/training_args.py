"""A `Job` from the configs people train with: `TrainingArguments` (or TRL's `SFTConfig`), a LoRA
config as PEFT saves it (`adapter_config.json`) and a `BitsAndBytesConfig`, by their own key names.

Every key of the pinned transformers 5.17 `TrainingArguments` (and of TRL 1.16's `SFTConfig`) is
sorted into one of three kinds, so nothing is silently dropped:
- mapped to a job field (`per_device_train_batch_size`, `gradient_accumulation_steps`, `bf16`/`fp16`
  with the load dtype, `gradient_checkpointing` and its `use_reentrant`, `optim`,
  `use_liger_kernel`, `max_length`);
- known and without a memory effect on one GPU's training step (logging, saving, seeds, the
  learning rate…): ignored;
- known, with a memory effect the estimator does not model (`deepspeed`, `fsdp`, `torch_compile`,
  label smoothing…): refused with a message that names it, unless it holds its neutral default.
A key the pinned libraries do not have is refused too.

An `SFTConfig` (a dict holding any key TRL 1.16's `SFTConfig` adds to `TrainingArguments`,
SFT_ONLY: `to_json_string()` writes them all) is a job for TRL's SFTTrainer (`Job.sft`), and a
key it leaves out takes SFTConfig's default, not TrainingArguments': gradient checkpointing on and
bf16 on unless fp16 (trl/trainer/base_config.py `_BaseConfig`, its `__post_init__`), `max_length`
1024 (trl/trainer/sft_config.py); `use_liger_kernel=True` there is Liger's layer kernels with
SFTTrainer's own chunked head. `loss_type` "dft" only reweights the per-token loss by its
detached probability (`SFTTrainer.compute_loss`, per-token vectors), and "chunked_nll" is
SFTConfig's deprecated alias of "nll"; both are mapped as "nll" is. Completion-only and
assistant-only losses score fewer tokens through the chunked head, so the estimate, which scores
every token, is an upper bound for them.

The load dtype is not in a TrainingArguments file: transformers 5 loads with `dtype="auto"`, so it
is the config's `torch_dtype` unless the caller says otherwise (the CLI's `--precision` or
`--base-dtype` win over it).
"""

from __future__ import annotations

from typing import Any, Mapping

from estimator.job import Job, Loss, Mode
from estimator.optimizers import OPTIMIZERS


class TrainingArgsError(ValueError):
    """A config the estimator cannot map; the message names the key and what to change."""


# ---- TrainingArguments (transformers 5.17) and SFTConfig (TRL 1.16) keys -------------------------
MAPPED = frozenset({
    "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "optim", "use_liger_kernel", "max_length", "loss_type",
})

# The keys TRL 1.16's SFTConfig adds to transformers 5.17's TrainingArguments (trl/trainer/sft_config.py):
# any of them makes a dict an SFTConfig.
SFT_ONLY = frozenset({
    "activation_offloading", "assistant_only_loss", "chat_template_path", "completion_only_loss", "dataset_kwargs",
    "dataset_num_proc", "dataset_text_field", "eos_token", "eval_packing", "loss_type", "max_length",
    "model_init_kwargs", "packing", "packing_strategy", "pad_to_multiple_of", "pad_token", "padding_free",
    "router_aux_loss_coef", "shuffle_dataset", "truncation_mode", "trust_remote_code",
})
# SFTConfig's defaults where they differ from TrainingArguments' and change memory
SFT_DEFAULTS = {"gradient_checkpointing": True, "max_length": 1024}
SFT_LOSS_TYPES = ("nll", "dft", "chunked_nll")

# Known keys with no effect on one GPU's training-step memory (host-side, logging, scheduling,
# evaluation switched off, multi-process settings that do nothing on one GPU).
NO_MEMORY_EFFECT = frozenset({
    "output_dir", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
    "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "average_tokens_across_devices",
    "max_grad_norm", "bf16_full_eval", "fp16_full_eval", "tf32", "use_cache", "logging_strategy", "logging_steps",
    "logging_first_step", "log_on_each_node", "logging_nan_inf_filter", "include_num_input_tokens_seen", "log_level",
    "log_level_replica", "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
    "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics",
    "batch_eval_metrics", "save_only_model", "save_strategy", "save_steps", "save_on_each_node", "save_total_limit",
    "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy",
    "hub_always_push", "hub_revision", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "ignore_data_skip", "restore_callback_states_from_checkpoint", "full_determinism", "seed", "data_seed", "use_cpu",
    "accelerator_config", "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "dataloader_in_order", "remove_unused_columns", "label_names", "train_sampling_strategy", "length_column_name",
    "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend",
    "ddp_timeout", "debug", "skip_memory_metrics", "do_train", "do_eval", "do_predict", "resume_from_checkpoint",
    "local_rank",
    # SFTConfig's data preparation
    "model_init_kwargs", "trust_remote_code", "chat_template_path", "dataset_text_field", "dataset_kwargs",
    "dataset_num_proc", "eos_token", "pad_token", "truncation_mode", "shuffle_dataset", "eval_packing",
    "completion_only_loss", "assistant_only_loss", "pad_to_multiple_of",
})

# Known keys whose non-default values change memory in ways not modelled: the neutral values.
_OFF = (None, False, "", [], {}, 0, 0.0, "no")
NEUTRAL: dict[str, tuple] = {
    "deepspeed": _OFF, "fsdp": _OFF, "fsdp_config": _OFF, "parallelism_config": _OFF, "torch_compile": _OFF,
    "torch_compile_backend": _OFF, "torch_compile_mode": _OFF, "auto_find_batch_size": _OFF,
    "neftune_noise_alpha": _OFF, "torch_empty_cache_steps": _OFF, "optim_args": _OFF, "optim_target_modules": _OFF,
    "label_smoothing_factor": _OFF, "liger_kernel_config": _OFF, "eval_strategy": _OFF, "eval_on_start": _OFF,
    "router_aux_loss_coef": _OFF + (0.001,),  # SFTConfig's default; only MoE routers read it
    "packing": _OFF, "packing_strategy": ("bfd", "bfd_split", "wrapped", None), "padding_free": _OFF,
    "activation_offloading": _OFF,
}
WHY_NOT = {
    "deepspeed": "DeepSpeed shards state across GPUs: use --strategy zero1/zero2/zero3 with --gpu",
    "fsdp": "FSDP shards state across GPUs: use --strategy zero3 with --gpu",
    "torch_compile": "torch.compile changes which activations are kept",
    "auto_find_batch_size": "the Trainer would change the batch size itself: give --batch-size",
    "label_smoothing_factor": "label smoothing computes its own loss over the logits",
    "packing": "packing changes the sequence layout; give --seq-len for the packed length",
    "padding_free": "padding-free batches change the sequence layout",
    "activation_offloading": "activation offloading moves saved tensors to the CPU",
    "eval_strategy": "evaluation during training runs its own forward passes",
}


def _neutral(key: str, value: Any) -> bool:
    return value in NEUTRAL[key]


def _refuse(key: str, value: Any) -> TrainingArgsError:
    why = WHY_NOT.get(key, "its memory effect is not modelled")
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return TrainingArgsError(f"training args: {key}={shown} is not supported ({why}); remove it to estimate the rest")


def read_config_file(path: str) -> dict:
    """A config file as a dict: JSON, or YAML with the same keys. Errors are one line."""
    import json
    from pathlib import Path

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise TrainingArgsError(f"--training-args: cannot read {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except ValueError:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise TrainingArgsError(f"--training-args: {path} is neither JSON nor YAML ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise TrainingArgsError(f"--training-args: {path} holds a {type(data).__name__}, not a mapping of keys")
    return data


# ---- the three configs ---------------------------------------------------------------------------
def _as_dict(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    for name in ("to_dict", "to_json_string"):
        if hasattr(config, name):
            value = getattr(config, name)()
            if isinstance(value, str):
                import json

                value = json.loads(value)
            return dict(value)
    raise TrainingArgsError(f"expected a dict or a config object, got {type(config).__name__}")


def kind_of(data: Mapping) -> str:
    """Which config a dict is: "lora" (PEFT), "bnb" (BitsAndBytesConfig) or "training" (TrainingArguments/SFTConfig)."""
    if "peft_type" in data or ("r" in data and "target_modules" in data):
        return "lora"
    if "load_in_4bit" in data or "load_in_8bit" in data or data.get("quant_method") == "bitsandbytes":
        return "bnb"
    return "training"


def is_sft_config(data: Mapping) -> bool:
    """Whether a training dict is TRL's SFTConfig (it holds a key only SFTConfig has)."""
    return any(key in SFT_ONLY for key in data)


def _training_fields(data: Mapping) -> tuple[dict, list[str]]:
    fields: dict[str, Any] = {}
    notes: list[str] = []
    sft = is_sft_config(data)
    if sft:  # a key SFTConfig leaves out has SFTConfig's default
        data = {**SFT_DEFAULTS, **data}
        if data.get("bf16") is None:  # _BaseConfig.__post_init__: bf16 = not fp16
            data["bf16"] = not data.get("fp16")
        if data.get("loss_type", "nll") not in SFT_LOSS_TYPES:
            raise TrainingArgsError(f"training args: loss_type={data['loss_type']!r} is not one of SFTConfig's "
                                    f"{', '.join(SFT_LOSS_TYPES)}")
    for key, value in data.items():
        if key.startswith("_"):
            continue  # private fields to_dict() may carry
        if key in NEUTRAL:
            if not _neutral(key, value):
                raise _refuse(key, value)
        elif key not in MAPPED and key not in NO_MEMORY_EFFECT:
            raise TrainingArgsError(f"training args: {key!r} is not a TrainingArguments or SFTConfig key of the "
                                    "pinned transformers 5.17 / TRL 1.16; check the spelling")
    if "per_device_train_batch_size" in data:
        fields["batch_size"] = data["per_device_train_batch_size"]
    if "gradient_accumulation_steps" in data:
        fields["gradient_accumulation_steps"] = data["gradient_accumulation_steps"]
    if data.get("max_length") is not None:
        fields["seq_len"] = data["max_length"]
    if "gradient_checkpointing" in data:
        fields["gradient_checkpointing"] = bool(data["gradient_checkpointing"])
    kwargs = data.get("gradient_checkpointing_kwargs") or {}
    if fields.get("gradient_checkpointing") and isinstance(kwargs, Mapping) and kwargs.get("use_reentrant") is True:
        raise TrainingArgsError("training args: gradient_checkpointing_kwargs use_reentrant=True is not modelled; "
                                "use {\"use_reentrant\": false}, the non-reentrant checkpointing transformers recommends")
    if "optim" in data:
        optim = str(data["optim"])
        names = {n: e.name for e in OPTIMIZERS.values() for n in e.trainer_optim}
        if optim not in names:
            raise TrainingArgsError(f"training args: optim={optim!r} is not modelled; use one of {', '.join(sorted(names))}")
        fields["optimizer"] = names[optim]
    if data.get("use_liger_kernel"):
        fields["loss"] = Loss.LIGER
    bf16, fp16 = bool(data.get("bf16")), bool(data.get("fp16"))
    if bf16 and fp16:
        raise TrainingArgsError("training args: bf16 and fp16 are both true; the Trainer refuses that too")
    fields["_autocast"] = "bf16" if bf16 else "fp16" if fp16 else None
    if sft:
        fields["sft"] = True
        if data.get("completion_only_loss") or data.get("assistant_only_loss"):
            notes.append("SFTTrainer scores only the completion or assistant tokens; the estimate scores every token "
                         "(an upper bound)")
    return fields, notes


def _precision(load_dtype: str, autocast: str | None) -> str:
    """Full fine-tuning's precision from the load dtype and the Trainer's bf16/fp16 flags."""
    if autocast is None:
        return load_dtype
    if load_dtype == "fp32":
        return "amp_" + autocast
    if load_dtype == "bf16" and autocast == "bf16":
        return "bf16_autocast"
    raise TrainingArgsError(f"training args: a model loaded in {load_dtype} with {autocast}=True is not modelled "
                            "(the Trainer's fp16 needs fp32 weights); load in fp32 or bf16")


def _lora_fields(data: Mapping) -> dict:
    if str(data.get("peft_type", "LORA")).upper() != "LORA":
        raise TrainingArgsError(f"LoRA config: peft_type {data.get('peft_type')!r} is not LoRA")
    for key, neutral in (("use_dora", (False, None)), ("bias", ("none", None)), ("modules_to_save", (None, [])),
                         ("target_parameters", (None, []))):
        if key in data and data[key] not in neutral:
            raise TrainingArgsError(f"LoRA config: {key}={data[key]!r} is not modelled; remove it to estimate the rest")
    fields: dict[str, Any] = {}
    if "r" in data:
        fields["lora_r"] = data["r"]
    if "lora_alpha" in data:
        fields["lora_alpha"] = data["lora_alpha"]
    if "lora_dropout" in data:
        fields["lora_dropout"] = data["lora_dropout"]
    targets = data.get("target_modules")
    if targets is not None:
        if isinstance(targets, str):
            targets = (targets,)
        fields["lora_targets"] = tuple(sorted(str(t) for t in targets)) if "all-linear" not in targets else ("all-linear",)
    return fields


def _bnb_fields(data: Mapping) -> dict:
    if data.get("load_in_8bit"):
        raise TrainingArgsError("BitsAndBytesConfig: load_in_8bit training is not one of the jobs (use 4-bit QLoRA)")
    if not data.get("load_in_4bit"):
        raise TrainingArgsError("BitsAndBytesConfig: neither load_in_4bit nor load_in_8bit is set")
    compute = str(data.get("bnb_4bit_compute_dtype") or "bfloat16").removeprefix("torch.")
    if compute != "bfloat16":
        raise TrainingArgsError(f"BitsAndBytesConfig: bnb_4bit_compute_dtype={compute} is not modelled; use bfloat16")
    fields: dict[str, Any] = {"quant": str(data.get("bnb_4bit_quant_type") or "fp4")}
    fields["double_quant"] = bool(data.get("bnb_4bit_use_double_quant", False))
    return fields


def from_training_args(args: Any, peft_config: Any = None, quantization_config: Any = None, *,
                       load_dtype: str = "bf16", overrides: Mapping[str, Any] | None = None) -> tuple[Job, list[str]]:
    """The `Job` a Trainer run with these configs is, and notes on what was assumed.

    `load_dtype` is the dtype the model loads in (the config's `torch_dtype` under `dtype="auto"`);
    `overrides` are job fields given explicitly, which win over the configs.
    """
    training = _as_dict(args)
    lora = _as_dict(peft_config)
    bnb = _as_dict(quantization_config)
    overrides = dict(overrides or {})
    fields, notes = _training_fields(training)
    autocast = fields.pop("_autocast")
    mode = Mode.QLORA if bnb else Mode.LORA if lora else Mode.FULL
    mode = Mode(overrides.get("mode", mode))
    if mode in (Mode.LORA, Mode.QLORA):
        fields.update(_lora_fields(lora))
        if autocast != "bf16":
            raise TrainingArgsError(f"training args: {mode.value} needs bf16=True (the forward under bf16 autocast); "
                                    "other precisions are not modelled")
        if mode is Mode.QLORA:
            fields.update(_bnb_fields(bnb) if bnb else {})
        else:
            fields["base_dtype"] = load_dtype
    elif mode is Mode.FULL and "precision" not in overrides:
        fields["precision"] = _precision(load_dtype, autocast)
    elif mode is Mode.INFERENCE:
        raise TrainingArgsError("training args describe training: use --mode full, lora or qlora")
    fields["mode"] = mode
    fields["trainer"] = True
    fields.update(overrides)
    return Job(**fields), notes

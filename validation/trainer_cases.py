"""Trainer cases: a catalog model trained by the real `transformers.Trainer` (SPEC's Additions).

A case names what a user would write: how the model is loaded (`load_dtype`, LoRA, QLoRA), the
sequence length of the random token data set, and the `TrainingArguments` the user sets (`args`).
`training_arguments_kwargs` adds the harness's fixed settings (three steps, no logging, no saving),
and the resulting dict is the case's source of truth: it is recorded with every result.

    - id: qwen-full-g2                     # optional: derived from the fields when absent
      model: Qwen/Qwen2.5-0.5B             # a catalog name
      mode: full                           # full | lora | qlora
      load_dtype: fp32                     # from_pretrained's dtype: fp32 | bf16 (qlora: bf16)
      seq_len: 1024
      args: {per_device_train_batch_size: 4, gradient_accumulation_steps: 2, bf16: true,
             optim: adamw_torch_fused, gradient_checkpointing: false, use_liger_kernel: false}
      lora_r: 16                           # lora/qlora: LoRA fields as in estimator.Job
      holdout: true

A case with `trainer: sft` runs through TRL 1.16.0's `SFTTrainer` instead, with `SFTConfig`
kwargs: unset `args` take SFTConfig's own defaults (SFT_ARG_DEFAULTS: gradient checkpointing and
bf16 on, `max_length` 1024), `max_length` may be set, and `seq_len` (the data's length) defaults
to `max_length`, so nothing is truncated.

`estimator_job` maps a case onto the estimator's `Job` fields (SPEC's names; `bf16_autocast` and
`sgd_no_momentum` are SPEC's Additions), plus `gradient_accumulation_steps` and `loss`, which
today's `Job` lacks. Pure data: no torch here, so the tests can run it anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from validation.cases import ensure_unique_ids, read_case_list

MAX_STEPS = 3

# The TrainingArguments a case may set, with the values a case gets when it does not say.
# The defaults are the Trainer's own (transformers 5.17, torch >= 2.8: optim adamw_torch_fused,
# max_grad_norm 1.0) except bf16, which SPEC's Trainer regime turns on.
ARG_DEFAULTS: dict = {
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "bf16": True,
    "gradient_checkpointing": False,
    "optim": "adamw_torch_fused",
    "max_grad_norm": 1.0,
    "use_liger_kernel": False,
}

# An SFTTrainer case's: SFTConfig's defaults (trl 1.16.0, trl/trainer/base_config.py _BaseConfig:
# gradient_checkpointing True, bf16 True unless fp16; trl/trainer/sft_config.py: max_length 1024),
# the rest as the Trainer's.
SFT_ARG_DEFAULTS: dict = {**ARG_DEFAULTS, "bf16": True, "gradient_checkpointing": True, "max_length": 1024}
TRAINERS = ("hf", "sft")

# Fixed by the harness for every case: three optimizer steps and nothing else (no logging,
# checkpoints, progress bars or dataloader workers), so the peak is the training step's.
HARNESS_ARGS: dict = {
    "max_steps": MAX_STEPS,
    "report_to": [],
    "save_strategy": "no",
    "logging_strategy": "no",
    "dataloader_num_workers": 0,
    "remove_unused_columns": False,
    "disable_tqdm": True,
}

# The Trainer's optimizer names (transformers.training_args.OptimizerNames) -> SPEC's names.
OPTIMIZERS: dict[str, str] = {
    "adamw_torch_fused": "adamw_fused",
    "adamw_torch": "adamw",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",  # transformers' alias of adamw_bnb_8bit
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adafactor": "adafactor",
    "sgd": "sgd_no_momentum",  # the Trainer's SGD has no momentum; SPEC's `sgd` has 0.9
}

MODES = ("full", "lora", "qlora")
LOAD_DTYPES = ("bf16", "fp32")

# The names in an `estimator_job` that today's estimator.Job cannot take (SPEC's Additions).
NEW_JOB_TERMS = {
    ("precision", "bf16_autocast"),
    ("optimizer", "sgd_no_momentum"),
}

_LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_targets": ("all-linear",)}
_QLORA_DEFAULTS = {"quant": "nf4", "double_quant": True}


@dataclass(frozen=True)
class TrainerCase:
    """One Trainer run. `args` holds the case's TrainingArguments with ARG_DEFAULTS filled in."""

    id: str
    model: str
    mode: str
    load_dtype: str
    seq_len: int
    args: dict
    lora: dict = field(default_factory=dict)  # lora/qlora: r, alpha, dropout, targets
    quant: dict = field(default_factory=dict)  # qlora: quant, double_quant
    holdout: bool = False
    trainer: str = "hf"  # "hf": transformers.Trainer; "sft": TRL's SFTTrainer

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"{self.id}: trainer must be one of {', '.join(TRAINERS)}; got {self.trainer!r}")
        if self.trainer == "sft":
            max_length = self.args.get("max_length")
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
                raise ValueError(f"{self.id}: max_length must be a whole number of at least 2; got {max_length!r}")
            if self.seq_len > max_length:
                raise ValueError(f"{self.id}: seq_len {self.seq_len} is above max_length {max_length}: SFTTrainer would "
                                 "truncate it; give seq_len <= max_length")
        elif "max_length" in self.args:
            raise ValueError(f"{self.id}: max_length is an SFTConfig key; set trainer: sft")
        if self.mode not in MODES:
            raise ValueError(f"{self.id}: mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.load_dtype not in LOAD_DTYPES:
            raise ValueError(f"{self.id}: load_dtype must be one of {', '.join(LOAD_DTYPES)}; got {self.load_dtype!r}")
        if self.mode == "qlora" and self.load_dtype != "bf16":
            raise ValueError(f"{self.id}: qlora loads its 4-bit base with dtype bf16 (SPEC); drop load_dtype")
        if self.args["optim"] not in OPTIMIZERS:
            raise ValueError(f"{self.id}: optim must be one of {', '.join(OPTIMIZERS)}; got {self.args['optim']!r}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            value = self.args[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.id}: {name} must be a whole number of at least 1; got {value!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"{self.id}: seq_len must be a whole number of at least 1; got {self.seq_len!r}")
        if self.mode != "full" and not self.args["bf16"]:
            raise ValueError(f"{self.id}: lora/qlora run under bf16 autocast (SPEC); keep bf16: true")

    @property
    def batch_size(self) -> int:
        return self.args["per_device_train_batch_size"]

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.args["gradient_accumulation_steps"]

    @property
    def samples(self) -> int:
        """Rows in the random data set: exactly one epoch of MAX_STEPS optimizer steps."""
        return self.batch_size * self.gradient_accumulation_steps * MAX_STEPS

    def to_dict(self) -> dict:
        lora = dict(self.lora)
        if "lora_targets" in lora:
            lora["lora_targets"] = list(lora["lora_targets"])
        return {
            "id": self.id,
            "model": self.model,
            "mode": self.mode,
            "load_dtype": self.load_dtype,
            "seq_len": self.seq_len,
            "args": dict(self.args),
            "lora": lora,
            "quant": dict(self.quant),
            "holdout": self.holdout,
            "trainer": self.trainer,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerCase":
        lora = dict(data.get("lora") or {})
        if "lora_targets" in lora:
            lora["lora_targets"] = tuple(lora["lora_targets"])
        return cls(
            id=data["id"],
            model=data["model"],
            mode=data["mode"],
            load_dtype=data["load_dtype"],
            seq_len=data["seq_len"],
            args=dict(data["args"]),
            lora=lora,
            quant=dict(data.get("quant") or {}),
            holdout=bool(data.get("holdout", False)),
            trainer=data.get("trainer", "hf"),
        )


# ---------------------------------------------------------------------------------------------
# What the harness hands to transformers and peft
# ---------------------------------------------------------------------------------------------
def training_arguments_kwargs(case: TrainerCase, output_dir: str) -> dict:
    """The exact `TrainingArguments(**kwargs)` of a case: its args, then the harness's fixed ones.

    Gradient checkpointing is always asked for non-reentrant, as SPEC's plain loop does (an
    SFTConfig leaves it at its default, None, which transformers 5.17's
    `gradient_checkpointing_enable` reads as `{"use_reentrant": False}`).
    """
    kwargs = dict(case.args)
    if case.trainer != "sft":
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    kwargs.update(HARNESS_ARGS)
    kwargs["report_to"] = list(HARNESS_ARGS["report_to"])
    kwargs["output_dir"] = output_dir
    return kwargs


def lora_config_kwargs(case: TrainerCase) -> dict | None:
    """`peft.LoraConfig(**kwargs)` exactly as validation.measure builds it; None for full."""
    if case.mode == "full":
        return None
    targets = case.lora["lora_targets"]
    return {
        "r": case.lora["lora_r"],
        "lora_alpha": case.lora["lora_alpha"],
        "lora_dropout": case.lora["lora_dropout"],
        "target_modules": "all-linear" if tuple(targets) == ("all-linear",) else list(targets),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def bnb_config_kwargs(case: TrainerCase) -> dict | None:
    """`transformers.BitsAndBytesConfig(**kwargs)` for qlora, as validation.measure builds it
    (the compute dtype is written as a name; the harness turns it into torch.bfloat16)."""
    if case.mode != "qlora":
        return None
    from estimator.quantizers import QUANTIZERS

    return QUANTIZERS[case.quant["quant"]].bnb_config(case.quant["double_quant"])


# ---------------------------------------------------------------------------------------------
# The same job in the estimator's terms
# ---------------------------------------------------------------------------------------------
def full_precision(load_dtype: str, bf16: bool) -> str:
    """SPEC's precision for full fine-tuning from the load dtype and the Trainer's bf16 flag."""
    if load_dtype == "fp32":
        return "amp_bf16" if bf16 else "fp32"
    return "bf16_autocast" if bf16 else "bf16"


def estimator_job(case: TrainerCase) -> dict:
    """The case as estimator `Job` fields (SPEC's names), plus `gradient_accumulation_steps` and
    `loss`, which the estimator's Job does not have yet. Only the fields that matter to the mode."""
    job: dict = {
        "mode": case.mode,
        "batch_size": case.batch_size,
        "seq_len": case.seq_len,
        "optimizer": OPTIMIZERS[case.args["optim"]],
        "gradient_checkpointing": bool(case.args["gradient_checkpointing"]),
        "attn": "sdpa",
    }
    if case.mode == "full":
        job["precision"] = full_precision(case.load_dtype, bool(case.args["bf16"]))
    else:
        if case.mode == "lora":
            job["base_dtype"] = case.load_dtype
        else:
            job["quant"] = case.quant["quant"]
            job["double_quant"] = case.quant["double_quant"]
        job["lora_r"] = case.lora["lora_r"]
        job["lora_alpha"] = case.lora["lora_alpha"]
        job["lora_dropout"] = case.lora["lora_dropout"]
        job["lora_targets"] = ",".join(case.lora["lora_targets"])
    job["gradient_accumulation_steps"] = case.gradient_accumulation_steps
    job["loss"] = "liger" if case.args["use_liger_kernel"] else "standard"
    if case.trainer == "sft":  # Job(sft=True): the loop, and the loss through TRL's chunked head
        job["sft"] = True
        if job["loss"] == "standard":
            job["loss"] = "chunked"
    return job


def new_job_terms(job: dict) -> list[str]:
    """What in an `estimator_job` today's estimator.Job cannot express (SPEC's Additions)."""
    out = [f"{k}={v}" for k, v in job.items() if (k, v) in NEW_JOB_TERMS]
    if job.get("gradient_accumulation_steps", 1) != 1:
        out.append(f"gradient_accumulation_steps={job['gradient_accumulation_steps']}")
    if job.get("loss", "standard") != "standard":
        out.append(f"loss={job['loss']}")
    if job.get("sft"):
        out.append("sft=True")
    return out


# ---------------------------------------------------------------------------------------------
# Loading a cases file
# ---------------------------------------------------------------------------------------------
_CASE_KEYS = {"id", "model", "mode", "load_dtype", "seq_len", "args", "holdout", "trainer"} | set(_LORA_DEFAULTS) | set(_QLORA_DEFAULTS)


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", model.rsplit("/", 1)[-1]).strip("-").lower()


def derive_id(case_fields: dict) -> str:
    """`<model>-trainer-<mode>-<precision>-b<B>-g<G>-s<S>-<optim>[-gc][-liger][-clip0][-r<r>...]`."""
    mode, args = case_fields["mode"], case_fields["args"]
    parts = [_slug(case_fields["model"]), "sft" if case_fields.get("trainer") == "sft" else "trainer", mode]
    if mode == "full":
        parts.append(full_precision(case_fields["load_dtype"], bool(args["bf16"])))
    elif mode == "lora" and case_fields["load_dtype"] != "bf16":
        parts.append(f"base-{case_fields['load_dtype']}")
    if mode == "qlora" and case_fields["quant"] != _QLORA_DEFAULTS:
        parts.append(case_fields["quant"]["quant"] + ("" if case_fields["quant"]["double_quant"] else "-nodq"))
    parts += [f"b{args['per_device_train_batch_size']}", f"g{args['gradient_accumulation_steps']}", f"s{case_fields['seq_len']}"]
    if mode != "full":
        lora = case_fields["lora"]
        parts.append(f"r{lora['lora_r']}")
        if tuple(lora["lora_targets"]) != ("all-linear",):
            parts.append("t-" + "+".join(lora["lora_targets"]))
    parts.append(args["optim"])
    if args["gradient_checkpointing"]:
        parts.append("gc")
    if args["use_liger_kernel"]:
        parts.append("liger")
    if "max_length" in args and args["max_length"] != case_fields["seq_len"]:
        parts.append(f"ml{args['max_length']}")
    if args["max_grad_norm"] != ARG_DEFAULTS["max_grad_norm"]:
        parts.append(f"clip{args['max_grad_norm']:g}")
    return "-".join(parts)


def parse_case(item: dict, where: str) -> TrainerCase:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(item).__name__}")
    unknown = sorted(set(item) - _CASE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if not item.get("model"):
        raise ValueError(f"{where}: a case needs a model (a catalog name)")
    mode = item.get("mode")
    trainer = item.get("trainer", "hf")
    defaults = SFT_ARG_DEFAULTS if trainer == "sft" else ARG_DEFAULTS
    given_args = item.get("args") or {}
    bad_args = sorted(set(given_args) - set(defaults))
    if bad_args:
        raise ValueError(
            f"{where}: args may set only {', '.join(defaults)}; got {', '.join(bad_args)} "
            "(the harness fixes the rest: see HARNESS_ARGS)"
        )
    args = {**defaults, **given_args}
    lora: dict = {}
    quant: dict = {}
    if mode in ("lora", "qlora"):
        lora = {k: item.get(k, v) for k, v in _LORA_DEFAULTS.items()}
        targets = lora["lora_targets"]
        lora["lora_targets"] = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)
    if mode == "qlora":
        quant = {k: item.get(k, v) for k, v in _QLORA_DEFAULTS.items()}
    stray = [k for k in (*_LORA_DEFAULTS, *_QLORA_DEFAULTS) if k in item and k not in lora and k not in quant]
    if stray:
        raise ValueError(f"{where}: {', '.join(stray)} do not apply to mode {mode!r}")
    load_dtype = item.get("load_dtype", "bf16")
    seq_len = item.get("seq_len", args["max_length"] if trainer == "sft" else 2048)
    case_fields = {"model": item["model"], "mode": mode, "load_dtype": load_dtype, "seq_len": seq_len, "args": args,
                   "lora": lora, "quant": quant, "trainer": trainer}
    case_id = item.get("id")
    if case_id is None:
        if mode not in MODES or args.get("optim") not in OPTIMIZERS:
            case_id = f"{where}"
        else:
            case_id = derive_id(case_fields)
    return TrainerCase(id=case_id, holdout=bool(item.get("holdout", False)), **case_fields)


def expand_trainer_cases(items: list) -> list[TrainerCase]:
    cases = [parse_case(item, f"case {i + 1}") for i, item in enumerate(items)]
    return ensure_unique_ids(cases)


def load_trainer_cases(path: str | Path) -> list[TrainerCase]:
    return expand_trainer_cases(read_case_list(path))

"""The job: what the user wants to do with a model, exactly as ../shared/SPEC.md defines it.

A `Job` is a frozen dataclass validated in its constructor, so every presenter (CLI, app,
validation harness) turns its input into the same typed object, and bad input is refused with a
`ValueError` whose message a user can act on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, replace

from estimator.optimizers import Optimizer


class Mode(str, enum.Enum):
    INFERENCE = "inference"
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class Weights(str, enum.Enum):
    """How inference weights are stored on the GPU."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"  # bitsandbytes LLM.int8 (load_in_8bit)
    NF4 = "nf4"  # bitsandbytes 4-bit, NormalFloat
    FP4 = "fp4"  # bitsandbytes 4-bit, float

    @property
    def is_4bit(self) -> bool:
        return self in (Weights.NF4, Weights.FP4)


class Precision(str, enum.Enum):
    """Full fine-tuning precision. `amp_*` is the HF Trainer's bf16=True/fp16=True on an fp32-loaded
    model: fp32 weights, autocast forward. `bf16_autocast` is the Trainer's bf16=True on a bf16-loaded
    model (transformers 5's default `dtype="auto"` for bf16 checkpoints): bf16 weights under autocast."""

    AMP_BF16 = "amp_bf16"
    AMP_FP16 = "amp_fp16"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    BF16_AUTOCAST = "bf16_autocast"

    @property
    def is_amp(self) -> bool:
        return self in (Precision.AMP_BF16, Precision.AMP_FP16)


class BaseDtype(str, enum.Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Quant(str, enum.Enum):
    NF4 = "nf4"
    FP4 = "fp4"


class Loss(str, enum.Enum):
    """How the loss is computed: transformers' cross-entropy over materialized logits; Liger's
    fused linear cross-entropy with its kernels (`use_liger_kernel=True`); or TRL's chunked loss,
    the fused LM head (`trl.trainer.utils.add_fused_lm_head`, `trl/kernels/chunked_logprob.py`)
    that scores each token's label in tiles without the N×V logits.

    TRL 1.16's SFTTrainer always computes its loss through the chunked head, so a `sft` job's
    `standard` is `chunked`; its `liger` is Liger's layer kernels with the chunked head (SFTTrainer
    turns Liger's fused linear cross-entropy off)."""

    STANDARD = "standard"
    LIGER = "liger"
    CHUNKED = "chunked"


class Attention(str, enum.Enum):
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH_ATTENTION_2 = "flash_attention_2"


class Mxfp4(str, enum.Enum):
    """How transformers 5.17 loads a checkpoint stored in MXFP4 (gpt-oss' experts).

    `kernels`: as stored, 4.25 bits a weight, run by the Triton `matmul_ogs` kernels that
    `Mxfp4HfQuantizer` fetches from the Hub (`kernels-community/gpt-oss-triton-kernels`); what
    transformers does on a CUDA GPU of compute capability >= 7.5 with Triton >= 3.4 and the
    `kernels` package installed (`quantizer_mxfp4.py: validate_environment`). `dequantized`: the
    experts dequantized to bf16 on load, transformers' fallback when any of those is missing (it
    warns "We will default to dequantizing the model to bf16") or with
    `Mxfp4Config(dequantize=True)`. Other checkpoints ignore it."""

    KERNELS = "kernels"
    DEQUANTIZED = "dequantized"


# Sizes beyond these are not a memory question any GPU can answer; they are almost surely typos.
MAX_BATCH_SIZE = 1 << 16
MAX_TOKENS = 1 << 24
MAX_LORA_RANK = 1 << 16

# The bound of each size field (Job refuses more; the app's inputs and the solvers stop there).
FIELD_LIMITS = {
    "batch_size": MAX_BATCH_SIZE,
    "seq_len": MAX_TOKENS,
    "prompt_len": MAX_TOKENS,
    "new_tokens": MAX_TOKENS,
    "lora_r": MAX_LORA_RANK,
    "gradient_accumulation_steps": MAX_BATCH_SIZE,
}

DEFAULT_SEQ_LEN = 2048
DEFAULT_PROMPT_LEN = 512
DEFAULT_NEW_TOKENS = 256


def _option(default, help: str):
    """A job field with the help text its command-line option shows (estimator/cli.py builds the
    options from these fields, so each default lives here only)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Job:
    """One job on one model. Field names and defaults follow SPEC's command line.

    `seq_len` is the training sequence length; `prompt_len` and `new_tokens` are inference's.
    `lora_targets` is `("all-linear",)` or a tuple of module names (PEFT matches them as suffixes).
    """

    mode: Mode = _option(Mode.INFERENCE, "the job")
    batch_size: int = _option(1, "sequences per step or per generate call")
    seq_len: int = _option(DEFAULT_SEQ_LEN, "training tokens per sequence")
    prompt_len: int = _option(DEFAULT_PROMPT_LEN, "inference prompt tokens")
    new_tokens: int = _option(DEFAULT_NEW_TOKENS, "inference generated tokens")
    weights: Weights = _option(Weights.BF16, "inference weights")
    precision: Precision = _option(Precision.AMP_BF16, "full fine-tuning")
    base_dtype: BaseDtype = _option(BaseDtype.BF16, "LoRA base")
    quant: Quant = _option(Quant.NF4, "QLoRA storage")
    double_quant: bool = _option(True, "4-bit without double quantization")
    lora_r: int = _option(16, "LoRA rank")
    lora_alpha: float = _option(32, "LoRA alpha")
    lora_dropout: float = _option(0.05, "LoRA dropout")
    lora_targets: tuple[str, ...] = _option(("all-linear",), "all-linear or NAME[,NAME...]")
    optimizer: Optimizer = _option(Optimizer.ADAMW_FUSED, "optimizer")
    gradient_checkpointing: bool = _option(False, "recompute activations in backward")
    gradient_accumulation_steps: int = _option(1, "micro-batches per optimizer step (the Trainer's)")
    loss: Loss = _option(Loss.STANDARD, "loss: standard cross-entropy, Liger's fused kernels, or TRL's chunked LM head")
    trainer: bool = _option(False, "train as transformers.Trainer runs it (its micro-batches and optimizer set-up)")
    sft: bool = _option(False, "train as TRL 1.16's SFTTrainer runs it (a Trainer; its chunked LM head and metrics)")
    attn: Attention = _option(Attention.SDPA, "attention implementation")
    expandable_segments: bool = _option(False, "PyTorch's allocator with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    mxfp4: Mxfp4 = _option(Mxfp4.KERNELS, "MXFP4 checkpoints (gpt-oss): kernels = as stored, with the Hub's Triton "
                                           "kernels; dequantized = experts in bf16, transformers' fallback without them")

    def __post_init__(self) -> None:
        coerce = {
            "mode": Mode,
            "weights": Weights,
            "precision": Precision,
            "base_dtype": BaseDtype,
            "quant": Quant,
            "optimizer": Optimizer,
            "loss": Loss,
            "attn": Attention,
            "mxfp4": Mxfp4,
        }
        for name, kind in coerce.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(str(value).lower()))
                except ValueError:
                    choices = ", ".join(member.value for member in kind)
                    raise ValueError(f"{name} must be one of {choices}; got {value!r}") from None
        for name, upper in FIELD_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number; got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1; got {value}")
            if value > upper:
                raise ValueError(f"{name} of {value:,} is beyond any real job (at most {upper:,}); check the number")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not 0 < self.lora_alpha < float("inf"):
            raise ValueError(f"lora_alpha must be a finite positive number; got {self.lora_alpha!r}")  # NaN fails 0 < x too
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}")
        targets = self.lora_targets
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        targets = tuple(targets)
        if not targets or any(not isinstance(t, str) or not t for t in targets):
            raise ValueError("lora_targets must be 'all-linear' or a comma-separated list of module names")
        if "all-linear" in targets and len(targets) > 1:
            raise ValueError("lora_targets: 'all-linear' cannot be combined with module names")
        object.__setattr__(self, "lora_targets", targets)
        if self.sft:  # SFTTrainer is a Trainer, and its loss is always TRL's chunked head
            object.__setattr__(self, "trainer", True)
            if self.loss is Loss.STANDARD:
                object.__setattr__(self, "loss", Loss.CHUNKED)

    # ---- derived views -------------------------------------------------------------------
    @property
    def is_training(self) -> bool:
        return self.mode is not Mode.INFERENCE

    @property
    def uses_lora(self) -> bool:
        return self.mode in (Mode.LORA, Mode.QLORA)

    def with_(self, **changes) -> "Job":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able values, for results files and URLs."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = ",".join(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown job field(s): {', '.join(unknown)}")
        return cls(**data)

    def relevant_fields(self) -> tuple[str, ...]:
        """The fields that matter for this mode (the rest keep their defaults and are ignored)."""
        common = ("mode", "batch_size", "attn", "expandable_segments")
        if self.mode is Mode.INFERENCE:
            return common + ("prompt_len", "new_tokens", "weights") + (("double_quant",) if self.weights.is_4bit else ())
        training = ("seq_len", "optimizer", "gradient_checkpointing", "gradient_accumulation_steps", "loss", "trainer", "sft")
        if self.mode is Mode.FULL:
            return common + training + ("precision",)
        lora = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
        if self.mode is Mode.LORA:
            return common + training + ("base_dtype",) + lora
        return common + training + ("quant", "double_quant") + lora

"""The regime a job implies: which parameters are stored in which dtype, what autocast computes in,
the adapter and gradient dtypes, and which library quantizes what. Derived once from a `Job`.

Every term, `fit` and the validation harness's model loading read the same `Regime`, so nothing
downstream compares mode or dtype strings again. The rules, from SPEC and the libraries:

- inference: weights load in their dtype (`from_pretrained(dtype=...)`); bitsandbytes int8/4-bit
  keep every unquantized parameter in bf16 and compute in bf16. No autocast.
- full: `amp_*` is the Trainer's bf16=True/fp16=True on an fp32-loaded model: fp32 weights,
  gradients and optimizer state, the forward under autocast. `bf16`/`fp16`/`fp32` load in that
  dtype and run without autocast; `bf16_autocast` loads in bf16 and runs under bf16 autocast (the
  Trainer's bf16=True on a bf16 checkpoint loaded with `dtype="auto"`).
- lora: the base loads in `base_dtype`, the forward runs under bf16 autocast, and PEFT keeps the
  adapters in fp32 (`autocast_adapter_dtype=True`), so their gradients are fp32 too.
- qlora: bitsandbytes 4-bit linears; `prepare_model_for_kbit_training` casts every other
  parameter to fp32; adapters in fp32; bf16 autocast. Under TRL 1.16's SFTTrainer the adapters
  are bf16: for a quantized model `SFTTrainer.__init__` casts every trainable parameter
  (`param.data = param.data.to(torch.bfloat16)`, after QLoRA's paper), so their gradients and
  optimizer state are bf16 too.
- the loss: `loss` is the head that computes it (standard cross-entropy over the logits, Liger's
  fused linear cross-entropy, or TRL's chunked head); `liger_kernels` says whether Liger's layer
  kernels are applied (`use_liger_kernel=True`). They part under SFTTrainer, which keeps Liger's
  kernels but sets `liger_kernel_config["fused_linear_cross_entropy"] = False` and scores the
  tokens through its own chunked head (`trl/trainer/sft_trainer.py`, `SFTTrainer.__init__`).

A `Regime` is hashable and holds every fact of the job except its sizes (`Sizes`), so caches keyed
by `(regime, ...)` cannot go stale when a job field is added: a new field lands in one or the
other.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.dtypes import BF16, DTYPES, FP16, FP32, DType
from estimator.job import Attention, Job, Loss, Mode, Mxfp4, Precision
from estimator.optimizers import OPTIMIZERS, OptimizerEntry
from estimator.quantizers import QUANTIZERS, Quantizer


@dataclass(frozen=True)
class Adapter:
    """LoRA as PEFT builds it: rank, scaling, dropout, targets, and the adapters' dtype."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # ("all-linear",) or module names matched as suffixes
    dtype: DType = FP32  # autocast_adapter_dtype=True: fp32 adapters on a half-precision base


@dataclass(frozen=True)
class Regime:
    """Dtypes, autocast, what trains, and the quantizer and optimizer entries of one job."""

    mode: Mode
    load: DType  # the dtype `from_pretrained(dtype=...)` loads the checkpoint in
    storage: DType  # every unquantized base parameter, as stored on the GPU (after QLoRA's upcast)
    compute: DType  # the dtype matmuls run in: autocast's, else the weights' own
    autocast: bool
    base_trainable: bool  # full fine-tuning: every base parameter trains
    quantizer: Quantizer | None  # bitsandbytes' on-the-fly scheme for its linears
    double_quant: bool  # 4-bit: the absmax quantized too
    adapter: Adapter | None  # LoRA and QLoRA
    optimizer: OptimizerEntry | None  # training only
    gradient_checkpointing: bool
    attn: Attention
    loss: Loss = Loss.STANDARD  # the head that computes the loss (see the module's docstring)
    trainer: bool = False  # transformers.Trainer's loop rather than SPEC's plain one
    sft: bool = False  # TRL 1.16's SFTTrainer (a Trainer): its collator, metrics and QLoRA adapters
    liger_kernels: bool = False  # Liger's norm, gated-activation and RoPE kernels
    expandable_segments: bool = False  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    # An MXFP4 checkpoint's experts dequantized to bf16 on load (Job.mxfp4, and always for training:
    # transformers' Mxfp4HfQuantizer.is_trainable is False, so a trainable gpt-oss is the dequantized one)
    mxfp4_dequantized: bool = False

    @property
    def training(self) -> bool:
        return self.mode is not Mode.INFERENCE

    @property
    def gradient(self) -> DType:
        """The dtype of the trainable parameters' gradients (autograd's AccumulateGrad keeps the parameter's)."""
        return self.adapter.dtype if self.adapter is not None else self.storage

    @property
    def residual(self) -> DType:
        """The embedding's dtype, which the hidden stream starts in."""
        return self.storage

    @property
    def base_is_compute(self) -> bool:
        """Same dtype, not just the same size: fp16 weights under bf16 autocast are cast per call."""
        return self.storage == self.compute

    @property
    def features(self) -> tuple[str, ...]:
        """The platform features (gpu_db/platforms.yaml) the job needs."""
        needed = []
        if self.compute == BF16:
            needed.append("bf16")
        if self.quantizer is not None:
            needed.append(self.quantizer.feature)
        if self.optimizer is not None and self.optimizer.feature:
            needed.append(self.optimizer.feature)
        return tuple(needed)


@dataclass(frozen=True)
class Sizes:
    """The job's sizes, in sequences and tokens."""

    batch: int  # sequences per micro-batch (training) or per generate call
    seq_len: int  # training tokens per sequence
    prompt_len: int  # inference prompt tokens
    new_tokens: int  # inference generated tokens
    accumulation: int = 1  # micro-batches per optimizer step

    @property
    def training_tokens(self) -> int:
        """Tokens per training step: B·S."""
        return self.batch * self.seq_len

    @property
    def final_len(self) -> int:
        """The sequence length at generate's last decoding step: prompt + new − 1."""
        return self.prompt_len + self.new_tokens - 1


def sizes_of(job: Job) -> Sizes:
    return Sizes(job.batch_size, job.seq_len, job.prompt_len, job.new_tokens, job.gradient_accumulation_steps)


def regime_of(job: Job) -> Regime:
    """The regime `job` implies (see the module's docstring for the rules)."""
    adapter = None
    sft = job.sft and job.is_training
    if job.uses_lora:
        dtype = BF16 if sft and job.mode is Mode.QLORA else FP32  # SFTTrainer's cast of a quantized model's adapters
        adapter = Adapter(job.lora_r, job.lora_alpha, job.lora_dropout, job.lora_targets, dtype)
    optimizer = OPTIMIZERS[job.optimizer.value] if job.is_training else None
    loss, liger_kernels = Loss.STANDARD, False
    if job.is_training:
        liger_kernels = job.loss is Loss.LIGER
        loss = Loss.CHUNKED if sft else job.loss  # SFTTrainer: Liger's kernels, its own chunked head
    common = dict(optimizer=optimizer, gradient_checkpointing=job.gradient_checkpointing and job.is_training,
                  attn=job.attn, adapter=adapter, loss=loss, trainer=job.trainer and job.is_training, sft=sft,
                  liger_kernels=liger_kernels, expandable_segments=job.expandable_segments,
                  mxfp4_dequantized=job.mxfp4 is Mxfp4.DEQUANTIZED or job.is_training)
    if job.mode is Mode.INFERENCE:
        quantizer = QUANTIZERS.get(job.weights.value)
        storage = BF16 if quantizer is not None else DTYPES[job.weights.value]
        return Regime(job.mode, storage, storage, storage, False, False, quantizer, job.double_quant, **common)
    if job.mode is Mode.FULL:
        if job.precision.is_amp:
            compute = {"amp_bf16": BF16, "amp_fp16": FP16}[job.precision.value]
            return Regime(job.mode, FP32, FP32, compute, True, True, None, job.double_quant, **common)
        if job.precision is Precision.BF16_AUTOCAST:  # bf16 weights, the forward under bf16 autocast anyway
            return Regime(job.mode, BF16, BF16, BF16, True, True, None, job.double_quant, **common)
        dtype = DTYPES[job.precision.value]
        return Regime(job.mode, dtype, dtype, dtype, False, True, None, job.double_quant, **common)
    if job.mode is Mode.LORA:
        base = DTYPES[job.base_dtype.value]
        return Regime(job.mode, base, base, BF16, True, False, None, job.double_quant, **common)
    # QLoRA loads in bf16; prepare_model_for_kbit_training then casts every non-4-bit parameter to fp32
    return Regime(job.mode, BF16, FP32, BF16, True, False, QUANTIZERS[job.quant.value], job.double_quant, **common)

"""What would make it fit: the user's own knobs, searched cheapest first.

When a job does not fit one GPU, or fits only tightly, each change below is tried on its own, in this fixed order (the
cost of each in speed is not estimated yet, so the order is what usually costs least):

0. PyTorch's expandable segments (no speed cost: the allocator reserves little beyond what it hands out);
1. gradient checkpointing (recomputes each layer once in the backward);
2. Liger's fused loss and kernels (no N×V logits);
3. a smaller micro-batch, with gradient accumulation keeping the sequences per step;
4. an 8-bit optimizer, then a paged one (its state leaves PyTorch's allocator);
5. LoRA instead of full fine-tuning, then QLoRA;
6. 4-bit (then 8-bit) weights, for inference; a smaller batch;
7. more GPUs, with the default strategy (ZeRO-3 for training, a pipeline for inference).

The changes that fit are returned in that order, at most `limit` of them. If none fits alone, the
changes are combined in the same order until the job fits, and that combination is the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from estimator.estimate import Estimate
from estimator.fit import Fit, Verdict, default_strategy, fit
from estimator.job import Job, Loss, Mode


@dataclass(frozen=True)
class Suggestion:
    """One change (or combination) and what the job needs with it."""

    change: str  # in words: "turn on gradient checkpointing"
    options: tuple[str, ...]  # the command-line flags that make it
    job: Job
    gpus: int  # GPUs it runs on (1 unless the change is more GPUs)
    strategy: str | None
    peak_allocated_bytes: int
    device_total_bytes: int  # on the fullest GPU
    verdict: Verdict

    def to_dict(self) -> dict:
        return {
            "change": self.change,
            "options": list(self.options),
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "device_total_bytes": self.device_total_bytes,
            "verdict": self.verdict.value,
        }


@dataclass(frozen=True)
class _Change:
    change: str
    options: tuple[str, ...]
    fields: dict


def _changes(job: Job) -> list[_Change]:
    """The single changes that apply to `job`, cheapest first."""
    out: list[_Change] = []
    if not job.expandable_segments:
        out.append(_Change("PyTorch's expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)",
                           ("--expandable-segments",), {"expandable_segments": True}))
    if job.is_training:
        if not job.gradient_checkpointing:
            out.append(_Change("turn on gradient checkpointing", ("--gradient-checkpointing",), {"gradient_checkpointing": True}))
        if job.loss is Loss.STANDARD:
            out.append(_Change("use Liger's fused loss and kernels (use_liger_kernel=True)", ("--loss", "liger"), {"loss": Loss.LIGER}))
        b, g = job.batch_size, job.gradient_accumulation_steps
        while b > 1:
            b, g = b // 2, g * 2
            if b * g == job.batch_size * job.gradient_accumulation_steps:
                out.append(_Change(f"a micro-batch of {b} with {g} accumulation steps (the same {b * g} sequences a step)",
                                   ("--batch-size", str(b), "--gradient-accumulation-steps", str(g)),
                                   {"batch_size": b, "gradient_accumulation_steps": g}))
        name = job.optimizer.value
        if name in ("adamw_fused", "adamw", "adafactor", "sgd", "paged_adamw_32bit"):
            out.append(_Change("an 8-bit optimizer (bitsandbytes AdamW8bit)", ("--optimizer", "adamw_8bit"), {"optimizer": "adamw_8bit"}))
        if name != "paged_adamw_8bit":
            out.append(_Change("a paged 8-bit optimizer (its state in CUDA managed memory)", ("--optimizer", "paged_adamw_8bit"),
                               {"optimizer": "paged_adamw_8bit"}))
        if job.mode is Mode.FULL:
            out.append(_Change("LoRA instead of full fine-tuning", ("--mode", "lora"), {"mode": Mode.LORA}))
        if job.mode in (Mode.FULL, Mode.LORA):
            out.append(_Change("QLoRA (a 4-bit base)", ("--mode", "qlora"), {"mode": Mode.QLORA}))
    else:
        if not job.weights.is_4bit:
            out.append(_Change("4-bit weights (bitsandbytes nf4)", ("--weights", "nf4"), {"weights": "nf4"}))
            if job.weights.value != "int8":
                out.append(_Change("8-bit weights (LLM.int8)", ("--weights", "int8"), {"weights": "int8"}))
        b = job.batch_size
        while b > 1:
            b //= 2
            out.append(_Change(f"a batch of {b}", ("--batch-size", str(b)), {"batch_size": b}))
    return out


def suggest(result: Estimate, gpu, estimate_of: Callable[[Job], Estimate], limit: int = 3) -> list[Suggestion]:
    """The cheapest changes that make `result`'s job fit one `gpu` (empty when it already fits).

    `estimate_of(job)` estimates a job on the same model. More GPUs come last, with the default
    strategy and the count it needs.
    """
    job = result.job
    here = fit(result, gpu)
    if here.verdict is Verdict.CANNOT_RUN or (here.gpus_needed == 1 and here.verdict is Verdict.FITS):
        return []  # a tight job goes on: the changes found make it fit with headroom
    found: list[Suggestion] = []
    changes = _changes(job)
    for change in changes:
        if len(found) >= limit:
            return found
        candidate = _try(change.change, change.options, job.with_(**change.fields), gpu, estimate_of)
        if candidate is not None:
            found.append(candidate)
    if not found:  # nothing alone: combine in order until it fits, then drop what is not needed
        combined = _combine(job, changes, gpu, estimate_of)
        if combined is not None:
            found.append(combined)
    if len(found) < limit:
        more = _more_gpus(result, gpu)
        if more is not None:
            found.append(more)
    return found[:limit]


def confirmed(found: list[Suggestion], gpu, estimate_of: Callable[[Job], Estimate]) -> list[Suggestion]:
    """The suggestions searched with a cheaper estimate (training's reserve by the formula), each
    one-GPU change re-estimated with `estimate_of` (its step traced) and kept, with those figures,
    where it still fits: what a user reruns with the suggested options is what is shown."""
    out = []
    for s in found:
        if s.gpus != 1:
            out.append(s)
            continue
        checked = _try(s.change, s.options, s.job, gpu, estimate_of)
        if checked is not None:
            out.append(checked)
    return out


def _combination(job: Job, chosen: list[_Change]) -> tuple[str, tuple[str, ...], Job]:
    """The changes applied in order; a later change of the same field replaces an earlier one."""
    by_field: dict[frozenset, _Change] = {}
    for change in chosen:
        key = frozenset(change.fields)
        for other in list(by_field):
            if other & key:
                del by_field[other]
        by_field[key] = change
    kept = [c for c in chosen if c in by_field.values()]
    fields: dict = {}
    for change in kept:
        fields.update(change.fields)
    return " and ".join(c.change for c in kept), tuple(o for c in kept for o in c.options), job.with_(**fields)


def _combine(job: Job, changes: list[_Change], gpu, estimate_of) -> Suggestion | None:
    chosen: list[_Change] = []
    for change in changes:
        chosen.append(change)
        if _try(*_combination(job, chosen), gpu, estimate_of) is not None:
            break
    else:
        return None
    for change in reversed(chosen[:-1]):  # drop the costliest changes first, while the rest still fit
        trial = [c for c in chosen if c is not change]
        if _try(*_combination(job, trial), gpu, estimate_of) is not None:
            chosen = trial
    return _try(*_combination(job, chosen), gpu, estimate_of)


def _try(words: str, options: tuple[str, ...], job: Job, gpu, estimate_of) -> Suggestion | None:
    try:
        result = estimate_of(job)
    except ValueError:
        return None  # e.g. a LoRA target the model lacks
    answer = fit(result, gpu)
    if answer.gpus_needed != 1 or answer.verdict is not Verdict.FITS:
        return None
    return Suggestion(words, options, job, 1, None, result.peak_allocated_bytes, result.device_total_bytes, answer.verdict)


def _more_gpus(result: Estimate, gpu) -> Suggestion | None:
    strategy = default_strategy(result.job)
    answer: Fit = fit(result, gpu, strategy)
    if answer.gpus_needed is None or answer.gpus_needed == 1 or answer.verdict is not Verdict.FITS:
        return None
    n = answer.gpus_needed
    return Suggestion(f"{n} × {gpu.name} with {strategy.value}", ("--strategy", strategy.value, "--num-gpus", str(n)),
                      result.job, n, strategy.value, answer.per_gpu.peak_allocated_bytes, answer.per_gpu.device_total_bytes,
                      answer.verdict)

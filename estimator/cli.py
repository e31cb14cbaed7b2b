"""Argument parsing and output for `python -m estimator`; all computation lives in the library.

Bad input never shows a traceback: it exits with status 2 and one line on stderr saying what was
wrong and what to do (SPEC).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from estimator.job import Attention, BaseDtype, Job, Mode, Optimizer, Precision, Quant, Weights

GIB = 1024**3


class UsageError(Exception):
    """Bad command-line input; its message is the one line shown to the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(f"{message} (see python -m estimator --help)")


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m estimator",
        description="How much GPU memory a Hugging Face model needs for a job, term by term, and how many GPUs.",
    )
    p.add_argument("model", help="Hub repo id or URL, a path to a config.json (or its folder), or a catalog name")
    choices = lambda enum: [m.value for m in enum]  # noqa: E731
    p.add_argument("--mode", choices=choices(Mode), default="inference", help="the job (inference)")
    p.add_argument("--batch-size", type=_positive, default=1, help="sequences per step or per generate call (1)")
    p.add_argument("--seq-len", type=_positive, default=2048, help="training tokens per sequence (2048)")
    p.add_argument("--prompt-len", type=_positive, default=512, help="inference prompt tokens (512)")
    p.add_argument("--new-tokens", type=_positive, default=256, help="inference generated tokens (256)")
    p.add_argument("--weights", choices=choices(Weights), default="bf16", help="inference weights (bf16)")
    p.add_argument("--precision", choices=choices(Precision), default="amp_bf16", help="full fine-tuning (amp_bf16)")
    p.add_argument("--base-dtype", choices=choices(BaseDtype), default="bf16", help="LoRA base (bf16)")
    p.add_argument("--quant", choices=choices(Quant), default="nf4", help="QLoRA storage (nf4)")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit without double quantization")
    p.add_argument("--lora-r", type=_positive, default=16, help="LoRA rank (16)")
    p.add_argument("--lora-alpha", type=_fraction, default=32, help="LoRA alpha (32)")
    p.add_argument("--lora-dropout", type=_fraction, default=0.05, help="LoRA dropout (0.05)")
    p.add_argument("--lora-targets", default="all-linear", help="all-linear or NAME[,NAME...] (all-linear)")
    p.add_argument("--optimizer", choices=choices(Optimizer), default="adamw_fused", help="optimizer (adamw_fused)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--attn", choices=choices(Attention), default="sdpa", help="attention implementation (sdpa)")
    p.add_argument("--gpu", help="a GPU from gpu_db: also say how many are needed")
    p.add_argument("--strategy", help="multi-GPU strategy (see --help-strategies)")
    p.add_argument("--num-gpus", type=_positive, help="figures per GPU for this many GPUs")
    p.add_argument("--which-gpus", action="store_true", help="list every GPU in the database with the count it needs")
    p.add_argument("--sort", default="count", choices=["count", "memory", "bandwidth", "name"], help="--which-gpus order")
    p.add_argument("--token", help="Hub token for gated models (HF_TOKEN also works)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


def job_from_args(args: argparse.Namespace) -> Job:
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return Job(
        mode=args.mode,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        weights=args.weights,
        precision=args.precision,
        base_dtype=args.base_dtype,
        quant=args.quant,
        double_quant=not args.no_double_quant,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=targets,
        optimizer=args.optimizer,
        gradient_checkpointing=args.gradient_checkpointing,
        attn=args.attn,
    )


def json_object(name: str, origin: str, url: str, result, fit, notes=()) -> dict:
    """SPEC's JSON object (the CLI's --json, the app's download): the estimate, where the model came
    from, and `gpus_needed` (None without a GPU)."""
    out = result.to_dict()
    out["model"] = name
    out["source"] = {"origin": origin, "url": url}
    out["notes"] = list(notes) + [n for n in out["notes"] if n not in notes]
    out["gpus_needed"] = fit.gpus_needed if fit is not None else None
    if fit is not None:
        out["fit"] = fit.to_dict()
    return out


_LONG_QUOTED = re.compile(r"'[^']{81,}'|\"[^\"]{81,}\"")
_LONG_WORD = re.compile(r"\S{201,}")
MAX_MESSAGE_CHARS = 1_000


def one_line(err: BaseException) -> str:
    """Messages from libraries can span lines; SPEC's bad-input contract is one line, and a short
    one: argparse echoes what it refuses, so a quoted value over 80 characters, or a word over 200,
    is cut (a 100 KB argument is not written back)."""
    text = " ".join(str(err).split())
    text = _LONG_QUOTED.sub(lambda m: f"{m[0][:61]}… ({len(m[0]) - 2:,} characters){m[0][0]}", text)
    text = _LONG_WORD.sub(lambda m: f"{m[0][:60]}… ({len(m[0]):,} characters)", text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "…"


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def render_text(name: str, source, result, fit) -> str:
    job = result.job
    lines = [f"{name}  ({source.origin}: {source.source})"]
    shown = ", ".join(f"{k}={v}" for k, v in job.to_dict().items() if k in job.relevant_fields())
    lines.append(f"job: {shown}")
    lines.append(f"parameters: {result.params_total:,} total, {result.params_trainable:,} trainable")
    lines.append("")
    lines.append(f"memory at the peak ({result.peak_phase.replace('_', ' ')}), GiB = 1024^3 bytes:")
    for component, value in result.breakdown.items():
        if value:
            lines.append(f"  {component.replace('_', ' '):24s}{_gib(value)}")
    lines.append(f"  {'peak allocated':24s}{_gib(result.peak_allocated_bytes)}   (torch.cuda.max_memory_allocated)")
    lines.append(f"  {'device total':24s}{_gib(result.device_total_bytes)}   (what nvidia-smi shows)")
    if fit is not None:
        lines.append("")
        lines.extend(fit.describe())
    for note in tuple(source.notes) + tuple(n for n in result.notes if n not in source.notes):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from estimator.estimate import estimate
    from estimator.inventory import UnsupportedModelError
    from estimator.sources import ModelSourceError, resolve

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        job = job_from_args(args)
        token = args.token or os.environ.get("HF_TOKEN") or None
        reference = args.model if not args.revision else f"{args.model}@{args.revision}"
        source = resolve(reference, token=token)
        result = estimate(source.config, job)
        fit = None
        if args.gpu or args.which_gpus:
            from estimator import fit as fitting

            fit = fitting.from_cli(source.config, job, result, args)
    except UsageError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except (ModelSourceError, UnsupportedModelError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        try:  # SPEC's JSON has no NaN or Infinity; a non-finite figure is a bug to report, not output
            text = json.dumps(json_object(source.name, source.origin, source.source, result, fit, source.notes), indent=2, allow_nan=False)
        except ValueError as err:
            print(f"error: the estimate holds a number that is not finite ({err}); please report it with the command line", file=sys.stderr)
            return 2
        print(text)
    else:
        print(render_text(source.name, source, result, fit))
    return 0

"""Argument parsing and output for `python -m estimator`; all computation lives in the library.

Bad input never shows a traceback: it exits with status 2 and one line on stderr saying what was
wrong and what to do (SPEC).
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
import typing
from dataclasses import fields

from estimator.job import Job


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


def _price(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):  # NaN fails >= too
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def _default_text(value) -> str:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _add_job_options(p: argparse.ArgumentParser) -> None:
    """One option per `Job` field, named after it, with the field's default and help text.

    Enums offer their members; whole numbers must be positive; a boolean that defaults to off is a
    switch (`--gradient-checkpointing`), one that defaults to on is turned off with `--no-…`.
    """
    hints = typing.get_type_hints(Job)
    for f in fields(Job):
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", f.name)
        # Options that are not given stay out of the namespace (SUPPRESS), so a --training-args file
        # can fill them and a flag given beside it wins.
        if kind is bool:
            if f.default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", default=argparse.SUPPRESS,
                               help=help_text)
            else:
                p.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        shown = f"{help_text} ({_default_text(f.default)})"
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            p.add_argument(flag, dest=f.name, choices=[m.value for m in kind], default=argparse.SUPPRESS, help=shown)
        elif kind is int:
            p.add_argument(flag, dest=f.name, type=_positive, default=argparse.SUPPRESS, help=shown)
        elif kind is float:
            p.add_argument(flag, dest=f.name, type=_fraction, default=argparse.SUPPRESS, help=shown)
        else:  # a tuple of names, given comma-separated
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=shown)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m estimator",
        description="How much GPU memory a Hugging Face model needs for a job, term by term, and how many GPUs.",
    )
    p.add_argument("model", nargs="?", help="Hub repo id or URL, a path to a config.json (or its folder), or a catalog name")
    _add_job_options(p)
    p.add_argument("--training-args", action="append", metavar="FILE",
                   help="a TrainingArguments/SFTConfig JSON or YAML (to_json_string()), an adapter_config.json or a "
                        "BitsAndBytesConfig dict; repeatable; flags given beside it win")
    p.add_argument("--gpu", help="a GPU from gpu_db: also say how many are needed")
    p.add_argument("--strategy", help="multi-GPU strategy with --gpu: for training ddp, zero1, zero2, zero3 (FSDP), "
                                      "zero3_offload; for inference single, pipeline (device_map) or tensor_parallel")
    p.add_argument("--num-gpus", type=_positive, help="figures per GPU for this many GPUs")
    p.add_argument("--which-gpus", action="store_true", help="list every GPU in the database with the count it needs")
    p.add_argument("--sort", default="count", choices=["count", "memory", "bandwidth", "speed", "name"],
                   help="--which-gpus order (speed: fastest first, by training or decode tokens/s)")
    p.add_argument("--tokens", type=_positive, metavar="N",
                   help="with --gpu or --which-gpus: GPU-hours for N training tokens (inference: N generated tokens, "
                        "in generate() calls of batch x new tokens)")
    p.add_argument("--price", type=_price, metavar="X", help="with --tokens: the cost at X per GPU-hour")
    p.add_argument("--suggest", action="store_true", help="with --gpu: the cheapest changes that make the job fit it")
    p.add_argument("--plot", metavar="FILE.html", help="with --gpu: memory against batch and sequence length, as HTML")
    p.add_argument("--token", help="Hub token for gated models (HF_TOKEN also works)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--list-models", nargs="?", const="", metavar="QUERY",
                   help="list the offline catalog (names containing QUERY, if given); MODEL is not needed")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


def given_job_fields(args: argparse.Namespace) -> dict:
    """The job fields given on the command line (the rest were left out of the namespace)."""
    return {f.name: getattr(args, f.name) for f in fields(Job) if hasattr(args, f.name)}


def job_from_args(args: argparse.Namespace, config: dict | None = None) -> tuple[Job, list[str]]:
    """The `Job` of the parsed options (Job validates the values), and notes from --training-args.

    With --training-args, the files give the job and the flags beside them win; the load dtype is
    the model config's `torch_dtype` (transformers 5 loads with dtype="auto")."""
    given = given_job_fields(args)
    if not getattr(args, "training_args", None):
        return Job(**given), []
    from estimator.training_args import from_training_args, kind_of, read_config_file

    configs: dict[str, dict] = {}
    for path in args.training_args:
        data = read_config_file(path)
        kind = kind_of(data)
        if kind in configs:
            raise UsageError(f"--training-args: two {kind} configs given ({path}); give one of each kind")
        configs[kind] = data
    load = _config_load_dtype(config or {})
    return from_training_args(configs.get("training"), configs.get("lora"), configs.get("bnb"), load_dtype=load,
                              overrides=given)


def _config_load_dtype(config: dict) -> str:
    """The dtype `from_pretrained(dtype="auto")` loads: the config's own (bf16 if it names none)."""
    from estimator.dtypes import BY_SAFETENSORS
    from estimator.prequantized import checkpoint_dtype

    return BY_SAFETENSORS[checkpoint_dtype(config)].name


def not_applied(args: argparse.Namespace, job: Job, inv=None) -> list[str]:
    """A note for each option given that does not apply to the job (it is ignored, not an error).

    `--mxfp4` depends on the model rather than the mode: it applies to MXFP4 checkpoints
    (`inv.quant_method`), and only to inference (training is always the dequantized path)."""
    defaults = {f.name: f.default for f in fields(Job)}
    flag = lambda name: ("--no-" if defaults.get(name) is True else "--") + name.replace("_", "-")  # noqa: E731
    given = given_job_fields(args)
    notes = [f"{flag(name)} does not apply to --mode {job.mode.value}; ignored"
             for name in given if name not in job.relevant_fields() and name not in ("mode", "mxfp4")]
    if "mxfp4" in given and inv is not None:
        if inv.quant_method != "mxfp4":
            notes.append("--mxfp4 applies only to checkpoints stored in MXFP4 (gpt-oss); ignored")
        elif job.is_training and job.mxfp4.value == "kernels":
            notes.append(f"--mxfp4 kernels does not apply to --mode {job.mode.value}: MXFP4 trains dequantized; ignored")
    if not (args.gpu or args.which_gpus):
        notes += [f"{flag(name)} applies only with --gpu or --which-gpus; ignored"
                  for name in ("strategy", "num_gpus") if getattr(args, name) is not None]
    if args.which_gpus and args.num_gpus is not None:
        notes.append("--num-gpus does not apply to --which-gpus (each GPU gets the count it needs); ignored")
    if args.sort != "count" and not args.which_gpus:
        notes.append("--sort applies only to --which-gpus; ignored")
    if not (args.gpu or args.which_gpus):
        notes += [f"--{name} applies only with --gpu or --which-gpus (speed is per GPU); ignored"
                  for name in ("tokens", "price") if getattr(args, name) is not None]
    elif args.price is not None and args.tokens is None:
        notes.append("--price needs --tokens (the cost is GPU-hours for that many tokens times the price); ignored")
    return notes


def _list_models(query: str, as_json: bool) -> int:
    from estimator.catalog import load_catalog

    q = query.casefold()
    entries = [e for e in load_catalog() if q in e.name.casefold() or q in e.repo.casefold()]
    if as_json:
        print(json.dumps([{"name": e.name, "repo": e.repo, "source": e.source, "gated": e.gated,
                           "published_params": e.published_params} for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no catalog model matches {query!r}; any Hub id works too (org/name)")
        return 0
    width = max(len(e.name) for e in entries)
    for e in entries:
        params = f"{e.published_params / 1e9:.1f}B" if e.published_params else ""
        print(f"{e.name:{width}s}  {e.repo:45s} {params:>7s}{'  gated' if e.gated else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from estimator.estimate import estimate
    from estimator.fit import fit as fit_on, parse_strategy, which_gpus
    from estimator.inventory import UnsupportedModelError
    from estimator.present import json_object, one_line, render_text
    from estimator.sources import ModelSourceError, resolve

    parser = build_parser()
    fit = which = suggestions = speed = None
    speeds: dict = {}
    try:
        args = parser.parse_args(argv)
        if args.list_models is not None:
            return _list_models(args.list_models, args.json)
        if not args.model:
            raise UsageError("a MODEL is needed: a catalog name, a Hub id, or a config.json (--list-models shows the catalog)")
        if args.suggest and not args.gpu:
            raise UsageError("--suggest needs --gpu: the changes are searched for one GPU")
        if args.plot and not args.gpu:
            raise UsageError("--plot needs --gpu: the plot draws the card's capacity")
        token = args.token or os.environ.get("HF_TOKEN") or None
        reference = args.model if not args.revision else f"{args.model}@{args.revision}"
        if not args.training_args:
            job, job_notes = job_from_args(args)  # bad flags are reported before any Hub request
        source = resolve(reference, token=token)
        if args.training_args:
            job, job_notes = job_from_args(args, source.config)
        from estimator.estimate import sdpa_refusal
        from estimator.inventory import inventory_from_config

        inventory = inventory_from_config(source.config)
        if str(given_job_fields(args).get("attn", "")) == "sdpa" and not inventory.supports_sdpa:
            raise UsageError(sdpa_refusal(inventory))  # the default falls back to eager; an explicit sdpa is refused
        result = estimate(inventory, job)
        ignored = not_applied(args, job, inventory)
        for note in ignored:
            print(f"note: {note}", file=sys.stderr)
        job_notes = list(job_notes) + ignored
        if args.gpu or args.which_gpus:
            import gpu_db

            from estimator.speed import speed_of

            strategy = parse_strategy(args.strategy, job) if args.strategy else None
            price = args.price if args.tokens is not None else None
            if args.which_gpus:
                gpus = gpu_db.load_gpus()
                which = which_gpus(result, gpus, strategy, sort="count" if args.sort == "speed" else args.sort)
                speeds = {g.name: speed_of(result, g, args.tokens, price) for g in gpus}
                if args.sort == "speed":
                    from estimator.present import sort_by_speed

                    which = sort_by_speed(which, speeds)
            else:
                gpu = gpu_db.find_gpu(args.gpu)
                fit = fit_on(result, gpu, strategy, args.num_gpus)
                speed = speed_of(result, gpu, args.tokens, price)
                if args.suggest:
                    from estimator.suggest import confirmed, suggest

                    # searched with training's reserve by the formula (a traced step is about a
                    # second each), as the app's suggestions are; the few found are then traced
                    suggestions = suggest(result, gpu, lambda j: result if j == job else estimate(source.config, j, trace=False))
                    suggestions = confirmed(suggestions, gpu, lambda j: result if j == job else estimate(source.config, j))
                if args.plot:
                    from estimator.present import memory_plot, write_plot_html

                    figure = memory_plot(lambda j: result if j == job else estimate(source.config, j, trace=False),
                                         job, fit.capacity_bytes, gpu.name)
                    try:
                        write_plot_html(figure, args.plot)
                    except OSError as err:
                        raise UsageError(f"--plot: cannot write {args.plot}: {err.strerror or err}") from None
    except UsageError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except (ModelSourceError, UnsupportedModelError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        notes = tuple(source.notes) + tuple(job_notes)
        out = json_object(source.name, source.origin, source.source, result, fit, notes, which=which, speed=speed,
                          speeds=speeds)
        if suggestions is not None:
            out["suggestions"] = [s.to_dict() for s in suggestions]
        try:  # SPEC's JSON has no NaN or Infinity; a non-finite figure is a bug to report, not output
            text = json.dumps(out, indent=2, allow_nan=False)
        except ValueError as err:
            print(f"error: the estimate holds a number that is not finite ({err}); please report it with the command line", file=sys.stderr)
            return 2
        print(text)
    else:
        print(render_text(source.name, source, result, fit, which=which, num_gpus=args.num_gpus, extra_notes=job_notes,
                          suggestions=suggestions, speed=speed, speeds=speeds))
    return 0


def run() -> None:
    """The `canirun` console script: `python -m estimator` under a shorter name."""
    sys.exit(main())

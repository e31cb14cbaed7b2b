"""What app.py needs that is not UI: model sources, the job from widget values, URL state, fast
GPU counts, the largest batch and sequence that fit, the dtype grid, and the exports.

Pure Python over `estimator` and `gpu_db` (no Streamlit here), so each piece is tested directly.
GPU counts are always `estimator.fit.fit`'s own answers.
Results are cached per (model, job, ...) with `functools.lru_cache`: the Streamlit process keeps
this module between reruns, so a rerun that changes nothing recomputes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Mapping

import gpu_db
from estimator import Estimate, Job, Mode, estimate, inventory_from_config
from estimator import fit as fitting
from estimator.fit import Fit, Strategy
from estimator.inventory import Inventory, config_key
from estimator.job import MAX_BATCH_SIZE, MAX_LORA_RANK, MAX_TOKENS
from estimator.regime import regime_of
from estimator.sources import ModelConfig, ModelSourceError, parse_config_text

GIB = 1024**3
MAX_UPLOAD_BYTES = 4 * 1024 * 1024  # a config.json is a few KiB; anything this large is not one
DEFAULT_MODEL = "Llama-3.1-8B"
DEFAULT_GPU = "H100 SXM 80GB"
AUTO = "auto"  # the GPU count when the app picks the fewest that fit


# -------------------------------------------------------------------------------------------------
# Model sources
# -------------------------------------------------------------------------------------------------
ACCURACY_PATH = Path(__file__).resolve().parent / "validation" / "accuracy.json"


def load_accuracy(path: Path = ACCURACY_PATH) -> dict:
    """The committed validation figures the accuracy page shows: plain data, no harness code."""
    return json.loads(path.read_text())


def parse_upload(data: bytes, filename: str) -> ModelConfig:
    """An uploaded config.json → `ModelConfig`, or a `ModelSourceError` that says what to do."""
    where = f"the uploaded file {filename!r}"
    hint = "upload the model's config.json (the file next to its weights on the Hub)"
    if len(data) > MAX_UPLOAD_BYTES:
        raise ModelSourceError(f"{where} is {len(data) / 2**20:.1f} MiB: a config.json is a few KiB; {hint}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ModelSourceError(f"{where} is not UTF-8 text; {hint}") from None
    config = parse_config_text(text, where, hint)
    name = config.get("_name_or_path") if isinstance(config.get("_name_or_path"), str) else ""
    return ModelConfig(config, name=name or filename, origin="upload", source=filename)


def redact(message: str, secret: str | None) -> str:
    """The message with the token (if any) replaced: a token is never shown back."""
    return message.replace(secret, "***") if secret else message


@dataclass(frozen=True, eq=False)
class Model:
    """A resolved model with its inventory. Hashes by its config's digest, so caches key on it cheaply."""

    key: str
    name: str
    origin: str
    source: str
    inventory: Inventory
    notes: tuple[str, ...] = ()
    max_positions: int | None = None

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Model) and other.key == self.key


def model_from_source(source: ModelConfig) -> Model:
    """Build (or fetch from the library's cache) the inventory; may import transformers for new configs."""
    inv = inventory_from_config(source.config)
    cfg = source.config.get("text_config") if isinstance(source.config.get("text_config"), dict) else source.config
    positions = cfg.get("max_position_embeddings")
    return Model(
        key=config_key(source.config),
        name=source.name,
        origin=source.origin,
        source=source.source,
        inventory=inv,
        notes=tuple(source.notes),
        max_positions=positions if isinstance(positions, int) and positions > 0 else None,
    )


# -------------------------------------------------------------------------------------------------
# Widgets ⇄ Job ⇄ URL
# -------------------------------------------------------------------------------------------------
JOB_DEFAULTS = Job().to_dict()
JOB_FIELDS = tuple(f.name for f in fields(Job))

# Upper bounds the number inputs enforce (the same as Job's: beyond them a job is a typo).
LIMITS = {
    "batch_size": MAX_BATCH_SIZE,
    "seq_len": MAX_TOKENS,
    "prompt_len": MAX_TOKENS,
    "new_tokens": MAX_TOKENS,
    "lora_r": MAX_LORA_RANK,
}
MAX_MIN_MEMORY_GIB = 4096.0
PAGES = ("estimate", "accuracy")
VENDORS = ("any",) + tuple(v.value for v in gpu_db.Vendor)


def job_from_values(values: Mapping[str, object]) -> Job:
    """A `Job` from widget values (missing fields keep their defaults); ValueError on bad input."""
    data = {k: v for k, v in values.items() if k in JOB_FIELDS}
    if isinstance(data.get("lora_targets"), str):
        data["lora_targets"] = tuple(t.strip() for t in str(data["lora_targets"]).split(",") if t.strip())
    return Job(**data)


def strategies_for(mode: Mode | str) -> tuple[Strategy, ...]:
    mode = Mode(mode)
    return fitting.TRAINING_STRATEGIES if mode is not Mode.INFERENCE else fitting.INFERENCE_STRATEGIES


def default_strategy_for(mode: Mode | str) -> Strategy:
    return fitting.default_strategy(Job(mode=Mode(mode)))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_int(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def _parse_number(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return int(value) if value.is_integer() else value


def _job_field_value(name: str, text: str) -> object:
    """One job field from its URL text, checked by Job's own validation."""
    default = JOB_DEFAULTS[name]
    if name in ("lora_alpha", "lora_dropout"):
        value: object = _parse_number(text)
    elif isinstance(default, bool):
        value = _parse_bool(text)
    elif isinstance(default, int):
        value = _parse_int(text)
    else:
        value = text.strip()
    checked = job_from_values({name: value}).to_dict()[name]  # raises ValueError with Job's message
    return checked


def parse_query_params(params: Mapping[str, str], catalog_names: Iterable[str]) -> tuple[dict, list[str]]:
    """URL query params → widget values, and one message per parameter that was refused.

    A refused parameter is left out (its widget keeps its default); the rest still apply.
    """
    values: dict[str, object] = {}
    errors: list[str] = []
    catalog_names = list(catalog_names)

    def refuse(name: str, why: str) -> None:
        shown = "…" if "token" in name.lower() else repr(params[name])  # a token is never echoed
        errors.append(f"The link's {name}={shown} was ignored: {why}.")

    for name, text in params.items():
        text = str(text)
        try:
            if name in JOB_FIELDS:
                values[name] = _job_field_value(name, text)
            elif name == "model":
                match = [n for n in catalog_names if n.casefold() == text.strip().casefold()]
                if not match:
                    raise ValueError("it is not a catalog model; put a Hub id in hub= instead")
                values[name] = match[0]
            elif name == "hub":
                values["hub_id"] = text.strip()
            elif name == "gpu":
                values[name] = gpu_db.find_gpu(text).name
            elif name == "vendor":
                if text.strip().lower() not in VENDORS:
                    raise ValueError(f"use one of {', '.join(VENDORS)}")
                values[name] = text.strip().lower()
            elif name == "min_memory_gib":
                number = float(_parse_number(text))
                if not 0 <= number <= MAX_MIN_MEMORY_GIB:
                    raise ValueError(f"use a number of GiB from 0 to {MAX_MIN_MEMORY_GIB:,.0f}")
                values[name] = number
            elif name == "strategy":
                try:
                    values[name] = Strategy(text.strip().lower()).value
                except ValueError:
                    raise ValueError(f"use one of {', '.join(s.value for s in Strategy)}") from None
            elif name == "num_gpus":
                if text.strip().lower() == AUTO:
                    values[name] = AUTO
                else:
                    count = _parse_int(text)
                    if not 1 <= count <= fitting.MAX_GPUS:
                        raise ValueError(f"use {AUTO} or a count from 1 to {fitting.MAX_GPUS}")
                    values[name] = count
            elif name == "page":
                if text.strip().lower() not in PAGES:
                    raise ValueError(f"use one of {', '.join(PAGES)}")
                values[name] = text.strip().lower()
            elif name in ("token", "hf_token"):
                raise ValueError("a token is never read from a link; type it in the token box")
            else:
                raise ValueError("the app has no such setting")
        except ValueError as err:
            refuse(name, str(err).rstrip("."))
    mode = values.get("mode", JOB_DEFAULTS["mode"])
    if "strategy" in values and Strategy(values["strategy"]) not in strategies_for(mode):
        errors.append(
            f"The link's strategy={params['strategy']!r} was ignored: for {mode} use one of "
            f"{', '.join(s.value for s in strategies_for(mode))}."
        )
        del values["strategy"]
    return values, errors


def query_params_for(values: Mapping[str, object], job: Job) -> dict[str, str]:
    """The URL query params that reproduce the view: every input shown, never the token."""
    out: dict[str, str] = {}
    if values.get("page", "estimate") != "estimate":
        out["page"] = str(values["page"])
    hub = str(values.get("hub_id") or "").strip()
    if hub:
        out["hub"] = hub
    else:
        out["model"] = str(values.get("model") or DEFAULT_MODEL)
    job_values = job.to_dict()
    for name in job.relevant_fields():
        value = job_values[name]
        if isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, float):
            out[name] = f"{value:g}"
        else:
            out[name] = str(value)
    for name in ("gpu", "vendor", "min_memory_gib", "strategy", "num_gpus"):
        value = values.get(name)
        if value is None:
            continue
        if name == "min_memory_gib":
            value = f"{float(value):g}"
        out[name] = str(value)
    return out


# -------------------------------------------------------------------------------------------------
# Estimates and GPU counts
# -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2048)
def cached_estimate(model: Model, job: Job) -> Estimate:
    return estimate(model.inventory, job)


@functools.lru_cache(maxsize=4096)
def fit_job(model: Model, job: Job, gpu, strategy: Strategy | None = None, num_gpus: int | None = None) -> Fit:
    """`estimator.fit.fit` on the cached estimate (cached too: a rerun that changes nothing recomputes nothing)."""
    return fitting.fit(cached_estimate(model, job), gpu, strategy or fitting.default_strategy(job), num_gpus)


def _fit_profile(gpu) -> tuple:
    """Everything of a GPU that `fit()` reads besides its name: capacity and platform limits."""
    return (gpu.usable_by_default_bytes, gpu.platform, gpu.unsupported_jobs, gpu.caveats)


@functools.lru_cache(maxsize=256)
def _fits_for_gpus(model: Model, job: Job, gpus: tuple, strategy: Strategy) -> tuple[Fit, ...]:
    first: dict[tuple, Fit] = {}
    fits = []
    for gpu in gpus:
        key = _fit_profile(gpu)
        shared = first.get(key)
        if shared is not None and shared.gpus_needed is not None:
            # Same capacity and platform: the same count and figures; only the name differs
            # (a `Fit` that fits carries no reason, and so no GPU name, in its text).
            fits.append(dataclasses.replace(shared, gpu_name=gpu.name))
            continue
        f = fitting.fit(cached_estimate(model, job), gpu, strategy)
        first.setdefault(key, f)
        fits.append(f)
    fits.sort(key=lambda f: (f.gpus_needed is None, f.gpus_needed or 0, -f.capacity_bytes))
    return tuple(fits)


def fits_for_gpus(model: Model, job: Job, gpus: Iterable, strategy: Strategy | None = None) -> list[Fit]:
    """`estimator.fit.which_gpus(..., sort="count")` for these GPUs, faster.

    GPUs of the same capacity and platform limits get the same answer, so `fit()` runs once per
    such group (67 groups among the 181 GPUs) and the others copy it under their own name; tests
    check the result equals `which_gpus`.
    """
    return list(_fits_for_gpus(model, job, tuple(gpus), strategy or fitting.default_strategy(job)))


# -------------------------------------------------------------------------------------------------
# The largest batch and the longest sequence that fit
# -------------------------------------------------------------------------------------------------
def largest_true(predicate: Callable[[int], bool], upper: int, start: int = 1, start_ok: bool | None = None) -> int:
    """The largest n in [1, upper] with predicate(n) true, for a predicate true up to some n and false after.

    Exponential search from `start` (doubling up while it holds, halving down while it fails),
    then bisection of the bracket: O(log n) calls. 0 when predicate(1) is false.
    """
    start = min(max(int(start), 1), upper)
    ok = predicate(start) if start_ok is None else start_ok
    if ok:
        lo, hi = start, None
        while hi is None:
            if lo >= upper:
                return upper
            probe = min(lo * 2, upper)
            if predicate(probe):
                lo = probe
            else:
                hi = probe
    else:
        hi, lo = start, None
        while lo is None:
            if hi <= 1:
                return 0
            probe = max(hi // 2, 1)
            if predicate(probe):
                lo = probe
            else:
                hi = probe
    while hi - lo > 1:  # predicate(lo) holds, predicate(hi) fails
        mid = (lo + hi) // 2
        if predicate(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Limit:
    """The largest value of one job field that still fits, with what it was solved for."""

    field: str
    value: int  # 0: not even 1 fits
    upper: int  # the search's cap (Job's own limit)
    gpu_name: str
    num_gpus: int
    strategy: Strategy
    reason: str | None = None  # why the GPU cannot run the job at all

    @property
    def at_cap(self) -> bool:
        return self.value >= self.upper


def _fits_predicate(model: Model, gpu, strategy: Strategy, num_gpus: int) -> Callable[[Job], bool]:
    capacity = int(gpu.usable_by_default_bytes)
    if num_gpus == 1:
        # One GPU, no distributed wrapper (DDP's buckets would only add memory): `fit` with `single`.
        return lambda j: fitting.fit(cached_estimate(model, j), gpu, Strategy.SINGLE).gpus_needed == 1
    # n GPUs with the strategy: the fullest GPU's device total against the capacity.
    return lambda j: fitting.per_gpu(cached_estimate(model, j), strategy, num_gpus).device_total_bytes <= capacity


@functools.lru_cache(maxsize=512)
def largest_fitting(model: Model, job: Job, field_name: str, gpu_name: str, strategy: Strategy, num_gpus: int) -> Limit:
    """Solve for the largest `field_name` (batch_size, seq_len or prompt_len) that fits `num_gpus` × the GPU.

    The estimate is monotone in batch and length, so exponential search then bisection finds the
    exact integer. Starts from the job's own value; `num_gpus == 1` means one GPU, no strategy.
    """
    gpu = gpu_db.find_gpu(gpu_name)
    upper = LIMITS[field_name]
    # `fit` decides whether the platform can run the job at all (bf16, bitsandbytes) with this
    # helper, so the solver asks it the same way.
    reason = fitting.unsupported_reason(regime_of(job), gpu)
    if reason:
        return Limit(field_name, 0, upper, gpu.name, num_gpus, strategy, reason)
    ok = _fits_predicate(model, gpu, strategy, num_gpus)
    value = largest_true(lambda n: ok(job.with_(**{field_name: n})), upper, start=getattr(job, field_name))
    return Limit(field_name, value, upper, gpu.name, num_gpus, strategy)


# -------------------------------------------------------------------------------------------------
# The can-it-run grid: GPUs needed for each job × dtype on the chosen GPU
# -------------------------------------------------------------------------------------------------
GRID_COLUMNS = ("32-bit", "mixed (AMP)", "16-bit", "8-bit", "4-bit nf4", "4-bit fp4")
GRID: dict[str, dict[str, dict[str, str]]] = {
    "inference": {
        "32-bit": {"weights": "fp32"},
        "16-bit": {"weights": "bf16"},
        "8-bit": {"weights": "int8"},
        "4-bit nf4": {"weights": "nf4"},
        "4-bit fp4": {"weights": "fp4"},
    },
    "full": {"32-bit": {"precision": "fp32"}, "mixed (AMP)": {"precision": "amp_bf16"}, "16-bit": {"precision": "bf16"}},
    "lora": {"32-bit": {"base_dtype": "fp32"}, "16-bit": {"base_dtype": "bf16"}},
    "qlora": {"4-bit nf4": {"quant": "nf4"}, "4-bit fp4": {"quant": "fp4"}},
}
GRID_LABELS = {"inference": "inference", "full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


@dataclass(frozen=True)
class GridCell:
    mode: str
    column: str
    job: Job
    fit: Fit

    @property
    def text(self) -> str:
        f = self.fit
        if f.gpus_needed is None:
            return "✗ no GPU" if f.verdict is fitting.Verdict.CANNOT_RUN else f"✗ >{fitting.MAX_GPUS}"
        each = f.per_gpu.device_total_bytes / GIB
        if f.gpus_needed == 1:
            return f"1 · {each:.1f} GiB"
        return f"{f.gpus_needed} · {each:.1f} GiB each"


def grid(model: Model, job: Job, gpu, strategy: Strategy | None) -> list[GridCell]:
    """Every mode × dtype with the job's other knobs; the job's own mode uses the chosen strategy."""
    cells = []
    for mode, columns in GRID.items():
        for column, changes in columns.items():
            cell_job = job.with_(mode=Mode(mode), **changes)
            cell_strategy = strategy if Mode(mode) is job.mode and strategy is not None else None
            cells.append(GridCell(mode, column, cell_job, fit_job(model, cell_job, gpu, cell_strategy)))
    return cells


def current_column(job: Job) -> str | None:
    for column, changes in GRID[job.mode.value].items():
        if all(getattr(job, k).value == v for k, v in changes.items()):
            return column
    return None

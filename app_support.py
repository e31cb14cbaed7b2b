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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import gpu_db
from estimator import Estimate, Job, Mode, estimate, inventory_from_config
from estimator import fit as fitting
from estimator.fit import Fit, Strategy
from estimator.inventory import Inventory, config_key
from estimator import limits
from estimator.limits import Limit
from estimator.sources import ModelConfig, ModelSourceError, parse_config_text

GIB = 1024**3
MAX_UPLOAD_BYTES = 4 * 1024 * 1024  # a config.json is a few KiB; anything this large is not one


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
# Estimates and GPU counts
# -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2048)
def cached_estimate(model: Model, job: Job) -> Estimate:
    return estimate(model.inventory, job)


@functools.lru_cache(maxsize=4096)
def cached_overview(model: Model, job: Job) -> Estimate:
    """The estimate with a training step's reserve by the formula rather than its trace (about a
    second per job): for the figures around the headline (the grid, the plot, the solvers, the
    suggestions), which need many jobs. The headline and the which-GPUs list trace their job.
    An inference job has no trace: its estimate is the cached one."""
    if job.mode is Mode.INFERENCE:
        return cached_estimate(model, job)
    return estimate(model.inventory, job, trace=False)


def overview_of(model: Model, job: Job):
    """Estimates for the figures around `job`'s headline: `job` itself as the headline has it,
    every other job from `cached_overview`."""
    return lambda j: cached_estimate(model, j) if j == job else cached_overview(model, j)


@functools.lru_cache(maxsize=4096)
def cached_lower_bound(model: Model, job: Job) -> Estimate:
    """The estimate without the replayed allocator reserve (inference's stream, a traced training
    step's): the solvers' cheap bound."""
    return estimate(model.inventory, job, replay=False)


@functools.lru_cache(maxsize=4096)
def fit_job(model: Model, job: Job, gpu, strategy: Strategy | None = None, num_gpus: int | None = None) -> Fit:
    """`estimator.fit.fit` on the cached estimate (cached too: a rerun that changes nothing recomputes nothing)."""
    return fitting.fit(cached_estimate(model, job), gpu, strategy or fitting.default_strategy(job), num_gpus)


@functools.lru_cache(maxsize=4096)
def fit_overview(model: Model, job: Job, gpu, strategy: Strategy | None = None) -> Fit:
    """`fit` on the overview estimate (`cached_overview`): the grid's cells other than the job's own."""
    return fitting.fit(cached_overview(model, job), gpu, strategy or fitting.default_strategy(job))


@functools.lru_cache(maxsize=4096)
def speed_job(model: Model, job: Job, gpu, tokens: int | None = None, price: float | None = None):
    """`estimator.speed.speed_of` on the cached estimate: one GPU's speed, None where gpu_db lacks a figure."""
    from estimator.speed import speed_of

    return speed_of(cached_estimate(model, job), gpu, tokens, price)


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
# The largest batch and the longest sequence that fit (the library's solver, over cached estimates)
# -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def suggestions(model: Model, job: Job, gpu_name: str) -> tuple:
    """`estimator.suggest.suggest` for this model on one GPU, with the app's cached estimates."""
    from estimator.suggest import suggest

    return tuple(suggest(cached_estimate(model, job), gpu_db.find_gpu(gpu_name), overview_of(model, job)))


@functools.lru_cache(maxsize=512)
def largest_fitting(model: Model, job: Job, field_name: str, gpu_name: str, strategy: Strategy, num_gpus: int) -> Limit:
    """`estimator.limits.largest_fitting` for this model, with the app's cached overview estimates."""
    # on the overview's estimates: a training job's reserve by the formula, as the page says (a
    # search on traced steps would take a second per size it tries)
    return limits.largest_fitting(overview_of(model, job), job, field_name, gpu_db.find_gpu(gpu_name), strategy,
                                  num_gpus, lower_bound_of=lambda j: cached_lower_bound(model, j))


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
            fit = fit_job(model, cell_job, gpu, cell_strategy) if cell_job == job else \
                fit_overview(model, cell_job, gpu, cell_strategy)
            cells.append(GridCell(mode, column, cell_job, fit))
    return cells


def current_column(job: Job) -> str | None:
    for column, changes in GRID[job.mode.value].items():
        if all(getattr(job, k).value == v for k, v in changes.items()):
            return column
    return None

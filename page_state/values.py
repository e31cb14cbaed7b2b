"""The page's values: defaults, bounds and choices of every input, and widget values → `Job`."""

from __future__ import annotations

from dataclasses import fields
from typing import Mapping

import gpu_db
from estimator import Job, Mode
from estimator import fit as fitting
from estimator.fit import Strategy
from estimator.job import FIELD_LIMITS

DEFAULT_MODEL = "Llama-3.1-8B"
DEFAULT_GPU = "H100 SXM 80GB"
AUTO = "auto"  # the GPU count when the app picks the fewest that fit

JOB_DEFAULTS = Job().to_dict()
JOB_FIELDS = tuple(f.name for f in fields(Job))

# Upper bounds the number inputs enforce (Job's own: beyond them a job is a typo).
LIMITS = FIELD_LIMITS
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



# Every widget's value when neither the session nor the link says otherwise.
DEFAULTS: dict[str, object] = {
    "page": "estimate",
    "model": DEFAULT_MODEL,
    "hub_id": "",
    "hf_token": "",
    **JOB_DEFAULTS,
    "lora_alpha": float(JOB_DEFAULTS["lora_alpha"]),
    "lora_dropout": float(JOB_DEFAULTS["lora_dropout"]),
    "vendor": "any",
    "min_memory_gib": 0.0,
    "gpu": DEFAULT_GPU,
    "strategy": default_strategy_for(JOB_DEFAULTS["mode"]).value,
    "num_gpus": AUTO,
}

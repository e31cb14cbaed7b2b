"""The page's link: URL query parameters → widget values (each refusal one message), and back."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import gpu_db
from estimator import Job
from estimator import fit as fitting
from estimator.fit import Strategy
from estimator.sources import shorten
from page_state.values import (AUTO, DEFAULT_MODEL, JOB_DEFAULTS, JOB_FIELDS, MAX_MIN_MEMORY_GIB, PAGES, VENDORS,
                               job_from_values, strategies_for)


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
        shown = "…" if "token" in name.lower() else repr(shorten(params[name]))  # a token is never echoed; a long value is cut
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

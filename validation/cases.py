"""Validation cases: a model from the catalog plus a `Job`, named and optionally held out.

A cases file is YAML: a list whose items are either one case or a `grid`, which expands to the
cross product of its list-valued fields. Every case becomes `(id, model, Job, holdout)`; the
job fields are exactly `estimator.Job`'s, so the harness measures what the estimator estimates.

    - id: llama1b-lora-r16            # optional: derived from the fields when absent
      model: Llama-3.2-1B
      mode: lora
      batch_size: 4
      seq_len: 1024
      holdout: true                   # kept back: never used to choose a mechanism's constant
    - model: Qwen/Qwen3-30B-A3B       # id gets "-L4": the harness builds, and the report
      config_overrides: {num_hidden_layers: 4}   # estimates, 4 of its 48 layers (validation/overrides.py)
      mode: inference
    - grid:
        model: [Qwen2.5-0.5B]
        mode: [full]
        optimizer: [adamw, sgd]
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from estimator.job import Job
from validation.overrides import check_shape, id_suffix

# Short labels for the id derived from a case's fields, in this order.
_ID_FIELDS = (
    ("mode", ""),
    ("weights", ""),
    ("precision", ""),
    ("base_dtype", "base-"),
    ("quant", ""),
    ("double_quant", "dq"),
    ("batch_size", "b"),
    ("seq_len", "s"),
    ("prompt_len", "p"),
    ("new_tokens", "n"),
    ("lora_r", "r"),
    ("lora_targets", "t-"),
    ("lora_dropout", "drop"),
    ("optimizer", ""),
    ("gradient_checkpointing", "gc"),
    ("attn", ""),
)


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    job: Job
    holdout: bool = False
    # Changes to the catalog config, made identically when the checkpoint is built and when the
    # report estimates the case (validation/overrides.py); empty for the catalog config as it is.
    config_overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"id": self.id, "model": self.model, "holdout": self.holdout, "job": self.job.to_dict()}
        if self.config_overrides:
            out["config_overrides"] = dict(self.config_overrides)
        return out

    def header(self) -> dict:
        """What a result row says about its case before it ran (the row's own keys follow)."""
        out = {"case": self.id, "model": self.model, "holdout": self.holdout, "job": self.job.to_dict()}
        if self.config_overrides:
            out["config_overrides"] = dict(self.config_overrides)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Case":
        return cls(id=data["id"], model=data["model"], job=Job.from_dict(data["job"]), holdout=data.get("holdout", False),
                   config_overrides=dict(data.get("config_overrides") or {}))


def _derive_id(model: str, fields: dict) -> str:
    parts = [re.sub(r"[^A-Za-z0-9.]+", "-", model.rsplit("/", 1)[-1]).strip("-").lower()]
    for key, prefix in _ID_FIELDS:
        if key not in fields:
            continue
        value = fields[key]
        if isinstance(value, bool):
            if value:
                parts.append(prefix)
            elif key == "double_quant":
                parts.append("nodq")
            continue
        if isinstance(value, (list, tuple)):
            value = "+".join(value)
        parts.append(f"{prefix}{value}")
    return "-".join(str(p) for p in parts if p != "")


def _one(item: dict, where: str) -> Case:
    item = dict(item)
    model = item.pop("model", None)
    if not model:
        raise ValueError(f"{where}: a case needs a model (a catalog name)")
    case_id = item.pop("id", None)
    holdout = bool(item.pop("holdout", False))
    overrides = item.pop("config_overrides", None)
    if overrides is not None:
        overrides = check_shape(overrides, f"{where}: config_overrides")
    job_fields = dict(item)
    if "lora_targets" in job_fields and isinstance(job_fields["lora_targets"], list):
        job_fields["lora_targets"] = tuple(job_fields["lora_targets"])
    try:
        job = Job.from_dict(job_fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    case_id = case_id or _derive_id(model, job_fields)
    if overrides:  # the id says the config is not the catalog's: "-L4", "-L2-noquant"
        suffix = id_suffix(overrides)
        if not case_id.endswith(suffix):
            case_id = f"{case_id}-{suffix}"
    return Case(id=case_id, model=model, job=job, holdout=holdout, config_overrides=overrides or {})


def expand(items: list) -> list[Case]:
    """Turn the YAML list into cases; grids become their cross product. Ids must be unique."""
    cases: list[Case] = []
    for index, item in enumerate(items):
        where = f"case {index + 1}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(item).__name__}")
        if "grid" in item:
            grid = item["grid"]
            holdout = bool(item.get("holdout", False))
            keys = list(grid)
            values = [v if isinstance(v, list) else [v] for v in grid.values()]
            for combo in itertools.product(*values):
                fields = dict(zip(keys, combo))
                fields["holdout"] = holdout
                cases.append(_one(fields, f"{where} (grid)"))
        else:
            cases.append(_one(item, where))
    return ensure_unique_ids(cases)


def ensure_unique_ids(cases: list) -> list:
    """Refuse a cases list with two cases of one id (anything with an `.id`); return it unchanged."""
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise ValueError(f"duplicate case id {case.id!r}: give the cases distinct ids")
        seen.add(case.id)
    return cases


def read_case_list(path: str | Path) -> list:
    """A cases file's items: every cases file (plain loop, Trainer, edge searches) is a YAML list."""
    with open(path, encoding="utf-8") as handle:
        items = yaml.safe_load(handle) or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: a cases file is a YAML list")
    return items


def load_cases(path: str | Path) -> list[Case]:
    return expand(read_case_list(path))


def select(cases: list[Case], only: list[str] | None) -> list[Case]:
    """Keep the cases whose id matches any of the glob-like patterns (`*` wildcards)."""
    if not only:
        return cases
    patterns = [re.compile("^" + re.escape(p).replace(r"\*", ".*") + "$") for p in only]
    return [c for c in cases if any(p.search(c.id) for p in patterns)]

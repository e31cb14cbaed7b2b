"""The offline catalog: real Hugging Face ``config.json`` files, each with its source.

The data lives next to this module: ``catalog.yaml`` lists the entries (each under a comment
that says where its copy came from, as litgpt's ``config.py`` does), and ``configs/`` holds the
files themselves, pretty-printed but otherwise as published.

This module only reads those files: no network, and nothing heavier than ``json`` and ``yaml``
is imported, so ``estimator`` stays fast to import.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

CATALOG_DIR = Path(__file__).resolve().parent
CATALOG_PATH = CATALOG_DIR / "catalog.yaml"
CONFIGS_DIR = CATALOG_DIR / "configs"

_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/", re.IGNORECASE)


@dataclass(frozen=True)
class CatalogEntry:
    """One model of the catalog.

    ``published_params`` is the parameter count the model's publisher (or a model hub that
    converted its weights) states, with tied weights counted once; ``None`` where no such
    figure was found. ``source`` is the canonical Hub URL of the original file, ``copy_from``
    the place the text was actually read, since the Hub itself was not reachable.
    """

    name: str
    repo: str
    file: str
    source: str
    copy_from: str
    gated: bool
    published_params: int | None = None
    published_params_source: str | None = None
    reconstructed: bool = False
    note: str | None = None
    config_dir: Path = CONFIGS_DIR

    @property
    def config_path(self) -> Path:
        return self.config_dir / self.file

    def config(self) -> dict[str, Any]:
        """The ``config.json`` as a fresh dict (the parsed file is cached; callers may mutate the copy)."""
        return json.loads(_read_text(self.config_path))


@functools.lru_cache(maxsize=None)
def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "repo": str,
    "file": str,
    "source": str,
    "copy_from": str,
    "gated": bool,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "published_params": int,
    "published_params_source": str,
    "reconstructed": bool,
    "note": str,
}
_KNOWN = set(_REQUIRED) | set(_OPTIONAL)
assert _KNOWN <= {f.name for f in fields(CatalogEntry)}


def _entry_label(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        return f"catalog entry {index} ({raw['name']!r})"
    return f"catalog entry {index}"


def _check_type(label: str, key: str, value: Any, kind: type | tuple[type, ...]) -> None:
    # bool is an int in Python; a count of True parameters is not a count.
    if kind is int and isinstance(value, bool):
        raise ValueError(f"{label}: field {key!r} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{label}: field {key!r} must be {expected}, got {value!r}")


def _parse_entry(raw: Any, index: int, config_dir: Path) -> CatalogEntry:
    label = _entry_label(raw, index)
    if not isinstance(raw, dict):
        raise ValueError(f"{label}: must be a mapping of fields, got {type(raw).__name__}")
    for key in raw:
        if key not in _KNOWN:
            raise ValueError(f"{label}: unknown field {key!r}; known fields are {sorted(_KNOWN)}")
    for key, kind in _REQUIRED.items():
        if key not in raw or raw[key] is None:
            raise ValueError(f"{label}: missing required field {key!r}")
        _check_type(label, key, raw[key], kind)
        if kind is str and not raw[key].strip():
            raise ValueError(f"{label}: field {key!r} is empty")
    for key, kind in _OPTIONAL.items():
        if raw.get(key) is not None:
            _check_type(label, key, raw[key], kind)
    for key in ("source", "copy_from", "published_params_source"):
        value = raw.get(key)
        if value is not None and not value.startswith(("https://", "http://", "arXiv:")):
            raise ValueError(f"{label}: field {key!r} must be a URL, got {value!r}")
    if raw["repo"].count("/") != 1:
        raise ValueError(f"{label}: field 'repo' must look like 'org/name', got {raw['repo']!r}")
    params = raw.get("published_params")
    if params is not None and params <= 0:
        raise ValueError(f"{label}: field 'published_params' must be positive, got {params!r}")
    if params is not None and not raw.get("published_params_source"):
        raise ValueError(f"{label}: field 'published_params_source' is required with 'published_params'")
    if raw.get("reconstructed") and not raw.get("note"):
        raise ValueError(f"{label}: field 'note' must say how a reconstructed config was assembled")
    if not (config_dir / raw["file"]).is_file():
        raise ValueError(f"{label}: field 'file' names {raw['file']!r}, which is not in {config_dir}")
    return CatalogEntry(**{k: v for k, v in raw.items() if v is not None}, config_dir=config_dir)


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> tuple[CatalogEntry, ...]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: the catalog must be a YAML list of entries")
    config_dir = path.parent / "configs"
    entries: list[CatalogEntry] = []
    seen_names: dict[str, int] = {}
    seen_repos: dict[str, int] = {}
    for index, raw in enumerate(data):
        entry = _parse_entry(raw, index, config_dir)
        for key, seen, value in (("name", seen_names, entry.name), ("repo", seen_repos, entry.repo)):
            folded = value.casefold()
            if folded in seen:
                raise ValueError(
                    f"{_entry_label(raw, index)}: field {key!r} duplicates entry {seen[folded]} ({value!r})"
                )
            seen[folded] = index
        entries.append(entry)
    return tuple(entries)


def load_catalog(path: str | Path | None = None) -> tuple[CatalogEntry, ...]:
    """Read and validate the catalog (cached per path).

    Raises ``ValueError`` naming the entry and the field for a missing, unknown or ill-typed
    field, a duplicate name or repo, or a config file that is not there.
    """
    resolved = CATALOG_PATH if path is None else Path(path).resolve()
    return _load(resolved)


def _normalize(name_or_repo: str) -> str:
    text = name_or_repo.strip()
    text = _HUB_URL.sub("", text)
    # A Hub URL may point inside the repo: /blob/main/config.json, /tree/main, ...
    text = re.split(r"/(?:blob|tree|resolve|raw)/", text, maxsplit=1)[0]
    return text.strip("/").casefold()


def find_entry(name_or_repo: str, path: str | Path | None = None) -> CatalogEntry | None:
    """The entry whose display name or Hub repo id matches, ignoring case; ``None`` if none does.

    Accepts ``Llama-3.1-8B``, ``meta-llama/Llama-3.1-8B``, ``meta-llama/Llama-3.1-8B/`` and
    ``https://huggingface.co/meta-llama/Llama-3.1-8B`` alike.
    """
    key = _normalize(name_or_repo)
    if not key:
        return None
    for entry in load_catalog(path):
        if key in (entry.name.casefold(), entry.repo.casefold()):
            return entry
    return None


def _squash(text: str) -> str:
    """A name without case, separators or the organisation: "meta-llama/Llama-3.1-8B" -> "llama318b"."""
    return re.sub(r"[^a-z0-9]", "", text.casefold().rsplit("/", 1)[-1])


def close_names(query: str, limit: int = 3, path: str | Path | None = None) -> list[str]:
    """Catalog names that look like `query` (a typo, a missing dot or dash): for "did you mean"."""
    import difflib

    key = _squash(_normalize(query) or query)
    if not key:
        return []
    names = {_squash(e.name): e.name for e in load_catalog(path)}
    contained = [name for squashed, name in names.items() if key in squashed or squashed in key]
    close = [names[m] for m in difflib.get_close_matches(key, list(names), n=limit, cutoff=0.75)]
    ordered = list(dict.fromkeys(close + sorted(contained, key=len)))
    return ordered[:limit]


__all__ = ["CATALOG_PATH", "CONFIGS_DIR", "CatalogEntry", "close_names", "find_entry", "load_catalog"]

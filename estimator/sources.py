"""Where a model's config comes from: a local path, the offline catalog, or the Hugging Face Hub.

This is the estimator's one edge that reads files and the network; the computation modules never
do. Every failure becomes a `ModelSourceError` whose message says what went wrong and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

# The config's text and the error type live in config_text (hub.py reads them too); they are
# re-exported here, where callers have always found them.
from estimator.config_text import MAX_CONFIG_BYTES, ModelConfig, ModelSourceError, one_line, parse_config_text, shorten

__all__ = ["MAX_CONFIG_BYTES", "ModelConfig", "ModelSourceError", "one_line", "parse_config_text", "resolve", "shorten"]


_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/(?P<repo>[^/\s]+/[^/\s?#]+)(?:/(?:tree|blob)/(?P<rev>[^/\s?#]+))?")
# org/name, or a legacy id without an organisation (gpt2, bert-base-uncased), which the Hub still serves.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def read_config_file(path: Path) -> ModelConfig:
    """A local config.json (the CLI's and the library's; the app never reads local paths).

    Only a regular file of at most MAX_CONFIG_BYTES is read: a FIFO would block the open and
    `/dev/zero` would never end.
    """
    shown = shorten(str(path), 200)
    try:
        if path.is_dir():
            path = path / "config.json"
        info = path.stat()
    except (OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError) or isinstance(err, NotADirectoryError):
            raise ModelSourceError(f"no config.json at {shown}; give a path to a config.json or to a folder holding one") from None
        raise ModelSourceError(f"cannot read {shown} ({type(err).__name__}); give a path to a config.json or to a folder holding one") from None
    import stat

    if not stat.S_ISREG(info.st_mode):
        raise ModelSourceError(f"{shown} is not a regular file; give a path to a config.json or to a folder holding one")
    if info.st_size > MAX_CONFIG_BYTES:
        raise ModelSourceError(f"{shown} is {info.st_size:,} bytes, more than any config.json (at most {MAX_CONFIG_BYTES:,}); check the path")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelSourceError(f"cannot read {shown}: {type(err).__name__}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelSourceError(f"{shown} is more than {MAX_CONFIG_BYTES:,} bytes, more than any config.json; check the path")
    return ModelConfig(parse_config_text(text, str(path)), name=path.parent.name or str(path), origin="file", source=str(path))


def split_reference(reference: str) -> tuple[str, str | None]:
    """A Hub URL or `org/name[@revision]` → (repo id, revision)."""
    reference = reference.strip()
    match = _HUB_URL.match(reference)
    if match:
        rev = match.group("rev")
        return match.group("repo"), unquote(rev) if rev else None
    if "@" in reference:
        repo, _, rev = reference.partition("@")
        return repo.rstrip("/"), rev or None
    return reference.rstrip("/"), None


def _is_file_path(reference: str) -> bool:
    """Whether `reference` names something on disk; a name the OS cannot even look up (too long,
    a NUL byte) is not one, so it goes on to the Hub's rules and their one-line message."""
    try:
        return Path(reference).expanduser().exists()
    except (OSError, ValueError):
        return False


# The app's one answer to anything that looks like a path: the same words whether or not such a
# file exists, so a public page says nothing about the server's files.
PATHS_REFUSED = (
    "the app reads a catalog name, a Hub repo id (org/name) or its URL, or an uploaded config.json, "
    "never a file on the server; upload the config.json instead"
)
_PATH_LIKE = re.compile(r"^(?:[/~.\\]|[A-Za-z]:|file:)|\\|\.json$|\x00", re.IGNORECASE)


def resolve(
    reference: str, *, token: str | bool | None = None, offline: bool | None = None, allow_paths: bool = True
) -> ModelConfig:
    """Turn what the user typed into a config: a path, a catalog name, or a Hub repo id/URL.

    `allow_paths=False` (the app) never looks at the filesystem: a catalog name or a Hub reference,
    and anything path-like (absolute, `~`, `.`, backslashes, a drive, `file:`, `.json`) is refused
    with PATHS_REFUSED before any check of whether it exists. A relative name like `org/name` is a
    Hub id then, even where a folder of that name exists.
    """
    if not isinstance(reference, str) or not reference.strip():
        raise ModelSourceError("give a model: a Hub repo id (org/name), a catalog name, or a path to a config.json")
    reference = reference.strip()
    if allow_paths and (reference.endswith(".json") or _is_file_path(reference)):
        return read_config_file(Path(reference).expanduser())

    from estimator.catalog import find_entry

    entry = find_entry(reference)
    repo, revision = split_reference(reference)
    if entry is not None and revision is None:
        return ModelConfig(entry.config(), name=entry.name, origin="catalog", source=entry.source)
    if not allow_paths and not _HUB_URL.match(reference) and _PATH_LIKE.search(reference):
        raise ModelSourceError(PATHS_REFUSED)
    if not _REPO_ID.match(repo):
        raise ModelSourceError(
            f"{shorten(reference)!r} is not a catalog name, a config.json path, or a Hub repo id "
            "(org/name, each part 1 to 96 letters, digits, '-', '_' or '.'), e.g. meta-llama/Llama-3.1-8B"
        )
    from estimator import hub

    hub.check_repo_id(repo)
    if revision is not None:
        hub.check_revision(repo, revision)

    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return hub.fetch_config(repo, revision=revision, token=token, offline=offline)
    except ModelSourceError as err:
        from estimator.catalog import close_names

        near = close_names(repo)
        if not near:
            raise
        raise ModelSourceError(f"{err} (did you mean {', '.join(near)}? python -m estimator --list-models lists the catalog)") from None

"""Configs from the Hugging Face Hub: `config.json` and the safetensors headers, never the weights.

`fetch_config(repo, revision=..., token=..., offline=...)` is the one entry point (`sources.resolve`
calls it for a repo id or URL). It goes through `huggingface_hub` 1.x, whose HTTP client is httpx:

- `config.json`: a HEAD through `get_hf_file_metadata` first, with the caller's timeout and no
  retries, so every failure arrives fast and as the exception that says what happened; then
  `hf_hub_download`, which stores the file in the Hugging Face cache (`HF_HUB_CACHE`, else
  `HF_HOME/hub`) where later offline runs find it.
- the weights' stored dtypes and exact element counts: `HfApi.get_safetensors_metadata` reads only
  each safetensors file's JSON header (a range request), so nothing heavy is downloaded. Failing to
  read them is not an error; the result says so in its notes.
- `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE` and `HF_HUB_ETAG_TIMEOUT` are read at call time (not at
  import, as huggingface_hub's own constants are), so a test can point them elsewhere.
- Offline (`offline=True`, which `resolve` derives from `HF_HUB_OFFLINE=1`) reads the cache only;
  online, a Hub that cannot be reached (no network, a timeout, a 5xx) falls back to the cache too,
  and the notes say which copy was used.
- The token is sent to the Hub and nowhere else: no message, note or log line carries it, and the
  in-process cache keys on its hash.
- Remote code never runs: a config whose `model_type` transformers does not know (it would need
  `trust_remote_code`) is refused here with the size its weights take, when the header says so.

Every failure is a `ModelSourceError` with one line that says what went wrong and what to do.

Before any request, the repo id must pass the Hub's own rules (`huggingface_hub.utils.
validate_repo_id`: a name of 1 to 96 characters, an optional organisation) and the revision those
of a git ref (`check_revision`): huggingface_hub joins the revision into cache paths
(`refs/<revision>`), so `name@../../../x` would otherwise write and read files outside the cache.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path

from estimator.sources import ModelConfig, ModelSourceError, parse_config_text, shorten

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT_S = 10.0  # huggingface_hub's DEFAULT_ETAG_TIMEOUT
CONFIG_NAME = "config.json"
GIB = 1024**3


def endpoint() -> str:
    """The Hub to ask: `HF_ENDPOINT`, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")


def cache_dir() -> str:
    """huggingface_hub's cache folder, as its constants would compute it now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(os.path.expandvars(explicit))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(os.path.expandvars(home)), "hub")


def default_timeout_s() -> float:
    """Seconds to wait for the Hub: `HF_HUB_ETAG_TIMEOUT` if set, else 10."""
    try:
        value = float(os.environ.get("HF_HUB_ETAG_TIMEOUT", ""))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


MAX_REVISION_CHARS = 255  # a ref is a file name in the cache (refs/<revision>); most filesystems stop at 255
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REF_FORBIDDEN = set("\\ ~^:?*[")


def _revision_problem(revision: str) -> str | None:
    """Why `revision` is not a branch, tag, `refs/pr/N` or commit name, or None when it is.

    git's rules for ref names (`git check-ref-format`), which the Hub's branches and tags follow:
    components separated by single slashes, none empty, none `.`/`..` or starting with a dot or
    ending in `.lock`; no control characters, spaces, backslashes or `~^:?*[`, no `@{`.
    """
    if not isinstance(revision, str) or not revision:
        return "it is empty"
    if len(revision) > MAX_REVISION_CHARS:
        return f"it is {len(revision):,} characters long (at most {MAX_REVISION_CHARS})"
    if _COMMIT.fullmatch(revision):
        return None
    if any(not c.isprintable() or c.isspace() for c in revision):
        return "it holds a control character or a space"
    bad = sorted(_REF_FORBIDDEN.intersection(revision))
    if bad:
        return f"it holds {' '.join(repr(c) for c in bad)}"
    if revision.startswith("/") or revision.endswith("/"):
        return "it starts or ends with '/'"
    if revision.startswith("-") or revision.endswith(".") or "@{" in revision or revision == "@":
        return "it starts with '-', ends with '.' or holds '@{'"
    for part in revision.split("/"):
        if not part:
            return "it has an empty path component ('//')"
        if part.startswith(".") or part.endswith(".lock"):
            return f"a component starts with '.' or ends with '.lock' ({shorten(part, 40)!r})"
    return None


def check_revision(repo: str, revision: str) -> None:
    """Refuse a revision that is not a branch, tag, `refs/pr/N` or 40-hex commit, before any request."""
    problem = _revision_problem(revision)
    if problem:
        raise ModelSourceError(
            f"revision {shorten(revision)!r} is not a branch, tag, pull request (refs/pr/N) or commit name: {problem}; "
            f"use one listed at {model_page(shorten(repo, 200))}/tree/main"
        )


def check_repo_id(repo: str) -> None:
    """Refuse what the Hub would refuse as a repo id (huggingface_hub's own validator), before any request."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except hf_errors.HFValidationError:
        raise ModelSourceError(
            f"{shorten(repo)!r} is not a valid Hub repo id: org/name, each part 1 to 96 letters, digits, '-', '_' or '.' "
            "(no '--' or '..'), e.g. meta-llama/Llama-3.1-8B"
        ) from None


def model_page(repo: str) -> str:
    """The model's page on huggingface.co (where gated models' terms are accepted)."""
    return f"https://huggingface.co/{repo}"


def fetch_config(
    repo: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool = False,
    timeout_s: float | None = None,
) -> ModelConfig:
    """A Hub repo's `config.json` (and its safetensors parameter counts) as a `ModelConfig`.

    `token`: a string is used as given; None lets huggingface_hub fall back to `HF_TOKEN` or the
    stored login (the CLI's behaviour); False forbids that fallback, so a public server never
    reads gated configs with its owner's token on a visitor's behalf (the app passes False when
    its token field is empty).

    Results are cached in-process per endpoint, cache folder, repo, revision, token and mode; each
    call gets its own copy of the config dict.
    """
    if not isinstance(repo, str) or not repo.strip():
        raise ModelSourceError("give a Hub repo id like meta-llama/Llama-3.1-8B")
    check_repo_id(repo.strip())
    if revision:
        check_revision(repo.strip(), revision)
    timeout = float(timeout_s) if timeout_s is not None and timeout_s > 0 else default_timeout_s()
    if token is not False:
        token = token or None
    if isinstance(token, str):
        token_key = hashlib.sha256(token.encode()).hexdigest()
    else:
        token_key = "no-implicit-token" if token is False else None
    result = _fetch_cached(endpoint(), cache_dir(), repo.strip(), revision or None, token_key, bool(offline), timeout, _Secret(token))
    return replace(result, config=copy.deepcopy(result.config))


def clear_cache() -> None:
    """Forget what this process fetched (huggingface_hub's file cache is left alone)."""
    _fetch_cached.cache_clear()


class _Secret:
    """Carries the token past lru_cache without making it part of the key (the key holds its hash)."""

    __slots__ = ("value",)

    def __init__(self, value: str | bool | None) -> None:
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Secret)

    def __repr__(self) -> str:
        return "<token>" if isinstance(self.value, str) else "<no token>"


@functools.lru_cache(maxsize=64)
def _fetch_cached(ep: str, cache: str, repo: str, revision: str | None, _token_key: str | None, offline: bool, timeout: float, secret: _Secret) -> ModelConfig:
    return _fetch(ep, cache, repo, revision, secret.value, offline, timeout)


class _NoProgress:
    """A tqdm stand-in: a config.json download needs no progress bar on stderr."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, *args, **kwargs) -> None:
        return None

    def close(self) -> None:
        return None


# -------------------------------------------------------------------------------------------------
# Fetching
# -------------------------------------------------------------------------------------------------
def _fetch(ep: str, cache: str, repo: str, revision: str | None, token: str | None, offline: bool, timeout: float) -> ModelConfig:
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    rev = revision or "main"
    shown = repo if revision is None else f"{repo}@{revision}"
    source = f"{ep}/{repo}" + (f"/tree/{revision}" if revision else "")
    if offline:
        path = _cached_path(repo, rev, cache, shown)
        if path is None:
            raise ModelSourceError(
                f"offline (HF_HUB_OFFLINE=1) and {shown}'s config.json is not in the local Hugging Face cache ({cache}): "
                "run once online, or use a catalog name or a path to a config.json"
            )
        notes = [f"offline: config.json read from the local Hugging Face cache ({path}), not checked against the Hub"]
        notes.append("offline: the safetensors header was not read, so the stored dtypes are not known")
        return _finish(_read(path, shown), shown, "hub-cache", source, notes, None)

    url = hf.hf_hub_url(repo, CONFIG_NAME, revision=rev, endpoint=ep)
    notes: list[str] = []
    try:
        meta = hf.get_hf_file_metadata(url, token=token, timeout=timeout, endpoint=ep)
        commit = meta.commit_hash
        path = hf.hf_hub_download(
            repo,
            CONFIG_NAME,
            revision=rev,
            cache_dir=cache,
            token=token,
            endpoint=ep,
            etag_timeout=timeout,
            tqdm_class=_NoProgress,  # type: ignore[arg-type]
        )
    except Exception as err:  # noqa: BLE001 - every failure is mapped to one line below
        reason = _unreachable(err)
        if reason is None:
            raise _source_error(err, repo, revision, token, ep, timeout, cache) from None
        cached = _cached_path(repo, rev, cache, shown)
        if cached is None:
            raise _source_error(err, repo, revision, token, ep, timeout, cache) from None
        notes.append(f"the Hub could not be reached ({reason}); config.json read from the local Hugging Face cache ({cached})")
        notes.append("the safetensors header was not read, so the stored dtypes are not known")
        return _finish(_read(cached, shown), shown, "hub-cache", source, notes, None)

    config = _read(path, shown)
    counts, note = _safetensors_counts(ep, repo, commit or rev, token, timeout)
    if note:
        notes.append(note)
    return _finish(config, shown, "hub", source, notes, counts)


def _cached_path(repo: str, rev: str, cache: str, shown: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, CONFIG_NAME, cache_dir=cache, revision=rev)
    except Exception:  # noqa: BLE001 - an unreadable cache is the same as an empty one
        return None
    if isinstance(found, str):
        return found
    if found is not None:  # _CACHED_NO_EXIST: an earlier online run found no config.json
        raise ModelSourceError(
            f"the local Hugging Face cache records that {shown} has no config.json: it is not a transformers model; "
            "use a catalog name or a path to a config.json"
        )
    return None


def _read(path: str, shown: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelSourceError(f"cannot read the cached config.json of {shown} ({type(err).__name__}); delete it from the Hugging Face cache and retry") from None
    return parse_config_text(text, f"the config.json of {shown}", "the repo's config.json is broken; use a catalog name or a path to a config.json")


def _safetensors_counts(ep: str, repo: str, rev: str, token: str | None, timeout: float) -> tuple[dict[str, int] | None, str | None]:
    """Stored element counts per dtype from the safetensors headers; a note instead when unavailable."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    try:
        meta = HfApi(endpoint=ep).get_safetensors_metadata(repo, revision=rev, token=token, timeout=timeout)
    except hf_errors.NotASafetensorsRepoError:
        return None, "the repo has no safetensors weights, so their stored dtypes are not known (sized from config.json alone)"
    except Exception as err:  # noqa: BLE001 - optional information
        return None, f"the safetensors header could not be read ({_short(err)}), so the stored dtypes are not known"
    counts = {str(k): int(v) for k, v in (meta.parameter_count or {}).items()}
    if not counts:
        return None, "the safetensors header lists no tensors"
    return counts, None


def _finish(config: dict, shown: str, origin: str, source: str, notes: list[str], counts: dict[str, int] | None) -> ModelConfig:
    from estimator import prequantized

    stored = prequantized.safetensors_bytes(counts) if counts else None
    _refuse_remote_code(config, shown, stored)
    if isinstance(config.get("auto_map"), dict):
        notes.append(
            f"the repo ships its own modeling code (auto_map); the estimator never runs it and sizes the model "
            f"with transformers' built-in {config.get('model_type')} implementation"
        )
    described = prequantized.describe_quantization(config)
    if described:
        notes.append(described)
    if stored is not None:
        dtypes = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        notes.append(f"safetensors header: {stored / GIB:.2f} GiB of weights as stored ({dtypes} elements)")
    return ModelConfig(config, name=shown, origin=origin, source=source, notes=tuple(notes), safetensors_params=counts)


def _has_model_folder(model_type: str) -> bool:
    """Whether transformers ships `models/<model_type>/`: a quick yes that avoids importing it (and torch).

    A no is not final (some model types live in a folder of another name), so the caller then asks
    transformers' own CONFIG_MAPPING.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = model_type.replace("-", "_")
    return folder.isidentifier() and any((Path(root) / "models" / folder / "__init__.py").is_file() for root in spec.submodule_search_locations)


def _refuse_remote_code(config: dict, shown: str, stored_bytes: int | None) -> None:
    """A model_type transformers does not know needs the repo's own code, which is never run."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or _has_model_folder(model_type):
        return  # parse_config_text insists on a model_type; the inventory reports other shapes
    try:
        import transformers

        known = model_type in transformers.CONFIG_MAPPING
        version = transformers.__version__
    except Exception:  # noqa: BLE001 - without transformers the inventory will say so
        return
    if known:
        return
    where = " (its config's auto_map points at code in the repo)" if isinstance(config.get("auto_map"), dict) else ""
    size = f"; its weights alone take {stored_bytes / GIB:.1f} GiB in their stored dtypes (from the safetensors header)" if stored_bytes else ""
    raise ModelSourceError(
        f"{shown} has model_type {model_type!r}, which transformers {version} does not know{where}: it needs trust_remote_code, "
        f"and the estimator does not run remote code{size}; try a catalog model or a config.json of a supported architecture"
    )


# -------------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------------
def _short(err: BaseException) -> str:
    """An exception's class and status, never its text (which may quote URLs at length)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    return f"{type(err).__name__}{f' {status}' if status else ''}"


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _causes(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _unreachable(err: BaseException) -> str | None:
    """Why the Hub could not answer (no network, a timeout, a 5xx), or None for a real answer."""
    import httpx
    from huggingface_hub import errors as hf_errors

    for e in _causes(err):
        if isinstance(e, httpx.TimeoutException):
            return "timed out"
        if isinstance(e, hf_errors.OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set"
        if isinstance(e, (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)):
            return f"no connection: {type(e).__name__}"
        if isinstance(e, hf_errors.HfHubHTTPError) and not isinstance(
            e, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.RemoteEntryNotFoundError)
        ):
            status = _status(e)
            if status is not None and (status >= 500 or status in (408, 429)):
                return f"HTTP {status}"
            return None
        if isinstance(e, hf_errors.FileMetadataError):
            return "the endpoint did not answer like a Hub"
    return None


def _source_error(err: BaseException, repo: str, revision: str | None, token: str | None, ep: str, timeout: float, cache: str) -> ModelSourceError:
    """One line for each way the Hub can fail."""
    import httpx
    from huggingface_hub import errors as hf_errors

    if token is None:  # huggingface_hub sent the machine's own token (HF_TOKEN, a saved login), if any
        from huggingface_hub import get_token

        token = bool(get_token())

    shown = repo if revision is None else f"{repo}@{revision}"
    page = model_page(repo)
    alternatives = "or use a catalog name or a path to a config.json"
    for e in _causes(err):
        status = _status(e)
        if isinstance(e, hf_errors.GatedRepoError):
            if token:
                return ModelSourceError(
                    f"{repo} is gated and the account of the token given has not been granted access: "
                    f"accept its terms at {page} with that account (and wait for approval), then retry"
                )
            return ModelSourceError(
                f"{repo} is gated: accept its terms at {page}, then pass a token of that account with --token or HF_TOKEN"
            )
        if isinstance(e, hf_errors.RepositoryNotFoundError):
            private = " (or it is private and the token given cannot see it)" if token else " (or it is private: pass a token with --token or HF_TOKEN)"
            return ModelSourceError(f"no model {repo!r} on the Hub{private}; check the spelling, {alternatives}")
        if isinstance(e, hf_errors.RevisionNotFoundError):
            return ModelSourceError(
                f"{repo} has no revision {revision or 'main'!r}; use a branch, tag or commit listed at {page}/tree/main"
            )
        if isinstance(e, (hf_errors.RemoteEntryNotFoundError,)) or (
            isinstance(e, hf_errors.EntryNotFoundError) and not isinstance(e, hf_errors.LocalEntryNotFoundError)
        ):
            return ModelSourceError(
                f"{shown} has no config.json, so it is not a transformers model repo; give a repo that has one, {alternatives}"
            )
        if isinstance(e, httpx.TimeoutException):
            return ModelSourceError(
                f"the Hub did not answer within {timeout:g} s for {shown}; check the connection, raise HF_HUB_ETAG_TIMEOUT, "
                f"or set HF_HUB_OFFLINE=1 to use the local cache, {alternatives}"
            )
        if isinstance(e, hf_errors.OfflineModeIsEnabled):
            return ModelSourceError(
                f"HF_HUB_OFFLINE is set and {shown}'s config.json is not in the local Hugging Face cache ({cache}); "
                f"run once online, {alternatives}"
            )
        if isinstance(e, (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)):
            return ModelSourceError(
                f"cannot reach the Hub at {ep} ({type(e).__name__}) and {shown}'s config.json is not in the local cache; "
                f"check the connection or HF_ENDPOINT, {alternatives}"
            )
        if isinstance(e, hf_errors.HfHubHTTPError) and status is not None:
            if status == 401:
                return ModelSourceError(
                    "the Hub rejected the token (401 Unauthorized: invalid credentials); check --token or HF_TOKEN "
                    "(tokens are listed at https://huggingface.co/settings/tokens)"
                )
            if status == 403:
                return ModelSourceError(
                    f"the Hub refused access to {shown} (403 Forbidden); the token may lack read permission: "
                    "check it at https://huggingface.co/settings/tokens"
                )
            if status == 429:
                return ModelSourceError(f"the Hub is rate-limiting requests (429 Too Many Requests); wait a minute and retry, {alternatives}")
            if status >= 500:
                return ModelSourceError(
                    f"the Hub answered {status} (a server error) for {shown} and no copy is cached; try again later, {alternatives}"
                )
            return ModelSourceError(f"the Hub answered {status} for {shown}; check the repo id and revision, {alternatives}")
        if isinstance(e, hf_errors.FileMetadataError):
            return ModelSourceError(
                f"{ep} did not answer like the Hugging Face Hub for {shown} (no commit or ETag header); check HF_ENDPOINT, {alternatives}"
            )
        if isinstance(e, hf_errors.HFValidationError):
            return ModelSourceError(f"{repo!r} or revision {revision!r} is not valid for the Hub; use org/name[@revision]")
    return ModelSourceError(f"could not fetch the config.json of {shown} from {ep} ({_short(err)}); {alternatives}")

"""Configs from the Hugging Face Hub: `config.json` and the safetensors headers, never the weights.

`fetch_config(repo, revision=..., token=..., offline=...)` is the one entry point (`sources.resolve`
calls it for a repo id or URL). It goes through `huggingface_hub` 1.x, whose HTTP client is httpx.

One resolution has one deadline (`deadline_s`, default 20 s, `CANIRUN_HUB_DEADLINE_S`) and one
byte budget (MAX_RESOLUTION_BYTES) for everything it reads. `hf_hub_download` and
`get_safetensors_metadata` cannot keep either (each read gets the whole timeout again, so a server
that trickles a byte a second never times out; a 20,000-shard index means 20,000 requests; a
server that ignores `Range` sends the whole file), so every request here is a streamed GET of our
own, through huggingface_hub's `get_session()`, `hf_hub_url` and `build_hf_headers` (so tokens,
proxies and the client factory work as huggingface_hub's own):

- `config.json`: at most MAX_CONFIG_BYTES (4 MiB). It is stored in the Hugging Face cache
  (`HF_HUB_CACHE`, else `HF_HOME/hub`) in huggingface_hub's layout (blobs/, snapshots/, refs/),
  where `try_to_load_from_cache` and later offline runs find it.
- the weights' stored dtypes and exact element counts: each safetensors file's JSON header, read
  with range requests (the first 100,000 bytes, as huggingface_hub does, then the rest of a longer
  header), from `model.safetensors` or the shards of `model.safetensors.index.json`, at most
  MAX_SHARD_HEADERS of them (beyond, the dtypes come from the config). Failing to read them (the
  deadline, the budget, the network) is not an error; the result says so in its notes. A header
  that lies about sizes is (`prequantized.safetensors_header_counts`).
- At the deadline a watchdog shuts down the sockets of the requests in flight, so no phase of a
  request (headers, body, a redirect) outlives it; each request asks `Connection: close`, so each
  has a socket of its own that the watchdog knows. Each single read also gives up after
  `timeout_s` (`HF_HUB_ETAG_TIMEOUT`, else 10 s). Only a DNS lookup is outside the watchdog's reach.
- `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE`, `HF_HUB_ETAG_TIMEOUT` and `CANIRUN_HUB_DEADLINE_S` are
  read at call time (not at import, as huggingface_hub's own constants are), so a test can point
  them elsewhere.
- Offline (`offline=True`, which `resolve` derives from `HF_HUB_OFFLINE=1`) reads the cache only;
  online, a Hub that cannot be reached (no network, a timeout, the deadline, a 5xx) falls back to
  the cache too, and the notes say which copy was used.
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
import json
import os
import re
import socket
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from estimator.config_text import MAX_CONFIG_BYTES, ModelConfig, ModelSourceError, parse_config_text, shorten

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT_S = 10.0  # huggingface_hub's DEFAULT_ETAG_TIMEOUT: one read
DEFAULT_DEADLINE_S = 20.0  # one whole resolution: config.json, the index, the headers
CONFIG_NAME = "config.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_RESOLUTION_BYTES = 64 << 20  # everything one resolution reads
MAX_INDEX_BYTES = 32 << 20  # the largest real indexes (DeepSeek-V3, Kimi K2) are 10-20 MB
MAX_SHARD_HEADERS = 64
HEADER_PREFETCH_BYTES = 100_000  # huggingface_hub's first range: 97% of headers fit
SHARD_WORKERS = 8
GIB = 1024**3
MIB = 1024**2


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


def default_deadline_s() -> float:
    """Seconds one resolution may take in all: `CANIRUN_HUB_DEADLINE_S` if set, else 20."""
    try:
        value = float(os.environ.get("CANIRUN_HUB_DEADLINE_S", ""))
    except ValueError:
        return DEFAULT_DEADLINE_S
    return value if 0 < value < float("inf") else DEFAULT_DEADLINE_S


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
    deadline_s: float | None = None,
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
    deadline = float(deadline_s) if deadline_s is not None and deadline_s > 0 else default_deadline_s()
    if token is not False:
        token = token or None
    if isinstance(token, str):
        token_key = hashlib.sha256(token.encode()).hexdigest()
    else:
        token_key = "no-implicit-token" if token is False else None
    result = _fetch_cached(endpoint(), cache_dir(), repo.strip(), revision or None, token_key, bool(offline), timeout, deadline, _Secret(token))
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
def _fetch_cached(
    ep: str, cache: str, repo: str, revision: str | None, _token_key: str | None, offline: bool, timeout: float, deadline: float, secret: _Secret
) -> ModelConfig:
    return _fetch(ep, cache, repo, revision, secret.value, offline, timeout, deadline)


# -------------------------------------------------------------------------------------------------
# Fetching
# -------------------------------------------------------------------------------------------------
class DeadlineExceeded(Exception):
    """The resolution's deadline passed (a timeout for `_unreachable`, so a cached copy still serves)."""

    def __init__(self, deadline_s: float) -> None:
        super().__init__(f"deadline of {deadline_s:g} s passed")
        self.deadline_s = deadline_s


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit:,} bytes")
        self.limit = limit


class _Budget:
    """One resolution's deadline and byte budget, shared by its requests (the shard workers too).

    A `threading.Timer` fires at the deadline and shuts down every socket in flight: a blocked
    `recv` then returns at once, whichever phase of the request it was in, and the request fails
    as `DeadlineExceeded`. Sockets are learnt from httpcore's trace hook when it connects.
    """

    def __init__(self, deadline_s: float, timeout_s: float, max_bytes: int, token: str | bool | None) -> None:
        self.deadline_s = deadline_s
        self.timeout_s = timeout_s
        self.bytes_left = max_bytes
        self.token = token
        self.requests = 0
        self._end = time.monotonic() + deadline_s
        self._lock = threading.Lock()
        self._sockets: set = set()
        self.expired = False
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def remaining_s(self) -> float:
        left = self._end - time.monotonic()
        if self.expired or left <= 0:
            raise DeadlineExceeded(self.deadline_s)
        return left

    def _track(self, stream, mine: list) -> None:
        sock = stream.get_extra_info("socket") if stream is not None and hasattr(stream, "get_extra_info") else None
        if sock is None:
            return
        with self._lock:
            self._sockets.add(sock)
            mine.append(sock)
            expired = self.expired
        if expired:
            self._expire()

    def _charge(self, n: int) -> None:
        with self._lock:
            self.bytes_left -= n
            if self.bytes_left < 0:
                raise _TooLarge(MAX_RESOLUTION_BYTES)

    def get(self, url: str, max_bytes: int, byte_range: tuple[int, int] | None = None) -> tuple[dict, bytes]:
        """GET `url`: (the response's headers, its body). Raises huggingface_hub's HTTP errors,
        `DeadlineExceeded`, or `_TooLarge` past `max_bytes` (a range request instead keeps what fits:
        a server that ignores `Range` sends the whole file, and the start of it is what was asked)."""
        import httpx
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        per_read = min(self.timeout_s, self.remaining_s())
        headers = build_hf_headers(token=self.token)
        headers["Accept-Encoding"] = "identity"  # bytes counted are bytes sent, no decompression bombs
        headers["Connection"] = "close"  # a socket per request, known to the watchdog from its connect
        if byte_range is not None:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        mine: list = []

        def trace(event: str, info: dict) -> None:
            if event.endswith(("connect_tcp.complete", "start_tls.complete")):
                self._track(info.get("return_value"), mine)

        with self._lock:
            self.requests += 1
        try:
            with get_session().stream(
                "GET", url, headers=headers, timeout=httpx.Timeout(per_read), follow_redirects=True, extensions={"trace": trace}
            ) as response:
                self._track(response.extensions.get("network_stream"), mine)
                if response.status_code >= 400:
                    body = self._read(response, 65_536, keep_start=True)
                    hf_raise_for_status(httpx.Response(response.status_code, headers=response.headers, content=body, request=response.request))
                declared = response.headers.get("Content-Length", "")
                if byte_range is None and declared.isdigit() and int(declared) > max_bytes:
                    raise _TooLarge(max_bytes)
                return dict(response.headers), self._read(response, max_bytes, keep_start=byte_range is not None)
        except (DeadlineExceeded, _TooLarge):
            raise
        except Exception:
            if self.expired or time.monotonic() >= self._end:
                raise DeadlineExceeded(self.deadline_s) from None
            raise
        finally:
            with self._lock:
                self._sockets.difference_update(mine)

    def _read(self, response, limit: int, keep_start: bool) -> bytes:
        chunks, total = [], 0
        for chunk in response.iter_bytes():
            if self.expired or time.monotonic() >= self._end:
                raise DeadlineExceeded(self.deadline_s)
            if total + len(chunk) > limit:
                if not keep_start:
                    raise _TooLarge(limit)
                chunk = chunk[: limit - total]
            self._charge(len(chunk))
            chunks.append(chunk)
            total += len(chunk)
            if total >= limit:
                break
        return b"".join(chunks)


def _fetch(ep: str, cache: str, repo: str, revision: str | None, token: str | bool | None, offline: bool, timeout: float, deadline: float) -> ModelConfig:
    import huggingface_hub as hf

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
    budget = _Budget(deadline, timeout, MAX_RESOLUTION_BYTES, token)
    try:
        try:
            headers, data = budget.get(url, MAX_CONFIG_BYTES)
            commit, etag = _commit_and_etag(headers)
        except _TooLarge:
            raise ModelSourceError(
                f"the config.json of {shown} is more than {MAX_CONFIG_BYTES // MIB} MiB ({MAX_CONFIG_BYTES:,} bytes), more than any "
                "transformers config, so it was not read; give a repo with a real config.json, or use a catalog name or a path to a config.json"
            ) from None
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

        config = _parse(data, shown)
        _store(cache, repo, rev, commit, etag, data)
        counts, note = _safetensors_counts(budget, ep, repo, commit, shown, config)
    finally:
        budget.close()
    if note:
        notes.append(note)
    return _finish(config, shown, "hub", source, notes, counts)


_ETAG = re.compile(r"[A-Za-z0-9_\-]{1,128}")


def _commit_and_etag(headers: dict) -> tuple[str, str]:
    """The commit and ETag huggingface_hub's cache is keyed on; both become path parts, so only
    a 40-hex commit and a plain ETag are taken (a server could send `../..`)."""
    from huggingface_hub import errors as hf_errors

    lower = {k.lower(): v for k, v in headers.items()}
    commit = lower.get("x-repo-commit", "")
    etag = (lower.get("x-linked-etag") or lower.get("etag") or "").removeprefix("W/").strip('"')
    if not _COMMIT.fullmatch(commit) or not _ETAG.fullmatch(etag):
        raise hf_errors.FileMetadataError("no commit or ETag header")
    return commit, etag


def _parse(data: bytes, shown: str) -> dict:
    hint = "the repo's config.json is broken; use a catalog name or a path to a config.json"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelSourceError(f"the config.json of {shown} is not UTF-8 text; {hint}") from None
    return parse_config_text(text, f"the config.json of {shown}", hint)


def _store(cache: str, repo: str, rev: str, commit: str, etag: str, data: bytes) -> None:
    """config.json into the Hugging Face cache as hf_hub_download lays it out: blobs/<etag>,
    snapshots/<commit>/config.json pointing at it, refs/<revision> holding the commit. Best effort:
    a cache that cannot be written only means a later offline run will not find it."""
    from huggingface_hub import file_download as fd

    try:
        storage = os.path.join(cache, fd.repo_folder_name(repo_id=repo, repo_type="model"))
        blob = os.path.join(storage, "blobs", etag)
        pointer = os.path.join(storage, "snapshots", commit, CONFIG_NAME)
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        new_blob = not os.path.exists(blob)
        if new_blob:
            handle, tmp = tempfile.mkstemp(dir=os.path.dirname(blob), prefix=".incomplete-")
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(tmp, blob)
        if not os.path.exists(pointer):
            fd._create_symlink(blob, pointer, new_blob=new_blob)
        fd._cache_commit_hash_for_specific_revision(storage, rev, commit)
    except Exception:  # noqa: BLE001 - the cache is an optimisation
        return


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


def _safetensors_counts(budget: _Budget, ep: str, repo: str, commit: str, shown: str, config: dict) -> tuple[dict[str, int] | None, str | None]:
    """Stored element counts per dtype from the safetensors headers; a note instead when unavailable.

    A header that lies about sizes is a ModelSourceError; anything else that stops the reading
    (the deadline, the budget, the network, a missing file) is a note.
    """
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_url

    from estimator import prequantized

    def url(name: str) -> str:
        return hf_hub_url(repo, name, revision=commit, endpoint=ep)

    dtype = config.get("torch_dtype") or config.get("dtype")
    from_config = f"the stored dtypes come from the config ({dtype})" if isinstance(dtype, str) else "the stored dtypes come from the config"
    try:
        try:
            return _header_counts(budget, url(SAFETENSORS_SINGLE)), None
        except hf_errors.EntryNotFoundError:
            pass
        try:
            _, raw = budget.get(url(SAFETENSORS_INDEX), min(MAX_INDEX_BYTES, max(budget.bytes_left, 0)))
        except hf_errors.EntryNotFoundError:
            return None, "the repo has no safetensors weights, so their stored dtypes are not known (sized from config.json alone)"
        except _TooLarge:
            return None, f"the safetensors index is more than {MAX_INDEX_BYTES // MIB} MiB, so it was not read and {from_config}"
        shards = _shards(raw)
        if shards is None:
            return None, f"the safetensors index is not a valid weight map, so {from_config}"
        if len(shards) > MAX_SHARD_HEADERS:
            return None, f"the safetensors index lists {len(shards):,} shards, more than the {MAX_SHARD_HEADERS} headers read per model, so {from_config}"
        with ThreadPoolExecutor(max_workers=min(SHARD_WORKERS, len(shards)), thread_name_prefix="safetensors-header") as pool:
            parts = list(pool.map(lambda name: _header_counts(budget, url(name), name), shards))
        counts: dict[str, int] = {}
        for part in parts:
            for key, value in part.items():
                counts[key] = counts.get(key, 0) + value
        prequantized.safetensors_bytes(counts)  # the sums stay within bounds too
    except prequantized.SafetensorsHeaderError as err:
        raise ModelSourceError(
            f"the safetensors header of {shown} is malformed: {err}; the repo's weights are broken or not safetensors, "
            "so its size cannot be trusted; tell the repo's owner, or use a catalog name or a path to its config.json"
        ) from None
    except DeadlineExceeded:
        return None, f"the safetensors headers were not read within the {budget.deadline_s:g} s deadline, so {from_config}"
    except _TooLarge:
        return None, f"the safetensors headers are more than the {MAX_RESOLUTION_BYTES // MIB} MiB read per model, so {from_config}"
    except Exception as err:  # noqa: BLE001 - optional information
        return None, f"the safetensors header could not be read ({_short(err)}), so the stored dtypes are not known"
    if not counts:
        return None, "the safetensors header lists no tensors"
    return counts, None


_SHARD_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*\.safetensors")


def _shards(raw: bytes) -> list[str] | None:
    """The shard files an index's weight_map names, or None when it is not one. Names are files
    of this repo: no `..`, no absolute paths (they become URL paths on the Hub)."""
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return None
    names = set()
    for name in weight_map.values():
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or any(p in ("", ".", "..") for p in name.split("/")):
            return None
        names.add(name)
    return sorted(names)


def _header_counts(budget: _Budget, url: str, name: str = SAFETENSORS_SINGLE) -> dict[str, int]:
    """One file's header: its first 100,000 bytes, then the rest if the header is longer."""
    from estimator import prequantized

    _, first = budget.get(url, HEADER_PREFETCH_BYTES + 1, byte_range=(0, HEADER_PREFETCH_BYTES))
    if len(first) < 8:
        raise prequantized.SafetensorsHeaderError(f"{name} is shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", first[:8])
    if length > prequantized.MAX_HEADER_BYTES:
        raise prequantized.SafetensorsHeaderError(f"{name} says its header is {length:,} bytes long (at most {prequantized.MAX_HEADER_BYTES:,})")
    raw = first[8 : 8 + length]
    if len(raw) < length:
        _, raw = budget.get(url, length, byte_range=(8, 8 + length - 1))
        if len(raw) < length:
            raise prequantized.SafetensorsHeaderError(f"{name} ends inside its header")
    return prequantized.safetensors_header_counts(raw)


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
        if isinstance(e, DeadlineExceeded):
            return f"no answer within the {e.deadline_s:g} s deadline"
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
        if isinstance(e, DeadlineExceeded):
            return ModelSourceError(
                f"the Hub did not answer for {shown} within {e.deadline_s:g} s (the deadline for reading one model's config); "
                f"check the connection, raise CANIRUN_HUB_DEADLINE_S, or set HF_HUB_OFFLINE=1 to use the local cache, {alternatives}"
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

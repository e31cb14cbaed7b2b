"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for tests that must not touch the network.

It answers what huggingface_hub 1.x asks of the Hub, with the headers it reads
(`huggingface_hub/file_download.py: get_hf_file_metadata`, `utils/_http.py: hf_raise_for_status`):

- `HEAD|GET /{repo}/resolve/{revision}/{file}`: 200 with `X-Repo-Commit`, `ETag`, `Content-Length`
  (a `Range: bytes=a-b` GET answers 206 with that slice: how `get_safetensors_metadata` reads a
  safetensors header), or an error with the `X-Error-Code` / `X-Error-Message` the client maps to
  its exception classes (`RepoNotFound`, `GatedRepo`, `RevisionNotFound`, `EntryNotFound`).
- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{revision}`: a minimal model info.

Repos (see `REPOS`): a good config; one with a `model.safetensors`; one whose model_type needs
remote code (with weights); a missing repo; a gated one; a revision that does not exist; a repo
without config.json; three malformed configs; a slow answer; a 500; one that answers for any
revision; and the faults of issue 14 (`Fault`): a config.json that trickles its body or its
headers, one padded to 100 MB, one without end, sharded weights (3, 64, 65 and 20,000 shards), an
80 MB index, weights that trickle or ignore `Range`, and safetensors headers that lie about sizes
(`bad_header_repos`). Any request carrying the token
`INVALID_TOKEN` gets the 401 the Hub gives for bad credentials. Every request is recorded in
`FakeHub.requests` (method, path, the Authorization header) so tests can see what was sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

VALID_TOKEN = "hf_fake_valid_token_0123456789"
INVALID_TOKEN = "hf_fake_revoked_token_9876543210"
SLOW_SECONDS = 3.0
TRICKLE_SECONDS = 0.05  # per byte: a 400-byte config.json takes 20 s, each byte well inside any read timeout
SMOL: dict = {}  # filled from the catalog by default_repos()

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def safetensors_file(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A safetensors file's first bytes: the 8-byte little-endian header size and the JSON header.

    The data section is left out (nothing reads past the header); Content-Length still says the
    full size, as the Hub's would.
    """
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "F8_E4M3": 1, "U8": 1, "I8": 1}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw


def llama_tensors(config: dict) -> dict[str, tuple[str, list[int]]]:
    """The tensors a Llama-architecture checkpoint of `config` stores (tied lm_head stored once)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    out: dict[str, tuple[str, list[int]]] = {"model.embed_tokens.weight": ("BF16", [v, h])}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out.update(
            {
                p + "self_attn.q_proj.weight": ("BF16", [h, h]),
                p + "self_attn.k_proj.weight": ("BF16", [kv, h]),
                p + "self_attn.v_proj.weight": ("BF16", [kv, h]),
                p + "self_attn.o_proj.weight": ("BF16", [h, h]),
                p + "mlp.gate_proj.weight": ("BF16", [i, h]),
                p + "mlp.up_proj.weight": ("BF16", [i, h]),
                p + "mlp.down_proj.weight": ("BF16", [h, i]),
                p + "input_layernorm.weight": ("BF16", [h]),
                p + "post_attention_layernorm.weight": ("BF16", [h]),
            }
        )
    out["model.norm.weight"] = ("BF16", [h])
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = ("BF16", [v, h])
    return out


def llama_params_by_dtype(config: dict = TINY_LLAMA) -> dict[str, int]:
    total = 0
    for _, shape in llama_tensors(config).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return {"BF16": total}


@dataclass
class Fault:
    """How one file of a repo misbehaves (the faults a Hub resolution must survive within its budget)."""

    trickle_s: float = 0.0  # a pause before each byte of the body
    trickle_headers_s: float = 0.0  # a pause before each byte of the status line and headers
    pad_to: int = 0  # the body is the file padded with spaces to this many bytes (a 100 MB config.json that is valid JSON)
    endless: bool = False  # after the file, spaces without end and without a Content-Length
    ignore_range: bool = False  # a Range request gets the whole file (200), with `pad_to` bytes of zeros after it
    filler_pause_s: float = 0.0  # a pause before each 64 KiB of padding (1 GiB then takes minutes, but memory stays flat)


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    gated: bool = False
    error: int | None = None  # every request to the repo answers this status
    slow: float = 0.0  # seconds to wait before answering the HEAD of config.json
    revisions: tuple[str, ...] = ("main",)
    any_revision: bool = False  # answers for every revision asked (a Hub that trusts the client's revision)
    faults: dict[str, Fault] = field(default_factory=dict)

    @property
    def commit(self) -> str:
        return hashlib.sha1(repr(sorted(self.files)).encode() + b"commit").hexdigest()


def _config(data) -> bytes:
    return json.dumps(data, indent=2).encode()


def raw_safetensors(header_json: str) -> bytes:
    """A safetensors file's first bytes from header text as given (for headers no honest writer makes)."""
    raw = header_json.encode()
    return struct.pack("<Q", len(raw)) + raw


def sharded_files(config: dict, shards: int, *, bad_header: str | None = None) -> dict[str, bytes]:
    """config.json, a `model.safetensors.index.json` over `shards` files and those files' headers.

    The model's tensors go to the first shards round-robin; shards beyond the tensors hold one
    small bias each, so the stored total grows by `shards - len(tensors)` BF16 elements at most.
    `bad_header` replaces the last shard's header text.
    """
    tensors = llama_tensors(config)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    per_shard: list[dict] = [{} for _ in range(shards)]
    for k, (name, spec) in enumerate(tensors.items()):
        per_shard[k % shards][name] = spec
    for k in range(len(tensors), shards):
        per_shard[k][f"extra.{k}.bias"] = ("BF16", [1])
    weight_map = {tensor: names[k] for k in range(shards) for tensor in per_shard[k]}
    files = {"config.json": _config(config), "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": weight_map}).encode()}
    for k, name in enumerate(names):
        files[name] = safetensors_file(per_shard[k])
    if bad_header is not None:
        files[names[-1]] = raw_safetensors(bad_header)
    return files


def bad_header_repos() -> dict[str, Repo]:
    """One repo per way a safetensors header can lie about sizes (issue 14): each must be one clear line."""
    good = '"model.embed_tokens.weight":{"dtype":"BF16","shape":[256,64],"data_offsets":[0,32768]}'
    cases = {
        "huge-shape": '{"w":{"dtype":"BF16","shape":[%s],"data_offsets":[0,2]}}' % ("1" + "0" * 200),
        "huge-shapes": '{"w":{"dtype":"BF16","shape":[%s],"data_offsets":[0,2]}}' % ",".join(["4294967296"] * 40),
        "float-shape": '{"w":{"dtype":"BF16","shape":[1e200],"data_offsets":[0,2]}}',
        "inf-shape": '{"w":{"dtype":"BF16","shape":[Infinity],"data_offsets":[0,2]}}',
        "nan-shape": '{"w":{"dtype":"BF16","shape":[NaN],"data_offsets":[0,2]}}',
        "negative-shape": '{"w":{"dtype":"BF16","shape":[-1000000000, 64],"data_offsets":[0,2]}}',
        "negative-offsets": '{"w":{"dtype":"BF16","shape":[2],"data_offsets":[-4,0]}}',
        "reversed-offsets": '{"w":{"dtype":"BF16","shape":[2],"data_offsets":[8,4]}}',
        "huge-offsets": '{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,%s]}}' % ("9" * 300),
        "offsets-disagree": '{"w":{"dtype":"BF16","shape":[1000],"data_offsets":[0,2]}}',
        "shape-not-list": '{"w":{"dtype":"BF16","shape":"64","data_offsets":[0,128]}}',
        "bool-shape": '{"w":{"dtype":"BF16","shape":[true],"data_offsets":[0,2]}}',
        "no-dtype": '{"w":{"shape":[2],"data_offsets":[0,4]}}',
        "not-object": '[1, 2, 3]',
        "not-json": '{"w": {',
        "entry-not-object": '{"w": 7}',
    }
    repos = {}
    for name, text in cases.items():
        text = text if not text.startswith("{") else "{" + good + "," + text[1:]
        repos[f"acme/header-{name}"] = Repo({"config.json": _config(TINY_LLAMA), "model.safetensors": raw_safetensors(text)})
    # A header that says it is longer than any real one (hf's SAFETENSORS_MAX_HEADER_LENGTH is 25 MB).
    repos["acme/header-length-huge"] = Repo({"config.json": _config(TINY_LLAMA), "model.safetensors": struct.pack("<Q", 1 << 60) + b"{}"})
    repos["acme/header-sharded-huge-shape"] = Repo(sharded_files(TINY_LLAMA, 3, bad_header=cases["huge-shape"]))
    return repos


def default_repos() -> dict[str, Repo]:
    from estimator.catalog import find_entry

    global SMOL
    SMOL = find_entry("HuggingFaceTB/SmolLM2-135M").config()
    remote_code = dict(TINY_LLAMA, model_type="acme_secret", architectures=["AcmeForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    big = {"model.embed_tokens.weight": ("BF16", [1 << 20, 1024])}  # 1 GiB of stored bf16
    return {
        "acme/good": Repo({"config.json": _config(TINY_LLAMA)}),
        "acme/with-weights": Repo({"config.json": _config(TINY_LLAMA), "model.safetensors": safetensors_file(llama_tensors(TINY_LLAMA))}),
        # the catalog's own SmolLM2-135M config: the CLI finds its prebuilt inventory, so no torch import
        "acme/smol": Repo({"config.json": _config(SMOL), "model.safetensors": safetensors_file(llama_tensors(SMOL))}),
        "acme/remote-code": Repo({"config.json": _config(remote_code), "model.safetensors": safetensors_file(big)}),
        "acme/gated": Repo({"config.json": _config(TINY_LLAMA)}, gated=True),
        "acme/versioned": Repo({"config.json": _config(TINY_LLAMA)}, revisions=("main", "v1.0")),
        "acme/no-config": Repo({"README.md": b"# weights only\n"}),
        "acme/not-json": Repo({"config.json": b"{ this is not json"}),
        "acme/json-list": Repo({"config.json": b"[1, 2, 3]"}),
        "acme/no-model-type": Repo({"config.json": _config({"hidden_size": 64})}),
        "acme/slow": Repo({"config.json": _config(TINY_LLAMA)}, slow=SLOW_SECONDS),
        "acme/broken": Repo({"config.json": _config(TINY_LLAMA)}, error=500),
        "acme/any-revision": Repo({"config.json": _config(TINY_LLAMA)}, any_revision=True),
        # Faults a resolution must survive within one deadline and one byte budget (issue 14).
        "acme/trickle": Repo({"config.json": _config(TINY_LLAMA)}, faults={"config.json": Fault(trickle_s=TRICKLE_SECONDS)}),
        "acme/trickle-headers": Repo({"config.json": _config(TINY_LLAMA)}, faults={"config.json": Fault(trickle_headers_s=TRICKLE_SECONDS)}),
        "acme/huge-config": Repo({"config.json": _config(TINY_LLAMA)}, faults={"config.json": Fault(pad_to=100_000_000)}),
        "acme/endless-config": Repo({"config.json": _config(TINY_LLAMA)}, faults={"config.json": Fault(endless=True)}),
        "acme/sharded": Repo(sharded_files(TINY_LLAMA, 3)),
        "acme/sharded-64": Repo(sharded_files(TINY_LLAMA, 64)),
        "acme/sharded-65": Repo(sharded_files(TINY_LLAMA, 65)),
        "acme/sharded-20000": Repo(sharded_files(TINY_LLAMA, 20_000)),
        "acme/huge-index": Repo(
            {"config.json": _config(TINY_LLAMA), "model.safetensors.index.json": b'{"weight_map": {}}'},
            faults={"model.safetensors.index.json": Fault(pad_to=80_000_000)},
        ),
        "acme/trickle-weights": Repo(
            {"config.json": _config(TINY_LLAMA), "model.safetensors": safetensors_file(llama_tensors(TINY_LLAMA))},
            faults={"model.safetensors": Fault(trickle_s=TRICKLE_SECONDS)},
        ),
        "acme/ignores-range": Repo(
            {"config.json": _config(TINY_LLAMA), "model.safetensors": safetensors_file(llama_tensors(TINY_LLAMA))},
            faults={"model.safetensors": Fault(ignore_range=True, pad_to=1 << 30, filler_pause_s=0.01)},
        ),
        **bad_header_repos(),
    }


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: "FakeHub"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(head=False)

    # -- helpers ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False, length: int | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _faulty(self, fault: Fault, data: bytes, headers: dict[str, str], head: bool) -> None:
        """Answer 200 with `data`, misbehaving as `fault` says, until done or the client leaves."""
        length = None if fault.endless else max(len(data), fault.pad_to)
        lines = ["HTTP/1.1 200 OK"] + [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {length}" if length is not None else "Connection: close")
        preamble = ("\r\n".join(lines) + "\r\n\r\n").encode()

        def body():
            yield data
            if fault.endless:
                while True:
                    yield b" " * 65_536
            left = (length or 0) - len(data)
            filler = b"\0" if fault.ignore_range else b" "
            step = 1 << 16 if fault.filler_pause_s else 1 << 20
            while left > 0:
                if fault.filler_pause_s:
                    time.sleep(fault.filler_pause_s)
                n = min(left, step)
                yield filler * n
                left -= n

        try:
            if fault.trickle_headers_s:
                for i in range(len(preamble)):
                    time.sleep(fault.trickle_headers_s)
                    self.wfile.write(preamble[i : i + 1])
                    self.wfile.flush()
            else:
                self.wfile.write(preamble)
            if head:
                return
            for chunk in body():
                if fault.trickle_s:
                    for i in range(len(chunk)):
                        time.sleep(fault.trickle_s)
                        self.wfile.write(chunk[i : i + 1])
                        self.wfile.flush()
                else:
                    self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            self.close_connection = True

    def _error(self, status: int, code: str | None, message: str, head: bool, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers, head)

    def _answer(self, head: bool) -> None:
        raw = self.path.split("?", 1)[0]
        path = unquote(raw)
        auth = self.headers.get("Authorization")
        self.hub.requests.append((self.command, path, auth))
        if auth == f"Bearer {INVALID_TOKEN}":
            return self._error(401, None, "Invalid credentials in Authorization header", head)

        # Matched before unquoting: huggingface_hub sends a revision's slashes as %2F (refs/pr/1).
        match = _API.match(raw)
        if match:
            repo = self.hub.repos.get(match["repo"])
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            body = json.dumps(
                {"id": match["repo"], "modelId": match["repo"], "sha": repo.commit, "gated": "auto" if repo.gated else False, "private": False,
                 "siblings": [{"rfilename": name} for name in repo.files]}
            ).encode()
            return self._send(200, body, {"Content-Type": "application/json"}, head)

        match = _RESOLVE.match(raw)
        if not match:
            return self._error(404, None, "Not found", head)
        match = {key: unquote(value) for key, value in match.groupdict().items()}
        repo = self.hub.repos.get(match["repo"])
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", head)
        if repo.error is not None:
            return self._error(repo.error, None, "Internal Error - We're working hard to fix this as soon as possible!", head)
        if repo.gated:
            if auth is None:
                return self._error(401, "GatedRepo", f"Access to model {match['repo']} is restricted. You must have access to it and be authenticated to access it. Please log in.", head)
            return self._error(
                403, "GatedRepo",
                f"Access to model {match['repo']} is restricted and you are not in the authorized list. Visit https://huggingface.co/{match['repo']} to ask for access.",
                head,
            )
        rev = match["rev"]
        if rev not in repo.revisions and rev != repo.commit and not repo.any_revision:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        data = repo.files.get(match["file"])
        if data is None:
            return self._error(404, "EntryNotFound", f"{match['file']} does not exist on \"{rev}\"", head, commit=repo.commit)
        if repo.slow and match["file"] == "config.json":
            time.sleep(repo.slow)
        headers = {
            "X-Repo-Commit": repo.commit,
            "ETag": '"' + hashlib.sha1(data).hexdigest() + '"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        fault = repo.faults.get(match["file"])
        if fault is not None:
            return self._faulty(fault, data, headers, head)
        byte_range = self.headers.get("Range") or self.headers.get("range")
        if byte_range and not head:
            m = re.match(r"bytes=(\d+)-(\d*)", byte_range)
            start = int(m[1]) if m else 0
            end = int(m[2]) if m and m[2] else len(data) - 1
            chunk = data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
            return self._send(206, chunk, headers)
        return self._send(200, data, headers, head)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the shard workers connect at once


class FakeHub:
    """`with FakeHub() as hub:` serves on `hub.url` until the block ends."""

    def __init__(self, repos: dict[str, Repo] | None = None) -> None:
        self.repos = repos if repos is not None else default_repos()
        self.requests: list[tuple[str, str, str | None]] = []
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# The Hub settings a test must not inherit from the machine it runs on.
APP_HF_ENV = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT")


def offline_hub_env(monkeypatch, tmp_path) -> None:
    """No Hub settings from the machine, offline, and an empty Hugging Face home of the test's own."""
    for name in APP_HF_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

"""Loading configs from the Hub, against a fake Hub on 127.0.0.1 (tests/fake_hub.py): no network.

Each way the Hub can fail must become one `ModelSourceError` line saying what to do, in-process
and through the CLI (exit status 2, one line on stderr); a good repo must load, with its
safetensors parameter counts when it has weights; offline runs must use the cache and say so; and
the token must never show up in any output.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from estimator import hub as hub_module
from estimator.sources import ModelSourceError, resolve
import fake_hub as fake_hub_module
from fake_hub import INVALID_TOKEN, TINY_LLAMA, VALID_TOKEN, FakeHub, llama_params_by_dtype

ROOT = Path(__file__).resolve().parents[1]
_HF_ENV = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT")


def _isolate(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    for name in _HF_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(home))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # in case the session started offline
    hub_module.clear_cache()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    with FakeHub() as server:
        _isolate(monkeypatch, server.url, tmp_path / "hf")
        yield server
    hub_module.clear_cache()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


# -------------------------------------------------------------------------------------------------
# A good repo
# -------------------------------------------------------------------------------------------------
def test_good_repo_loads_its_config(fake_hub):
    got = hub_module.fetch_config("acme/good")
    assert got.config == TINY_LLAMA
    assert got.origin == "hub" and got.name == "acme/good"
    assert got.source == f"{fake_hub.url}/acme/good"
    assert got.safetensors_params is None
    assert any("no safetensors weights" in note for note in got.notes)


def test_safetensors_header_gives_stored_counts_per_dtype(fake_hub):
    got = hub_module.fetch_config("acme/with-weights")
    assert got.safetensors_params == llama_params_by_dtype()
    assert any("safetensors header" in note and "GiB" in note for note in got.notes)
    ranged = [path for method, path, _ in fake_hub.requests if method == "GET" and path.endswith("model.safetensors")]
    assert ranged, "the header is read with a range request, not by downloading the weights"


def test_revision_and_url_forms(fake_hub):
    assert resolve("acme/versioned@v1.0").name == "acme/versioned@v1.0"
    got = resolve("https://huggingface.co/acme/versioned/tree/v1.0")
    assert got.name == "acme/versioned@v1.0" and got.source.endswith("/acme/versioned/tree/v1.0")
    assert any("/resolve/v1.0/config.json" in path for _, path, _ in fake_hub.requests)


def test_results_are_cached_in_process_and_handed_out_as_copies(fake_hub):
    first = hub_module.fetch_config("acme/good")
    seen = len(fake_hub.requests)
    first.config["hidden_size"] = 1
    second = hub_module.fetch_config("acme/good")
    assert len(fake_hub.requests) == seen, "the second call is served from the lru cache"
    assert second.config["hidden_size"] == TINY_LLAMA["hidden_size"]


def test_config_is_stored_in_the_hf_cache(fake_hub, tmp_path):
    hub_module.fetch_config("acme/good")
    cached = list((tmp_path / "hf" / "hub").glob("models--acme--good/snapshots/*/config.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == TINY_LLAMA


# -------------------------------------------------------------------------------------------------
# Offline and unreachable
# -------------------------------------------------------------------------------------------------
def test_offline_uses_the_cache_after_one_online_fetch_and_says_so(fake_hub, monkeypatch):
    hub_module.fetch_config("acme/good")
    hub_module.clear_cache()
    seen = len(fake_hub.requests)
    got = hub_module.fetch_config("acme/good", offline=True)
    assert len(fake_hub.requests) == seen, "offline must not touch the network"
    assert got.config == TINY_LLAMA and got.origin == "hub-cache"
    assert any(note.startswith("offline:") and "cache" in note for note in got.notes)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what resolve() reads
    hub_module.clear_cache()
    assert resolve("acme/good").origin == "hub-cache"
    assert len(fake_hub.requests) == seen


def test_unreachable_hub_falls_back_to_the_cache(fake_hub, monkeypatch):
    hub_module.fetch_config("acme/good")
    hub_module.clear_cache()
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    got = hub_module.fetch_config("acme/good")
    assert got.origin == "hub-cache" and got.config == TINY_LLAMA
    assert any("could not be reached" in note for note in got.notes)


# -------------------------------------------------------------------------------------------------
# Every failure: one line, what happened and what to do
# -------------------------------------------------------------------------------------------------
ERRORS = [
    # id, repo, fetch kwargs, words the message must hold
    ("repo-not-found", "acme/missing", {}, ["no model 'acme/missing'", "check the spelling"]),
    ("gated-no-token", "acme/gated", {}, ["gated", "https://huggingface.co/acme/gated", "--token"]),
    ("gated-not-accepted", "acme/gated", {"token": VALID_TOKEN}, ["gated", "not been granted access", "https://huggingface.co/acme/gated"]),
    ("invalid-token", "acme/good", {"token": INVALID_TOKEN}, ["rejected the token", "401", "HF_TOKEN"]),
    ("revision-not-found", "acme/versioned", {"revision": "nope"}, ["no revision 'nope'", "branch, tag or commit"]),
    ("no-config-json", "acme/no-config", {}, ["has no config.json", "catalog name"]),
    ("config-not-json", "acme/not-json", {}, ["not valid JSON", "config.json is broken"]),
    ("config-not-object", "acme/json-list", {}, ["JSON object", "not a list"]),
    ("config-no-model-type", "acme/no-model-type", {}, ["no model_type"]),
    ("timeout", "acme/slow", {"timeout_s": 0.5}, ["did not answer within 0.5 s", "HF_HUB_OFFLINE"]),
    ("server-error", "acme/broken", {}, ["answered 500", "try again later"]),
    ("remote-code", "acme/remote-code", {}, ["does not run remote code", "trust_remote_code", "2.0 GiB", "acme_secret"]),
    ("offline-not-cached", "acme/good", {"offline": True}, ["offline", "not in the local Hugging Face cache", "catalog name", "config.json"]),
]


@pytest.mark.parametrize("case,repo,kwargs,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_each_failure_is_one_clear_line(fake_hub, case, repo, kwargs, words):
    with pytest.raises(ModelSourceError) as info:
        hub_module.fetch_config(repo, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and message.strip() == message
    for word in words:
        assert word in message, (word, message)
    assert VALID_TOKEN not in message and INVALID_TOKEN not in message


def test_no_network_and_nothing_cached(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    with pytest.raises(ModelSourceError, match="cannot reach the Hub .* not in the local cache"):
        hub_module.fetch_config("acme/good")


def test_invalid_repo_id_is_refused_before_any_request(fake_hub):
    with pytest.raises(ModelSourceError, match="not a valid Hub repo id"):
        hub_module.fetch_config("acme/bad--name")
    assert fake_hub.requests == []


def test_token_is_sent_to_the_hub_and_never_shown(fake_hub, caplog):
    caplog.set_level(logging.DEBUG)
    got = hub_module.fetch_config("acme/with-weights", token=VALID_TOKEN)
    assert ("GET", "/acme/with-weights/resolve/main/config.json", f"Bearer {VALID_TOKEN}") in fake_hub.requests
    shown = repr(got) + " ".join(got.notes) + caplog.text + repr(hub_module._fetch_cached.cache_info())
    assert VALID_TOKEN not in shown


# -------------------------------------------------------------------------------------------------
# The command line, in a subprocess with the environment the fixture sets up
# -------------------------------------------------------------------------------------------------
CLI_ERRORS = [
    # id, argv, environment additions, words stderr must hold
    ("repo-not-found", ["acme/missing"], {}, ["no model 'acme/missing'"]),
    ("gated-no-token", ["acme/gated"], {}, ["https://huggingface.co/acme/gated"]),
    ("gated-not-accepted", ["acme/gated", "--token", VALID_TOKEN], {}, ["not been granted access"]),
    ("gated-not-accepted-env-token", ["acme/gated"], {"HF_TOKEN": VALID_TOKEN}, ["not been granted access"]),  # HF_TOKEN counts
    ("invalid-token", ["acme/good", "--token", INVALID_TOKEN], {}, ["rejected the token"]),
    ("revision-not-found", ["acme/versioned", "--revision", "nope", "--token", VALID_TOKEN], {}, ["no revision 'nope'"]),
    ("no-config-json", ["acme/no-config"], {}, ["has no config.json"]),
    ("config-not-json", ["acme/not-json"], {}, ["not valid JSON"]),
    ("config-not-object", ["acme/json-list"], {}, ["JSON object"]),
    ("config-no-model-type", ["acme/no-model-type"], {}, ["no model_type"]),
    ("timeout", ["acme/slow", "--token", VALID_TOKEN], {"HF_HUB_ETAG_TIMEOUT": "1"}, ["did not answer within 1 s"]),
    ("server-error", ["acme/broken"], {}, ["answered 500"]),
    ("remote-code", ["acme/remote-code"], {}, ["does not run remote code", "2.0 GiB"]),
    ("offline-not-cached", ["acme/never-fetched"], {"HF_HUB_OFFLINE": "1"}, ["not in the local Hugging Face cache"]),
]


def _cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "estimator", *argv, "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every CLI case at once (each is its own process), against one fake Hub and one HF cache."""
    home = tmp_path_factory.mktemp("hf-cli")
    with FakeHub() as server:
        base = {k: v for k, v in os.environ.items() if k not in _HF_ENV}
        base.update(HF_ENDPOINT=server.url, HF_HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
        jobs = {case: (argv, {**base, **extra}) for case, argv, extra, _ in CLI_ERRORS}
        jobs["good"] = (["acme/smol", "--token", VALID_TOKEN], base)
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = {case: pool.submit(_cli, argv, env) for case, (argv, env) in jobs.items()}
            results = {case: f.result() for case, f in futures.items()}
        # offline, after the good run put the config in the cache
        results["offline-cached"] = _cli(["acme/smol"], {**base, "HF_HUB_OFFLINE": "1"})
        yield results


@pytest.mark.parametrize("case,argv,extra,words", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_cli_exits_2_with_one_line(cli_runs, case, argv, extra, words):
    run = cli_runs[case]
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_cli_good_repo_prints_json(cli_runs):
    run = cli_runs["good"]
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["source"]["origin"] == "hub" and out["model"] == "acme/smol"
    # the estimate's parameter count agrees with the safetensors header the fake Hub serves
    assert isinstance(out["peak_allocated_bytes"], int) and out["params_total"] == llama_params_by_dtype(fake_hub_module.SMOL)["BF16"]


def test_cli_offline_uses_the_cache(cli_runs):
    run = cli_runs["offline-cached"]
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["source"]["origin"] == "hub-cache"


def test_cli_never_shows_the_token(cli_runs):
    for case, run in cli_runs.items():
        for token in (VALID_TOKEN, INVALID_TOKEN):
            assert token not in run.stdout and token not in run.stderr, case



def test_false_token_never_falls_back_to_hf_token(fake_hub, monkeypatch):
    """The app passes token=False: a server's HF_TOKEN must never reach the Hub on a visitor's behalf."""
    from estimator import hub as hub_module

    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    hub_module.clear_cache()
    hub_module.fetch_config("acme/good", token=False)
    sent = {auth for method, path, auth in fake_hub.requests if "acme/good" in path}
    assert sent == {None}
    hub_module.clear_cache()
    fake_hub.requests.clear()
    hub_module.fetch_config("acme/good", token=None)  # the CLI: HF_TOKEN also works
    assert f"Bearer {VALID_TOKEN}" in {auth for method, path, auth in fake_hub.requests if "acme/good" in path}


def test_gated_message_counts_the_machine_token(fake_hub, monkeypatch):
    """token=None lets huggingface_hub send HF_TOKEN; the message must then not ask for a token."""
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    with pytest.raises(ModelSourceError, match="not been granted access") as info:
        hub_module.fetch_config("acme/gated")
    assert VALID_TOKEN not in str(info.value)
    with pytest.raises(ModelSourceError, match="then pass a token"):
        hub_module.fetch_config("acme/gated", token=False)


# -------------------------------------------------------------------------------------------------
# Revisions and repo ids are checked before any request (issue 14)
# -------------------------------------------------------------------------------------------------
GOOD_REVISIONS = ["main", "v1.0", "feature/long-context", "refs/pr/1", "refs/pr/12345", "a" * 40, "0123456789abcdef0123456789abcdef01234567"]
BAD_REVISIONS = [
    "../../../escape", "..", "a/../b", "a/..", "/etc/passwd", "refs/../../x", "a\\b", "..\\..\\x", "main\n", "main\r\n", "ma\x00in", "\x1b[31m",
    "a//b", "-x", "a b", "v1.0.lock", "a" * 300,
]


@pytest.mark.parametrize("revision", BAD_REVISIONS, ids=lambda r: repr(r)[:20])
def test_a_bad_revision_is_refused_before_any_request(fake_hub, tmp_path, revision):
    with pytest.raises(ModelSourceError) as info:
        hub_module.fetch_config("acme/any-revision", revision=revision)
    message = str(info.value)
    assert "\n" not in message and "revision" in message and len(message) < 400, message
    assert fake_hub.requests == []
    home = tmp_path / "hf"
    assert not home.exists() or sorted(p.name for p in home.iterdir()) in ([], ["hub"]), "nothing is written outside the cache"


def test_a_traversing_revision_writes_nothing_outside_the_cache(fake_hub, tmp_path):
    with pytest.raises(ModelSourceError):
        resolve("acme/any-revision@../../../escape")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "hf" / "escape").exists()


@pytest.mark.parametrize("revision", GOOD_REVISIONS, ids=lambda r: r[:20])
def test_branches_tags_pull_requests_and_commits_are_allowed(fake_hub, revision):
    got = hub_module.fetch_config("acme/any-revision", revision=revision)
    assert got.config == TINY_LLAMA and got.name == f"acme/any-revision@{revision}"
    assert any(path.endswith(f"/resolve/{revision}/config.json") for _, path, _ in fake_hub.requests)


@pytest.mark.parametrize(
    "reference",
    ["a" * 256, "org/" + "a" * 256, "a" * 97, "org/" + "b" * 97, ("x" * 255 + "/") * 3, "acme/good@" + "v" * 5000],
    ids=["256", "org-256", "97", "org-97", "deep", "long-revision"],
)
def test_an_overlong_name_is_one_clear_line_before_any_request(fake_hub, reference):
    with pytest.raises(ModelSourceError) as info:
        resolve(reference)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert "96" in message or "revision" in message, message
    assert fake_hub.requests == []


def test_cli_overlong_name_is_one_line():
    run = subprocess.run([sys.executable, "-m", "estimator", "a" * 256], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr[-800:]

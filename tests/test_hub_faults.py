"""A Hub resolution (config.json, the safetensors index and headers) keeps one deadline and one byte
budget, whatever the server does (issue 14), against the faults of tests/fake_hub.py.

- a config.json that trickles (a byte every 50 ms: each well inside any read timeout), whose
  headers trickle, that takes 3 s to answer, of 100 MB, or without end;
- an index of 20,000 shards (at most 64 headers are read: beyond, the dtypes come from the config),
  an index of 80 MB, weights that trickle, a server that ignores `Range` on a 1 GiB file;
- safetensors headers whose sizes are absurd (issue 14, item 4): each is one clear line.

The deadline is set short through `CANIRUN_HUB_DEADLINE_S`; every call runs in a thread joined with
a limit, so a resolution that overruns fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
import time

import pytest

from estimator import hub as hub_module
from estimator.sources import ModelSourceError
from fake_hub import TINY_LLAMA, FakeHub, llama_params_by_dtype
from test_hub import _isolate

DEADLINE_S = 2.0
SLACK_S = 1.5  # thread start, the fake Hub's own pace, a loaded CI machine


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub() as server:
        _isolate(monkeypatch, server.url, tmp_path / "hf")
        monkeypatch.setenv("CANIRUN_HUB_DEADLINE_S", str(DEADLINE_S))
        yield server
    hub_module.clear_cache()


def _within(limit_s: float, fn, *args, **kwargs):
    """fn's result or exception, and the seconds it took; fails if it is still running after limit_s."""
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            box["error"] = err

    start = time.monotonic()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(limit_s)
    elapsed = time.monotonic() - start
    if thread.is_alive():
        pytest.fail(f"still running after {limit_s:g} s")
    return box.get("result"), box.get("error"), elapsed


def _one_line_error(error: BaseException | None) -> str:
    assert isinstance(error, ModelSourceError), repr(error)
    message = str(error)
    assert "\n" not in message and len(message) < 500, message
    return message


def _shard_gets(server) -> int:
    """Requests for shard files (model-00001-of-00003.safetensors), not the probe for model.safetensors."""
    return sum(1 for method, path, _ in server.requests if method == "GET" and "-of-" in path and path.endswith(".safetensors"))


# -------------------------------------------------------------------------------------------------
# config.json: one deadline, 4 MiB
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("repo", ["acme/trickle", "acme/trickle-headers", "acme/slow"])
def test_a_slow_or_trickling_config_stops_at_the_deadline(hub, repo):
    _, error, elapsed = _within(DEADLINE_S + SLACK_S, hub_module.fetch_config, repo, timeout_s=30)
    message = _one_line_error(error)
    assert f"{DEADLINE_S:g} s" in message, message
    assert elapsed < DEADLINE_S + SLACK_S


@pytest.mark.parametrize("repo", ["acme/huge-config", "acme/endless-config"])
def test_a_huge_config_is_refused_after_4_mib(hub, repo):
    _, error, elapsed = _within(DEADLINE_S + SLACK_S, hub_module.fetch_config, repo)
    message = _one_line_error(error)
    assert "4 MiB" in message or "4,194,304" in message, message


def test_the_default_deadline_is_20_s(monkeypatch):
    monkeypatch.delenv("CANIRUN_HUB_DEADLINE_S", raising=False)
    assert hub_module.default_deadline_s() == 20.0
    monkeypatch.setenv("CANIRUN_HUB_DEADLINE_S", "nonsense")
    assert hub_module.default_deadline_s() == 20.0


# -------------------------------------------------------------------------------------------------
# The safetensors index and headers: at most 64 headers, inside the same deadline and budget
# -------------------------------------------------------------------------------------------------
def test_a_sharded_checkpoint_sums_its_shards(hub):
    got, error, _ = _within(10, hub_module.fetch_config, "acme/sharded")
    assert error is None, error
    assert got.safetensors_params == llama_params_by_dtype()
    assert _shard_gets(hub) == 3


def test_64_shards_are_all_read(hub):
    got, error, _ = _within(15, hub_module.fetch_config, "acme/sharded-64")
    assert error is None, error
    assert got.safetensors_params == {"BF16": llama_params_by_dtype()["BF16"] + 64 - len_tensors()}


def len_tensors() -> int:
    from fake_hub import llama_tensors

    return len(llama_tensors(TINY_LLAMA))


@pytest.mark.parametrize("repo,shards", [("acme/sharded-65", 65), ("acme/sharded-20000", 20_000)])
def test_more_than_64_shards_are_not_read(hub, repo, shards):
    got, error, _ = _within(DEADLINE_S + SLACK_S, hub_module.fetch_config, repo)
    assert error is None, error
    assert got.config == TINY_LLAMA and got.safetensors_params is None
    assert _shard_gets(hub) == 0
    note = " ".join(got.notes)
    assert f"{shards:,} shards" in note and "dtypes come from the config" in note, got.notes


def test_a_huge_index_is_not_read_whole(hub):
    got, error, elapsed = _within(DEADLINE_S + SLACK_S, hub_module.fetch_config, "acme/huge-index")
    assert error is None, error
    assert got.config == TINY_LLAMA and got.safetensors_params is None
    assert any("index" in note and "MiB" in note for note in got.notes), got.notes


def test_trickling_weights_end_at_the_deadline_with_a_note(hub):
    got, error, elapsed = _within(DEADLINE_S + SLACK_S, hub_module.fetch_config, "acme/trickle-weights", timeout_s=30)
    assert error is None, error
    assert got.config == TINY_LLAMA and got.safetensors_params is None
    assert any(f"{DEADLINE_S:g} s" in note for note in got.notes), got.notes


def test_a_server_ignoring_range_is_read_only_up_to_the_header(hub):
    got, error, elapsed = _within(DEADLINE_S + SLACK_S, hub_module.fetch_config, "acme/ignores-range", timeout_s=30)
    assert error is None, error
    assert got.safetensors_params == llama_params_by_dtype()


# -------------------------------------------------------------------------------------------------
# Safetensors headers that lie about sizes (issue 14, item 4)
# -------------------------------------------------------------------------------------------------
BAD_HEADERS = [
    "huge-shape", "huge-shapes", "float-shape", "inf-shape", "nan-shape", "negative-shape", "negative-offsets", "reversed-offsets",
    "huge-offsets", "offsets-disagree", "shape-not-list", "bool-shape", "no-dtype", "not-object", "not-json", "entry-not-object",
    "length-huge", "sharded-huge-shape",
]


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_a_header_with_absurd_sizes_is_one_clear_line(hub, case):
    _, error, _ = _within(DEADLINE_S + SLACK_S, hub_module.fetch_config, f"acme/header-{case}")
    message = _one_line_error(error)
    assert "safetensors header" in message, message


# -------------------------------------------------------------------------------------------------
# Every repo of the stand-in at once: each a config or one line, all within one deadline
# -------------------------------------------------------------------------------------------------
def test_every_fake_repo_at_once_resolves_or_fails_in_one_line_within_the_deadline(hub):
    """All the stand-in's repos (every fault above, the gated, missing and broken ones) resolved
    concurrently, as a busy Space would: none outlives the deadline, each answers a config or one
    ModelSourceError line, and the shard headers read stay within 64 per repo."""
    from concurrent.futures import ThreadPoolExecutor

    repos = sorted(hub.repos)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(repos)) as pool:
        futures = {repo: pool.submit(_within, DEADLINE_S + 2 * SLACK_S, hub_module.fetch_config, repo, timeout_s=30) for repo in repos}
        outcomes = {repo: f.result() for repo, f in futures.items()}
    assert time.monotonic() - start < DEADLINE_S + 3 * SLACK_S
    for repo, (result, error, _) in outcomes.items():
        if error is not None:
            _one_line_error(error)
        else:
            assert result.config and result.origin == "hub", repo
    per_repo: dict[str, int] = {}
    for method, path, _ in hub.requests:
        if method == "GET" and "-of-" in path:
            repo = "/".join(path.strip("/").split("/")[:2])
            per_repo[repo] = per_repo.get(repo, 0) + 1
    assert max(per_repo.values()) <= 64, per_repo

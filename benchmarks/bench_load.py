"""Load: N Streamlit sessions at once, as a Space serves them (a script, not a test).

    python benchmarks/bench_load.py                  # 1, 4 and 16 sessions
    python benchmarks/bench_load.py --levels 1 4 --steps 4

Streamlit runs every browser session as a thread of one process, sharing its caches. Here each
session is an `AppTest` driven from its own thread (the same app script, the same process-wide
caches, the same GIL), all released together by a barrier. Each session picks a model, half of
them catalog names and half uploaded config.json files that are not in the catalog (so their
inventories are built on the meta device while other sessions run), then changes widgets for
`--steps` reruns (batch size, mode, sequence length, GPU).

What it checks: every answer (headline, peak allocated and device total after every rerun) is
identical to the same session run alone, first. Before each level the inventory and result caches
are cleared, so the uploaded configs are built concurrently at every level.

What it reports, per level: the median first load of a session's page, and p50 / p95 / max wall
time of one rerun after a widget change (the upload's rerun included: it builds an inventory),
over every rerun of every session. Bounded: at most 16 sessions × (2 + steps) reruns per level, each with a 120 s timeout.

AppTest is built for one test at a time: each run installs a mock `Runtime` as the process's
instance and sets it back to None when done (so a second session running then finds none), and
compiles the script afresh (Python 3.11's compiler can fail when threads compile at once: "AST
constructor recursion depth mismatch"). A real server has one Runtime and one script cache for all
its sessions; `shared_runtime()` gives the sessions the same (and keeps AppTest's `global.appTest`
option on), which is all this bench changes about Streamlit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CATALOG = ["Llama-3.1-8B", "Qwen/Qwen2.5-7B", "openai-community/gpt2", "mistralai/Mixtral-8x7B-v0.1"]


def uploads() -> list[tuple[str, dict]]:
    """Configs outside the catalog: small variants with tied embeddings (the count that once raced)."""
    out = []
    for i in range(4):
        out.append((f"tiny-llama-{i}.json", {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "_name_or_path": f"bench/tiny-llama-{i}",
            "hidden_size": 512 + 128 * i, "intermediate_size": 1536 + 256 * i, "num_attention_heads": 8, "num_key_value_heads": 4,
            "num_hidden_layers": 4 + i, "vocab_size": 32_000 + 1_000 * i, "max_position_embeddings": 4096,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        }))
        out.append((f"tiny-gpt2-{i}.json", {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "_name_or_path": f"bench/tiny-gpt2-{i}",
            "n_embd": 256 + 64 * i, "n_head": 4, "n_layer": 2 + i, "vocab_size": 50_257 + 7 * i, "n_positions": 1024,
        }))
    return out


STEPS = [
    ("batch_size", "number_input", 4),
    ("mode", "radio", "qlora"),
    ("seq_len", "number_input", 4096),
    ("gpu", "selectbox", "GeForce RTX 4090"),
    ("batch_size", "number_input", 2),
    ("mode", "radio", "full"),
]


def shared_runtime() -> None:
    """One mock Runtime for every session, as `streamlit run` has one real one (see the docstring)."""
    from unittest.mock import MagicMock

    from streamlit import config
    from streamlit.runtime import Runtime
    from streamlit.runtime.caching.storage.dummy_cache_storage import MemoryCacheStorageManager
    from streamlit.runtime.dataframe_source_manager import DataframeSourceManager
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    runtime = MagicMock(spec=Runtime)
    runtime.media_file_mgr = MediaFileManager(MemoryMediaFileStorage("/mock/media"))
    runtime.dataframe_source_mgr = DataframeSourceManager()
    runtime.cache_storage_manager = MemoryCacheStorageManager()
    Runtime.instance = classmethod(lambda cls: runtime)
    Runtime.exists = classmethod(lambda cls: True)
    config.set_option("global.appTest", True)

    import streamlit.testing.v1.app_test as app_test
    import streamlit.testing.v1.local_script_runner as local_script_runner
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache

    script_cache = ScriptCache()  # thread-safe (a lock around compile), as the server's own
    app_test.ScriptCache = local_script_runner.ScriptCache = lambda: script_cache


def session_plan(i: int) -> dict:
    ups = uploads()
    if i % 2 == 0:
        return {"model": CATALOG[(i // 2) % len(CATALOG)]}
    name, config = ups[(i // 2) % len(ups)]
    return {"upload": (name, json.dumps(config).encode())}


def answer(at) -> tuple:
    assert not at.exception, [e.value for e in at.exception]
    heads = [m.value for m in at.markdown if m.value.startswith("### ")]
    metrics = tuple((m.label, m.value) for m in at.metric)
    return (tuple(heads[:1]), metrics, tuple(e.value for e in at.error))


def run_session(i: int, steps: int, barrier: threading.Barrier | None) -> tuple[list[tuple], list[float]]:
    from streamlit.testing.v1 import AppTest

    plan = session_plan(i)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    if "model" in plan:
        at.query_params["model"] = plan["model"]
    if barrier is not None:
        barrier.wait()
    answers, times = [], []

    def timed(change=None) -> None:
        if change is not None:
            change()
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
        answers.append(answer(at))

    timed()
    if "upload" in plan:
        name, data = plan["upload"]
        timed(lambda: at.file_uploader(key="upload").set_value((name, data, "application/json")))
    for key, kind, value in STEPS[:steps]:
        timed(lambda key=key, kind=kind, value=value: getattr(at, kind)(key=key).set_value(value))
    return answers, times


def clear_caches() -> None:
    import streamlit as st

    import app_support
    from estimator import inventory

    inventory._build_cached.cache_clear()
    for name in dir(app_support):
        fn = getattr(app_support, name)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
    st.cache_data.clear()
    st.cache_resource.clear()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent sessions per level (at most 16)")
    parser.add_argument("--steps", type=int, default=len(STEPS), help=f"widget changes per session (at most {len(STEPS)})")
    args = parser.parse_args()
    levels = [n for n in args.levels if 1 <= n <= 16]
    steps = max(0, min(args.steps, len(STEPS)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at the start; python {sys.version.split()[0]}")

    shared_runtime()
    # Serial: every session of the largest level alone, the reference answers (and a warm process).
    sessions = max(levels)
    reference = {}
    start = time.perf_counter()
    for i in range(sessions):
        reference[i], _ = run_session(i, steps, None)
    print(f"serial reference: {sessions} sessions in {time.perf_counter() - start:.1f} s")

    failures = 0
    for n in levels:
        clear_caches()
        barrier = threading.Barrier(n)
        results: dict[int, tuple] = {}

        def work(i: int) -> None:
            try:
                results[i] = run_session(i, steps, barrier)
            except BaseException as err:  # noqa: BLE001 - reported below
                results[i] = err

        threads = [threading.Thread(target=work, args=(i,), name=f"session-{i}") for i in range(n)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.perf_counter() - start
        firsts, times, mismatched = [], [], []
        for i in range(n):
            got = results.get(i)
            if not isinstance(got, tuple):
                mismatched.append(f"session {i}: {got!r}")
                continue
            answers, ts = got
            firsts.append(ts[0])
            times.extend(ts[1:])
            if answers != reference[i]:
                mismatched.append(f"session {i} ({session_plan(i).get('model') or session_plan(i)['upload'][0]})")
        failures += len(mismatched)
        if not times:
            print(f"{n:2d} sessions: no session finished: {', '.join(mismatched)}")
            continue
        print(f"{n:2d} sessions: {len(firsts)} first loads (p50 {statistics.median(firsts) * 1000:.0f} ms) and {len(times)} reruns "
              f"in {wall:.1f} s; rerun p50 {statistics.median(times) * 1000:.0f} ms, p95 {percentile(times, 0.95) * 1000:.0f} ms, "
              f"max {max(times) * 1000:.0f} ms; answers identical to serial: {'yes' if not mismatched else 'NO: ' + ', '.join(mismatched)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

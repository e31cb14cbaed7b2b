"""App speed: the cold start and a warm rerun after a widget change (a script, not a test).

    python benchmarks/bench_app.py            # both; --no-browser skips the Playwright part

Cold start, two ways:
- browser: `streamlit run app.py` as a subprocess, headless Chromium opens the page; the clock runs
  from the process start to the headline ("… GiB") being visible, and separately from the page
  request (server already up) to the headline;
- AppTest: a fresh Python process times its first `AppTest.run()` (imports included).
Warm rerun (AppTest, in one process, after the first run): set a number_input or a selectbox and
`run()`, median of 10 (wall clock, and the process's CPU time, which other load on the machine
barely changes); "new values" never repeats a value (the app's caches miss), "repeated" alternates
two values (they hit). Targets (issue 5, this 2-core machine): first page usable ≤ 5 s,
warm rerun ≤ 200 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

APPTEST_FIRST_RUN = r"""
import json, sys, time
t0 = time.perf_counter()
from streamlit.testing.v1 import AppTest
t1 = time.perf_counter()
at = AppTest.from_file(sys.argv[1], default_timeout=120).run()
t2 = time.perf_counter()
headline = [m.value for m in at.markdown if m.value.startswith("### ")]
print(json.dumps({"import_streamlit_s": t1 - t0, "first_run_s": t2 - t1, "headline": headline[:1],
                  "exceptions": [e.value for e in at.exception], "torch_imported": "torch" in sys.modules}))
"""


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false", PYTHONPATH=str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_browser() -> dict:
    from playwright.sync_api import sync_playwright

    port = free_port()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # started before the clock
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1"],
            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).read()
                    break
                except OSError:
                    if time.perf_counter() - t0 > 60:
                        raise RuntimeError("the server did not answer within 60 s")
                    time.sleep(0.05)
            t_health = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text("GiB", exact=False).first.wait_for(timeout=60_000)
            page.locator("h3", has_text="Fits on").first.wait_for(timeout=60_000)
            t_headline = time.perf_counter()
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            t_chart = time.perf_counter()
        finally:
            server.terminate()
            server.wait(timeout=10)
            browser.close()
    return {
        "server_up_s": t_health - t0,
        "process_start_to_headline_s": t_headline - t0,
        "page_request_to_headline_s": t_headline - t_health,
        "process_start_to_chart_s": t_chart - t0,
    }


def cold_apptest() -> dict:
    out = subprocess.run([sys.executable, "-c", APPTEST_FIRST_RUN, str(ROOT / "app.py")], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(lines[-1])


def warm() -> dict:
    os.environ.update(HF_HUB_OFFLINE="1")
    sys.path.insert(0, str(ROOT))
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception, at.exception

    def timed(change) -> tuple[float, float]:
        """(wall, CPU) seconds of one rerun; the CPU time of this process barely depends on other load."""
        change()
        t0, c0 = time.perf_counter(), time.process_time()
        at.run()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        assert not at.exception and not at.error, (at.exception, at.error)
        return dt, dc

    results = {}
    results["batch_size, new values (Llama-3.1-8B inference)"] = [
        timed(lambda v=v: at.number_input(key="batch_size").set_value(v)) for v in range(2, 12)
    ]
    results["batch_size, repeated values"] = [
        timed(lambda v=v: at.number_input(key="batch_size").set_value(v)) for v in [3, 4] * 5
    ]
    gpus = ["A100 SXM 80GB", "L40S", "RTX 4090", "A10", "H200 SXM 141GB", "RTX 3090", "L4", "MI300X", "T4", "A100 PCIe 40GB"]
    options = at.selectbox(key="gpu").options
    gpus = [g for g in gpus if g in options] or options[1:11]
    results["gpu, new values"] = [timed(lambda g=g: at.selectbox(key="gpu").set_value(g)) for g in gpus]
    at.selectbox(key="gpu").set_value("H100 SXM 80GB").run()
    at.radio(key="mode").set_value("qlora").run()
    results["seq_len, new values (QLoRA)"] = [
        timed(lambda v=v: at.number_input(key="seq_len").set_value(v)) for v in range(1024, 1024 + 10 * 256, 256)
    ]
    return {
        name: {
            "median_ms": statistics.median(w for w, _ in v) * 1000,
            "max_ms": max(w for w, _ in v) * 1000,
            "cpu_median_ms": statistics.median(c for _, c in v) * 1000,
            "n": len(v),
        }
        for name, v in results.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-browser", action="store_true", help="skip the Playwright cold start")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at the start (other work inflates every figure); "
          f"python {sys.version.split()[0]}")
    if not args.no_browser and Path(CHROMIUM).exists():
        b = cold_browser()
        print(f"cold, browser: server up {b['server_up_s']:.2f} s; process start → headline {b['process_start_to_headline_s']:.2f} s "
              f"(page request → headline {b['page_request_to_headline_s']:.2f} s); process start → chart {b['process_start_to_chart_s']:.2f} s")
    a = cold_apptest()
    print(f"cold, AppTest: first run {a['first_run_s']:.2f} s (+ {a['import_streamlit_s']:.2f} s importing streamlit); "
          f"torch imported: {a['torch_imported']}; headline: {a['headline']}")
    for name, stat in warm().items():
        print(f"warm rerun, {name}: median {stat['median_ms']:.0f} ms, max {stat['max_ms']:.0f} ms "
              f"(CPU median {stat['cpu_median_ms']:.0f} ms; n={stat['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

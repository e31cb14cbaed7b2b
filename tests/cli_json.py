"""In-process CLI runs for tests: `python -m estimator ... --json` as (exit code, JSON or None, stderr)."""

from __future__ import annotations

import contextlib
import io
import json

from estimator.cli import main


def cli_json(*argv: str) -> tuple[int, dict | None, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--json"])
    return code, (json.loads(out.getvalue()) if code == 0 else None), err.getvalue()


def assert_same_estimate(a: dict, b: dict) -> None:
    """Two CLI answers agree on the memory figures and the job they describe."""
    for key in ("peak_allocated_bytes", "device_total_bytes", "breakdown", "job"):
        assert a[key] == b[key], key

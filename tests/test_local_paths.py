"""Local paths (the CLI's and the library's; the app never reads them) are read only when they are
a regular config-sized file: a FIFO would block the open, `/dev/zero` never ends, and a 100 MB file
is not a config.json. Each is one clear line, quickly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.sources import ModelSourceError, resolve

ROOT = Path(__file__).resolve().parent.parent


def _one_line_error(reference: str) -> str:
    with pytest.raises(ModelSourceError) as info:
        resolve(reference)
    message = str(info.value)
    assert "\n" not in message and len(message) < 500, message
    return message


def _in_subprocess(reference: str, timeout_s: float = 20) -> subprocess.CompletedProcess:
    """Through the CLI, in a process of its own with 1 GiB of address space, so a read that never
    ends fails the test instead of the machine."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))\n"
        "from estimator.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, reference], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def test_dev_zero_is_refused():
    try:
        run = _in_subprocess("/dev/zero")
    except subprocess.TimeoutExpired:
        pytest.fail("reading /dev/zero did not stop")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "regular file" in run.stderr, run.stderr[-500:]


def test_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    try:
        run = _in_subprocess(str(fifo), timeout_s=15)
    except subprocess.TimeoutExpired:
        pytest.fail("opening the FIFO blocked")
    assert run.returncode == 2 and "regular file" in run.stderr, run.stderr[-500:]


def test_a_huge_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as handle:
        handle.truncate(100 << 20)  # sparse: 100 MB of zeros without writing them
    assert "bytes" in _one_line_error(str(path))


def test_a_json_name_too_long_for_the_os(tmp_path):
    _one_line_error(str(tmp_path / ("x" * 300 + ".json")))


def test_a_missing_path_and_a_folder_without_config(tmp_path):
    assert "no config.json" in _one_line_error(str(tmp_path / "missing.json"))
    assert "no config.json" in _one_line_error(str(tmp_path) + "/")

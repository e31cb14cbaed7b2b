"""The app reads catalog names, Hub ids and uploads only, never a path on the server (issue 14).

`?hub=/etc/passwd`, `/dev/zero`, a FIFO, the server's own config files: each gets the same one
message, whether the file exists or not, so the page says nothing about the server's files. The
CLI still reads local paths (tests/test_local_paths.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from fake_hub import offline_hub_env

from estimator.catalog import find_entry

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    offline_hub_env(monkeypatch, tmp_path)


@pytest.fixture
def server_files(tmp_path):
    """Paths on the 'server': a real config.json, a FIFO, and the same names where nothing exists."""
    real = tmp_path / "secret" / "config.json"
    real.parent.mkdir()
    real.write_text(json.dumps(find_entry("openai-community/gpt2").config()))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    return {
        "existing": [str(real), str(real.parent), "/etc/passwd", "/dev/zero", str(fifo), APP, "./app.py", str(ROOT / "estimator")],
        "missing": [str(tmp_path / "nothing" / "config.json"), str(tmp_path / "nothing"), "/etc/no-such-file", "./no-such.json", "~/no-such"],
        "odd": ["~/.bashrc", "../x", "file:///etc/passwd", "C:\\Windows\\win.ini", "\\\\server\\share\\config.json"],
    }


def _shown(at: AppTest, path: str) -> str:
    """The page's one error line, with the path itself written as <path>."""
    assert not at.exception, at.exception
    lines = [e.value for e in at.error]
    assert len(lines) == 1, lines
    return lines[0].replace(repr(path), "<path>").replace(path, "<path>")


def _no_estimate(at: AppTest) -> None:
    assert not [m for m in at.markdown if m.value.startswith("### ")], "the page estimated a local file"


def test_a_path_in_the_link_gets_one_message_whether_or_not_it_exists(server_files):
    seen = set()
    for kind in ("existing", "missing", "odd"):
        for path in server_files[kind]:
            at = AppTest.from_file(APP, default_timeout=60)
            at.query_params["hub"] = path
            at.run()
            _no_estimate(at)
            seen.add(_shown(at, path))
    assert len(seen) == 1, seen
    (message,) = seen
    assert "upload" in message and "root:" not in message


def test_a_path_typed_in_the_hub_box_is_refused(server_files):
    at = AppTest.from_file(APP, default_timeout=60).run()
    messages = set()
    for path in server_files["existing"][:2] + server_files["missing"][:2]:
        at.text_input(key="hub_id").input(path).run()
        _no_estimate(at)
        messages.add(_shown(at, path))
    assert len(messages) == 1, messages
    at.text_input(key="hub_id").input("").run()  # the catalog model comes back
    assert not at.error and [m for m in at.markdown if m.value.startswith("### ")]


def test_a_bare_name_is_a_hub_id_whether_or_not_a_file_has_that_name():
    """`app.py` is shaped like a legacy Hub id (gpt2): it goes to the Hub, never to the disk, so a
    file of that name in the server's folder changes nothing."""
    shown = set()
    for name in ("app.py", "no-such-file.py", "estimator", "no-such-folder"):
        at = AppTest.from_file(APP, default_timeout=60)
        at.query_params["hub"] = name
        at.run()
        _no_estimate(at)
        shown.add(_shown(at, name))
    assert len(shown) == 1, shown
    assert "offline" in shown.pop()

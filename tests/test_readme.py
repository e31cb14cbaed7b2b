"""The README's library snippet is a doctest, run from another directory against the installed package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The library"):]
    match = re.search(r"```pycon\n(.*?)```", section, re.S)
    assert match, "the README's library section has no pycon block"
    return match.group(1)


def test_the_readme_snippet_runs_from_another_directory(tmp_path):
    snippet = _snippet()
    assert snippet.count(">>>") >= 8
    (tmp_path / "snippet.txt").write_text(snippet)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "doctest", "-v", "snippet.txt"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "Test passed." in out.stdout
    # and it ran the installed package, not this checkout by accident
    where = subprocess.run([sys.executable, "-c", "import estimator; print(estimator.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, "estimator is not installed: pip install -r requirements-dev.txt installs it (-e .)"

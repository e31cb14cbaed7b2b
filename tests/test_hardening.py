"""Small hardenings of issue 14: the CLI's one error line stays one short line, its JSON is JSON,
a closed pipe is not a traceback, and the report survives a box without Chrome."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.job import Job

ROOT = Path(__file__).resolve().parents[1]
BIG = "x" * 100_000


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "estimator", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def _strict_json(text: str):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# -------------------------------------------------------------------------------------------------
# LoRA alpha: finite and positive; --json never writes NaN
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [math.nan, math.inf], ids=["nan", "inf"])
def test_lora_alpha_must_be_finite(alpha):
    with pytest.raises(ValueError, match="lora_alpha"):
        Job(mode="lora", lora_alpha=alpha)


@pytest.mark.parametrize("alpha", ["nan", "inf", "NaN"])
def test_cli_lora_alpha_nan_is_one_line(alpha):
    run = run_cli("GPT-2", "--mode", "lora", "--lora-alpha", alpha, "--json")
    assert run.returncode == 2 and run.stdout == "", run.stdout[:300]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "lora_alpha" in lines[0].replace("-", "_"), run.stderr


def test_cli_json_is_strict_json():
    run = run_cli("GPT-2", "--mode", "lora", "--lora-alpha", "16", "--gpu", "H100", "--json")
    assert run.returncode == 0, run.stderr
    _strict_json(run.stdout)


# -------------------------------------------------------------------------------------------------
# One line: transformers' own warnings stay quiet; a 100 KB argument is not echoed
# -------------------------------------------------------------------------------------------------
# transformers logs two rope warnings while parsing this config, then refuses int8 as a dtype.
WARNS_THEN_FAILS = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
    "vocab_size": 256, "rope_scaling": {"rope_type": "yarn", "factor": 0.5, "foo": 1}, "torch_dtype": "int8",
}


def test_transformers_warnings_do_not_add_lines(tmp_path):
    """Fixed with the thread-safe build (e3e4187), which silences transformers while it parses the
    config too; at 6103d2d this printed three lines."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(WARNS_THEN_FAILS))
    run = run_cli(str(path))
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize(
    "args",
    [["GPT-2", "--batch-size", BIG], ["GPT-2", "--mode", BIG], ["GPT-2", "--gpu", BIG], ["GPT-2", "--gpu", "H100", "--strategy", BIG],
     ["GPT-2", "--lora-alpha", BIG], ["GPT-2", BIG]],
    ids=["batch-size", "mode", "gpu", "strategy", "lora-alpha", "extra"],
)
def test_a_100_kb_argument_is_not_echoed(args):
    _short_one_line(args)


@pytest.mark.parametrize(
    "args", [[BIG], ["/" + BIG], ["GPT-2", "--mode", "lora", "--lora-targets", BIG + ",all-linear"]], ids=["model", "path", "lora-targets"]
)
def test_a_100_kb_model_or_target_is_not_echoed(args):
    _short_one_line(args)


def _short_one_line(args: list[str]) -> None:
    run = run_cli(*args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 1_000, (len(run.stderr), run.stderr[:200])


# -------------------------------------------------------------------------------------------------
# A closed pipe (`--json | head -1`)
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["GPT-2", "--json"], ["GPT-2", "--which-gpus", "--json"], ["GPT-2"]], ids=["json", "which-gpus", "text"])
def test_a_closed_pipe_is_not_a_traceback(args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (head -1) is gone before the first write
    try:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        run = subprocess.run([sys.executable, "-m", "estimator", *args], cwd=ROOT, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr[-800:]
    assert run.returncode in (0, 1, 141), run.returncode


# -------------------------------------------------------------------------------------------------
# The report on a box without Chrome
# -------------------------------------------------------------------------------------------------
def test_report_without_chrome_writes_tables_and_skips_the_plot(tmp_path, monkeypatch, capsys):
    import kaleido
    from kaleido.errors import ChromeNotFoundError

    from validation import report

    def no_chrome(*args, **kwargs):
        raise ChromeNotFoundError("no Chrome here")

    monkeypatch.setattr(kaleido, "calc_fig_sync", no_chrome)
    out, plot = tmp_path / "REPORT.md", tmp_path / "accuracy.png"
    assert report.main(["--out", str(out), "--plot", str(plot)]) == 0
    assert out.read_text().startswith("#") and "|" in out.read_text()
    assert not plot.exists()
    printed = capsys.readouterr().out
    assert "skipped the plot" in printed and "Chrome" in printed


def test_the_error_line_stays_under_1000_characters_with_its_prefix():
    """Found by the fuzzer: a message cut to 1,000 characters became 1,007 with "error: " in front."""
    from estimator.present import MAX_MESSAGE_CHARS, one_line

    text = one_line(ValueError("unrecognized arguments: " + " ".join(["x" * 150] * 40)))
    assert len(text) <= MAX_MESSAGE_CHARS and len("error: " + text) < 1_000

"""`python -m estimator`: SPEC's output, and one clear line with exit status 2 for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.catalog import find_entry
from estimator.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "estimator", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_json_for_a_catalog_name():
    out = run_cli("Llama-3.1-8B", "--mode", "qlora", "--gradient-checkpointing", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert isinstance(data["peak_allocated_bytes"], int) and isinstance(data["device_total_bytes"], int)
    assert data["params_total"] == 8_030_261_248 and data["params_trainable"] == 41_943_040
    assert data["gpus_needed"] is None
    assert set(data["breakdown"]) >= {"weights", "gradients", "optimizer_state", "activations", "logits", "kv_cache", "cuda_context"}


def test_config_path_and_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(find_entry("openai-community/gpt2").config()))
    for target in (folder, folder / "config.json"):
        out = run_cli(str(target), "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["params_total"] == 124_439_808


def test_human_output_labels_gib():
    out = run_cli("Qwen/Qwen2.5-0.5B", "--mode", "lora", "--seq-len", "512")
    assert out.returncode == 0, out.stderr
    assert "GiB" in out.stdout and "peak allocated" in out.stdout and "device total" in out.stdout


def test_gpu_count_above_one_with_a_per_gpu_breakdown():
    """Issue 4: `python -m estimator <8B config> --mode full --gpu A10` answers a count above 1."""
    path = find_entry("meta-llama/Llama-3.1-8B").config_path
    out = run_cli(str(path), "--mode", "full", "--gpu", "A10", "--batch-size", "1", "--seq-len", "512", "--gradient-checkpointing", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["gpus_needed"] > 1
    per_gpu = data["fit"]["per_gpu"]
    assert per_gpu["num_gpus"] == data["gpus_needed"] and per_gpu["device_total_bytes"] <= data["fit"]["capacity_bytes"]
    assert "estimates" in " ".join(data["fit"]["notes"])


def _bad(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_model_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _bad(["no-such-org/no-such-model-xyz"], capsys)
    assert "no-such-org/no-such-model-xyz" in line


def test_not_a_model_reference(capsys):
    assert "not a catalog name" in _bad(["definitely not a model"], capsys)


def test_unreadable_and_malformed_configs(tmp_path, capsys):
    assert "no config.json" in _bad([str(tmp_path / "missing.json")], capsys)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _bad([str(bad)], capsys)
    bad.write_text("[1, 2]")
    assert "JSON object" in _bad([str(bad)], capsys)
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": "wide"}))
    assert "malformed" in _bad([str(bad)], capsys)


def test_architecture_we_cannot_handle(tmp_path, capsys):
    bert = tmp_path / "config.json"
    bert.write_text(json.dumps({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "vocab_size": 100}))
    assert "not a causal language model" in _bad([str(bert)], capsys)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--batch-size", "0"], "at least 1"),
        (["--seq-len", "-5"], "at least 1"),
        (["--batch-size", "1000000000"], "beyond any real job"),
        (["--lora-dropout", "1.5", "--mode", "lora"], "lora_dropout"),
        (["--mode", "lora", "--lora-targets", "c_attn"], "no linear layer matches"),
        (["--mode", "sideways"], "invalid choice"),
        (["--gpu", "Voodoo 5 6000"], "unknown"),
        (["--gpu", "h100", "--strategy", "zero3"], "training strategy"),
    ],
)
def test_bad_options(args, needle, capsys):
    assert needle in _bad(["Llama-3.2-1B", *args], capsys)


def _json(*argv: str) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


def test_suggest_needs_a_gpu():
    out = run_cli("Qwen3-8B", "--mode", "qlora", "--suggest")
    assert out.returncode == 2 and "--suggest needs --gpu" in out.stderr and out.stderr.count("\n") == 1


def test_suggestions_are_cheapest_first_and_reproduce_with_their_options():
    """Issue 15: a Qwen3-8B QLoRA on a 4090 does not fit by default; checkpointing makes it fit."""
    base = ("Qwen3-8B", "--mode", "qlora", "--gpu", "RTX 4090")
    data = _json(*base, "--suggest")
    assert data["fit"]["gpus_needed"] != 1
    suggestions = data["suggestions"]
    assert suggestions and suggestions[0]["options"] == ["--gradient-checkpointing"]
    assert set(suggestions[0]) == {"change", "options", "peak_allocated_bytes", "device_total_bytes", "verdict"}
    for s in suggestions:
        assert s["verdict"] == "fits"
        again = _json(*base, *s["options"])
        per = again["fit"]["per_gpu"]
        assert per["device_total_bytes"] == s["device_total_bytes"] <= again["fit"]["capacity_bytes"]


def test_a_job_that_fits_gets_no_suggestions():
    data = _json("Qwen3-0.6B", "--mode", "lora", "--gpu", "H100", "--suggest")
    assert data["fit"]["gpus_needed"] == 1 and data["suggestions"] == []


def test_when_nothing_alone_fits_the_changes_combine():
    data = _json("Llama-3.1-8B", "--mode", "full", "--batch-size", "8", "--gpu", "RTX 4090", "--suggest")
    combined = [s for s in data["suggestions"] if " and " in s["change"]]
    assert combined and "--mode" in combined[0]["options"]
    assert _json("Llama-3.1-8B", "--mode", "full", "--batch-size", "8", "--gpu", "RTX 4090",
                 *combined[0]["options"])["fit"]["gpus_needed"] == 1


def test_plot_writes_html_with_both_sweeps_and_the_capacity(tmp_path):
    path = tmp_path / "memory.html"
    out = run_cli("Qwen3-8B", "--mode", "qlora", "--gpu", "RTX 4090", "--plot", str(path))
    assert out.returncode == 0, out.stderr
    html = path.read_text()
    assert "plotly" in html and "batch size (sequences)" in html and "sequence length (tokens)" in html
    assert "GeForce RTX 4090: 23.6 GiB" in html
    bad = run_cli("Qwen3-8B", "--plot", str(path))
    assert bad.returncode == 2 and "--plot needs --gpu" in bad.stderr


def test_memory_plot_grows_with_batch_and_length():
    from estimator import estimate
    from estimator.catalog import find_entry
    from estimator.inventory import inventory_from_config
    from estimator.present import memory_plot

    inv = inventory_from_config(find_entry("Qwen/Qwen3-8B").config())
    fig = memory_plot(lambda j: estimate(inv, j), __import__("estimator").Job(mode="qlora"), 24 * 1024**3, "X")
    device = [t for t in fig["data"] if t["name"] == "device total"]
    assert len(device) == 2
    for trace in device:
        assert trace["y"] == sorted(trace["y"]) and len(trace["x"]) >= 3
    shapes = fig["layout"]["shapes"]
    assert [s["type"] for s in shapes] == ["line", "rect", "line", "rect"]  # capacity line and tight band, each panel
    band = shapes[1]
    assert band["y1"] == 24 and band["y0"] == pytest.approx(24 * 0.95)


def test_help_names_only_options_that_exist_and_lists_the_strategies():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "--help-strategies" not in out.stdout
    for name in ("ddp", "zero3", "pipeline", "tensor_parallel", "--list-models", "--suggest", "--training-args"):
        assert name in out.stdout


def test_list_models_needs_no_model_and_filters():
    out = run_cli("--list-models", "qwen3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all("qwen3" in line.lower() for line in lines)
    assert any(line.startswith("Qwen3-8B ") for line in lines)
    everything = json.loads(run_cli("--list-models", "--json").stdout)
    from estimator.catalog import load_catalog

    assert [e["name"] for e in everything] == [e.name for e in load_catalog()]
    none = run_cli()
    assert none.returncode == 2 and "a MODEL is needed" in none.stderr


def test_options_that_do_not_apply_get_a_note_and_still_answer():
    out = run_cli("Llama-3.1-8B", "--mode", "full", "--weights", "nf4", "--strategy", "zero3", "--json")
    assert out.returncode == 0, out.stderr
    notes = json.loads(out.stdout)["notes"]
    for text in ("--weights does not apply to --mode full", "--strategy applies only with --gpu"):
        assert any(text in n for n in notes) and text in out.stderr
    clean = run_cli("Llama-3.1-8B", "--mode", "full", "--json")
    assert "does not apply" not in clean.stderr


def test_a_count_below_the_need_is_said_as_such():
    """Issue 15: "Needs 17 × H100 with zero3: 146.8 of 79.6 GiB on the fullest GPU" contradicted itself."""
    data = _json("Llama-3.1-70B-Instruct", "--mode", "full", "--gradient-checkpointing", "--gpu", "H100", "--num-gpus", "4")
    assert data["fit"]["gpus_needed"] > 4 and data["fit"]["per_gpu"]["num_gpus"] == 4
    text = run_cli("Llama-3.1-70B-Instruct", "--mode", "full", "--gradient-checkpointing", "--gpu", "H100", "--num-gpus", "4").stdout
    head = next(line for line in text.splitlines() if line.startswith(("On ", "Needs ", "Fits ")))
    assert head.startswith("On 4 × H100 SXM 80GB with zero3") and f"does not fit (needs {data['fit']['gpus_needed']})" in head


def test_which_gpus_aligns_long_names_and_says_why_there_is_no_count():
    out = run_cli("Llama-3.1-8B", "--mode", "qlora", "--which-gpus")
    assert out.returncode == 0, out.stderr
    table = out.stdout[out.stdout.index("GPU "):].splitlines()  # the header row
    rows = [r for r in table[1:] if r.strip() and not r.startswith("note:")]
    column = table[0].index("usable GiB")
    assert all(r[column - 1] == " " for r in rows)  # no name runs into the next column
    missing = [r for r in rows if " — " in r]
    assert missing and all(r.split("zero3", 1)[1].strip() for r in missing)  # each says why


def test_a_near_miss_name_gets_catalog_suggestions():
    """Issue 15: `llama3-8b` said only "cannot reach the Hub"."""
    out = run_cli("llama3-8b")  # HF_HUB_OFFLINE=1: the Hub is not tried
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "did you mean Llama-3-8B" in out.stderr and "--list-models" in out.stderr
    far = run_cli("xyzzy-unknown-model")
    assert far.returncode == 2 and "did you mean" not in far.stderr


def test_close_names_ignore_case_separators_and_the_organisation():
    from estimator.catalog import close_names

    assert close_names("QWEN3_8b")[0] == "Qwen3-8B"
    assert close_names("meta-llama/llama3.1-8b")[0] == "Llama-3.1-8B"
    assert close_names("zzzz") == []

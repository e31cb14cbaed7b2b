"""A case's config_overrides (issue 13's reduced-layer cases): the same reduced config reaches the
checkpoint the harness builds and the estimate the report makes, the per-layer fields follow the
layer count, an override that breaks the model is refused in one line; and the trainable-parameter
counts, PEFT's and ours, are both in every training row and in the families report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator import Job
from estimator.catalog import find_entry
from validation import measure, report
from validation.cases import Case, expand, load_cases
from validation.overrides import apply_overrides, id_suffix, reduced_config

ROOT = Path(__file__).resolve().parent.parent


def _config(model: str) -> dict:
    return find_entry(model).config()


def test_the_override_reaches_the_checkpoint_and_the_estimate(tmp_path, monkeypatch):
    """The harness builds the checkpoint from case_config, and the report estimates from it too."""
    import safetensors

    (case,) = expand([{"model": "HuggingFaceTB/SmolLM2-135M", "config_overrides": {"num_hidden_layers": 2},
                       "mode": "lora", "lora_r": 4, "batch_size": 1, "seq_len": 16, "holdout": True}])
    assert case.id == "smollm2-135m-lora-b1-s16-r4-L2" and case.config_overrides == {"num_hidden_layers": 2}
    assert Case.from_dict(case.to_dict()) == case  # what a spawned case process reads
    monkeypatch.setattr(measure, "DEVICE", "cpu")
    ckpt = tmp_path / "ckpt"
    measure.build_checkpoint(case.model, ckpt, case.config_overrides)
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2
    stored = 0
    with safetensors.safe_open(str(ckpt / "model.safetensors"), "pt") as handle:
        for name in handle.keys():
            stored += math.prod(handle.get_slice(name).get_shape())
    row = {**case.header(), "status": "ok", "params_trainable": 0}
    assert row["config_overrides"] == {"num_hidden_layers": 2}
    ours = report.compare(row)
    full = report.compare({**row, "config_overrides": None})
    assert ours.estimated_peak < full.estimated_peak
    from estimator import estimate, inventory_from_config

    inv = inventory_from_config(measure.case_config(case.model, case.config_overrides))
    assert inv.params_total == stored  # tied embeddings are stored once, and counted once
    assert estimate(inv, case.job).peak_allocated_bytes == ours.estimated_peak


def test_per_layer_fields_follow_the_layer_count():
    smol3 = apply_overrides(_config("HuggingFaceTB/SmolLM3-3B"), {"num_hidden_layers": 4})
    assert smol3["num_hidden_layers"] == 4
    assert smol3["no_rope_layers"] == [1, 1, 1, 0] and len(smol3["layer_types"]) == 4
    gemma = apply_overrides(_config("google/gemma-3-4b-it"), {"num_hidden_layers": 6})
    assert gemma["text_config"]["num_hidden_layers"] == 6 and "num_hidden_layers" not in gemma  # where Gemma 3 keeps it
    oss = apply_overrides(_config("openai/gpt-oss-20b"), {"num_hidden_layers": 2, "quantization_config": None})
    assert "quantization_config" not in oss and oss["layer_types"] == ["sliding_attention", "full_attention"]
    scout = apply_overrides(_config("meta-llama/Llama-4-Scout-17B-16E-Instruct"), {"num_hidden_layers": 2, "no_rope_layers": [1, 0]})
    assert scout["text_config"]["no_rope_layers"] == [1, 0]
    assert id_suffix({"num_hidden_layers": 2, "no_rope_layers": [1, 0]}) == "L2-nope10"
    assert id_suffix({"num_hidden_layers": 2, "first_k_dense_replace": 1, "quantization_config": None}) == "L2-dense1-noquant"


@pytest.mark.parametrize("model, overrides", [
    ("Qwen/Qwen3-30B-A3B", {"num_hidden_layers": 4}),
    ("deepseek-ai/DeepSeek-V2-Lite", {"num_hidden_layers": 4}),  # one dense layer, three MoE
    ("deepseek-ai/DeepSeek-V3", {"num_hidden_layers": 2, "first_k_dense_replace": 1, "quantization_config": None}),
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", {"num_hidden_layers": 4}),  # three RoPE/chunked, one NoPE/full
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", {"num_hidden_layers": 2, "no_rope_layers": [1, 0]}),
    ("google/gemma-3-4b-it", {"num_hidden_layers": 6}),  # five sliding, one full
    ("openai/gpt-oss-20b", {"num_hidden_layers": 2, "quantization_config": None}),
])
def test_reductions_that_keep_every_layer_kind(model, overrides):
    reduced_config(_config(model), overrides)


@pytest.mark.parametrize("model, overrides, message", [
    ("google/gemma-3-4b-it", {"num_hidden_layers": 4}, "drops 1 of the model's 2 layer kinds"),
    ("deepseek-ai/DeepSeek-V3", {"num_hidden_layers": 2}, "drops 1 of the model's 2 layer kinds"),
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", {"num_hidden_layers": 2}, "drops 1 of the model's 2 layer kinds"),
    ("HuggingFaceTB/SmolLM3-3B", {"num_hiden_layers": 4}, "'num_hiden_layers' is not a field"),
    ("HuggingFaceTB/SmolLM3-3B", {"num_hidden_layers": 40}, "more than the model's 36 layers"),
    ("HuggingFaceTB/SmolLM3-3B", {"quantization_config": None}, "null removes a field"),
    ("HuggingFaceTB/SmolLM3-3B", {"num_hidden_layers": 0}, "must be a positive int"),
])
def test_an_invalid_override_is_refused_in_one_line(model, overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        reduced_config(_config(model), overrides)
    assert "\n" not in str(err.value)


def test_a_bad_override_in_a_cases_file_stops_the_harness_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="config_overrides: expected a non-empty mapping"):
        expand([{"model": "m/x", "config_overrides": [4]}])
    cases = tmp_path / "cases.yaml"
    cases.write_text("- {model: google/gemma-3-4b-it, config_overrides: {num_hidden_layers: 4}, mode: inference}\n")
    proc = subprocess.run([sys.executable, "-m", "validation.measure", "--cases", str(cases), "--out", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, CANIRUN_MEASURE_DEVICE="cpu", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and not (tmp_path / "o.jsonl").exists()
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert len(lines) == 1 and "gemma-3-4b-it-inference-L4" in lines[0] and "drops 1" in lines[0], proc.stderr


def test_the_families_file_is_all_holdouts_on_new_families():
    """Issue 13's bar: at least 20 cases (24 written) over at least 8 families (9) with no case yet,
    LoRA on an MLA MoE model and QLoRA on an MoE model among them; every one a holdout."""
    cases = load_cases(ROOT / "validation" / "cases_h200_families.yaml")
    assert len(cases) >= 24 and all(c.holdout for c in cases)
    type_of = {c.id: measure.case_config(c.model, c.config_overrides).get("model_type") for c in cases}
    # new against every other measured row (the families rounds' own rows excepted, and the rounds
    # measured after this one: c's MoE decodes, d's traced steps with SmolLM3 among them, e to j)
    later = ("h200-families.jsonl", "h200-families-b.jsonl", "h200-device-c.jsonl", "h200-device-d.jsonl",
             "h200-device-e.jsonl", "h200-trainer-e.jsonl", "h200-device-f.jsonl", "h200-references-f.jsonl",
             "h200-moe-g.jsonl", "h200-sft-h.jsonl", "h200-device-j.jsonl")
    measured = {json.loads(line)["model"] for d in ("results", "results_h200", "results_trainer")
                for path in (ROOT / "validation" / d).glob("*.jsonl") if path.name not in later
                for line in path.read_text().splitlines() if line.strip()}
    measured_types = {find_entry(m).config().get("model_type") for m in measured}
    # DeepSeek-V2-Lite has one inference row; its LoRA case is here for the MLA MoE mechanism.
    assert set(type_of.values()) & measured_types == {"deepseek_v2"}
    new = [c for c in cases if type_of[c.id] not in measured_types]
    assert len(new) >= 24 and len({type_of[c.id] for c in new}) >= 9
    assert {c.job.mode.value for c in cases} == {"inference", "full", "lora", "qlora"}
    mla_moe = {"deepseek_v2", "deepseek_v3"}
    assert any(c.job.mode.value == "lora" and type_of[c.id] in mla_moe for c in cases)
    moe = {"qwen3_moe", "mixtral", "llama4", "deepseek_v3", "qwen3_next", "gpt_oss"}
    assert any(c.job.mode.value == "qlora" and type_of[c.id] in moe for c in cases)
    # PEFT's ParamWrapper (all-linear on 3-D experts) refuses dropout: every MoE LoRA case sets 0
    assert all(c.job.lora_dropout == 0 for c in cases if c.job.uses_lora and type_of[c.id] in moe | mla_moe)


def test_the_second_families_file_is_new_holdouts_on_families_without_h100_cases():
    """Issue 13's bar for the second round: at least 20 cases over at least 8 families (model types)
    with no case in validation/results/, LoRA on an MLA MoE model and QLoRA on an MoE model among
    them, every one a holdout, and none of them a case the first round measured."""
    cases = load_cases(ROOT / "validation" / "cases_h200_families_b.yaml")
    first = {c.id for c in load_cases(ROOT / "validation" / "cases_h200_families.yaml")}
    assert len(cases) >= 20 and all(c.holdout for c in cases) and not first & {c.id for c in cases}
    type_of = {c.id: measure.case_config(c.model, c.config_overrides).get("model_type") for c in cases}
    h100 = {json.loads(line)["model"] for path in (ROOT / "validation" / "results").glob("*.jsonl")
            for line in path.read_text().splitlines() if line.strip()}
    h100_types = {find_entry(m).config().get("model_type") for m in h100}
    assert not set(type_of.values()) & h100_types and len(set(type_of.values())) >= 8
    assert any(c.job.mode.value == "lora" and type_of[c.id] == "deepseek_v3" for c in cases)
    moe = {"qwen3_moe", "mixtral", "llama4", "deepseek_v3", "qwen3_next", "gpt_oss", "minimax_m2"}
    assert any(c.job.mode.value == "qlora" and type_of[c.id] in moe for c in cases)
    assert all(c.job.lora_dropout == 0 for c in cases if c.job.uses_lora and type_of[c.id] in moe)


def test_every_training_row_carries_both_trainable_counts():
    case = Case("c", "HuggingFaceTB/SmolLM2-135M", Job(mode="lora", lora_r=4), True, {"num_hidden_layers": 2})
    ours = measure.estimator_trainable(case)["estimator_params_trainable"]
    assert isinstance(ours, int) and ours > 0
    assert measure.estimator_trainable(Case("i", "HuggingFaceTB/SmolLM2-135M", Job())) == {}
    row = {**case.header(), "status": "ok", "params_trainable": ours, "peak_allocated_bytes": 1, "device_total_bytes": 1}
    same = report.compare(row)
    assert same.estimated_trainable == ours and same.trainable_equal is True
    off = report.compare(dict(row, params_trainable=ours + 8))
    assert off.trainable_equal is False


def test_the_families_report_shows_the_trainable_counts(monkeypatch):
    monkeypatch.setattr(report, "edge_rows", lambda: [])
    gib = 1024**3
    rows = [
        report.Comparison("a-lora", "m", "lora", True, "ok", gib, gib, gib, gib, measured_trainable=100, estimated_trainable=100),
        report.Comparison("b-qlora", "m", "qlora", True, "ok", gib, gib, gib, gib, measured_trainable=100, estimated_trainable=90),
        report.Comparison("c-inf", "m", "inference", True, "ok", gib, gib, gib, gib, measured_trainable=0, estimated_trainable=0),
    ]
    text = report.render_h200([(report.TRAINABLE_SETS[0], rows)], "cmd")
    assert "trainable: PEFT / ours" in text
    assert "| 100 / 100 equal |" in text and "100 / 90 **differ** (-10)" in text
    assert "ours equal PEFT's on 1 of 2." in text
    other = report.render_h200([("plain loop: calibration reruns", rows)], "cmd")
    assert "trainable" not in other  # the committed sets render as before


def test_the_parent_leaves_torch_idle_the_counts_come_from_a_child():
    """The harness forks its cases; the estimator's counts and the override checks run in forked
    children, so the parent never starts OpenMP (a forked child of a parent that has deadlocks)."""
    case = Case("c", "HuggingFaceTB/SmolLM2-135M", Job(mode="lora", lora_r=4), True, {"num_hidden_layers": 2})
    counts = measure.estimator_trainable_by_case([case, Case("i", "HuggingFaceTB/SmolLM2-135M", Job())])
    assert set(counts) == {"c"} and counts["c"] == measure.estimator_trainable(case)
    bad = Case("g", "google/gemma-3-4b-it", Job(), True, {"num_hidden_layers": 4})
    assert "drops 1 of the model's 2 layer kinds" in measure._checked_in_child([bad])
    assert measure._checked_in_child([case]) is None

"""The validation harness without a GPU: cases, result parsing, report maths, the peers, a dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator import Job, inventory_from_config
from estimator.catalog import find_entry
from validation import peers
from validation.cases import expand, load_cases, select
from validation.report import Comparison, load_rows, render_markdown, summarize, summary_rows

ROOT = Path(__file__).resolve().parent.parent


def test_committed_cases_load_and_meet_the_matrix():
    cases = load_cases(ROOT / "validation" / "cases.yaml")
    assert len(cases) >= 40
    assert {c.job.mode.value for c in cases} == {"inference", "full", "lora", "qlora"}
    assert {c.job.optimizer.value for c in cases if c.job.is_training} == {
        "adamw_fused", "adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor"
    }
    weights = {c.job.weights.value for c in cases if c.job.mode.value == "inference"}
    assert {"fp32", "bf16", "int8", "nf4"} <= weights
    assert any(not c.job.double_quant for c in cases) and any(c.job.gradient_checkpointing for c in cases)
    assert sum(c.job.attn.value == "eager" for c in cases) >= 2
    assert any(c.holdout for c in cases) and any(not c.holdout for c in cases)
    for c in cases:
        assert find_entry(c.model) is not None, c.model


def test_grid_expansion_and_ids():
    cases = expand([
        {"model": "Qwen/Qwen2.5-0.5B", "mode": "lora", "lora_r": 8},
        {"grid": {"model": ["meta-llama/Llama-3.2-1B"], "mode": ["full"], "optimizer": ["sgd", "adafactor"], "batch_size": [1, 2]}, "holdout": True},
    ])
    assert len(cases) == 5
    assert cases[0].id == "qwen2.5-0.5b-lora-r8"
    assert {c.id for c in cases[1:]} == {
        "llama-3.2-1b-full-b1-sgd", "llama-3.2-1b-full-b2-sgd", "llama-3.2-1b-full-b1-adafactor", "llama-3.2-1b-full-b2-adafactor"
    }
    assert all(c.holdout for c in cases[1:])


def test_bad_cases_are_refused():
    with pytest.raises(ValueError, match="needs a model"):
        expand([{"mode": "full"}])
    with pytest.raises(ValueError, match="duplicate case id"):
        expand([{"model": "m/x", "mode": "full"}, {"model": "m/x", "mode": "full"}])
    with pytest.raises(ValueError, match="batch_size"):
        expand([{"model": "m/x", "batch_size": 0}])


def test_select_by_pattern():
    cases = expand([{"model": "a/one", "mode": "full"}, {"model": "b/two", "mode": "lora"}])
    assert [c.id for c in select(cases, ["two-*"])] == ["two-lora"]
    assert len(select(cases, None)) == 2


def test_result_parsing(tmp_path):
    good = {"case": "x", "model": "Qwen/Qwen2.5-0.5B", "job": Job().to_dict(), "status": "ok"}
    (tmp_path / "a.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(dict(good, status="oom")) + "\n")
    rows = load_rows(tmp_path)
    assert len(rows) == 1 and rows[0]["status"] == "oom"  # a later line replaces an earlier one
    (tmp_path / "b.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="b.jsonl:1"):
        load_rows(tmp_path)


def test_report_maths():
    assert summarize([0.01, -0.05, None, 0.02]) == (3, 0.02, 0.05)
    assert summarize([None]) == (0, None, None)
    gib = 1024**3
    c = Comparison("c", "m", "lora", False, "ok", 10 * gib, 11 * gib, 20 * gib, 19 * gib, {"can_it_run_llm": 10 * gib, "accelerate": None, "gpu_poor": 40 * gib})
    assert c.peak_error == pytest.approx(0.1) and c.device_error == pytest.approx(-0.05)
    assert c.peer_error("can_it_run_llm") == pytest.approx(-0.5) and c.peer_error("accelerate") is None
    rows = summary_rows([c])
    assert rows[0]["group"] == "all" and rows[0]["peak"] == (1, pytest.approx(0.1), pytest.approx(0.1))
    text = render_markdown([c], "cmd")
    assert "| c | calibration | 10.00 | 11.00 | +10.0% |" in text


def test_peer_formulas_by_hand():
    inv = inventory_from_config(find_entry("meta-llama/Llama-3.1-8B").config())
    p = peers.automodel_params(inv)
    assert p == 8_030_261_248 - 128_256 * 4096  # AutoModel has no untied lm_head
    assert peers.can_it_run_llm(inv, Job(weights="bf16")) == int(1.2 * 2 * p)
    assert peers.can_it_run_llm(inv, Job(mode="full", precision="bf16")) == int(4 * 2 * p)
    assert peers.can_it_run_llm(inv, Job(mode="qlora")) == int(1.2 * (p / 2 + p * 0.02 * 8))
    assert peers.accelerate_estimate(inv, Job(mode="full", precision="amp_bf16")) == 16 * p
    assert peers.accelerate_estimate(inv, Job(mode="full", precision="bf16")) == 8 * p
    assert peers.accelerate_estimate(inv, Job(mode="lora")) is None
    gp = 2 * 128_256 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 14336)
    kv = 1 * 2 * (512 + 256) * 2 * 2 * 4096 * 32
    act = 1 * (10 * 768 * 4096 + 2 * 32 * 768 * 768)
    assert peers.gpu_poor(inv, Job(prompt_len=512, new_tokens=256)) == int(2 * gp + kv + act + 650 * 1024**2)


def test_measure_lists_cases_without_a_gpu():
    out = subprocess.run(
        [sys.executable, "-m", "validation.measure", "--list", "--only", "*-qlora-*"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and all("-qlora-" in line for line in out.stdout.splitlines())


@pytest.mark.slow
def test_measure_dry_run_on_cpu(tmp_path):
    """The harness end to end on the CPU (counters read 0): checkpoint, fork, LoRA step, census."""
    cases = tmp_path / "cases.yaml"
    cases.write_text("- {model: HuggingFaceTB/SmolLM2-135M, mode: lora, lora_r: 4, batch_size: 1, seq_len: 16}\n")
    out_file = tmp_path / "out.jsonl"
    env = dict(os.environ, CANIRUN_MEASURE_DEVICE="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "validation.measure", "--cases", str(cases), "--out", str(out_file), "--work", str(tmp_path / "w"), "--diag"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out_file.read_text().splitlines()[0])
    assert row["status"] == "ok", row.get("error")
    assert row["params_total"] == 134_515_008
    assert row["params_trainable"] > 0 and len(row["steps"]) == 3
    assert row["saved_tensors"]["rows"]


@pytest.mark.parametrize(
    "job, dtype, autocast, quant",
    [
        (Job(mode="inference", weights="fp16"), "float16", None, None),
        (Job(mode="inference", weights="int8"), "bfloat16", None, "int8"),
        (Job(mode="inference", weights="fp4", double_quant=False), "bfloat16", None, ("fp4", False)),
        (Job(mode="full"), "float32", "bfloat16", None),
        (Job(mode="full", precision="amp_fp16"), "float32", "float16", None),
        (Job(mode="full", precision="bf16"), "bfloat16", None, None),
        (Job(mode="lora", base_dtype="fp16"), "float16", "bfloat16", None),
        (Job(mode="qlora"), "bfloat16", "bfloat16", ("nf4", True)),
    ],
)
def test_harness_loads_as_the_regime_says(job, dtype, autocast, quant):
    """SPEC's loading rules, as the harness applies them from the estimator's regime (CPU only)."""
    import torch

    from validation.measure import autocast_dtype, from_pretrained_kwargs

    kwargs = from_pretrained_kwargs(job)
    assert kwargs["dtype"] is getattr(torch, dtype)
    assert kwargs["attn_implementation"] == job.attn.value
    assert autocast_dtype(job) is (getattr(torch, autocast) if autocast else None)
    config = kwargs.get("quantization_config")
    if quant is None:
        assert config is None
    elif quant == "int8":
        assert config.load_in_8bit and not config.load_in_4bit
    else:
        assert config.load_in_4bit and config.bnb_4bit_quant_type == quant[0]
        assert config.bnb_4bit_use_double_quant is quant[1] and config.bnb_4bit_compute_dtype is torch.bfloat16


def test_the_harness_sets_the_allocator_before_cuda(monkeypatch):
    from validation.measure import apply_allocator_settings

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage")
    apply_allocator_settings(Job(expandable_segments=True))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    apply_allocator_settings(Job())
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_edge_search_brackets_and_bisects_to_the_boundary():
    from validation.edge import EdgeCase, search

    case = EdgeCase("x", "m/x", Job(mode="full"), "batch_size", "H200 SXM 141GB")
    for boundary, start in ((37, 40), (37, 30), (37, 37), (1, 5), (200, 190)):
        sizes = []

        def run(size, boundary=boundary):
            sizes.append(size)
            return {"status": "ok"} if size <= boundary else {"status": "oom", "error": "CUDA out of memory"}

        row = search(case, run, start, max_probes=12)
        assert (row["largest_ok"], row["smallest_failed"], row["status"]) == (boundary, boundary + 1, "exact"), (boundary, start, sizes)
        assert len(sizes) <= 12
    row = search(case, lambda size: {"status": "oom"}, 3)
    assert row["largest_ok"] is None and row["smallest_failed"] == 1
    cublas = search(case, lambda size: {"status": "error", "error": "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"} if size > 9
                    else {"status": "ok"}, 10)
    assert cublas["largest_ok"] == 9  # a handle that cannot be made is a memory failure too
    other = search(case, lambda size: {"status": "error", "error": "KeyError: x"}, 10)
    assert other["status"] == "error"


def test_edge_cases_file_loads_with_unique_ids_and_both_allocators():
    from validation.edge import load_edge_cases

    cases = load_edge_cases(ROOT / "validation" / "cases_edge.yaml")
    assert len(cases) >= 12 and len({c.id for c in cases}) == len(cases)
    assert {c.job.expandable_segments for c in cases} == {True, False}
    assert {c.job.mode.value for c in cases} >= {"inference", "full", "lora", "qlora"}


def test_snapshot_stream_and_its_peaks(tmp_path):
    """validation.snapshot reads what torch.cuda.memory._dump_snapshot writes (a pickled dict)."""
    import gzip
    import pickle

    from validation.snapshot import convert, peaks

    trace = [
        {"action": "segment_alloc", "addr": 0, "size": 20 << 20, "frames": []},
        {"action": "alloc", "addr": 0, "size": 3 << 20, "frames": []},
        {"action": "alloc", "addr": 3 << 20, "size": 3 << 20, "frames": []},
        {"action": "free_requested", "addr": 0, "size": 3 << 20, "frames": []},
        {"action": "free_completed", "addr": 0, "size": 3 << 20, "frames": []},
        {"action": "segment_alloc", "addr": 1 << 30, "size": 40 << 20, "frames": []},
        {"action": "segment_free", "addr": 1 << 30, "size": 40 << 20, "frames": []},
    ]
    path = tmp_path / "case-a.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [trace]}))
    out = convert(path, tmp_path / "out")
    data = json.loads(gzip.open(out, "rt").read())
    assert data["case"] == "case-a" and [e[0] for e in data["events"]][:3] == ["segment_alloc", "alloc", "alloc"]
    assert "free_requested" not in [e[0] for e in data["events"]]
    assert (data["peak_reserved_bytes"], data["peak_allocated_bytes"]) == (60 << 20, 6 << 20)
    assert peaks([]) == (0, 0)


def test_snapshot_with_frames_keeps_each_allocations_line(tmp_path):
    """A history recorded with frames gets "sites": for each kept event, in order, the first library
    frame of an allocation (torch's own skipped), None for a free or a segment event; one without
    frames gets no "sites" at all."""
    import gzip
    import pickle

    from validation.snapshot import convert

    torch_frame = {"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"}
    bnb = {"filename": "/x/site-packages/bitsandbytes/functional.py", "line": 120, "name": "dequantize_4bit"}
    trace = [
        {"action": "segment_alloc", "addr": 0, "size": 20 << 20, "frames": [torch_frame, bnb]},
        {"action": "alloc", "addr": 0, "size": 3 << 20, "frames": [torch_frame, bnb]},
        {"action": "free_requested", "addr": 0, "size": 3 << 20, "frames": [torch_frame]},
        {"action": "free_completed", "addr": 0, "size": 3 << 20, "frames": [torch_frame]},
    ]
    path = tmp_path / "framed.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [trace]}))
    data = json.loads(gzip.open(convert(path, tmp_path / "out"), "rt").read())
    assert data["sites"] == [None, "bitsandbytes/functional.py:120 dequantize_4bit", None]
    assert len(data["sites"]) == len(data["events"])
    bare = tmp_path / "bare.pickle"
    bare.write_bytes(pickle.dumps({"device_traces": [[{**e, "frames": []} for e in trace]]}))
    assert "sites" not in json.loads(gzip.open(convert(bare, tmp_path / "out"), "rt").read())


def test_snapshot_explain_groups_the_blocks_alive_at_peak_by_the_line_that_allocated_them():
    """validation.snapshot.explain, worked by hand: the peak (7 MiB) is after the third alloc; the
    first block was freed before it, so the two alive come from two lines; torch's own frames are
    skipped for the first library frame, and a block freed that was allocated before the recording
    began changes nothing."""
    from validation.snapshot import explain

    mib = 2**20
    torch_frame = {"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"}
    moe = {"filename": "/x/site-packages/transformers/integrations/moe.py", "line": 445, "name": "grouped_mm_experts_forward"}
    norm = {"filename": "/x/site-packages/transformers/models/llama/modeling_llama.py", "line": 60, "name": "forward"}
    trace = [
        {"action": "alloc", "addr": 1, "size": 4 * mib, "frames": [norm]},
        {"action": "free_completed", "addr": 1, "size": 4 * mib, "frames": []},
        {"action": "free_completed", "addr": 77, "size": 9 * mib, "frames": []},
        {"action": "alloc", "addr": 2, "size": 5 * mib, "frames": [torch_frame, moe]},
        {"action": "alloc", "addr": 3, "size": 2 * mib, "frames": [norm]},
        {"action": "free_completed", "addr": 2, "size": 5 * mib, "frames": []},
        {"action": "alloc", "addr": 4, "size": 1 * mib, "frames": [moe]},
    ]
    report = explain({"device_traces": [trace]})
    assert report["peak_allocated_above_base_bytes"] == 7 * mib
    assert report["sites"] == [
        {"site": "transformers/integrations/moe.py:445 grouped_mm_experts_forward", "bytes": 5 * mib, "blocks": 1},
        {"site": "transformers/models/llama/modeling_llama.py:60 forward", "bytes": 2 * mib, "blocks": 1},
    ]


def test_snapshot_dir_reaches_each_case_process(tmp_path, monkeypatch):
    from validation import measure

    monkeypatch.setenv("CANIRUN_SNAPSHOT_DIR", "unset-by-teardown")  # monkeypatch removes it afterwards
    parser = __import__("argparse").ArgumentParser()
    measure.add_run_arguments(parser, "validation/cases.yaml", str(tmp_path / "out.jsonl"))
    args = parser.parse_args(["--snapshot-dir", str(tmp_path / "snaps"), "--list", "--only", "nothing-matches"])
    assert measure.run_cases([], args, measure_one=None, module="validation.measure", header=None) == 0
    assert os.environ["CANIRUN_SNAPSHOT_DIR"] == str((tmp_path / "snaps").resolve())
    assert "CANIRUN_SDPA_BACKENDS" not in os.environ  # only when asked
    monkeypatch.setenv("CANIRUN_SDPA_BACKENDS", "unset-by-teardown")
    args = parser.parse_args(["--sdpa-backends", "flash,efficient", "--list", "--only", "nothing-matches"])
    assert measure.run_cases([], args, measure_one=None, module="validation.measure", header=None) == 0
    assert os.environ["CANIRUN_SDPA_BACKENDS"] == "flash,efficient"
    assert (tmp_path / "snaps").is_dir()  # made here: torch.cuda.memory._dump_snapshot does not make it


def test_snapshot_replay_feeds_the_allocator_in_order():
    """validation.snapshot.replay: a stream's allocs and frees, matched by address, through the replay.
    Worked by hand: two 3 MiB requests share one 20 MiB segment (kLargeBuffer, split as the rest is
    over 1 MiB); the 2 MiB request after the first free reuses its block; a free of an address never
    allocated in the stream (allocated before recording began) is skipped."""
    from validation.snapshot import replay

    mib = 2**20
    events = [["alloc", 100, 3 * mib], ["alloc", 200, 3 * mib], ["free_completed", 100, 3 * mib],
              ["free_completed", 999, 5 * mib], ["alloc", 300, 2 * mib], ["alloc", 400, 30 * mib]]
    alloc = replay(events)
    assert alloc.peak_reserved_bytes == 20 * mib + 30 * mib
    assert alloc.allocated_bytes == 3 * mib + 3 * mib + 30 * mib  # the reused 3 MiB block is not split (rest is 1 MiB)


def test_profile_generate_runs_a_short_generate_under_the_profiler(monkeypatch):
    """validation.measure.profile_generate on the CPU (a tiny random Llama, the harness's dry-run
    device): the wall time and the profiler's kernel time of a short generate(); on the CPU there
    are no CUDA kernels, so 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from validation import measure

    monkeypatch.setattr(measure, "DEVICE", "cpu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    job = Job(mode="inference", batch_size=2, prompt_len=8, new_tokens=4)
    out = measure.profile_generate(model, job, measure.spec_prompt(model, job, "cpu"), new_tokens=3)
    assert "error" not in out, out
    assert out["new_tokens"] == 3 and out["wall_seconds"] > 0 and out["kernel_seconds"] == 0

"""The multi-GPU harness on the CPU: its cases file, the merge of per-rank results, the report's
arithmetic, and one end-to-end dry run through torchrun with gloo (no GPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from estimator import estimate, inventory_from_config
from estimator.catalog import find_entry
from estimator.fit import Strategy, per_gpu
from validation import multigpu, report_multigpu
from validation.multigpu import Kind, MultiCase, load_multi_cases, merge

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "validation" / "cases_multigpu.yaml"
GIB = 1024**3
H200_BYTES = 143_771 * 1024**2  # what the driver reports for an H200 141GB


# ---------------------------------------------------------------------------------------------
# The cases file
# ---------------------------------------------------------------------------------------------
def test_case_file_loads_and_covers_every_kind():
    cases = load_multi_cases(CASES)
    assert len(cases) >= 8
    assert {m.kind for m in cases} == set(Kind)
    assert len({m.id for m in cases}) == len(cases)


@pytest.mark.parametrize("multi", load_multi_cases(CASES), ids=lambda m: m.id)
def test_every_case_maps_to_a_strategy_and_a_catalog_model(multi: MultiCase):
    assert multi.strategy is multi.kind.strategy
    assert multi.strategy in (Strategy.ZERO3, Strategy.ZERO2, Strategy.PIPELINE)
    assert multi.case.job.mode is multi.kind.mode
    assert 2 <= multi.nproc <= 4  # an H200 x2 or x4 box
    entry = find_entry(multi.case.model)
    assert entry is not None, f"{multi.case.model} is not in the catalog"
    figures = per_gpu(estimate(inventory_from_config(entry.config()), multi.case.job), multi.strategy, multi.nproc)
    # Chosen to fit: a case that runs out of memory measures no peak.
    assert figures.device_total_bytes < H200_BYTES


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cases.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ("{kind: fsdp_full_shard, strategy: zero2, nproc: 2, model: openai-community/gpt2, mode: full}", "zero3"),
        ("{kind: fsdp_full_shard, strategy: zero3, model: openai-community/gpt2, mode: full}", "nproc"),
        ("{kind: fsdp_full_shard, strategy: zero3, nproc: 2, model: openai-community/gpt2, mode: lora}", "full job"),
        ("{kind: sharded, strategy: zero3, nproc: 2, model: openai-community/gpt2, mode: full}", "kind must be"),
        ("{kind: device_map_auto, nproc: 2, model: openai-community/gpt2, mode: inference}", "pipeline"),
        ("{kind: fsdp_full_shard, strategy: zero3, nproc: 2, model: openai-community/gpt2, mode: full, optimizer: adamw_8bit}", "bitsandbytes"),
    ],
)
def test_bad_cases_are_refused_with_a_reason(tmp_path, line, message):
    with pytest.raises(ValueError, match=message):
        load_multi_cases(_write(tmp_path, f"- {line}\n"))


def test_ids_are_derived_per_kind_and_count(tmp_path):
    path = _write(
        tmp_path,
        "- {kind: fsdp_full_shard, strategy: zero3, nproc: 2, model: openai-community/gpt2, mode: full}\n"
        "- {kind: fsdp_shard_grad_op, strategy: zero2, nproc: 2, model: openai-community/gpt2, mode: full}\n",
    )
    ids = [m.id for m in load_multi_cases(path)]
    assert ids == ["gpt2-full-fsdp_full_shard-x2", "gpt2-full-fsdp_shard_grad_op-x2"]


# ---------------------------------------------------------------------------------------------
# The launcher's environment and command
# ---------------------------------------------------------------------------------------------
def test_every_launch_keeps_nvlink_multicast_off(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2,1,0")
    env = multigpu.launch_env(2, dry_run_cpu=False)
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "3,2"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert multigpu.launch_env(1, dry_run_cpu=True)["CUDA_VISIBLE_DEVICES"] == ""


def test_torchrun_command():
    command = multigpu.torchrun_command(Path("c.json"), Path("ckpt"), Path("out"), 4, dry_run_cpu=True)
    assert command[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m"]
    assert command[7] == "validation.multigpu"
    assert "--worker" in command and command[-1] == "--dry-run-cpu"


# ---------------------------------------------------------------------------------------------
# Merging per-rank results
# ---------------------------------------------------------------------------------------------
def _multi(kind=Kind.FSDP_FULL_SHARD, nproc=2) -> MultiCase:
    from estimator.job import Job
    from validation.cases import Case

    mode = {Kind.DEVICE_MAP_AUTO: "inference", Kind.LORA_FSDP: "lora"}.get(kind, "full")
    job = Job(mode=mode, batch_size=2, seq_len=1024)
    return MultiCase(Case("c", "meta-llama/Llama-3.2-1B", job), kind, kind.strategy, nproc)


def _device(index, peak, device, reserved=None) -> dict:
    return {"index": index, "peak_allocated_bytes": peak, "peak_reserved_bytes": reserved or peak, "device_total_bytes": device}


def _rank(rank, *devices, status="ok") -> dict:
    return {"rank": rank, "status": status, "devices": list(devices), "versions": {"torch": "x"}}


def test_merge_takes_the_worst_rank():
    ranks = {
        0: _rank(0, _device(0, 10 * GIB, 12 * GIB, 11 * GIB)),
        1: _rank(1, _device(1, 11 * GIB, 11 * GIB + 5, 11 * GIB)),
        2: _rank(2, _device(2, 9 * GIB, 13 * GIB, 10 * GIB)),
    }
    row = merge(_multi(nproc=3), 3, ranks, {"returncode": 0, "timed_out": False})
    assert row["status"] == "ok" and "error" not in row
    assert [r["rank"] for r in row["ranks"]] == [0, 1, 2]
    assert row["worst_rank"] == 1
    assert row["worst_rank_peak_allocated_bytes"] == 11 * GIB
    # Each figure is the worst over ranks: the fullest GPU by device use can be another rank.
    assert row["worst_rank_device_total_bytes"] == 13 * GIB
    assert row["worst_rank_peak_reserved_bytes"] == 11 * GIB
    assert row["strategy"] == "zero3" and row["nproc"] == 3
    assert row["versions"] == {"torch": "x"}


def test_merge_records_a_failed_rank_and_a_missing_one():
    ranks = {1: {"rank": 1, "status": "oom", "error": "CUDA out of memory. Tried to allocate 2 GiB", "peak_allocated_bytes": 70 * GIB}}
    row = merge(_multi(), 2, ranks, {"returncode": 1, "timed_out": False})
    assert row["status"] == "oom"
    assert row["error"].startswith("rank 1: CUDA out of memory")
    assert row["ranks"][0]["status"] == "missing"
    assert "another rank failed" in row["ranks"][0]["error"]
    assert row["worst_rank_peak_allocated_bytes"] == 70 * GIB
    assert row["worst_rank_device_total_bytes"] is None


def test_merge_of_a_hung_case_is_an_error():
    row = merge(_multi(), 2, {}, {"returncode": -9, "timed_out": True, "timeout_s": 60})
    assert row["status"] == "error"
    assert "killed after 60" in row["ranks"][0]["error"]


def test_merge_of_a_launcher_failure_with_every_rank_ok_is_still_an_error():
    ranks = {0: _rank(0, _device(0, 1, 1)), 1: _rank(1, _device(1, 1, 1))}
    row = merge(_multi(), 2, ranks, {"returncode": 1, "timed_out": False, "stderr_tail": "boom"})
    assert row["status"] == "error" and "boom" in row["error"]


def test_merge_of_device_map_auto_reads_every_gpu_of_rank_0():
    ranks = {0: _rank(0, _device(0, 5 * GIB, 6 * GIB), _device(1, 7 * GIB, 8 * GIB)), 1: {"rank": 1, "status": "ok", "role": "idle"}}
    row = merge(_multi(Kind.DEVICE_MAP_AUTO), 2, ranks, {"returncode": 0})
    assert row["status"] == "ok"
    assert (row["worst_rank"], row["worst_device"]) == (0, 1)
    assert row["worst_rank_peak_allocated_bytes"] == 7 * GIB
    assert row["worst_rank_device_total_bytes"] == 8 * GIB
    assert row["strategy"] == "pipeline"


# ---------------------------------------------------------------------------------------------
# The report's arithmetic
# ---------------------------------------------------------------------------------------------
def _merged_row(**changes) -> dict:
    row = merge(
        _multi(nproc=2),
        2,
        {0: _rank(0, _device(0, 20 * GIB, 24 * GIB)), 1: _rank(1, _device(1, 21 * GIB, 25 * GIB))},
        {"returncode": 0},
    )
    row.update(changes)
    return row


def test_report_compares_the_worst_rank_with_per_gpu():
    row = _merged_row()
    c = report_multigpu.compare(row)
    entry = find_entry("meta-llama/Llama-3.2-1B")
    expected = per_gpu(estimate(inventory_from_config(entry.config()), _multi().case.job), Strategy.ZERO3, 2)
    assert (c.estimated_peak_bytes, c.estimated_device_bytes) == (expected.peak_allocated_bytes, expected.device_total_bytes)
    assert (c.measured_peak_bytes, c.measured_device_bytes) == (21 * GIB, 25 * GIB)
    assert c.peak_error == pytest.approx((expected.peak_allocated_bytes - 21 * GIB) / (21 * GIB))
    assert c.device_error == pytest.approx((expected.device_total_bytes - 25 * GIB) / (25 * GIB))
    table = report_multigpu.render([c])
    assert "| c | zero3 | 2 | ok |" in table
    assert f"{c.peak_error * 100:+.1f}%" in table


def test_report_uses_the_gpu_count_that_ran_not_the_case_files():
    c = report_multigpu.compare(_merged_row(nproc=1, num_gpus=1))
    entry = find_entry("meta-llama/Llama-3.2-1B")
    one = per_gpu(estimate(inventory_from_config(entry.config()), _multi().case.job), Strategy.ZERO3, 1)
    assert c.num_gpus == 1 and c.estimated_peak_bytes == one.peak_allocated_bytes


def test_report_scores_no_dry_run_and_no_failure():
    dry = report_multigpu.compare(_merged_row(dry_run=True))
    oom = report_multigpu.compare(_merged_row(status="oom", error="rank 0: out of memory"))
    assert dry.peak_error is None and dry.device_error is None
    assert oom.peak_error is None and "out of memory" in oom.note
    assert "nothing is scored" in report_multigpu.render([dry, oom])


def test_report_without_results_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report_multigpu, "RESULTS_DIR", tmp_path)
    assert report_multigpu.main([]) == 0
    assert capsys.readouterr().out.startswith("No multi-GPU results yet")


def test_report_reads_merged_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_merged_row()) + "\n" + json.dumps(_merged_row(status="error")) + "\n")
    rows = report_multigpu.load_rows([path])
    assert len(rows) == 1 and rows[0]["status"] == "error"  # the later line for a case wins


# ---------------------------------------------------------------------------------------------
# End to end on the CPU: torchrun, gloo, FSDP2, three steps, the merge
# ---------------------------------------------------------------------------------------------
TINY = "HuggingFaceTB/SmolLM2-135M"


def test_a_failing_rank_writes_its_result_and_exits_non_zero(tmp_path):
    """The worker alone (as torchrun would start it, with one rank): the checkpoint is missing."""
    spec = tmp_path / "case.json"
    spec.write_text(json.dumps(_multi(nproc=1).to_dict()))
    env = multigpu.launch_env(1, dry_run_cpu=True)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    proc = subprocess.run(
        [sys.executable, "-m", "validation.multigpu", "--worker", str(spec), "--ckpt", str(tmp_path / "missing"),
         "--result-dir", str(tmp_path / "ranks"), "--dry-run-cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    rank = json.loads((tmp_path / "ranks" / "rank0.json").read_text())
    assert rank["status"] == "error" and rank["rank"] == 0 and "traceback" in rank
    assert rank["dry_run"] is True and "counter reads 0" in rank["memory_counters"]


TINY = "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.slow
def test_dry_run_on_cpu_end_to_end(tmp_path):
    cases = tmp_path / "tiny.yaml"
    # The failing case (no checkpoint can be built for a model outside the catalog) comes first:
    # the run must go on past it. fp32 (no autocast) keeps the CPU steps fast; amp_bf16 is the
    # same code with a MixedPrecisionPolicy, and bf16 matmuls are slow on a CPU.
    cases.write_text(
        "- {id: not-in-catalog, kind: fsdp_full_shard, strategy: zero3, nproc: 2, model: nobody/no-such-model,"
        " mode: full, batch_size: 1, seq_len: 32}\n"
        f"- {{id: tiny-full-shard, kind: fsdp_full_shard, strategy: zero3, nproc: 2, model: {TINY}, mode: full,"
        " precision: fp32, batch_size: 1, seq_len: 32}\n"
        f"- {{id: tiny-auto, kind: device_map_auto, strategy: pipeline, nproc: 2, model: {TINY}, mode: inference,"
        " batch_size: 1, prompt_len: 16, new_tokens: 4}\n"
    )
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "validation.multigpu", "--cases", str(cases), "--out", str(out), "--nproc", "1",
         "--dry-run-cpu", "--work", str(tmp_path / "work"), "--case-timeout", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["case"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == ["not-in-catalog", "tiny-full-shard", "tiny-auto"]

    bad = rows["not-in-catalog"]
    assert bad["status"] == "error" and "not in the offline catalog" in bad["error"]

    full = rows["tiny-full-shard"]
    assert full["status"] == "ok", full.get("error")
    assert full["nproc"] == 1 and full["strategy"] == "zero3" and full["dry_run"] is True
    assert "counter reads 0" in full["memory_counters"]
    (rank,) = full["ranks"]
    assert rank["rank"] == 0 and rank["world_size"] == 1 and rank["backend"] == "gloo"
    assert "fully_shard on 30 LlamaDecoderLayer" in rank["sharding"] and "reshard_after_forward=True" in rank["sharding"]
    assert len(rank["steps"]) == 3 and all(step["loss"] > 0 for step in rank["steps"])
    assert rank["params_trainable"] == rank["params_total"]
    assert full["worst_rank_peak_allocated_bytes"] == 0 and full["worst_rank_device_total_bytes"] == 0

    auto = rows["tiny-auto"]
    assert auto["status"] == "ok", auto.get("error")
    assert auto["ranks"][0]["generated_tokens"] == 4

    table = report_multigpu.render([report_multigpu.compare(r) for r in rows.values() if r["case"] != "not-in-catalog"])
    assert "CPU dry run" in table and "nothing is scored" in table

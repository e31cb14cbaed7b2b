"""Golden tests: the CLI's `--json` output over a grid, pinned byte for byte (issue 10).

The grid crosses 14 catalog models with every mode, every inference weight format (4-bit and
LLM.int8 included), every full fine-tuning precision, every LoRA base dtype, both QLoRA storage
formats with and without double quantization, and every optimizer (the MoE and Gemma models: one
per regime, in rotation), each with and without `--gpu` and `--strategy`. Sizes, gradient
checkpointing and attention rotate through the grid so that each model meets several of them. A
refactor that claims "behaviour unchanged" must leave every line of `tests/data/golden/cli.jsonl`
as it is.

When a change is meant to alter the output, regenerate the file and say why in the commit:

    CANIRUN_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
from pathlib import Path

import pytest

from estimator.cli import main

GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "cli.jsonl"

MODELS = (
    "openai-community/gpt2",
    "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.1-8B",
    "mistralai/Mistral-7B-v0.1",
    "mistralai/Mixtral-8x7B-v0.1",
    "Qwen/Qwen2.5-0.5B",
    "Qwen/Qwen3-8B",
    "Qwen/Qwen1.5-MoE-A2.7B-Chat",
    "google/gemma-2-2b-it",
    "google/gemma-3-1b-it",
    "microsoft/Phi-3-mini-4k-instruct",
    "deepseek-ai/DeepSeek-V2-Lite",
    "facebook/opt-1.3b",
    "HuggingFaceTB/SmolLM2-135M",
)
# Their training steps take seconds each to trace (the MoE models' expert by expert; Gemma's whole,
# since sliding and global layers alternate and a few traced layers cannot compose the stack), so
# they meet every training regime with one optimizer each, in rotation, instead of all seven: the
# optimizers' own state and step are crossed with every regime on the nine other models, and the
# lines kept are the ones the full cross had (same sizes, same placements).
ROTATED_MODELS = ("mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen1.5-MoE-A2.7B-Chat", "deepseek-ai/DeepSeek-V2-Lite",
                  "google/gemma-2-2b-it", "google/gemma-3-1b-it")
OPTIMIZERS = ("adamw_fused", "adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor")
INFERENCE_SIZES = (("1", "512", "128"), ("8", "2048", "256"), ("32", "128", "64"))
TRAINING_SIZES = (("1", "2048"), ("4", "1024"), ("16", "256"))
# (extra options, what they exercise): no GPU; a GPU with the default strategy; a GPU with each
# strategy the mode allows; a fixed count.
TRAINING_PLACEMENTS = ((), ("--gpu", "H100"), ("--gpu", "RTX 4090", "--strategy", "ddp"),
                       ("--gpu", "A10", "--strategy", "zero1"), ("--gpu", "L4", "--strategy", "zero2"),
                       ("--gpu", "A100 40GB", "--strategy", "zero3_offload"), ("--gpu", "H100", "--strategy", "zero3", "--num-gpus", "4"))
INFERENCE_PLACEMENTS = ((), ("--gpu", "RTX 4090"), ("--gpu", "T4", "--strategy", "pipeline"),
                        ("--gpu", "A10", "--strategy", "tensor_parallel"), ("--gpu", "L4", "--strategy", "single"),
                        ("--gpu", "H100", "--strategy", "pipeline", "--num-gpus", "2"))


def grid() -> list[tuple[str, ...]]:
    """Every command line of the grid, in a fixed order."""
    cases: list[tuple[str, ...]] = []
    for m, model in enumerate(MODELS):
        turn = itertools.count(m)  # rotates sizes and placements so models meet different ones
        for weights in ("fp32", "bf16", "fp16", "int8", "nf4", "fp4"):
            i = next(turn)
            b, p, n = INFERENCE_SIZES[i % len(INFERENCE_SIZES)]
            attn = ("--attn", "eager") if i % 5 == 0 else ()
            dq = ("--no-double-quant",) if weights in ("nf4", "fp4") and i % 2 else ()
            cases.append((model, "--mode", "inference", "--weights", weights, "--batch-size", b, "--prompt-len", p,
                          "--new-tokens", n, *attn, *dq, *INFERENCE_PLACEMENTS[i % len(INFERENCE_PLACEMENTS)]))
        trainings = [("full", "--precision", p) for p in ("amp_bf16", "amp_fp16", "bf16", "fp16", "fp32")]
        trainings += [("lora", "--base-dtype", d) for d in ("bf16", "fp16", "fp32")]
        trainings += [("qlora", "--quant", q) for q in ("nf4", "fp4")] + [("qlora", "--quant", "nf4", "--no-double-quant")]
        for (t, (mode, *regime)), (o, optimizer) in itertools.product(enumerate(trainings), enumerate(OPTIMIZERS)):
            i = next(turn)
            if model in ROTATED_MODELS and o != t % len(OPTIMIZERS):
                continue  # each regime once, the optimizer rotating (see ROTATED_MODELS)
            b, s = TRAINING_SIZES[i % len(TRAINING_SIZES)]
            extra: list[str] = []
            if i % 2:
                extra.append("--gradient-checkpointing")
            if i % 7 == 3:
                extra += ["--attn", "eager"]
            if mode != "full" and i % 3 == 1:
                extra += ["--lora-r", "64", "--lora-alpha", "128", "--lora-dropout", "0"]
            cases.append((model, "--mode", mode, *regime, "--optimizer", optimizer, "--batch-size", b, "--seq-len", s,
                          *extra, *TRAINING_PLACEMENTS[i % len(TRAINING_PLACEMENTS)]))
    # a LoRA with named targets, and the which-GPUs table, for a few models
    for model in MODELS[:3]:
        cases.append((model, "--mode", "lora", "--lora-targets", "q_proj,v_proj" if "gpt2" not in model else "c_attn", "--gpu", "H100"))
        cases.append((model, "--mode", "qlora", "--gradient-checkpointing", "--which-gpus", "--sort", "memory"))
    # refusals keep their exit status and their one line
    cases.append((MODELS[1], "--mode", "inference", "--gpu", "H100", "--strategy", "zero3"))
    cases.append((MODELS[1], "--mode", "full", "--gpu", "H100", "--strategy", "tensor_parallel"))
    cases.append((MODELS[1], "--mode", "inference", "--gpu", "H100", "--strategy", "tensor_parallel", "--num-gpus", "3"))
    cases.append((MODELS[0], "--mode", "lora", "--lora-targets", "no_such_proj"))
    return cases


def run(argv: tuple[str, ...]) -> dict:
    """One command line, in process: exit code, stdout parsed as JSON, and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--json"])
    body = json.loads(out.getvalue()) if code == 0 else None
    return {"argv": list(argv), "exit": code, "json": body, "stderr": err.getvalue()}


def _load() -> dict[tuple[str, ...], dict]:
    rows = [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]
    return {tuple(row["argv"]): row for row in rows}


def test_grid_covers_what_issue_10_asks():
    cases = grid()
    assert len({c[0] for c in cases}) >= 12
    flat = [" ".join(c) for c in cases]
    for weights in ("fp32", "bf16", "fp16", "int8", "nf4", "fp4"):
        assert any(f"--weights {weights}" in c for c in flat)
    for optimizer in OPTIMIZERS:
        assert any(f"--optimizer {optimizer}" in c and "--mode full" in c for c in flat)
        assert any(f"--optimizer {optimizer}" in c and "--mode qlora" in c for c in flat)
    assert any("--gpu" not in c for c in flat) and any("--gpu" in c and "--strategy" not in c for c in flat)
    assert any("--strategy" in c for c in flat)
    assert len(set(cases)) == len(cases)


def test_golden_file_matches_the_grid():
    if os.environ.get("CANIRUN_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text("".join(json.dumps(run(c), sort_keys=True) + "\n" for c in grid()))
    assert list(_load()) == grid(), "the golden file was written for another grid: regenerate it"


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_cli_json_is_unchanged(model):
    golden = _load()
    cases = [c for c in grid() if c[0] == model]
    assert cases
    for argv in cases:
        want = golden[argv]
        got = json.loads(json.dumps(run(argv), sort_keys=True))
        assert got == want, f"output changed for: python -m estimator {' '.join(argv)}"


def test_committed_report_regenerates_byte_for_byte(tmp_path):
    """`python -m validation.report --plot ''` rewrites validation/REPORT.md exactly (issue 10)."""
    from validation import report

    out, data, h200 = tmp_path / "REPORT.md", tmp_path / "accuracy.json", tmp_path / "REPORT_H200.md"
    assert report.main(["--out", str(out), "--plot", "", "--data", str(data), "--h200", str(h200)]) == 0
    assert h200.read_text() == Path(report.H200_PATH).read_text()
    assert out.read_text() == Path(report.REPORT_PATH).read_text()
    # the app's accuracy page reads this file: it must be the report's own figures
    assert data.read_text() == Path(report.DATA_PATH).read_text()

"""Training's traced request stream (estimator.train_trace) against allocator histories measured on
the H200, and its parts: the CUDA rules, composing a deep stack from a few layers, the later steps.

validation/results_h200/streams/ holds the allocator histories of the training steps the trace's
rules were read off: six in 16 bits (four of SPEC's plain loop, two of the Trainer) and round e's
three 4-bit references (QLoRA, two of the loop, one of the Trainer; recorded with each request's
line) (torch.cuda.memory._record_memory_history, compacted by validation.snapshot). The trace runs
the same job on fake tensors; replayed through the allocator model, it must reach the real
reserved and allocated peaks (within 0.3%). No GPU is needed: the histories are committed.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from estimator import Job, estimate
from estimator.catalog import find_entry
from estimator.inventory import inventory_from_config
from estimator.regime import regime_of, sizes_of
from estimator import train_trace as tt
from validation.cases import load_cases

ROOT = Path(__file__).resolve().parents[1]
STREAMS = ROOT / "validation" / "results_h200" / "streams"
MIB = 1024**2


def _case(case_id: str):
    if "-trainer-" in case_id:  # transformers.Trainer's cases, as the report estimates them
        from validation.trainer_cases import estimator_job, load_trainer_cases

        for path in ("cases_trainer.yaml", "cases_trainer_e.yaml"):
            for case in load_trainer_cases(ROOT / "validation" / path):
                if case.id == case_id:
                    return SimpleNamespace(model=case.model, job=Job.from_dict(dict(estimator_job(case), trainer=True)))
        raise KeyError(case_id)
    for path in sorted((ROOT / "validation").glob("cases*.yaml")):
        try:
            cases = load_cases(path)
        except Exception:  # noqa: BLE001 - other harnesses' case files
            continue
        for case in cases:
            if case.id == case_id:
                return case
    raise KeyError(case_id)


# The six training histories: SPEC's loop (full fine-tuning under amp with gradient checkpointing,
# bf16 with paged 8-bit AdamW, LoRA r64, Gemma 3's multimodal model with 8-bit AdamW) and the
# Trainer's (SGD without clipping under amp, Adafactor in bf16).
HISTORIES = (
    "qwen2.5-0.5b-full-amp_bf16-b16-s2048-adamw_fused-gc",
    "llama-3.2-3b-full-bf16-b2-s2048-paged_adamw_8bit-gc",
    "llama-3.2-3b-lora-b8-s4096-r64-gc",
    "gemma-3-4b-it-full-amp_bf16-b1-s512-adamw_8bit",
    "qwen2.5-0.5b-trainer-full-amp_bf16-b4-g1-s1024-sgd-clip0",
    "qwen2.5-0.5b-trainer-full-bf16-b4-g1-s1024-adafactor",
    "llama-3.2-1b-qlora-b4-s1024-r16",
    "llama-3.2-1b-trainer-qlora-b4-g1-s1024-r16-adamw_torch_fused",
)


@pytest.mark.parametrize("name", HISTORIES)
def test_traced_step_reaches_the_real_peaks(name):
    case = _case(name)
    with gzip.open(STREAMS / f"{name}.json.gz", "rt") as handle:
        real = json.load(handle)
    inv = inventory_from_config(find_entry(case.model).config())
    regime = regime_of(case.job)
    assert tt.untraced_reason(inv, regime) is None
    reserved, allocated = tt.step_reserve(inv, regime, sizes_of(case.job))
    # 0.2% (0.3% while the load went in `named_parameters` order: Llama-3.2-3B's paged 8-bit history
    # was +0.27%; in the checkpoint's sorted order, as transformers' loader goes, it is +0.01%)
    assert reserved == pytest.approx(real["peak_reserved_bytes"], rel=0.002)
    assert allocated == pytest.approx(real["peak_allocated_bytes"], rel=0.002)
    # and the estimate's device total is that reserved peak plus the context
    e = estimate(inv, case.job)
    assert e.device_total_bytes - e.breakdown["cuda_context"] - e.breakdown["paged_optimizer_state"] == max(reserved, e.peak_allocated_bytes)


# TRL's SFTTrainer (round f's reference histories, recorded with each request's line): full
# fine-tuning under bf16 autocast with checkpointing, and LoRA
SFT_HISTORIES = (
    "qwen2.5-0.5b-sft-full-bf16_autocast-b4-g1-s1024-adamw_torch_fused-gc",
    "llama-3.2-1b-sft-lora-b4-g1-s1024-r16-adamw_torch_fused-gc",
)


def _reference_job(name):
    import json as _json

    from validation import report

    with open(ROOT / "validation" / "results_trainer" / "h200-references-f.jsonl", encoding="utf-8") as handle:
        row = next(r for r in map(_json.loads, handle) if r["case"] == name)
    return row["model"], report.job_of(row)


@pytest.mark.parametrize("name", SFT_HISTORIES)
def test_traced_sft_step_reaches_the_real_peaks(name):
    """SFTTrainer's step: its collator's three int64 inputs, the backbone without lm_head, the
    scored rows gathered, TRL's chunked head as it runs on CUDA, the outputs scattered back, the
    metrics, the clipping's foreach norm; the load in the checkpoint's sorted order."""
    model, job = _reference_job(name)
    with gzip.open(STREAMS / f"{name}.json.gz", "rt") as handle:
        real = json.load(handle)
    inv = inventory_from_config(find_entry(model).config())
    regime = regime_of(job)
    assert regime.sft and tt.untraced_reason(inv, regime) is None
    reserved, allocated = tt.step_reserve(inv, regime, sizes_of(job))
    assert reserved == pytest.approx(real["peak_reserved_bytes"], rel=0.005)
    assert allocated == pytest.approx(real["peak_allocated_bytes"], rel=0.004)


def test_the_chunked_head_requests_what_trl_makes_on_cuda():
    """TRL 1.16's chunked head over N = 10 rows, a 70,000-row fp32 head under bf16 autocast (three
    vocabulary tiles of 32,768): forward, seven fp32 [N] statistics, the [10, 32768] bf16 tile
    buffer, each weight tile cast to bf16 and freed, then log Z (with its log), the
    log-probabilities, the entropy (with its quotient) and the top-1 flags (with their two
    comparisons); backward, the fp32 zeros of both gradients, a tile buffer, the casts again, and
    the gradients cast back to bf16 input and fp32 weight (no copy)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from estimator.meta_trace import _live_bytes_mode

    n, vocab, hidden = 10, 70000, 8
    head = tt._chunked_head_function()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty((n, hidden), dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty((vocab, hidden), dtype=torch.float32, requires_grad=True)
        targets = torch.empty((n,), dtype=torch.long)
        mode = _live_bytes_mode()
        with mode, torch.autocast("cpu", dtype=torch.bfloat16):
            log_probs, entropy, top1 = head.apply(x, w, targets)
            forward = [e[2] for e in mode.events if e[0] == "A"]
            log_probs.sum().backward()
    tiles = [32768 * hidden * 2, 32768 * hidden * 2, (vocab - 2 * 32768) * hidden * 2]
    assert forward[:7] == [n * 4] * 7 and forward[7] == n * 32768 * 2
    assert forward[8:11] == tiles
    assert sorted(forward[11:]) == sorted([n * 4] * 5 + [n] * 3)  # log, log Z, log-probs, quotient, entropy; bools
    assert top1.dtype == torch.bool and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    sizes = [e[2] for e in mode.events if e[0] == "A"]
    assert n * hidden * 4 in sizes and vocab * hidden * 4 in sizes  # the fp32 zeros
    assert sizes.count(n * 32768 * 2) == 2  # a tile buffer each way


def test_the_foreach_norm_asks_for_a_partial_sum_per_chunk():
    """The clipping's `_foreach_norm` over bf16 gradients of 2·65,536 + 1, 10 and 5 elements: the
    largest spans 3 chunks, so 3 tensors × 3 chunks of fp32 partial sums, freed at once."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    rule = tt.CudaTransients()
    with FakeTensorMode():
        grads = [torch.empty((n,), dtype=torch.bfloat16) for n in (2 * 65536 + 1, 10, 5)]
        assert rule(torch.ops.aten._foreach_norm.Scalar, (grads, 2.0), {}, None) == ((3 * 3 * 4, False),)


def _family_case(name):
    """A family case (config_overrides applied, as the harness built its checkpoint) and its inventory."""
    from validation.measure import case_config

    case = _case(name)
    return case, inventory_from_config(case_config(case.model, case.config_overrides))


# MoE training steps (grouped_mm experts, PEFT's ParamWrapper on them): Mixtral's QLoRA, whose
# experts are stacked as they load and upcast to fp32, and gpt-oss's LoRA on its stored stacks.
MOE_HISTORIES = (
    "mixtral-8x7b-v0.1-qlora-b4-s1024-r16-drop0.0-gc-L4",
    "gpt-oss-20b-lora-b2-s1024-r16-drop0.0-eager-L4-noquant",
)


@pytest.mark.parametrize("name", MOE_HISTORIES)
def test_traced_moe_step_reaches_the_real_peaks(name):
    case, inv = _family_case(name)
    with gzip.open(STREAMS / f"{name}.json.gz", "rt") as handle:
        real = json.load(handle)
    regime = regime_of(case.job)
    assert inv.moe is not None and tt.untraced_reason(inv, regime) is None
    reserved, allocated = tt.step_reserve(inv, regime, sizes_of(case.job))
    assert reserved == pytest.approx(real["peak_reserved_bytes"], rel=0.003)
    assert allocated == pytest.approx(real["peak_allocated_bytes"], rel=0.002)


def test_a_4bit_load_stacks_the_experts_as_the_real_load_does():
    """transformers 5.17 loads a quantized model without its thread pool: each 3-D expert
    parameter's per-expert checkpoint tensors are materialized, stacked pattern by pattern (each
    list of sources then freed, last to first) and gate and up concatenated, in the checkpoint's
    sorted order (Mixtral's `block_sparse_moe` before its norms). The written load is Mixtral's
    real 4-bit load request for request, through prepare_model_for_kbit_training's casts."""
    name = "mixtral-8x7b-v0.1-qlora-b4-s1024-r16-drop0.0-gc-L4"
    case, inv = _family_case(name)
    regime, sizes = regime_of(case.job), sizes_of(case.job)
    events, _, _ = tt._trace(inv.config_json, regime, sizes.batch, sizes.seq_len)
    load = [e for e in events[: events.index(("C",))] if e[1] < 0]  # up to empty_cache
    numbered = _real_requests(name)
    mine = _requests(load)
    assert mine == _requests(numbered)[: len(mine)]
    stacks = [r for r in mine if r == ("A", 8 * 14336 * 4096 * 2)]  # one expert projection stacked: 896 MiB
    assert len(stacks) == 4 * 3  # gate, up and down in each of the 4 layers


def test_grouped_mm_takes_fp32_as_cuda_does():
    """QLoRA's fp32 experts: grouped_mm's output [S, N], then in the backward the input's gradient
    [S, K] (the frozen experts get none); the meta kernel alone would refuse fp32."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from estimator.meta_trace import _live_bytes_mode

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty((96, 64), dtype=torch.float32, requires_grad=True)
        w = torch.empty((4, 64, 32), dtype=torch.float32)
        offs = torch.empty((4,), dtype=torch.int32)
        mode = _live_bytes_mode()
        with mode, tt._grouped_mm_any_dtype():
            y = torch.nn.functional.grouped_mm(x, w, offs=offs)
            y.backward(torch.empty_like(y))
    sizes = [e[2] for e in mode.events if e[0] == "A"]
    assert y.shape == (96, 32) and x.grad.shape == (96, 64)
    assert sizes == [96 * 32 * 4, 96 * 32 * 4, 96 * 64 * 4]  # y, the incoming gradient, grad x


def test_a_narrower_value_head_takes_a_fused_kernel():
    """MLA's value head (128) narrower than its query's (192): the trace's SDPA holds no B·H·S²
    scores, as CUDA's memory-efficient kernel does not, where the CPU's math kernel would."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from estimator.meta_trace import _live_bytes_mode

    b, h, s, dq, dv = 1, 2, 256, 192, 128
    with FakeTensorMode(allow_non_fake_inputs=True):
        q, k = (torch.empty((b, h, s, dq), dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        v = torch.empty((b, h, s, dv), dtype=torch.bfloat16, requires_grad=True)
        mode = _live_bytes_mode()
        with mode, tt._fused_dropout():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(torch.empty_like(out))
    assert out.shape == (b, h, s, dv) and v.grad.shape == v.shape
    assert max(e[2] for e in mode.events if e[0] == "A") < b * h * s * s * 2


@pytest.mark.parametrize("model,job", [
    ("meta-llama/Llama-3.2-3B", Job(mode="lora", lora_r=64, batch_size=2, seq_len=2048, gradient_checkpointing=True)),
    ("meta-llama/Llama-3.2-1B", Job(mode="full", precision="amp_bf16", batch_size=2, seq_len=1024, optimizer="adamw")),
    ("meta-llama/Llama-3.2-1B", Job(mode="lora", batch_size=4, seq_len=1024)),
    # an fp16 base under bf16 autocast: layer 1 frees what layer 0 made differently from the rest
    ("meta-llama/Llama-3.1-8B", Job(mode="lora", base_dtype="fp16", batch_size=1, seq_len=1024)),
])
def test_composed_stack_equals_the_whole_trace(model, job, monkeypatch):
    """A deep stack composed from TEMPLATE_LAYERS traced layers makes the requests the whole stack makes."""
    inv = inventory_from_config(find_entry(model).config())
    regime = regime_of(job)
    raw = json.loads(inv.config_json)
    assert tt._composed_step(raw, regime, job.batch_size, job.seq_len, inv.num_layers) is not None  # it composes
    monkeypatch.setattr(tt, "COMPOSE_ABOVE", 10**9)
    whole = tt._trace(inv.config_json, regime, job.batch_size, job.seq_len)
    monkeypatch.setattr(tt, "COMPOSE_ABOVE", 8)
    composed = tt._trace(inv.config_json, regime, job.batch_size, job.seq_len)
    count = lambda events: sum(1 for e in events if e[0] == "A")  # noqa: E731
    assert count(composed[0]) == count(whole[0])
    a, b = tt.replay(*whole), tt.replay(*composed)
    assert (a.peak_reserved_bytes, a.peak_allocated_bytes) == (b.peak_reserved_bytes, b.peak_allocated_bytes)


def test_reduction_staging_matches_the_histories():
    """Reduce.cuh's split reductions: the staging buffers the histories show, for the norm and
    bias gradients of three models (sums over every token of [B, S, width])."""
    contiguous = lambda b, s, w: ((b, s, w), (s * w, w, 1))  # noqa: E731
    assert tt.reduce_staging_bytes(*contiguous(2, 2048, 3072), (0, 1)) == 100_663_296  # Llama-3.2-3B norms
    assert tt.reduce_staging_bytes(*contiguous(16, 2048, 896), (0, 1)) == 138_543_104  # Qwen2.5-0.5B norms, q bias
    assert tt.reduce_staging_bytes(*contiguous(16, 2048, 128), (0, 1)) == 33_554_432  # its k and v biases
    # Gemma 3's q_norm weight: [1, 512, 8, 256] summed over all but the last dim
    assert tt.reduce_staging_bytes((1, 512, 8, 256), (512 * 8 * 256, 8 * 256, 256, 1), (0, 1, 2)) == 8 * MIB
    # a reduction along the fastest dim (RMSNorm's variance) stays in one block
    assert tt.reduce_staging_bytes(*contiguous(2, 2048, 3072), (2,)) == 0


def test_cudnn_backward_workspace_matches_the_histories():
    """B·H·S·(8·D + 4) + 256 bytes: the workspace each history shows between dq, dk, dv and their
    release, as CudaTransients adds it after the attention backward's outputs (half precision only)."""
    import torch

    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    rules = tt.CudaTransients()

    def workspace(b, h, s, d, dtype=torch.bfloat16):
        q = torch.empty((b, h, s, d), dtype=dtype, device="meta")
        return rules(backward, (q, q, q, q, q, q), {}, None)

    assert workspace(16, 14, 2048, 64) == ((236_716_288, False),)  # Qwen2.5-0.5B
    assert workspace(2, 24, 2048, 128) == ((101_056_768, False),)  # Llama-3.2-3B
    assert workspace(8, 24, 4096, 128) == ((808_452_352, False),)  # Llama-3.2-3B LoRA
    assert workspace(1, 8, 512, 256) == ((8_405_248, False),)  # Gemma-3-4B
    assert workspace(1, 8, 512, 128, torch.float32) == ()  # cuDNN takes no fp32


def test_in_place_accumulation_undoes_the_subclass_copy():
    """The engine's out-of-place sum of a buffered gradient that dies right after becomes in place;
    one whose buffered gradient lives on (a view, another holder) stays a new tensor."""
    events = [("A", 0, 100), ("A", 1, 100), ("A", 2, 100), ("F", 0), ("F", 1), ("A", 3, 50), ("F", 2)]
    out = tt._in_place_accumulation(events, [(2, 0)])
    assert out == [("A", 0, 100), ("A", 1, 100), ("F", 1), ("A", 3, 50), ("F", 0)]
    kept = [("A", 0, 100), ("A", 1, 100), ("A", 2, 100), ("F", 1), ("F", 0), ("F", 2)]
    assert tt._in_place_accumulation(kept, [(2, 0)]) == kept  # the buffered one was not released next


def test_later_steps_drop_what_the_first_made_for_good():
    first = [("A", 0, 10), ("A", 1, 20), ("F", 0), ("A", 2, 30)]  # 1 and 2 live on (optimizer state)
    assert tt._later_steps(first, 3, 1) == [("A", 3, 10), ("F", 3)]
    assert tt._later_steps(first, 3, 2) == [("A", 3, 10), ("F", 3), ("A", 6, 10), ("F", 6)]


def _requests(events, minimum=0):
    """("A", bytes rounded as the allocator rounds them) and ("F", which earlier request it frees,
    by its ordinal) of a request stream: what the allocator sees, numbers and addresses aside."""
    from estimator.allocator import round_size

    out, ordinal = [], {}
    for e in events:
        if e[0] == "A" and e[2] > minimum:
            ordinal[e[1]] = len(ordinal)
            out.append(("A", round_size(e[2])))
        elif e[0] == "F" and e[1] in ordinal:
            out.append(("F", ordinal[e[1]]))
    return out


def _real_requests(name):
    """A committed history's stream as ("A", number, size) / ("F", number), numbered in order."""
    with gzip.open(STREAMS / f"{name}.json.gz", "rt") as handle:
        real = json.load(handle)["events"]
    numbered, at = [], {}
    for action, address, size in real:
        if action == "alloc":
            at[address] = len(numbered)
            numbered.append(("A", len(numbered), size))
        elif action == "free_completed" and address in at:
            numbered.append(("F", at.pop(address)))
    return numbered


@pytest.mark.parametrize("name", ["llama-3.2-1b-qlora-b4-s1024-r16", "qwen2-1.5b-instruct-qlora-b4-s1024-r16-gc"])
def test_a_4bit_load_makes_the_real_loads_requests(name):
    """A QLoRA load, written out from the pinned sources (train_trace_bnb.load_events: the warm-up
    block, each weight quantized as it loads, the buffers, prepare_model_for_kbit_training's fp32
    casts and empty_cache, PEFT's adapters made and cast), is the real history's request for
    request, the small ones included, up to the step's first request."""
    case = _case(name)
    inv = inventory_from_config(find_entry(case.model).config())
    regime, sizes = regime_of(case.job), sizes_of(case.job)
    events, param_sizes, adapter_sizes = tt._trace(inv.config_json, regime, sizes.batch, sizes.seq_len)
    assert param_sizes == adapter_sizes == []
    load = [e for e in events if e[0] != "C" and e[1] < 0]
    numbered = _real_requests(name)
    mine = _requests(load)
    assert mine == _requests(numbered)[: len(mine)]
    assert len(mine) > 1000 and sum(1 for r in mine if r[0] == "A") > 500


def test_4bit_matmuls_allocate_as_the_cuda_kernel_does():
    """bitsandbytes' gemm_4bit on CUDA: past its fused kernel's rows (sm90: more than 1536) it
    dequantizes — with double quantization, the fp32 absmax and its offset sum, then the [N, K]
    weight in the input's dtype — and runs F.linear; the backward dequantizes again (absmax, then
    the weight in the state's dtype) for grad_output @ W. A single row takes the fused kernel:
    its output only. Worked on a [256, 128] weight (512 blocks of 64)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from estimator import train_trace_bnb as bnb_trace
    from estimator.meta_trace import _live_bytes_mode

    with tt._quiet_bitsandbytes():
        import bitsandbytes as bnb

    regime = regime_of(Job(mode="qlora"))
    module = bnb.nn.Linear4bit(128, 256, bias=False, compute_dtype=torch.bfloat16, device="meta")
    holder = torch.nn.Sequential(module)
    with FakeTensorMode(allow_non_fake_inputs=True):
        holder.to_empty(device="cpu")
        bnb_trace.pack(holder, regime)
        state = module.weight.quant_state
        assert module.weight.shape == (256 * 128 // 2, 1) and state.absmax.shape == (512,) and state.nested
        x = torch.empty((2, 1024, 128), dtype=torch.bfloat16, requires_grad=True)
        mode = _live_bytes_mode()
        with mode, bnb_trace.cuda_matmuls():
            y = bnb.matmul_4bit(x, module.weight, quant_state=state)
            y.backward(torch.empty_like(y))
            one = bnb.matmul_4bit(torch.empty((1, 128), dtype=torch.bfloat16), module.weight, quant_state=state)
    sizes = [e[2] for e in mode.events if e[0] == "A"]
    forward = [512 * 4, 512 * 4, 256 * 128 * 2, 2 * 1024 * 256 * 2]  # absmax_dq, + offset, B_dq, y
    backward = [512 * 4, 256 * 128 * 2, 2 * 1024 * 128 * 2]  # absmax, W, grad_A
    assert sizes[:4] == forward
    assert sizes[4] == 2 * 1024 * 256 * 2  # the incoming gradient (empty_like)
    assert sizes[5:8] == backward
    assert sizes[-1] == 256 * 2 and one.shape == (1, 256)  # fused: the output alone


def test_untraced_jobs_name_why():
    inv = inventory_from_config(find_entry("meta-llama/Llama-3.2-1B").config())
    assert tt.untraced_reason(inv, regime_of(Job(mode="qlora"))) is None
    import dataclasses

    from estimator.quantizers import QUANTIZERS

    int8 = dataclasses.replace(regime_of(Job(mode="qlora")), quantizer=QUANTIZERS["int8"])
    assert "LLM.int8" in tt.untraced_reason(inv, int8)
    assert tt.untraced_reason(inv, regime_of(Job(mode="lora", sft=True))) is None  # SFTTrainer: traced
    assert "Liger" in tt.untraced_reason(inv, regime_of(Job(mode="lora", trainer=True, loss="liger")))
    assert "chunked head" in tt.untraced_reason(inv, regime_of(Job(mode="lora", loss="chunked")))
    assert tt.untraced_reason(inv, regime_of(Job(mode="lora", trainer=True))) is None
    assert tt.untraced_reason(inv, regime_of(Job(mode="inference"))) == "not a training job"
    assert tt.untraced_reason(inv, regime_of(Job(mode="full"))) is None
    moe = inventory_from_config(find_entry("mistralai/Mixtral-8x7B-v0.1").config())
    assert tt.untraced_reason(moe, regime_of(Job(mode="lora", lora_dropout=0.0))) is None  # alike layers compose
    dense_first = inventory_from_config(find_entry("deepseek-ai/DeepSeek-V3").config())
    assert "MoE stack" in tt.untraced_reason(dense_first, regime_of(Job(mode="lora", lora_dropout=0.0)))


def test_gradient_accumulation_traces_every_micro_batch():
    """SPEC's loop with accumulation runs its micro-batches one after another: the second backward
    finds every gradient alive, so the traced peak grows, as the phase model's does."""
    inv = inventory_from_config(find_entry("Qwen/Qwen2.5-0.5B").config())
    one, four = Job(mode="full", batch_size=1, seq_len=512), Job(mode="full", batch_size=1, seq_len=512, gradient_accumulation_steps=4)
    (_, a1), (_, a4) = (tt.step_reserve(inv, regime_of(j), sizes_of(j)) for j in (one, four))
    assert a4 > a1
    assert a4 == pytest.approx(estimate(inv, four).peak_allocated_bytes, rel=0.02)


def test_a_failed_trace_falls_back_and_says_so(monkeypatch):
    inv = inventory_from_config(find_entry("Qwen/Qwen2.5-0.5B").config())
    job = Job(mode="full", batch_size=3, seq_len=384)

    def broken(*args, **kwargs):
        raise RuntimeError("no fake kernel for aten.something")

    monkeypatch.setattr(tt, "_trace", broken)
    tt._step_reserve.cache_clear()
    try:
        e = estimate(inv, job)
        assert tt.step_reserve(inv, regime_of(job), sizes_of(job)) is None
        assert any("could not be traced" in n and "no fake kernel" in n for n in e.notes)
        assert e.breakdown["allocator_reserve"] == estimate(inv, job, trace=False).breakdown["allocator_reserve"] > 0
    finally:
        tt._step_reserve.cache_clear()


def test_solver_bound_leaves_the_traced_reserve_out():
    """replay=False is the solvers' lower bound: no traced reserve, never above the full estimate."""
    inv = inventory_from_config(find_entry("Qwen/Qwen2.5-0.5B").config())
    job = Job(mode="lora", batch_size=4, seq_len=1024)
    bound, full = estimate(inv, job, replay=False), estimate(inv, job)
    assert bound.breakdown["allocator_reserve"] == 0
    assert bound.device_total_bytes <= full.device_total_bytes
    assert full.breakdown["allocator_reserve"] > 0

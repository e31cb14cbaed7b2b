"""How many GPUs, per strategy: monotone in model size, the largest-layer limit, ZeRO-3 below DDP."""

from __future__ import annotations

import pytest

import gpu_db
from estimator import Job, estimate, inventory_from_config, present
from estimator.catalog import find_entry
from estimator.fit import MAX_GPUS, Strategy, fit, parse_strategy, per_gpu, which_gpus


def est(repo: str, job: Job):
    return estimate(inventory_from_config(find_entry(repo).config()), job)


H100 = gpu_db.find_gpu("H100 SXM")
A10 = gpu_db.find_gpu("A10")
RTX4090 = gpu_db.find_gpu("4090")

LADDER = ["Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B"]


@pytest.mark.parametrize("strategy", [Strategy.DDP, Strategy.ZERO1, Strategy.ZERO2, Strategy.ZERO3, Strategy.ZERO3_OFFLOAD])
def test_training_counts_are_monotone_in_model_size(strategy):
    job = Job(mode="full", batch_size=1, seq_len=512, gradient_checkpointing=True)
    counts = [fit(est(repo, job), H100, strategy).gpus_needed for repo in LADDER]
    known = [c for c in counts if c is not None]
    assert known and known == sorted(known)
    # once a model is too large for every count, every larger model is too
    first_none = counts.index(None) if None in counts else len(counts)
    assert all(c is None for c in counts[first_none:]) and None not in counts[:first_none]


@pytest.mark.parametrize("strategy", [Strategy.PIPELINE, Strategy.TENSOR_PARALLEL])
def test_inference_counts_are_monotone_in_model_size(strategy):
    job = Job(mode="inference", batch_size=1, prompt_len=1024, new_tokens=128)
    counts = [fit(est(repo, job), RTX4090, strategy).gpus_needed for repo in LADDER]
    assert all(c is not None for c in counts)
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] > 1


def test_zero3_strictly_below_ddp_for_a_large_model():
    result = est("meta-llama/Llama-3.1-8B", Job(mode="full", batch_size=1, seq_len=1024, gradient_checkpointing=True))
    for n in (2, 4, 8):
        assert per_gpu(result, Strategy.ZERO3, n).device_total_bytes < per_gpu(result, Strategy.ZERO2, n).device_total_bytes
        assert per_gpu(result, Strategy.ZERO2, n).device_total_bytes < per_gpu(result, Strategy.ZERO1, n).device_total_bytes
        assert per_gpu(result, Strategy.ZERO1, n).device_total_bytes < per_gpu(result, Strategy.DDP, n).device_total_bytes


def test_sharding_divides_state_but_not_activations():
    result = est("meta-llama/Llama-3.1-8B", Job(mode="full", batch_size=2, seq_len=1024))
    one, eight = per_gpu(result, Strategy.ZERO3, 1), per_gpu(result, Strategy.ZERO3, 8)
    assert eight.breakdown["optimizer_state"] == pytest.approx(one.breakdown["optimizer_state"] / 8, rel=1e-6)
    assert eight.breakdown["activations"] == one.breakdown["activations"]


def test_ddp_never_fits_what_one_gpu_cannot():
    result = est("meta-llama/Llama-3.1-8B", Job(mode="full", batch_size=1, seq_len=512))
    answer = fit(result, A10, Strategy.DDP)
    assert answer.gpus_needed is None and answer.reason


def test_largest_layer_limit_for_pipeline():
    """A 405B layer in bf16 (~6.4 GiB) plus its working set cannot fit a 6 GiB card at any count."""
    result = est("meta-llama/Llama-3.1-405B", Job(mode="inference", batch_size=1, prompt_len=512, new_tokens=16))
    small = gpu_db.find_gpu("RTX 3050")
    answer = fit(result, small, Strategy.PIPELINE)
    assert answer.gpus_needed is None
    assert "one layer and its working set do not fit" in answer.reason


def test_tensor_parallel_needs_a_divisor_of_the_heads():
    result = est("meta-llama/Llama-3.1-8B", Job(mode="inference"))
    with pytest.raises(ValueError, match="valid counts"):
        fit(result, H100, Strategy.TENSOR_PARALLEL, num_gpus=3)
    assert fit(result, H100, Strategy.TENSOR_PARALLEL, num_gpus=4).per_gpu.num_gpus == 4


def test_no_count_up_to_the_limit_says_why():
    result = est("meta-llama/Llama-3.1-8B", Job(mode="full", batch_size=64, seq_len=8192))
    answer = fit(result, H100, Strategy.ZERO3)
    assert answer.gpus_needed is None
    assert "activations" in answer.reason and str(MAX_GPUS) in present.describe_fit(answer)[0]


def test_platform_limits_are_reasons():
    result = est("meta-llama/Llama-3.2-1B", Job(mode="qlora", seq_len=512))
    t4 = fit(result, gpu_db.find_gpu("T4"), Strategy.ZERO3)
    assert t4.gpus_needed is None and "bf16" in t4.reason


def test_single_gpu_fit_and_headline():
    result = est("meta-llama/Llama-3.1-8B", Job(mode="inference", prompt_len=512, new_tokens=256))
    answer = fit(result, H100)
    assert answer.gpus_needed == 1
    assert present.describe_fit(answer)[0].startswith("Fits on 1 × H100")
    assert answer.per_gpu.device_total_bytes == result.device_total_bytes


def test_which_gpus_lists_every_gpu_sorted_by_count():
    result = est("meta-llama/Llama-3.1-8B", Job(mode="qlora", seq_len=1024, gradient_checkpointing=True))
    fits = which_gpus(result, gpu_db.load_gpus())
    assert len(fits) == len(gpu_db.load_gpus())
    counts = [f.gpus_needed for f in fits if f.gpus_needed is not None]
    assert counts == sorted(counts)


def test_strategy_names():
    assert parse_strategy("fsdp", Job(mode="full")) is Strategy.ZERO3
    assert parse_strategy("device_map", Job()) is Strategy.PIPELINE
    with pytest.raises(ValueError, match="inference strategy"):
        parse_strategy("pipeline", Job(mode="full"))
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_strategy("magic", Job())


def test_pipeline_memory_never_grows_with_more_gpus():
    """The stages are a balanced contiguous partition: more GPUs never make the fullest one fuller."""
    result = est("meta-llama/Llama-3.1-70B-Instruct", Job(mode="inference", prompt_len=1024, new_tokens=128))
    totals = [per_gpu(result, Strategy.PIPELINE, n).device_total_bytes for n in range(1, 81)]
    assert all(b <= a for a, b in zip(totals, totals[1:]))
    assert fit(result, gpu_db.find_gpu("A30"), Strategy.PIPELINE).gpus_needed is not None


def test_a_mac_has_one_gpu():
    result = est("meta-llama/Llama-3.1-70B-Instruct", Job(mode="full", seq_len=512))
    answer = fit(result, gpu_db.find_gpu("m3 ultra 512gb"), Strategy.ZERO3)
    assert answer.gpus_needed is None and "one GPU" in answer.reason


def test_no_checkpointing_hint_when_it_is_already_on():
    result = est("meta-llama/Llama-3.1-8B", Job(mode="full", batch_size=64, seq_len=8192, gradient_checkpointing=True))
    answer = fit(result, H100, Strategy.ZERO3)
    assert answer.gpus_needed is None and "gradient checkpointing" not in answer.reason

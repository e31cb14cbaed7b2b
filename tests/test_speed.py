"""The speed model (estimator/speed.py), its fit (validation/speed_fit.py) and its CLI options.

Hand-worked numbers use Llama-3.2-1B (16 layers, hidden 2048, 32 query heads and 8 KV heads of
64, tied embeddings: 1,235,814,400 parameters, of which 1,235,746,816 in linears with lm_head's
262,668,288).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

import gpu_db
from estimator.catalog import find_entry
from estimator.inventory import inventory_from_config
from estimator.job import Job
from estimator.regime import regime_of, sizes_of
from estimator.speed import (KV_TRAFFIC_PER_STEP, PER_GPU, REFERENCE, RATE_FIELDS, SpeedConstants, Work,
                             inference_seconds, inference_work, matmul_params, peaks, speed, training_work)
from estimator.cli import main

H200 = gpu_db.find_gpu("H200")
LLAMA_1B_PARAMS = 1_235_814_400
LLAMA_1B_LM_HEAD = 128_256 * 2048
KV_BYTES_PER_TOKEN = 16 * 2 * 8 * 64 * 2  # layers · (K and V) · KV heads · head_dim · bf16 bytes


@pytest.fixture(scope="module")
def llama_1b():
    return inventory_from_config(find_entry("meta-llama/Llama-3.2-1B").config())


@pytest.fixture(scope="module")
def qwen_05b():
    return inventory_from_config(find_entry("Qwen/Qwen2.5-0.5B").config())


def _work(inv, job):
    regime, sizes = regime_of(job), sizes_of(job)
    return (inference_work if not job.is_training else training_work)(inv, regime, sizes)


def test_llama_1b_split_of_matmul_parameters(llama_1b):
    mp = matmul_params(llama_1b)
    assert mp.lm_head == LLAMA_1B_LM_HEAD
    assert mp.layers + mp.lm_head == 1_235_746_816  # every linear; the tied embedding is lm_head's weight
    assert mp.attn_width == 2048


def test_decode_bytes_per_step_are_the_weights_plus_the_kv_traffic(llama_1b):
    """Llama-3.2-1B bf16, batch 1, prompt 512, 129 new tokens: the mean decode step holds 512 + 63.5
    ≈ 576 positions (rounded), reads every weight once (tied, so the embedding is lm_head's matrix,
    read whole) and the KV cache three times (attention, and torch.cat's read and write)."""
    w = _work(llama_1b, Job(mode="inference", weights="bf16", batch_size=1, prompt_len=512, new_tokens=129))
    held = round(512 + (128 - 1) / 2)
    assert w.decode_steps == 128
    assert w.decode_step.bytes == 2 * LLAMA_1B_PARAMS + KV_TRAFFIC_PER_STEP * KV_BYTES_PER_TOKEN * held
    # FLOPs: 2 per matmul parameter, and 4·d per cached position per layer (one query)
    assert w.decode_step.flops == 2 * 1_235_746_816 + 4 * 2048 * 16 * (held + 1)
    assert w.decode_step.layer_passes == 16


def test_prefill_flops_by_hand(llama_1b):
    """2·N per prompt token through the layers, lm_head on the last position only, and causal
    attention: P(P+1)/2 pairs per layer at 4·d FLOPs each."""
    b, p = 2, 1024
    w = _work(llama_1b, Job(mode="inference", batch_size=b, prompt_len=p, new_tokens=16))
    layers = 1_235_746_816 - LLAMA_1B_LM_HEAD
    expected = 2 * layers * b * p + 2 * LLAMA_1B_LM_HEAD * b + 4 * 2048 * b * 16 * p * (p + 1) / 2
    assert w.prefill.flops == pytest.approx(expected, rel=1e-12)


def test_4bit_decode_reads_codes_at_batch_1_and_dequantizes_above(llama_1b):
    one = _work(llama_1b, Job(mode="inference", weights="nf4", batch_size=1, prompt_len=128, new_tokens=2))
    two = _work(llama_1b, Job(mode="inference", weights="nf4", batch_size=2, prompt_len=128, new_tokens=2))
    bf16 = _work(llama_1b, Job(mode="inference", weights="bf16", batch_size=1, prompt_len=128, new_tokens=2))
    assert one.decode_step.bytes < bf16.decode_step.bytes / 2  # codes, not bf16 weights
    quantized = sum(lin.weight_params for lin in llama_1b.linears if lin.bnb_quantized)
    extra = two.decode_step.bytes - one.decode_step.bytes
    kv_extra = KV_TRAFFIC_PER_STEP * KV_BYTES_PER_TOKEN * 128  # the second sequence's cache
    assert extra == pytest.approx(4 * quantized + kv_extra, rel=1e-9)  # write bf16, read it again
    assert one.decode_step.bnb_4bit_calls == len([lin for lin in llama_1b.linears if lin.bnb_quantized]) == 16 * 7


def test_training_flops_full_is_6n_and_lora_4n(llama_1b):
    """Full fine-tuning: forward 2·N·T, backward 4·N·T; LoRA's frozen base: backward 2·N·T (input
    gradients only), plus the adapters' own 6·r·(in + out) per token."""
    b, s = 1, 512
    tokens = b * s
    n = 1_235_746_816
    attn = 4 * 2048 * b * 16 * s * (s + 1) / 2
    full = _work(llama_1b, Job(mode="full", batch_size=b, seq_len=s))
    assert full.micro_batch.flops == pytest.approx(6 * n * tokens + 3 * attn, rel=1e-12)
    lora = _work(llama_1b, Job(mode="lora", batch_size=b, seq_len=s))
    adapters = sum(p.numel for p in __import__("estimator.terms.weights", fromlist=["x"]).placements(
        llama_1b, regime_of(Job(mode="lora"))) if p.kind == "adapter")
    assert lora.micro_batch.flops == pytest.approx(4 * n * tokens + 3 * attn + 6 * adapters * tokens, rel=1e-12)
    gc = _work(llama_1b, Job(mode="lora", batch_size=b, seq_len=s, gradient_checkpointing=True))
    recompute = 2 * (n - LLAMA_1B_LM_HEAD) * tokens + attn + 2 * adapters * tokens
    assert gc.micro_batch.flops - lora.micro_batch.flops == pytest.approx(recompute, rel=1e-12)


def test_optimizer_step_bytes_full_adamw(qwen_05b):
    """AdamW on fp32 weights: read and write each parameter (4 + 4), read its gradient (4), read and
    write both states (2 · 8): 28 bytes per parameter (plus the fused step's one-element counters)."""
    w = _work(qwen_05b, Job(mode="full", precision="amp_bf16", batch_size=1, seq_len=128))
    assert w.optimizer_step.bytes == pytest.approx(28 * qwen_05b.params_total, rel=1e-4)


def test_accumulation_multiplies_the_micro_batches_only(qwen_05b):
    one = speed(qwen_05b, Job(mode="full", batch_size=2, seq_len=512), H200)
    four = speed(qwen_05b, Job(mode="full", batch_size=2, seq_len=512, gradient_accumulation_steps=4), H200)
    assert 3 * one.step_seconds < four.step_seconds < 4 * one.step_seconds


def _seconds_grow(inv, base: Job, field: str, values, attr: str):
    out = [getattr(speed(inv, base.with_(**{field: v}), H200), attr) for v in values]
    assert out == sorted(out), (field, out)


@pytest.mark.parametrize("field", ["batch_size", "seq_len", "gradient_accumulation_steps"])
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_more_work_is_never_faster_training(qwen_05b, field, mode):
    _seconds_grow(qwen_05b, Job(mode=mode), field, [1, 2, 4, 16, 64], "step_seconds")


@pytest.mark.parametrize("weights", ["bf16", "fp32", "nf4", "int8"])
def test_more_work_is_never_faster_inference(qwen_05b, weights):
    base = Job(mode="inference", weights=weights)
    _seconds_grow(qwen_05b, base, "prompt_len", [16, 256, 4096, 32_768], "prefill_seconds")
    _seconds_grow(qwen_05b, base, "new_tokens", [2, 64, 1024, 16_384], "decode_step_seconds")
    _seconds_grow(qwen_05b, base, "batch_size", [1, 2, 8, 64], "decode_step_seconds")


def test_gradient_checkpointing_costs_time(qwen_05b):
    plain = speed(qwen_05b, Job(mode="lora", batch_size=4, seq_len=1024), H200)
    gc = speed(qwen_05b, Job(mode="lora", batch_size=4, seq_len=1024, gradient_checkpointing=True), H200)
    assert gc.step_seconds > plain.step_seconds


def test_more_tokens_never_fewer_gpu_hours(qwen_05b):
    job = Job(mode="full", batch_size=4, seq_len=1024)
    hours = [speed(qwen_05b, job, H200, tokens=t).gpu_hours for t in (1, 4096, 4097, 10**6, 10**9)]
    assert hours == sorted(hours)
    s = speed(qwen_05b, job, H200, tokens=10 * 4096, price=2.0)
    assert s.gpu_hours == pytest.approx(10 * s.step_seconds / 3600)  # 10 steps of 4 × 1024 tokens
    assert s.cost == pytest.approx(2.0 * s.gpu_hours)
    inf = speed(qwen_05b, Job(mode="inference", batch_size=2, new_tokens=100), H200, tokens=1000)
    assert inf.gpu_hours == pytest.approx(5 * inf.generate_seconds / 3600)  # 5 calls of 2 × 100 tokens


def test_bad_tokens_or_price_are_refused(qwen_05b):
    for tokens, price in ((0, None), (-1, None), (1.5, None), (10, -1.0), (10, float("nan")), (10, float("inf"))):
        with pytest.raises(ValueError):
            speed(qwen_05b, Job(), H200, tokens=tokens, price=price)


def test_other_gpus_use_the_reference_rates_against_their_own_peaks(qwen_05b):
    job = Job(mode="inference", batch_size=1, prompt_len=512, new_tokens=64)
    h100 = gpu_db.find_gpu("H100")
    fast, slow = speed(qwen_05b, job, H200), speed(qwen_05b, job, h100)
    assert slow.constants_status == fast.constants_status == PER_GPU[REFERENCE].status
    assert slow.decode_step_seconds > fast.decode_step_seconds  # less bandwidth, same overheads


def test_a_gpu_without_the_dtype_peak_has_no_speed(qwen_05b):
    from estimator.estimate import estimate
    from estimator.speed import speed_of

    result = estimate(qwen_05b, Job(mode="inference", weights="fp32"))
    assert speed_of(result, gpu_db.find_gpu("RTX 4090")) is None  # no plain-FP32 figure in gpu_db
    assert speed_of(result, H200) is not None


# ---- the fit --------------------------------------------------------------------------------------
TRUE = SpeedConstants("H200 SXM 141GB", "synthetic", inference_compute_efficiency=0.62,
                      inference_bandwidth_efficiency=0.71, inference_layer_overhead_s=2.4e-4,
                      bnb_4bit_call_overhead_s=6e-5, bnb_int8_call_overhead_s=3.1e-4,
                      training_compute_efficiency=0.47, training_bandwidth_efficiency=0.66,
                      training_layer_pass_overhead_s=1.8e-4)

SYNTHETIC_CASES = (
    ("openai-community/gpt2", dict(mode="inference", weights="fp32", batch_size=16, prompt_len=512, new_tokens=256)),
    ("Qwen/Qwen2.5-0.5B", dict(mode="inference", weights="bf16", batch_size=1, prompt_len=512, new_tokens=128)),
    ("meta-llama/Llama-3.2-1B", dict(mode="inference", weights="bf16", batch_size=4, prompt_len=2048, new_tokens=256)),
    ("meta-llama/Llama-3.1-8B", dict(mode="inference", weights="bf16", batch_size=1, prompt_len=2048, new_tokens=128)),
    ("Qwen/Qwen2.5-7B", dict(mode="inference", weights="bf16", batch_size=8, prompt_len=4096, new_tokens=64)),
    ("meta-llama/Llama-3.2-1B", dict(mode="inference", weights="nf4", batch_size=1, prompt_len=512, new_tokens=128)),
    ("meta-llama/Llama-3.1-8B", dict(mode="inference", weights="nf4", batch_size=4, prompt_len=1024, new_tokens=128)),
    ("meta-llama/Llama-3.2-1B", dict(mode="inference", weights="int8", batch_size=2, prompt_len=1024, new_tokens=64)),
    ("Qwen/Qwen2.5-0.5B", dict(mode="full", batch_size=4, seq_len=1024)),
    ("meta-llama/Llama-3.2-1B", dict(mode="full", batch_size=2, seq_len=2048)),
    ("meta-llama/Llama-3.2-1B", dict(mode="lora", batch_size=4, seq_len=1024)),
    ("meta-llama/Llama-3.2-1B", dict(mode="qlora", batch_size=4, seq_len=2048)),
    ("meta-llama/Llama-3.1-8B", dict(mode="lora", batch_size=4, seq_len=2048, gradient_checkpointing=True)),
    ("meta-llama/Llama-3.2-3B", dict(mode="full", batch_size=4, seq_len=2048, gradient_checkpointing=True)),
)


def synthetic_rows(constants: SpeedConstants, noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Rows shaped as validation.measure writes them, timed by the model itself with `constants`."""
    rng = random.Random(seed)
    rows = []
    for i, (model, fields) in enumerate(SYNTHETIC_CASES):
        job = Job(**fields)
        inv = inventory_from_config(find_entry(model).config())
        s = speed(inv, job, H200, constants=constants)
        jitter = lambda: 1 + rng.uniform(-noise, noise)  # noqa: E731
        row = {"case": f"synthetic-{i}", "model": model, "job": job.to_dict(), "status": "ok",
               "gpu": {"name": "NVIDIA H200"}}
        if job.is_training:
            row["step_seconds"] = [s.step_seconds * jitter(), s.step_seconds * jitter()]
        else:
            row["prefill_seconds"] = s.prefill_seconds * jitter()
            row["decode_token_seconds"] = [s.decode_step_seconds * jitter() for _ in range(job.new_tokens - 1)]
        rows.append(row)
    return rows


def test_the_fit_recovers_the_rates_that_made_the_rows():
    from validation.speed_fit import fit, observations

    fitted, steps = fit(observations(synthetic_rows(TRUE)), PER_GPU[REFERENCE])
    assert all(s.values is not None for s in steps)
    for name in RATE_FIELDS:
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name


def test_the_fit_with_noise_stays_close_and_keeps_priors_without_rows():
    from validation.speed_fit import fit, observations

    fitted, _ = fit(observations(synthetic_rows(TRUE, noise=0.05, seed=3)), PER_GPU[REFERENCE])
    for name in ("inference_bandwidth_efficiency", "training_compute_efficiency"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.15), name
    inference_only = [r for r in synthetic_rows(TRUE) if "step_seconds" not in r]
    fitted, steps = fit(observations(inference_only), PER_GPU[REFERENCE])
    assert fitted.training_compute_efficiency == PER_GPU[REFERENCE].training_compute_efficiency
    assert [s.values is None for s in steps] == [False, False, False, True]


def test_write_constants_rewrites_only_the_speed_block(tmp_path):
    from estimator.speed import DATA_PATH, load_constants
    from validation.speed_fit import write_constants

    path = tmp_path / "calibration.yaml"
    path.write_text(DATA_PATH.read_text())
    write_constants(replace(TRUE, status="fitted: synthetic"), path)
    reference, per_gpu = load_constants(path)
    assert reference == REFERENCE and per_gpu[TRUE.gpu].status == "fitted: synthetic"
    assert per_gpu[TRUE.gpu].training_compute_efficiency == pytest.approx(0.47)
    assert path.read_text().split("\nspeed:\n")[0] == DATA_PATH.read_text().split("\nspeed:\n")[0]


def test_the_fit_reads_calibration_cases_only():
    from validation.speed_fit import calibration_ids

    ids = calibration_ids()
    assert len(ids) == 19
    holdouts = [json.loads(line)["case"] for line in open("validation/results_trainer/h200-trainer.jsonl")]
    assert not ids & set(holdouts)


# ---- the command line -----------------------------------------------------------------------------
def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


SPEED_KEYS = {"step_seconds", "tokens_per_second", "prefill_seconds", "decode_tokens_per_second", "gpu_hours", "cost"}


@pytest.mark.parametrize("argv, keys", [
    (("--mode", "inference"), set()),
    (("--mode", "inference", "--gpu", "H200"), {"prefill_seconds", "decode_tokens_per_second"}),
    (("--mode", "inference", "--gpu", "H200", "--tokens", "1000"), {"prefill_seconds", "decode_tokens_per_second", "gpu_hours"}),
    (("--mode", "lora", "--gpu", "H100"), {"step_seconds", "tokens_per_second"}),
    (("--mode", "lora", "--gpu", "H100", "--price", "2"), {"step_seconds", "tokens_per_second"}),
    (("--mode", "full", "--gpu", "H100", "--tokens", "1_000_000", "--price", "2.5"),
     {"step_seconds", "tokens_per_second", "gpu_hours", "cost"}),
    (("--mode", "full", "--tokens", "1000"), set()),
    (("--mode", "inference", "--weights", "fp32", "--gpu", "RTX 4090"), set()),  # no FP32 figure for it
])
def test_json_speed_keys_present_exactly_when_they_apply(capsys, argv, keys):
    code, out, _ = _run(capsys, "Qwen2.5-0.5B", *argv, "--json")
    assert code == 0
    data = json.loads(out)
    assert SPEED_KEYS & set(data) == keys
    for key in keys:
        assert isinstance(data[key], float) and data[key] > 0


def test_cost_is_hours_times_price(capsys):
    _, out, _ = _run(capsys, "Qwen2.5-0.5B", "--mode", "full", "--gpu", "H200", "--tokens", "4096000", "--price", "3", "--json")
    data = json.loads(out)
    assert data["cost"] == pytest.approx(3 * data["gpu_hours"])
    assert data["tokens_per_second"] == pytest.approx(2048 / data["step_seconds"])


@pytest.mark.parametrize("argv", [("--tokens", "-5"), ("--tokens", "0"), ("--tokens", "many"), ("--price", "-1"),
                                  ("--price", "nan"), ("--price", "inf"), ("--price", "cheap")])
def test_bad_tokens_or_price_exit_2_with_one_line(capsys, argv):
    code, out, err = _run(capsys, "Qwen2.5-0.5B", "--gpu", "H100", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: argument --")


def test_tokens_without_a_gpu_is_noted_and_ignored(capsys):
    code, out, err = _run(capsys, "Qwen2.5-0.5B", "--tokens", "1000")
    assert code == 0 and "--tokens applies only with --gpu or --which-gpus" in err
    code, out, err = _run(capsys, "Qwen2.5-0.5B", "--gpu", "H100", "--price", "2")
    assert code == 0 and "--price needs --tokens" in err


def test_text_output_shows_speed_beside_the_fit(capsys):
    _, out, _ = _run(capsys, "Qwen2.5-0.5B", "--mode", "qlora", "--gpu", "H200", "--tokens", "10_000_000", "--price", "4")
    block = out[out.index("speed on one H200 SXM 141GB"):]
    assert "training tokens/s" in block and "GPU-hours" in block and "cost" in block
    assert "priors, not fitted" in block


def test_which_gpus_sorts_by_speed(capsys):
    code, out, _ = _run(capsys, "Qwen2.5-0.5B", "--mode", "lora", "--which-gpus", "--sort", "speed", "--json")
    gpus = json.loads(out)["fit"]["gpus"]
    rates = [g["tokens_per_second"] for g in gpus if "tokens_per_second" in g and g["verdict"] != "cannot_run"]
    assert len(rates) > 50 and rates == sorted(rates, reverse=True)
    code, out, _ = _run(capsys, "Qwen2.5-0.5B", "--mode", "lora", "--which-gpus", "--sort", "speed")
    header = next(line for line in out.splitlines() if line.startswith("GPU "))
    assert "tokens/s" in header


# ---- the peers' speed formulas ----------------------------------------------------------------------
def test_llmfit_decode_by_hand(llama_1b):
    """fit.rs: tok/s = bandwidth / (params_B · bytes per param) · 0.55: 4800 / (1.2358 · 2) · 0.55."""
    from validation.peers import llmfit_speed

    s = llmfit_speed(llama_1b, Job(mode="inference", weights="bf16"), H200)
    assert 1 / s.decode_step_seconds == pytest.approx(4800 / (LLAMA_1B_PARAMS / 1e9 * 2) * 0.55)
    assert llmfit_speed(llama_1b, Job(mode="full"), H200).step_seconds is None  # no training figure


def test_gpu_poor_by_hand(llama_1b):
    """App.js, batch 1, prompt 512, 128 to generate, HF inference (extraFactor 2): memory-bound,
    (2·2·P' + 2·2·L·h·640·2) bytes in GiB over 4800 GB/s, P' = 2·V·h + L·(4h² + 3hi)."""
    from validation.peers import gpu_poor_speed

    p = 2 * 128_256 * 2048 + 16 * (4 * 2048**2 + 3 * 2048 * 8192)
    kv = 2 * 2 * 16 * 2048 * 640
    s = gpu_poor_speed(llama_1b, Job(mode="inference", batch_size=1, prompt_len=512, new_tokens=128), H200)
    assert s.decode_step_seconds == pytest.approx((2 * p * 2 + kv * 2) / 1024**3 / 4800)
    train = gpu_poor_speed(llama_1b, Job(mode="lora", batch_size=1, seq_len=1024), H200)
    flops = (2 * 1024 * p + 1024 * 2048 * 2 * 16) * 2 * 1.15
    assert train.step_seconds == pytest.approx(flops / (1e12 * 51.7 * 0.85))


def test_the_speed_report_scores_holdouts_only():
    from validation.report_speed import holdout_comparisons
    from validation.speed_fit import calibration_ids

    comparisons = holdout_comparisons()
    assert len({c.case for c in comparisons}) >= 28 and not {c.case for c in comparisons} & calibration_ids()
    assert all(c.measured_s > 0 and c.estimated_s > 0 for c in comparisons)

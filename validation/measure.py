"""Measure real peak GPU memory for validation cases, exactly in the regimes of ../shared/SPEC.md.

    python -m validation.measure --cases validation/cases.yaml --out validation/results/h100.jsonl

Each case runs in its own process (forked from a parent that never touches CUDA, so imports are
paid once while every case's allocator and peak counters start clean). Models are random-weight
bf16 checkpoints built from catalog configs: memory depends on shapes, not values. A case that
fails, OOM included, is written as such and the run goes on. One JSON line per case.

This is the only part of the project that needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

from estimator.optimizers import OPTIMIZERS
from estimator.regime import regime_of
from validation.cases import Case, load_cases, select

GIB = 1024**3

# CANIRUN_MEASURE_DEVICE=cpu runs the whole harness on the CPU with zeroed memory counters: a dry run
# for tests and for checking a case file before spending GPU time. Real measurements need CUDA.
DEVICE = os.environ.get("CANIRUN_MEASURE_DEVICE", "cuda")


class _NoCuda:
    """Stands in for torch.cuda in a CPU dry run: every counter reads 0."""

    def __getattr__(self, name):
        if name in ("get_device_name",):
            return lambda *a, **k: "cpu (dry run)"
        if name == "mem_get_info":
            return lambda *a, **k: (0, 0)
        if name == "memory_stats":
            return lambda *a, **k: {}
        return lambda *a, **k: 0


def _cuda():
    import torch

    return torch.cuda if DEVICE == "cuda" else _NoCuda()


# ---------------------------------------------------------------------------------------------
# Device memory as nvidia-smi sees it (NVML), process-independent
# ---------------------------------------------------------------------------------------------
def _nvml_used_bytes() -> int | None:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - NVML is optional; mem_get_info is the fallback
        return None


class DeviceProbe:
    """Samples memory at named points: allocator stats plus device use over a pre-CUDA baseline."""

    def __init__(self) -> None:
        self.baseline_used = _nvml_used_bytes()
        self.samples: dict[str, dict] = {}
        self.device_used_max = 0

    def device_used(self) -> int:
        import torch

        used = _nvml_used_bytes()
        if used is not None and self.baseline_used is not None:
            return used - self.baseline_used
        free, total = _cuda().mem_get_info()
        return total - free

    def sample(self, name: str) -> dict:
        import torch

        _cuda().synchronize()
        row = {
            "allocated": _cuda().memory_allocated(),
            "reserved": _cuda().memory_reserved(),
            "max_allocated": _cuda().max_memory_allocated(),
            "max_reserved": _cuda().max_memory_reserved(),
            "device_used": self.device_used(),
        }
        self.device_used_max = max(self.device_used_max, row["device_used"])
        self.samples[name] = row
        return row


# ---------------------------------------------------------------------------------------------
# Random-weight checkpoints from catalog configs
# ---------------------------------------------------------------------------------------------
def catalog_config(model: str) -> dict:
    from estimator.catalog import find_entry

    entry = find_entry(model)
    if entry is None:
        raise ValueError(f"{model!r} is not in the offline catalog")
    return entry.config()


def catalog_config_file(model: str) -> dict:
    """The catalog's config file for a repo id, read directly (the harness's only need)."""
    path = Path(__file__).resolve().parent.parent / "estimator" / "catalog" / "configs" / (model.replace("/", "--") + ".json")
    if path.exists():
        return json.loads(path.read_text())
    return catalog_config(model)


def case_config(model: str, overrides: dict | None = None) -> dict:
    """The config a case's checkpoint is built from: the catalog's, with the case's `config_overrides`
    (fewer layers, the checkpoint's quantization_config dropped) applied and checked. validation.report
    estimates the case from this same function's output."""
    from validation.overrides import reduced_config

    return reduced_config(catalog_config_file(model), overrides)


def build_checkpoint(model: str, directory: Path, overrides: dict | None = None) -> None:
    """Save a random bf16 checkpoint of `model` (built on the GPU: fast), as users' checkpoints are,
    from `case_config(model, overrides)`."""
    import torch
    import transformers

    raw = case_config(model, overrides)
    config = transformers.AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        net = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    net.tie_weights()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                param.zero_()
    net.save_pretrained(directory, safe_serialization=True)
    (directory / "READY").write_text("ok")


# ---------------------------------------------------------------------------------------------
# One case, in its own process
# ---------------------------------------------------------------------------------------------
def torch_dtype(d):
    """The `torch.dtype` of a `DType` of the estimator's table."""
    import torch

    return getattr(torch, d.torch)


def apply_allocator_settings(job) -> None:
    """The job's caching-allocator settings, before CUDA starts in this process: PyTorch's default,
    or `expandable_segments:True` (PYTORCH_CUDA_ALLOC_CONF, read when the allocator starts)."""
    conf = "expandable_segments:True" if getattr(job, "expandable_segments", False) else None
    if conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    else:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    import torch

    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is not None and not torch.cuda.is_initialized():  # in case torch read the variable already
        setter(conf or "expandable_segments:False")


def from_pretrained_kwargs(job) -> dict:
    """dtype, quantization and attention exactly as SPEC's job loads them: the estimator's regime."""
    import transformers

    regime = regime_of(job)
    kwargs: dict = {"attn_implementation": regime.attn.value, "dtype": torch_dtype(regime.load)}
    if regime.quantizer is not None:
        bnb = regime.quantizer.bnb_config(regime.double_quant)
        if "bnb_4bit_compute_dtype" in bnb:
            bnb["bnb_4bit_compute_dtype"] = torch_dtype(regime.quantizer.compute)
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**bnb)
    return kwargs


def autocast_dtype(job):
    """The dtype the forward runs under autocast in, or None without autocast."""
    regime = regime_of(job)
    return torch_dtype(regime.compute) if regime.autocast else None


def load_model(case: Case, ckpt: Path):
    """`from_pretrained(..., device_map={"": 0})` with the dtype or quantization the job names."""
    import transformers

    kwargs = from_pretrained_kwargs(case.job)
    kwargs["device_map"] = {"": 0 if DEVICE == "cuda" else "cpu"}
    return transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), **kwargs)


def make_optimizer(name: str, params):
    """The optimizer SPEC names, as its registry entry builds it."""
    return OPTIMIZERS[name].build(params)


def _lora_config(job):
    from peft import LoraConfig

    targets = "all-linear" if job.lora_targets == ("all-linear",) else list(job.lora_targets)
    return LoraConfig(
        r=job.lora_r,
        lora_alpha=job.lora_alpha,
        lora_dropout=job.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


class SavedTensorCensus:
    """Counts what autograd saves for backward during one forward, by module and dtype.

    Storages are counted once (several saves of one tensor, or views of it, share a storage).
    Parameters are recognised by storage and reported apart: they are not activations.
    """

    def __init__(self, model) -> None:
        import torch

        self.model = model
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.stack: list[str] = []
        self.seen: set[int] = set()
        self.rows: dict[tuple, list[int]] = {}
        self.total = 0
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave()))
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _enter(self, name):
        def hook(module, args):
            self.stack.append(name)

        return hook

    def _leave(self):
        def hook(module, args, output):
            if self.stack:
                self.stack.pop()

        return hook

    @staticmethod
    def _where(name: str) -> str | None:
        """Layer 0 and everything outside the layer stack; other layers repeat layer 0."""
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("layers", "h", "layer", "blocks") and parts[i + 1].isdigit():
                if parts[i + 1] != "0":
                    return None
                return ".".join(parts[:i] + ["N"] + parts[i + 2 :])
        return name

    def _pack(self, tensor):
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            nbytes = storage.nbytes()
        except Exception:  # noqa: BLE001 - e.g. tensor subclasses without storage
            return tensor
        if ptr in self.seen or nbytes == 0:
            return tensor
        self.seen.add(ptr)
        self.total += nbytes
        module = self.stack[-1] if self.stack else ""
        where = self._where(module)
        if where is not None:
            kind = "param" if ptr in self.param_ptrs else "act"
            key = (where, kind, str(tensor.dtype).replace("torch.", ""), "x".join(map(str, tensor.shape)))
            row = self.rows.setdefault(key, [0, 0])
            row[0] += 1
            row[1] += nbytes
        return tensor

    def __enter__(self):
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    def report(self) -> dict:
        rows = [
            {"module": k[0], "kind": k[1], "dtype": k[2], "shape": k[3], "count": v[0], "bytes": v[1]}
            for k, v in sorted(self.rows.items())
        ]
        return {"total_saved_bytes": self.total, "rows": rows}


def run_training(case: Case, ckpt: Path, probe: DeviceProbe, result: dict, diag: bool) -> None:
    import torch

    job = case.job
    mode = job.mode.value
    model = load_model(case, ckpt)
    probe.sample("loaded")
    result["params_total"] = _count_params(model)
    model.config.use_cache = False
    if mode == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=job.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        probe.sample("kbit_prepared")
    elif job.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if job.uses_lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(job))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    result["params_trainable"] = sum(p.numel() for p in params)
    optimizer = make_optimizer(job.optimizer.value, params)
    vocab = model.config.get_text_config().vocab_size
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (job.batch_size, job.seq_len), device=DEVICE)
    amp_dtype = autocast_dtype(job)

    def forward():
        if amp_dtype is None:
            return model(input_ids=ids, labels=ids).loss
        with torch.autocast(DEVICE, dtype=amp_dtype):
            return model(input_ids=ids, labels=ids).loss

    setup = probe.sample("setup")
    result["static_after_setup_bytes"] = setup["allocated"]
    _cuda().reset_peak_memory_stats()
    steps = []
    for step in range(3):
        _cuda().synchronize()
        t_start = time.perf_counter()  # the step's wall time (issue 16), with the probes' NVML reads in it
        row = {"start_allocated": _cuda().memory_allocated()}
        _cuda().reset_peak_memory_stats()
        loss = forward()
        s = probe.sample(f"step{step}_forward")
        row.update(forward_peak=s["max_allocated"], after_forward=s["allocated"])
        _cuda().reset_peak_memory_stats()
        loss.backward()
        del loss
        s = probe.sample(f"step{step}_backward")
        row.update(backward_peak=s["max_allocated"], after_backward=s["allocated"])
        _cuda().reset_peak_memory_stats()
        optimizer.step()
        s = probe.sample(f"step{step}_optimizer")
        row.update(optimizer_peak=s["max_allocated"], after_optimizer=s["allocated"])
        optimizer.zero_grad(set_to_none=True)
        s = probe.sample(f"step{step}_zero_grad")
        row.update(after_zero_grad=s["allocated"], reserved=s["max_reserved"])
        row["seconds"] = round(time.perf_counter() - t_start, 6)  # sample() synchronized the device
        steps.append(row)
    result["steps"] = steps
    result["step_seconds"] = [r["seconds"] for r in steps[1:]]  # after the first (warm-up) step
    result["peak_allocated_bytes"] = max(max(r["forward_peak"], r["backward_peak"], r["optimizer_peak"]) for r in steps)
    result["peak_reserved_bytes"] = max(s["max_reserved"] for s in probe.samples.values())
    result["optimizer_state_bytes"] = steps[1]["start_allocated"] - steps[0]["start_allocated"]
    if diag:
        _cuda().reset_peak_memory_stats()
        with SavedTensorCensus(model) as census:
            loss = forward()
        result["saved_tensors"] = census.report()
        del loss


def _count_params(model) -> int:
    """Parameters as the model has them; a 4-bit tensor holds two weights per stored element."""
    total = 0
    for p in model.parameters():
        total += p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
    return total


class _StepProbe:
    """A logits processor that changes nothing and records memory and the time at each generation
    step. It runs once per forward, after the logits: the first call ends the prefill, each later
    one a decoded token. It synchronizes the device, so the times are the kernels' (issue 16)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int]] = []
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        _cuda().synchronize()
        self.times.append(time.perf_counter())
        self.rows.append((_cuda().max_memory_allocated(), _cuda().memory_allocated()))
        return scores


def spec_prompt(model, job, device):
    """SPEC's inference input: random prompt ids [B, P], an all-ones mask, and a pad id."""
    import torch

    vocab = model.config.get_text_config().vocab_size
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (job.batch_size, job.prompt_len), device=device)
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return ids, torch.ones_like(ids), pad


def spec_generate(model, job, prompt, step_probe) -> int:
    """SPEC's generate: exactly N greedy new tokens; `step_probe`, a logits processor, sees every
    step. Returns the number of tokens generated."""
    import torch
    from transformers import LogitsProcessorList

    ids, mask, pad = prompt
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=job.new_tokens,
            min_new_tokens=job.new_tokens,
            do_sample=False,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([step_probe]),
        )
    return int(out.shape[1] - ids.shape[1])


def run_inference(case: Case, ckpt: Path, probe: DeviceProbe, result: dict) -> None:
    job = case.job
    model = load_model(case, ckpt)
    probe.sample("loaded")
    result["params_total"] = _count_params(model)
    model.eval()
    result["params_trainable"] = 0
    setup = probe.sample("setup")
    result["static_after_setup_bytes"] = setup["allocated"]
    prompt = spec_prompt(model, job, DEVICE)
    step_probe = _StepProbe()
    _cuda().reset_peak_memory_stats()
    _cuda().synchronize()
    t_generate = time.perf_counter()
    if os.environ.get("CANIRUN_SDPA_BACKENDS"):  # a diagnosis run: only these SDPA kernels (the row says which)
        result["sdpa_backends"] = os.environ["CANIRUN_SDPA_BACKENDS"]
    with _sdpa_context():
        generated = spec_generate(model, job, prompt, step_probe)
    s = probe.sample("generated")
    result["generated_tokens"] = generated
    result["peak_allocated_bytes"] = s["max_allocated"]
    result["peak_reserved_bytes"] = max(x["max_reserved"] for x in probe.samples.values())
    rows = step_probe.rows
    result["generate_steps"] = {
        "prefill_peak": rows[0][0] if rows else None,
        "after_prefill": rows[0][1] if rows else None,
        "last_step_allocated": rows[-1][1] if rows else None,
        "steps": len(rows),
    }
    times = step_probe.times
    if times:  # prefill: generate() to the first logits; decode: one interval per later token
        result["prefill_seconds"] = round(times[0] - t_generate, 6)
        result["decode_token_seconds"] = [round(b - a, 6) for a, b in zip(times, times[1:])]
    if os.environ.get("CANIRUN_PROFILE_GENERATE"):  # after the memory figures: it allocates its own
        with _sdpa_context():
            result["generate_gpu"] = profile_generate(model, job, prompt)


def profile_generate(model, job, prompt, new_tokens: int = 16) -> dict:
    """The GPU's own time in a second, shorter generate() (issue 16): torch.profiler's CUDA kernel
    time per step beside the wall time, so host overhead (Python, launches, the sandbox's
    syscalls) can be told apart from the kernels the speed model predicts. CUPTI's activity trace,
    not hardware counters: it needs no profiling permission."""
    from torch.profiler import ProfilerActivity, profile

    short = job.with_(new_tokens=new_tokens)
    try:
        _cuda().synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            spec_generate(model, short, prompt, _StepProbe())
            _cuda().synchronize()
        wall = time.perf_counter() - t0
        averages = prof.key_averages()
        kernels_us = sum(e.self_device_time_total for e in averages if getattr(e, "self_device_time_total", 0))
        # where the host's time goes: the ops with the most CPU time of their own, with their call counts
        host = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:20]
        return {"new_tokens": new_tokens, "wall_seconds": round(wall, 6), "kernel_seconds": round(kernels_us / 1e6, 6),
                "kernels": int(sum(e.count for e in averages if getattr(e, "self_device_time_total", 0))),
                "host_ops": [[e.key, int(e.count), round(e.self_cpu_time_total / 1e6, 6)] for e in host]}
    except Exception as err:  # noqa: BLE001 - a failed profile must not lose the row
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda, "device": DEVICE}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _gpu_info() -> dict:
    import torch

    if DEVICE != "cuda":
        return {"name": "cpu (dry run)", "total_bytes": 0, "driver": None}
    info = {"name": torch.cuda.get_device_name(0), "total_bytes": torch.cuda.get_device_properties(0).total_memory}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        if isinstance(info["driver"], bytes):
            info["driver"] = info["driver"].decode()
    except Exception:  # noqa: BLE001
        info["driver"] = None
    return info


def measure_context(probe: DeviceProbe, result: dict) -> None:
    """Start CUDA and record what it costs before any model: the context, then cuBLAS's handles."""
    import torch

    _cuda().init()
    torch.empty(1, device=DEVICE)
    first = probe.sample("context")
    result["context_bytes"] = first["device_used"] - first["reserved"]
    # The first matmul creates cuBLAS/cuBLASLt handles and workspaces, as the job's first forward would.
    a = torch.ones(64, 64, device=DEVICE, dtype=torch.bfloat16)
    (a @ a).sum().item()
    del a
    blas = probe.sample("blas")
    result["blas_workspace_allocated_bytes"] = blas["allocated"] - first["allocated"]
    result["blas_device_bytes"] = blas["device_used"] - first["device_used"]


def measure_case(case: Case, ckpt: Path, diag: bool) -> dict:
    """Run one case in this (fresh) process and return its result row."""
    apply_allocator_settings(case.job)
    result: dict = {**case.header(),
                    "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default"}

    def body(probe: DeviceProbe) -> None:
        if case.job.mode.value == "inference":
            run_inference(case, ckpt, probe, result)
        else:
            run_training(case, ckpt, probe, result, diag)

    return record_case(result, body, _versions)


def record_case(result: dict, body, versions) -> dict:
    """Run `body(probe)` after measuring the context, and record how it ended: "ok", "oom" (CUDA's
    out-of-memory, with its first line and the peak so far) or "error"; then the allocator's
    statistics, NVML's device peak, the GPU and the versions. One process, one case."""
    import torch

    t0 = time.time()
    probe = DeviceProbe()  # NVML baseline before this process starts CUDA
    snapshots = os.environ.get("CANIRUN_SNAPSHOT_DIR")
    try:
        measure_context(probe, result)
        if snapshots:  # every allocation and free from here on, for the allocator replay (issue 12)
            # no frames (cheap) unless CANIRUN_SNAPSHOT_FRAMES asks for each allocation's Python stack,
            # which `python -m validation.snapshot --explain` groups by the line that allocated
            frames = "alloc" if os.environ.get("CANIRUN_SNAPSHOT_FRAMES") else None
            torch.cuda.memory._record_memory_history(context=frames, stacks="python", max_entries=2_000_000)
        body(probe)
        result["status"] = "ok"
    except torch.OutOfMemoryError as err:
        result["status"] = "oom"
        result["oom"] = result["error"] = str(err).splitlines()[0][:500]
        result["peak_allocated_bytes"] = max(result.get("peak_allocated_bytes", 0), _cuda().max_memory_allocated())
    except Exception as err:  # noqa: BLE001 - a failing case is recorded, not fatal
        result["status"] = "error"
        result["error"] = f"{type(err).__name__}: {err}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
    if snapshots:  # the history as it ended, an OOM's included; validation.snapshot compacts it
        try:
            torch.cuda.memory._dump_snapshot(str(Path(snapshots) / f"{result['case']}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        except Exception as err:  # noqa: BLE001 - a lost snapshot must not lose the row
            result["snapshot_error"] = f"{type(err).__name__}: {err}"[:500]
    try:
        stats = _cuda().memory_stats()
        result["allocator"] = {k: stats.get(k) for k in ("num_alloc_retries", "num_ooms", "inactive_split_bytes.all.peak", "segment.all.peak")}
        result["num_alloc_retries"] = stats.get("num_alloc_retries")
        result["num_ooms"] = stats.get("num_ooms")
        result["device_total_bytes"] = probe.device_used_max
        result["samples"] = probe.samples
        result["gpu"] = _gpu_info()
        result["versions"] = versions()
    except Exception:  # noqa: BLE001
        pass
    result["wall_s"] = round(time.time() - t0, 2)
    return result


# ---------------------------------------------------------------------------------------------
# The parent: checkpoints, one forked child per case, results appended as JSON lines
# ---------------------------------------------------------------------------------------------
def _in_child(target, args, timeout_s: float) -> dict:
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)

    def body():
        try:
            value = target(*args)
        except BaseException as err:  # noqa: BLE001
            value = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        child_end.send(value)
        child_end.close()

    proc = ctx.Process(target=body)
    proc.start()
    child_end.close()
    value = None
    if parent_end.poll(timeout_s):
        try:
            value = parent_end.recv()
        except EOFError:
            value = None
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if value is None:
        value = {"status": "error", "error": f"the case process ended without a result (exit code {proc.exitcode})"}
    return value


def _in_subprocess(case, ckpt: Path, diag: bool, timeout_s: float, module: str = "validation.measure") -> dict:
    """Run one case in a fresh interpreter (slower than a fork: it pays the imports again).

    `module` is the harness whose hidden `--run-one` reads the case (validation.trainer_run too)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "case.json"
        out = Path(tmp) / "result.json"
        spec.write_text(json.dumps({"case": case.to_dict(), "ckpt": str(ckpt), "diag": diag}))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", module, "--run-one", str(spec), "--result", str(out)],
                timeout=timeout_s,
                capture_output=True,
                text=True,
            )
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
        if out.exists():
            return json.loads(out.read_text())
        return {"status": "error", "error": f"exit code {proc.returncode}: {proc.stderr[-2000:]}"}


def _checkpoint(model: str, work: Path, overrides: dict | None = None) -> Path:
    from validation.overrides import id_suffix

    directory = work / "ckpt" / (f"{model}-{id_suffix(overrides)}" if overrides else model)
    if not (directory / "READY").exists():
        directory.mkdir(parents=True, exist_ok=True)
        out = _in_child(lambda: (build_checkpoint(model, directory, overrides), {"status": "ok"})[1], (), 1800)
        if out.get("status") != "ok":
            raise RuntimeError(f"could not build a checkpoint for {model}: {out.get('error')}")
    return directory


def _done_ids(path: Path) -> set[str]:
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line)["case"])
    return done


def add_deadline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stop-at",
        type=float,
        help="unix time: start no checkpoint or case when fewer than --reserve-s seconds remain before it; "
        "a later call with --skip-done resumes (for one device call with a time limit)",
    )
    parser.add_argument("--reserve-s", type=float, default=60.0, help="seconds to keep for one case (with --stop-at)")


class Deadline:
    """`--stop-at`: whether another case may start, and a case's timeout cut to end before it."""

    def __init__(self, stop_at: float | None, reserve_s: float, case_timeout_s: float) -> None:
        self.stop_at, self.reserve_s, self.case_timeout_s = stop_at, reserve_s, case_timeout_s

    def left_s(self) -> float:
        return float("inf") if self.stop_at is None else self.stop_at - time.time()

    def may_start(self) -> bool:
        return self.left_s() >= self.reserve_s

    def timeout_s(self) -> float:
        # _in_child waits up to 30 s more for a timed-out child before killing it.
        return max(1.0, min(self.case_timeout_s, self.left_s() - 35.0))

    def cut_short(self, row: dict, timeout_s: float) -> bool:
        """A case that failed because --stop-at cut its timeout: leave it for the next call."""
        return row.get("status") == "error" and timeout_s < self.case_timeout_s and self.left_s() < 40.0


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH", "cudnn": "CUDNN_ATTENTION"}


def _sdpa_backends(text: str) -> str:
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in SDPA_BACKENDS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown SDPA backend {', '.join(unknown) or text!r}; choose from {', '.join(SDPA_BACKENDS)}")
    return ",".join(names)


def _sdpa_context():
    """The SDPA kernels a diagnosis run allows (CANIRUN_SDPA_BACKENDS), or a context that changes nothing."""
    import contextlib

    backends = os.environ.get("CANIRUN_SDPA_BACKENDS")
    if not backends:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[b]) for b in backends.split(",")])


def add_run_arguments(parser: argparse.ArgumentParser, cases: str, out: str) -> None:
    """The options every case harness takes (this one and validation.trainer_run)."""
    parser.add_argument("--cases", default=cases, help="YAML cases file")
    parser.add_argument("--only", action="append", help="case id pattern (* wildcards); repeatable")
    parser.add_argument("--out", default=out, help="JSON lines file to append to")
    parser.add_argument("--work", default="/tmp/canirun", help="scratch folder for random checkpoints")
    parser.add_argument("--skip-done", action="store_true", help="skip case ids already in --out")
    parser.add_argument("--case-timeout", type=float, default=600.0, help="seconds before a case is abandoned")
    parser.add_argument("--keep-checkpoints", action="store_true", help="don't delete a model's checkpoint after its cases")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument(
        "--isolation",
        choices=["fork", "spawn"],
        default="fork",
        help="fork: children of a parent that imported torch and transformers once; spawn: a fresh interpreter per case",
    )
    add_deadline_arguments(parser)
    parser.add_argument("--snapshot-dir", help="also dump each case's allocator history (torch.cuda.memory snapshots) here")
    parser.add_argument("--snapshot-frames", action="store_true",
                        help="with --snapshot-dir: record each allocation's Python stack (slower; for --explain)")
    parser.add_argument("--sdpa-backends", type=_sdpa_backends,
                        help="comma-separated SDPA backends to allow, of " + ", ".join(SDPA_BACKENDS) +
                        " (torch.nn.attention.sdpa_kernel; default: torch's own choice, cuDNN first on H100/H200)")
    parser.add_argument("--profile-generate", action="store_true",
                        help="after each inference case, time a 16-token generate() under torch.profiler (kernel time vs wall)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def run_cases(cases: list, args: argparse.Namespace, *, measure_one, module: str, header, before_group=None) -> int:
    """Run `cases`, one process each, grouped by model (one random checkpoint per model), appending
    a row per case to --out: `measure_one(case, ckpt, work)` in a forked child, or `module`'s hidden
    --run-one in a fresh interpreter. `header(case)` is what a row says about its case before it ran;
    `before_group(cases)`, if given, runs once per checkpoint's cases before them (it must leave the
    parent's torch idle: do its work in a child). The parent never initialises CUDA."""
    out = Path(args.out)
    if getattr(args, "profile_generate", False):  # read by run_inference in each case's process
        os.environ["CANIRUN_PROFILE_GENERATE"] = "1"
    if getattr(args, "sdpa_backends", None):  # read by run_inference in each case's process
        os.environ["CANIRUN_SDPA_BACKENDS"] = args.sdpa_backends
    if args.snapshot_dir:  # read by record_case in each case's process
        Path(args.snapshot_dir).mkdir(parents=True, exist_ok=True)  # _dump_snapshot does not make it
        os.environ["CANIRUN_SNAPSHOT_DIR"] = str(Path(args.snapshot_dir).resolve())
        if args.snapshot_frames:
            os.environ["CANIRUN_SNAPSHOT_FRAMES"] = "1"
    if args.skip_done:
        done = _done_ids(out)
        cases = [c for c in cases if c.id not in done]
    if args.list:
        for case in cases:
            print(case.id)
        return 0
    if args.isolation == "fork":
        # Imported once here, inherited by every forked case. CUDA must stay untouched in the parent:
        # PYTORCH_NVML_BASED_CUDA_CHECK keeps is_available() from initialising the driver. (Not the
        # Trainer or bitsandbytes: importing bitsandbytes initialises CUDA.)
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        import torch
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        if torch.cuda.is_initialized():
            raise SystemExit("the parent process must not initialise CUDA")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    by_model: dict[tuple, list] = {}  # one checkpoint per model and config_overrides
    for case in cases:
        overrides = getattr(case, "config_overrides", None) or {}
        by_model.setdefault((case.model, json.dumps(overrides, sort_keys=True)), []).append(case)
    deadline = Deadline(args.stop_at, args.reserve_s, args.case_timeout)
    for (model, overrides), group in by_model.items():
        if not deadline.may_start():
            print(f"stop   --stop-at is near; a later call with --skip-done resumes at {group[0].id}", flush=True)
            break
        if before_group is not None:
            before_group(group)
        ckpt = None
        try:
            ckpt = _checkpoint(model, work, json.loads(overrides))
        except Exception as err:  # noqa: BLE001
            for case in group:
                _append(out, dict(header(case), status="error", error=str(err)))
            continue
        for case in group:
            if not deadline.may_start():
                print(f"stop   --stop-at is near; a later call with --skip-done resumes at {case.id}", flush=True)
                break
            timeout_s = deadline.timeout_s()
            if args.isolation == "fork":
                row = _in_child(measure_one, (case, ckpt, work), timeout_s)
            else:
                row = _in_subprocess(case, ckpt, getattr(args, "diag", False), timeout_s, module=module)
            if deadline.cut_short(row, timeout_s):
                print(f"stop   {case.id} was cut short by --stop-at; not recorded", flush=True)
                break
            row = {**header(case), **row}
            _append(out, row)
            peak = row.get("peak_allocated_bytes")
            shown = f"{peak / GIB:7.2f} GiB" if isinstance(peak, int) else "      -"
            error = f"  {str(row['error'])[:160]}" if row.get("status") != "ok" and row.get("error") else ""
            print(f"{row.get('status', '?'):5} {shown}  {row.get('wall_s', 0):6.1f}s  {case.id}{error}", flush=True)
        if not args.keep_checkpoints:
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
    return 0


def _append(out: Path, row: dict) -> None:
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def estimator_trainable(case: Case) -> dict:
    """The estimator's trainable-parameter count for a training case, from the config the checkpoint
    is built from, recorded beside PEFT's (`params_trainable`, counted on the real model) so that every
    LoRA row carries both (issue 13). The report recomputes it with the estimator of its day."""
    if not case.job.is_training:
        return {}
    from estimator import estimate, inventory_from_config

    try:
        inv = inventory_from_config(case_config(case.model, case.config_overrides))
        return {"estimator_params_trainable": estimate(inv, case.job).params_trainable}
    except Exception as err:  # noqa: BLE001 - an estimator that refuses the job must not stop the measurement
        return {"estimator_params_trainable": None, "estimator_error": f"{type(err).__name__}: {err}"[:500]}


def check_case_configs(cases: list[Case]) -> None:
    """Build each distinct (model, config_overrides) config once, before any GPU time is spent: an
    override that is invalid or drops a layer kind stops the run with its one-line reason."""
    seen = set()
    for case in cases:
        key = (case.model, json.dumps(case.config_overrides, sort_keys=True))
        if case.config_overrides and key not in seen:
            seen.add(key)
            try:
                case_config(case.model, case.config_overrides)
            except ValueError as err:
                raise ValueError(f"{case.id}: {err}") from None


def _checked_in_child(cases: list[Case]) -> str | None:
    """check_case_configs in a forked child: the meta builds run torch ops, and a parent whose
    OpenMP pool has started deadlocks the children it forks later (libgomp is not fork-safe: a CPU
    dry run hung in gomp_team_barrier_wait_end). The parent forks cases, so it computes nothing."""
    def check():
        try:
            check_case_configs(cases)
        except ValueError as err:
            return {"status": "refused", "error": str(err)}
        return {"status": "ok"}

    out = _in_child(check, (), 600)
    return None if out.get("status") == "ok" else str(out.get("error"))


def estimator_trainable_by_case(cases: list) -> dict[str, dict]:
    """estimator_trainable for a group of cases, in one forked child (see _checked_in_child)."""
    training = [c for c in cases if isinstance(c, Case) and c.job.is_training]
    if not training:
        return {}
    out = _in_child(lambda: {"status": "ok", "counts": {c.id: estimator_trainable(c) for c in training}}, (), 600)
    if out.get("status") != "ok":
        return {c.id: {"estimator_params_trainable": None, "estimator_error": str(out.get("error"))[:500]} for c in training}
    return out["counts"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.measure", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, "validation/cases.yaml", "validation/results/measured.jsonl")
    parser.add_argument("--diag", action="store_true", help="also record a census of saved activations")
    args = parser.parse_args(argv)
    if args.run_one:
        spec = json.loads(Path(args.run_one).read_text())
        row = measure_case(Case.from_dict(spec["case"]), Path(spec["ckpt"]), spec["diag"])
        Path(args.result).write_text(json.dumps(row))
        return 0
    try:
        cases = select(load_cases(args.cases), args.only)
    except ValueError as err:
        print(f"{args.cases}: {err}", file=sys.stderr)
        return 2
    refused = None if args.list else _checked_in_child(cases)
    if refused:  # one line, before any checkpoint is built
        print(f"{args.cases}: {refused}", file=sys.stderr)
        return 2
    counts: dict[str, dict] = {}
    return run_cases(cases, args, module="validation.measure",
                     measure_one=lambda case, ckpt, work: measure_case(case, ckpt, args.diag),
                     header=lambda case: {**case.header(), **counts.get(case.id, {})},
                     before_group=lambda group: counts.update(estimator_trainable_by_case(group)))


if __name__ == "__main__":
    sys.exit(main())

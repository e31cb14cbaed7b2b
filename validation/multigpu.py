"""Measure multi-GPU jobs on several GPUs of one host: FSDP training and device_map="auto" inference.

    python -m validation.multigpu --cases validation/cases_multigpu.yaml \
        --out validation/results_multigpu/h200x2.jsonl
    python -m validation.multigpu --cases validation/cases_multigpu.yaml --out /tmp/dry.jsonl \
        --nproc 1 --only 'llama3.2-1b-*' --dry-run-cpu

The parent never touches CUDA. It builds each model's random bf16 checkpoint once (the single-GPU
harness's `validation.measure._checkpoint`), then runs every case as

    torchrun --standalone --nproc-per-node N -m validation.multigpu --worker CASE.json --ckpt DIR --result-dir DIR

one process per GPU. Each rank writes its own JSON; the parent merges them into one JSON line per
case with `ranks: [...]` and the worst rank's figures, which are what the per-GPU estimate
(`estimator.fit.per_gpu`) promises. A case that fails (out of memory, an error, a hang past the
timeout) is written as such and the run goes on.

Case kinds (`kind:` in the cases file) and what the worker does, in SPEC's regimes:

- `fsdp_full_shard`: full fine-tuning; the model loads as SPEC's full job does (fp32 weights for
  `amp_bf16`), on the CPU, then PyTorch's FSDP2 `fully_shard` wraps every decoder layer with
  `reshard_after_forward=True` (ZeRO-3) and then the root (embeddings, final norm, lm_head) with
  PyTorch's default, which keeps the root gathered from forward to backward; sharding moves each
  rank's shard to its GPU.
  For `amp_*` precisions, `MixedPrecisionPolicy(param_dtype=bf16|fp16, reduce_dtype=fp32)`, and the
  forward still runs under autocast, as the HF Trainer does under FSDP.
- `fsdp_shard_grad_op`: the same with `reshard_after_forward=False` (FSDP's SHARD_GRAD_OP: the
  gathered compute-dtype parameters stay from forward to the end of backward).
- `lora_fsdp`: SPEC's lora job (bf16 base + peft LoRA) sharded like `fsdp_full_shard`. FSDP2
  shards each parameter on its own, so frozen base weights and trainable adapters can share a unit
  (FSDP1 needed `use_orig_params=True` for that).
- `device_map_auto`: inference; only rank 0 works: `from_pretrained(..., device_map="auto")` over
  every visible GPU, then SPEC's `generate`; the other ranks wait on a gloo barrier and never touch
  a GPU, so they add nothing to any GPU's use. Every GPU's counters are read by rank 0.

Each case names `nproc`, the GPUs it uses; `--nproc N` overrides it for every case (the dry run
uses 1). `CUDA_VISIBLE_DEVICES` is narrowed to the first N GPUs, so `device_map="auto"` spreads
over exactly N.

`--dry-run-cpu` runs the same code on the CPU with gloo: the launcher, FSDP wrapping, the steps
and the merge are exercised, and every memory counter reads 0 (the JSON says so).

Measurements land outside `validation/results/`, whose rows `validation.report` scores against
single-GPU estimates; `python -m validation.report_multigpu` scores these.
"""

from __future__ import annotations

import argparse
import datetime
import enum
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from estimator.fit import Strategy
from estimator.job import Mode
from validation.cases import Case, ensure_unique_ids, expand, select

GIB = 1024**3
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results_multigpu"

# NVLink multicast (NVLS) off in NCCL, PyTorch's symmetric memory and NVSHMEM. The lent H200 hosts
# require it: a program that creates multicast objects can put the host's shared GPUs out of
# service for a day or more. Set on every torchrun the parent starts, whatever the caller's env.
NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

DRY_RUN_NOTE = "CPU dry run: gloo on the CPU; no GPU, so every memory counter reads 0"
STEPS = 3  # SPEC: the peak is the maximum over three steps


class Kind(str, enum.Enum):
    FSDP_FULL_SHARD = "fsdp_full_shard"
    FSDP_SHARD_GRAD_OP = "fsdp_shard_grad_op"
    LORA_FSDP = "lora_fsdp"
    DEVICE_MAP_AUTO = "device_map_auto"

    @property
    def strategy(self) -> Strategy:
        """The `estimator.fit.Strategy` whose per-GPU figures this kind measures."""
        return {
            Kind.FSDP_FULL_SHARD: Strategy.ZERO3,
            Kind.FSDP_SHARD_GRAD_OP: Strategy.ZERO2,
            Kind.LORA_FSDP: Strategy.ZERO3,
            Kind.DEVICE_MAP_AUTO: Strategy.PIPELINE,
        }[self]

    @property
    def mode(self) -> Mode:
        return {
            Kind.FSDP_FULL_SHARD: Mode.FULL,
            Kind.FSDP_SHARD_GRAD_OP: Mode.FULL,
            Kind.LORA_FSDP: Mode.LORA,
            Kind.DEVICE_MAP_AUTO: Mode.INFERENCE,
        }[self]

    @property
    def is_fsdp(self) -> bool:
        return self is not Kind.DEVICE_MAP_AUTO


@dataclass(frozen=True)
class MultiCase:
    """A single-GPU `Case` plus how it is spread: the kind, the estimator's strategy, the GPU count."""

    case: Case
    kind: Kind
    strategy: Strategy
    nproc: int

    @property
    def id(self) -> str:
        return self.case.id

    def to_dict(self) -> dict:
        return {"case": self.case.to_dict(), "kind": self.kind.value, "strategy": self.strategy.value, "nproc": self.nproc}

    @classmethod
    def from_dict(cls, data: dict) -> "MultiCase":
        return cls(Case.from_dict(data["case"]), Kind(data["kind"]), Strategy(data["strategy"]), int(data["nproc"]))


# ---------------------------------------------------------------------------------------------
# The cases file: validation/cases.py's format plus `kind`, `strategy` and `nproc` per case
# ---------------------------------------------------------------------------------------------
def _multi_one(item: dict, where: str) -> MultiCase:
    item = dict(item)
    try:
        kind = Kind(str(item.pop("kind")))
    except KeyError:
        raise ValueError(f"{where}: a multi-GPU case needs a kind ({', '.join(k.value for k in Kind)})") from None
    except ValueError:
        raise ValueError(f"{where}: kind must be one of {', '.join(k.value for k in Kind)}") from None
    strategy_text = item.pop("strategy", None)
    if strategy_text is None:
        raise ValueError(f"{where}: name the estimator's strategy ({kind.strategy.value} for {kind.value})")
    try:
        strategy = Strategy(str(strategy_text))
    except ValueError:
        raise ValueError(f"{where}: strategy must be one of {', '.join(s.value for s in Strategy)}") from None
    if strategy is not kind.strategy:
        raise ValueError(f"{where}: {kind.value} is measured against the {kind.strategy.value} estimate, not {strategy.value}")
    nproc = item.pop("nproc", None)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"{where}: nproc must be a whole number of GPUs, at least 1; got {nproc!r}")
    if "grid" in item:
        raise ValueError(f"{where}: grids are not supported in multi-GPU cases; write each case out")
    has_id = "id" in item
    (case,) = expand([item])
    if not has_id:
        case = replace(case, id=f"{case.id}-{kind.value}-x{nproc}")
    job = case.job
    if job.mode is not kind.mode:
        raise ValueError(f"{where}: {kind.value} runs a {kind.mode.value} job, not {job.mode.value}")
    if kind.is_fsdp and job.optimizer.uses_bitsandbytes:
        raise ValueError(f"{where}: bitsandbytes optimizers do not take FSDP's sharded (DTensor) parameters")
    return MultiCase(case, kind, strategy, nproc)


def load_multi_cases(path: str | Path) -> list[MultiCase]:
    with open(path, encoding="utf-8") as handle:
        items = yaml.safe_load(handle) or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: a cases file is a YAML list")
    cases = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"case {index + 1}: expected a mapping, got {type(item).__name__}")
        cases.append(_multi_one(item, f"case {index + 1}"))
    return ensure_unique_ids(cases)


# ---------------------------------------------------------------------------------------------
# Memory on one or several GPUs of this process
# ---------------------------------------------------------------------------------------------
def _nvml_handles(cuda_indices: list[int]) -> dict[int, object]:
    """NVML handles for CUDA device indices, taken before CUDA starts (NVML needs no context).

    The parent sets CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML's own order, so CUDA_VISIBLE_DEVICES'
    entries (indices or GPU-UUIDs) name the same devices in both.
    """
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        out = {}
        for i in cuda_indices:
            entry = visible[i] if i < len(visible) else str(i)
            if entry.startswith(("GPU-", "MIG-")):
                out[i] = pynvml.nvmlDeviceGetHandleByUUID(entry)
            else:
                out[i] = pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return out
    except Exception:  # noqa: BLE001 - NVML is optional; mem_get_info is the fallback
        return {}


class GpuProbe:
    """Allocator counters and device use (NVML, over a pre-CUDA baseline) for each of `devices`.

    On the CPU (`devices` empty) every figure is 0.
    """

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices
        self.handles = _nvml_handles(devices)
        self.baseline = {i: self._nvml_used(i) for i in devices}
        self.samples: dict[str, dict[str, dict]] = {}
        self.device_used_max = {i: 0 for i in devices}
        self.step_device_used_max = {i: 0 for i in devices}
        self.in_steps = False

    def _nvml_used(self, i: int) -> int | None:
        handle = self.handles.get(i)
        if handle is None:
            return None
        try:
            import pynvml

            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # noqa: BLE001
            return None

    @property
    def uses_nvml(self) -> bool:
        return bool(self.devices) and all(self.baseline.get(i) is not None for i in self.devices)

    def device_used(self, i: int) -> int:
        import torch

        used = self._nvml_used(i)
        if used is not None and self.baseline.get(i) is not None:
            return used - self.baseline[i]
        free, total = torch.cuda.mem_get_info(i)
        return total - free  # device-wide: includes what other processes hold

    def sample(self, name: str) -> dict[str, dict]:
        import torch

        rows = {}
        for i in self.devices:
            torch.cuda.synchronize(i)
            row = {
                "allocated": torch.cuda.memory_allocated(i),
                "reserved": torch.cuda.memory_reserved(i),
                "max_allocated": torch.cuda.max_memory_allocated(i),
                "max_reserved": torch.cuda.max_memory_reserved(i),
                "device_used": self.device_used(i),
            }
            self.device_used_max[i] = max(self.device_used_max[i], row["device_used"])
            if self.in_steps:
                self.step_device_used_max[i] = max(self.step_device_used_max[i], row["device_used"])
            rows[str(i)] = row
        self.samples[name] = rows
        return rows

    def reset_peaks(self) -> None:
        import torch

        for i in self.devices:
            torch.cuda.reset_peak_memory_stats(i)

    def max_allocated(self) -> int:
        import torch

        return max((torch.cuda.max_memory_allocated(i) for i in self.devices), default=0)

    def allocated(self) -> int:
        import torch

        return max((torch.cuda.memory_allocated(i) for i in self.devices), default=0)

    def device_rows(self, peak_allocated: dict[int, int], peak_reserved: dict[int, int]) -> list[dict]:
        """One entry per GPU this rank used: its peaks over the job and its device use."""
        import torch

        rows = []
        for i in self.devices:
            props = torch.cuda.get_device_properties(i)
            rows.append(
                {
                    "index": i,
                    "name": props.name,
                    "capacity_bytes": int(props.total_memory),
                    "peak_allocated_bytes": int(peak_allocated.get(i, 0)),
                    "peak_reserved_bytes": int(peak_reserved.get(i, 0)),
                    "device_total_bytes": int(self.step_device_used_max[i] or self.device_used_max[i]),
                    "device_used_max_incl_loading_bytes": int(self.device_used_max[i]),
                }
            )
        return rows


# ---------------------------------------------------------------------------------------------
# The worker: one rank of one case, under torchrun
# ---------------------------------------------------------------------------------------------
def _from_pretrained_kwargs(multi: MultiCase) -> dict:
    """dtype / quantization exactly as SPEC's job loads it (validation.measure's, from the regime)."""
    from validation.measure import from_pretrained_kwargs

    if multi.case.job.mode is Mode.QLORA:
        raise ValueError("QLoRA under FSDP is not a case kind here")
    return from_pretrained_kwargs(multi.case.job)


def decoder_layers(model) -> list:
    """The decoder layers: modules of the classes transformers keeps whole (`_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder-layer class (_no_split_modules) to shard")
    return layers


def _shard(model, multi: MultiCase, device_type: str, world_size: int) -> str:
    """FSDP2: every decoder layer, then the root. Returns what was done, for the JSON."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reshard = multi.kind is not Kind.FSDP_SHARD_GRAD_OP
    mesh = init_device_mesh(device_type, (world_size,))
    from validation.measure import autocast_dtype

    amp = autocast_dtype(multi.case.job)
    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp is not None else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = type(layers[0]).__name__, type(root).__name__  # before fully_shard renames the classes
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    # The root (embeddings, final norm, lm_head) keeps PyTorch's default for full shard: not
    # resharded after forward, since backward needs it at once (accelerate's FSDP2 does the same).
    root_reshard = None if reshard else False
    fully_shard(root, mesh=mesh, reshard_after_forward=root_reshard, mp_policy=mp)
    dtype = "none" if amp is None else str(amp).replace("torch.", "")
    return (
        f"FSDP2 fully_shard on {len(layers)} {names[0]} (reshard_after_forward={reshard}) + root {names[1]} "
        f"(reshard_after_forward={root_reshard}), param_dtype={dtype}, reduce_dtype={'float32' if amp is not None else 'none'}"
    )


class _Clock:
    """Seconds spent in each named stretch, into result["timings_s"]."""

    def __init__(self, result: dict) -> None:
        self.timings = result.setdefault("timings_s", {})
        self.last = time.time()

    def __call__(self, name: str) -> None:
        now = time.time()
        self.timings[name] = round(now - self.last, 2)
        self.last = now


def run_fsdp(multi: MultiCase, ckpt: Path, device, probe: GpuProbe, result: dict, world_size: int) -> None:
    """One rank of an FSDP training case: load on the CPU, shard to this rank's device, 3 steps."""
    import torch
    import transformers

    from validation.measure import _count_params, _lora_config, autocast_dtype, make_optimizer

    job = multi.case.job
    clock = _Clock(result)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), device_map={"": "cpu"}, **_from_pretrained_kwargs(multi))
    clock("load")
    result["params_total"] = _count_params(model)
    model.config.use_cache = False
    if job.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if job.uses_lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(job))
    result["sharding"] = _shard(model, multi, device.type, world_size)
    clock("shard")
    if device.type == "cuda":
        # Sharding moved each unit to the GPU whole before keeping this rank's shard: give the
        # freed blocks back so the device total reflects the job, not the loading.
        torch.cuda.empty_cache()
    probe.sample("sharded")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    result["params_trainable"] = sum(p.numel() for p in params)  # global numel (DTensor)
    result["params_trainable_local"] = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    optimizer = make_optimizer(job.optimizer.value, params)
    vocab = model.config.get_text_config().vocab_size
    torch.manual_seed(0)  # every rank the same ids: shapes, not data, decide memory
    ids = torch.randint(0, vocab, (job.batch_size, job.seq_len), device=device)
    amp = autocast_dtype(job)
    result["autocast"] = None if amp is None else str(amp).replace("torch.", "")

    def forward():
        if amp is None:
            return model(input_ids=ids, labels=ids).loss
        with torch.autocast(device.type, dtype=amp):
            return model(input_ids=ids, labels=ids).loss

    setup = probe.sample("setup")
    result["static_after_setup_bytes"] = sum(row["allocated"] for row in setup.values())
    probe.in_steps = True
    probe.reset_peaks()
    steps = []
    for step in range(STEPS):
        row = {"start_allocated": probe.allocated()}
        probe.reset_peaks()
        loss = forward()
        probe.sample(f"step{step}_forward")
        row.update(forward_peak=probe.max_allocated(), after_forward=probe.allocated())
        probe.reset_peaks()
        loss.backward()
        row["loss"] = float(loss.detach().float().item())
        del loss
        probe.sample(f"step{step}_backward")
        row.update(backward_peak=probe.max_allocated(), after_backward=probe.allocated())
        probe.reset_peaks()
        optimizer.step()
        probe.sample(f"step{step}_optimizer")
        row.update(optimizer_peak=probe.max_allocated(), after_optimizer=probe.allocated())
        optimizer.zero_grad(set_to_none=True)
        probe.sample(f"step{step}_zero_grad")
        row["after_zero_grad"] = probe.allocated()
        steps.append(row)
        clock(f"step{step}")
    result["steps"] = steps
    peak = max(max(r["forward_peak"], r["backward_peak"], r["optimizer_peak"]) for r in steps)
    step_reserved = max(
        (max(x["max_reserved"] for x in rows.values()) for name, rows in probe.samples.items() if name.startswith("step") and rows),
        default=0,
    )
    result["optimizer_state_bytes"] = steps[1]["start_allocated"] - steps[0]["start_allocated"]
    result["devices"] = probe.device_rows({i: peak for i in probe.devices}, {i: step_reserved for i in probe.devices})


def run_device_map_auto(multi: MultiCase, ckpt: Path, probe: GpuProbe, result: dict) -> None:
    """Rank 0 of a device_map="auto" case: load over every visible GPU, then SPEC's generate."""
    import transformers

    from validation.measure import _count_params, spec_generate, spec_prompt

    job = multi.case.job
    on_cuda = bool(probe.devices)
    device_map = "auto" if on_cuda else {"": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), device_map=device_map, **_from_pretrained_kwargs(multi))
    probe.sample("loaded")
    result["params_total"] = _count_params(model)
    result["params_trainable"] = 0
    placement: dict[str, int] = {}
    for where in (getattr(model, "hf_device_map", None) or {"": "cpu"}).values():
        placement[str(where)] = placement.get(str(where), 0) + 1
    result["device_map_modules_per_device"] = placement
    model.eval()
    prompt = spec_prompt(model, job, model.get_input_embeddings().weight.device)
    seen: list[int] = []

    def step_probe(input_ids, scores):
        seen.append(probe.max_allocated())
        return scores

    probe.sample("setup")
    probe.in_steps = True
    probe.reset_peaks()  # SPEC: the peak counter is reset after loading
    generated_tokens = spec_generate(model, job, prompt, step_probe)
    generated = probe.sample("generated")
    result["generated_tokens"] = generated_tokens
    result["generate_steps"] = len(seen)
    result["devices"] = probe.device_rows(
        {i: generated[str(i)]["max_allocated"] for i in probe.devices},
        {i: generated[str(i)]["max_reserved"] for i in probe.devices},
    )


def _gpu_totals(result: dict) -> None:
    devices = result.get("devices") or []
    result["peak_allocated_bytes"] = max((d["peak_allocated_bytes"] for d in devices), default=0)
    result["peak_reserved_bytes"] = max((d["peak_reserved_bytes"] for d in devices), default=0)
    result["device_total_bytes"] = max((d["device_total_bytes"] for d in devices), default=0)


def _cpu_device_row() -> dict:
    return {"index": "cpu", "name": "cpu (dry run)", "capacity_bytes": 0, "peak_allocated_bytes": 0,
            "peak_reserved_bytes": 0, "device_total_bytes": 0, "device_used_max_incl_loading_bytes": 0}


def worker(multi: MultiCase, ckpt: Path, result_dir: Path, dry_run_cpu: bool) -> int:
    """One rank. Writes result_dir/rank{R}.json whatever happens; a failure exits non-zero so
    torchrun stops the other ranks (which would otherwise wait in a collective forever)."""
    import torch
    import torch.distributed as dist

    import validation.measure as measure

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    on_cuda = not dry_run_cpu
    measure.DEVICE = "cuda" if on_cuda else "cpu"  # what measure._versions() reports
    kind = multi.kind
    active = kind.is_fsdp or rank == 0
    if not on_cuda or not active:
        devices: list[int] = []
    elif kind is Kind.DEVICE_MAP_AUTO:
        devices = list(range(torch.cuda.device_count()))  # NVML-based count: no context yet
    else:
        devices = [local_rank]
    probe = GpuProbe(devices)  # baseline before this rank creates a context
    result: dict = {
        "case": multi.id,
        "rank": rank,
        "local_rank": local_rank,
        "world_size": world_size,
        "kind": kind.value,
        "role": "worker" if active else "idle (device_map=auto runs on rank 0 only)",
        "dry_run": dry_run_cpu,
        "nvml": probe.uses_nvml,
    }
    if dry_run_cpu:
        result["memory_counters"] = DRY_RUN_NOTE
    t0 = time.time()
    status = 0
    try:
        # device_map=auto ranks need no GPU collective: gloo keeps the idle ranks off the GPUs.
        # Generous: idle ranks wait on rank 0's whole load and generate; the parent's timeout rules.
        timeout = datetime.timedelta(hours=2)
        backend = "nccl" if on_cuda and kind.is_fsdp else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, device_id=torch.device("cuda", local_rank), timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
        result["backend"] = backend
        if active and on_cuda:
            for i in devices:
                torch.empty(1, device=f"cuda:{i}")
            first = probe.sample("context")
            result["context_bytes"] = {i: row["device_used"] - row["reserved"] for i, row in first.items()}
            for i in devices:  # cuBLAS handles and workspaces, as the job's first matmul would create
                a = torch.ones(64, 64, device=f"cuda:{i}", dtype=torch.bfloat16)
                (a @ a).sum().item()
                del a
            probe.sample("blas")
        if active:
            if kind.is_fsdp:
                device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
                run_fsdp(multi, ckpt, device, probe, result, world_size)
            else:
                run_device_map_auto(multi, ckpt, probe, result)
            if not on_cuda:
                result["devices"] = [_cpu_device_row()]
            _gpu_totals(result)
        dist.barrier()
        result["status"] = "ok"
    except torch.OutOfMemoryError as err:
        result["status"] = "oom"
        result["error"] = str(err).splitlines()[0][:500]
        result["peak_allocated_bytes"] = probe.max_allocated()
        status = 1
    except Exception as err:  # noqa: BLE001 - recorded; the parent goes on with the next case
        result["status"] = "error"
        result["error"] = f"{type(err).__name__}: {err}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
        status = 1
    try:
        result["samples"] = probe.samples
        result["versions"] = measure._versions()
        result["versions"]["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if on_cuda else None
    except Exception:  # noqa: BLE001
        pass
    result["wall_s"] = round(time.time() - t0, 2)
    result_dir.mkdir(parents=True, exist_ok=True)
    (result_dir / f"rank{rank}.json").write_text(json.dumps(result))
    if status != 0:
        # Other ranks may sit in a collective this rank will never join: leave at once (no
        # process-group teardown, which could wait on them) and let torchrun stop them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# The merge: per-rank JSONs into one line per case
# ---------------------------------------------------------------------------------------------
def merge(multi: MultiCase, nproc: int, rank_rows: dict[int, dict], launcher: dict) -> dict:
    """One row per case. The worst rank (the fullest GPU of any rank) is what a per-GPU estimate
    must cover. Status: `oom` if any rank ran out of memory, else `error` if any rank failed, left
    no result or the launcher failed, else `ok`."""
    row: dict = {
        "case": multi.id,
        "model": multi.case.model,
        "holdout": multi.case.holdout,
        "job": multi.case.job.to_dict(),
        "kind": multi.kind.value,
        "strategy": multi.strategy.value,
        "nproc": nproc,
        "num_gpus": nproc,
    }
    ranks = []
    for r in range(nproc):
        got = rank_rows.get(r)
        if got is None:
            why = "no result from this rank"
            if launcher.get("timed_out"):
                why += f" (killed after {launcher.get('timeout_s')} s)"
            elif launcher.get("returncode"):
                why += " (stopped by torchrun after another rank failed, or crashed)"
            got = {"rank": r, "status": "missing", "error": why}
        ranks.append(got)
    row["ranks"] = ranks
    statuses = [r.get("status") for r in ranks]
    if "oom" in statuses:
        row["status"] = "oom"
    elif any(s != "ok" for s in statuses) or launcher.get("timed_out") or launcher.get("returncode"):
        row["status"] = "error"
    else:
        row["status"] = "ok"
    if row["status"] != "ok":
        failed = [r for r in ranks if r.get("status") == row["status"]] or [r for r in ranks if r.get("status") != "ok"]
        if failed:
            row["error"] = f"rank {failed[0]['rank']}: {failed[0].get('error', failed[0].get('status'))}"
        elif launcher.get("timed_out"):
            row["error"] = f"timed out after {launcher.get('timeout_s')} s"
        else:
            row["error"] = f"torchrun exited with {launcher.get('returncode')}: {launcher.get('stderr_tail', '')[-1000:]}"
    worst = None  # (peak allocated, rank, device entry)
    for r in ranks:
        for d in r.get("devices") or []:
            key = (d.get("peak_allocated_bytes") or 0, d.get("device_total_bytes") or 0)
            if worst is None or key > worst[0]:
                worst = (key, r["rank"], d)
    all_devices = [d for r in ranks for d in (r.get("devices") or [])]
    if worst is not None:
        row["worst_rank"] = worst[1]
        row["worst_device"] = worst[2].get("index")
        row["worst_rank_peak_allocated_bytes"] = max(d.get("peak_allocated_bytes") or 0 for d in all_devices)
        row["worst_rank_peak_reserved_bytes"] = max(d.get("peak_reserved_bytes") or 0 for d in all_devices)
        row["worst_rank_device_total_bytes"] = max(d.get("device_total_bytes") or 0 for d in all_devices)
    else:
        oom_peaks = [r.get("peak_allocated_bytes") for r in ranks if isinstance(r.get("peak_allocated_bytes"), int)]
        row["worst_rank_peak_allocated_bytes"] = max(oom_peaks) if oom_peaks else None
        row["worst_rank_peak_reserved_bytes"] = None
        row["worst_rank_device_total_bytes"] = None
    row["dry_run"] = any(r.get("dry_run") for r in ranks)
    if row["dry_run"]:
        row["memory_counters"] = DRY_RUN_NOTE
    first = next((r for r in ranks if r.get("versions")), None)
    if first is not None:
        row["versions"] = first["versions"]
    row["launcher"] = launcher
    return row


# ---------------------------------------------------------------------------------------------
# The parent: checkpoints, one torchrun per case, merged rows appended as JSON lines
# ---------------------------------------------------------------------------------------------
def _visible_devices(nproc: int) -> str:
    """The first `nproc` GPUs of those this process may use."""
    current = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and current:
        return ",".join(current[:nproc])
    return ",".join(str(i) for i in range(nproc))


def launch_env(nproc: int, dry_run_cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(NVLINK_MULTICAST_OFF)
    env.update(
        CUDA_DEVICE_ORDER="PCI_BUS_ID",  # NVML's order, so both name each GPU alike
        CUDA_VISIBLE_DEVICES="" if dry_run_cpu else _visible_devices(nproc),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTORCH_NVML_BASED_CUDA_CHECK="1",
    )
    return env


def torchrun_command(spec: Path, ckpt: Path, result_dir: Path, nproc: int, dry_run_cpu: bool) -> list[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run",  # torchrun, with this interpreter
        "--standalone", "--nproc-per-node", str(nproc),
        "-m", "validation.multigpu",
        "--worker", str(spec), "--ckpt", str(ckpt), "--result-dir", str(result_dir),
    ]  # fmt: skip
    if dry_run_cpu:
        command.append("--dry-run-cpu")
    return command


def run_case(multi: MultiCase, ckpt: Path, nproc: int, dry_run_cpu: bool, timeout_s: float) -> dict:
    """Launch one case under torchrun and merge what its ranks wrote."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="canirun-multigpu-") as tmp:
        spec = Path(tmp) / "case.json"
        spec.write_text(json.dumps(multi.to_dict()))
        result_dir = Path(tmp) / "ranks"
        command = torchrun_command(spec, ckpt, result_dir, nproc, dry_run_cpu)
        launcher: dict = {"command": " ".join(command), "timeout_s": timeout_s, "env": {k: v for k, v in NVLINK_MULTICAST_OFF.items()}}
        log = Path(tmp) / "torchrun.log"
        with log.open("w") as handle:
            proc = subprocess.Popen(command, env=launch_env(nproc, dry_run_cpu), cwd=REPO_ROOT, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                launcher["returncode"] = proc.wait(timeout=timeout_s)
                launcher["timed_out"] = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started: our own session
                proc.wait()
                launcher["returncode"] = proc.returncode
                launcher["timed_out"] = True
        launcher["stderr_tail"] = log.read_text(errors="replace")[-3000:]
        rank_rows = {}
        for path in sorted(result_dir.glob("rank*.json")) if result_dir.exists() else []:
            try:
                data = json.loads(path.read_text())
                rank_rows[int(data["rank"])] = data
            except (json.JSONDecodeError, KeyError, ValueError):
                continue
    if launcher["returncode"] == 0:
        launcher.pop("stderr_tail")  # torchrun's banner, nothing to keep
    row = merge(multi, nproc, rank_rows, launcher)
    row["wall_s"] = round(time.time() - t0, 2)
    return row


def _done_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["case"] for line in path.read_text().splitlines() if line.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.multigpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="validation/cases_multigpu.yaml", help="YAML multi-GPU cases file")
    parser.add_argument("--only", action="append", help="case id pattern (* wildcards); repeatable")
    parser.add_argument("--out", default=str(RESULTS_DIR / "measured.jsonl"), help="JSON lines file to append to")
    parser.add_argument("--nproc", type=int, help="GPUs (processes) for every case, overriding each case's nproc")
    parser.add_argument("--work", default="/tmp/canirun", help="scratch folder for random checkpoints")
    parser.add_argument("--dry-run-cpu", action="store_true", help="run on the CPU with gloo; memory counters read 0")
    parser.add_argument("--skip-done", action="store_true", help="skip case ids already in --out")
    parser.add_argument("--case-timeout", type=float, default=1200.0, help="seconds before a case's torchrun is killed")
    parser.add_argument("--keep-checkpoints", action="store_true", help="don't delete a model's checkpoint after its cases")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        multi = MultiCase.from_dict(json.loads(Path(args.worker).read_text()))
        return worker(multi, Path(args.ckpt), Path(args.result_dir), args.dry_run_cpu)
    if args.nproc is not None and args.nproc < 1:
        parser.error("--nproc must be at least 1")

    cases = load_multi_cases(args.cases)
    keep = {c.id for c in select([m.case for m in cases], args.only)}
    cases = [m for m in cases if m.id in keep]
    out = Path(args.out)
    if args.skip_done:
        done = _done_ids(out)
        cases = [m for m in cases if m.id not in done]
    if args.list:
        for multi in cases:
            print(f"{multi.id}  {multi.kind.value}  {multi.strategy.value}  x{args.nproc or multi.nproc}")
        return 0
    # The parent never initialises CUDA: the checkpoint is built in a forked child, the cases in torchrun's.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import validation.measure as measure

    if args.dry_run_cpu:
        measure.DEVICE = "cpu"  # build_checkpoint builds on measure.DEVICE
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    by_model: dict[str, list[MultiCase]] = {}
    for multi in cases:
        by_model.setdefault(multi.case.model, []).append(multi)
    for model, group in by_model.items():
        try:
            ckpt = measure._checkpoint(model, work)  # random bf16 weights, built once per model
        except Exception as err:  # noqa: BLE001
            for multi in group:
                row = merge(multi, args.nproc or multi.nproc, {}, {"returncode": None})
                row.update(status="error", error=f"checkpoint: {err}")
                with out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            continue
        for multi in group:
            nproc = args.nproc or multi.nproc
            row = run_case(multi, ckpt, nproc, args.dry_run_cpu, args.case_timeout)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            peak = row.get("worst_rank_peak_allocated_bytes")
            device = row.get("worst_rank_device_total_bytes")
            shown = f"{peak / GIB:7.2f} GiB" if isinstance(peak, int) else "      -    "
            shown += f" {device / GIB:7.2f} GiB" if isinstance(device, int) else "       -    "
            note = f"  {row.get('error', '')[:200]}" if row["status"] != "ok" else ""
            print(f"{row['status']:5} {shown}  {row['wall_s']:6.1f}s  x{nproc}  {multi.id}{note}", flush=True)
        if not args.keep_checkpoints:
            import shutil

            shutil.rmtree(work / "ckpt" / model, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

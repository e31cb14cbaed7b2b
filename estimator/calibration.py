"""The few constants that are measured rather than derived, each named, explained and sourced.

Everything else in the estimator follows from shapes, dtypes and the libraries' code. The
constants that depend on the GPU, the driver and the CUDA libraries are data, per GPU, in
`calibration.yaml` beside this module (measured by `python -m validation.measure` on an H100 80GB
HBM3 and an H200, driver 580, torch 2.11.0+cu130; tests/test_calibration.py recomputes them from
the committed rows). The estimate uses the reference GPU's; the two agree to the MiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

MIB = 1024**2
DATA_PATH = Path(__file__).resolve().parent / "calibration.yaml"


@dataclass(frozen=True)
class GpuConstants:
    """One GPU's measured constants, in bytes."""

    gpu: str
    results: str
    cuda_context_bytes: int
    cublas_workspace_bytes: int
    cublas_handles_bytes: int
    autograd_thread_bytes: int
    bnb_int8_kernels_bytes: int


def load(path: Path = DATA_PATH) -> tuple[str, dict[str, GpuConstants]]:
    """(reference GPU, constants per GPU) from calibration.yaml."""
    data = yaml.safe_load(path.read_text())
    per_gpu = {
        name: GpuConstants(name, row["results"], *(int(row[key]) * MIB for key in (
            "cuda_context", "cublas_workspace", "cublas_handles", "autograd_thread", "bnb_int8_kernels")))
        for name, row in data["gpus"].items()
    }
    return data["reference"], per_gpu


REFERENCE, PER_GPU = load()
_ref = PER_GPU[REFERENCE]

# The tight band, as a fraction of the card's capacity (calibration.yaml says how it was fixed).
TIGHT_BAND_FRACTION = float(yaml.safe_load(DATA_PATH.read_text())["tight_band"])

# The CUDA context of a PyTorch process: device memory in use after `torch.cuda.init()` and a
# first allocation, less what the caching allocator reserved. It holds the driver's per-process
# state and the lazily loaded kernels of torch's libraries. Measured per case ("context_bytes").
CUDA_CONTEXT_BYTES = _ref.cuda_context_bytes

# cuBLAS's workspace, created by the first matmul through the caching allocator, so it counts in
# `memory_allocated()`: torch's default on this GPU is 32 MiB ("blas_workspace_allocated_bytes").
CUBLAS_WORKSPACE_BYTES = _ref.cublas_workspace_bytes

# What the caching allocator holds reserved but unused when from_pretrained starts, under SPEC's
# measurement protocol: the context probe's one-element tensor (validation.measure's
# measure_context), freed, leaves its 2 MiB small-pool segment cached. transformers'
# caching_allocator_warmup subtracts such unused memory from its warm-up block
# (modeling_utils.py: `byte_count - unused_memory`), and the allocator histories of 4-bit loads on
# the H200 show the block 2 MiB short of the weights' bytes.
LOAD_UNUSED_RESERVED_BYTES = 2 * 1024 * 1024

# cuBLASLt's workspace: a matmul with a 1-D bias (`addmm` with beta 1, F.linear's bias) takes
# cuBLASLt's bias epilogue, whose workspace torch requests through the caching allocator and keeps,
# once per thread's handle: the main thread's forward, and again the autograd thread's (recomputed
# forwards under gradient checkpointing). 1 MiB (torch's CUBLASLT_WORKSPACE_SIZE default, 1024
# KiB), read off the allocator history of a Qwen2-1.5B QLoRA step on the H200 (its biased q/k/v
# projections), where two such 1 MiB blocks stay allocated to the end.
CUBLASLT_WORKSPACE_BYTES = 1024 * 1024

# The first matmul's cuBLAS/cuBLASLt handles and loaded kernels, outside the allocator: device use
# over reserved memory is 687 MiB in fp32 inference and up to 737 MiB in bf16 (median 707), of
# which the context is 527 MiB (calibration.yaml says how the 163 MiB were chosen).
CUBLAS_HANDLES_BYTES = _ref.cublas_handles_bytes

# The backward runs on the autograd engine's own thread, which creates its own cuBLAS handle and
# loads the backward kernels: training cases show 767 MiB over reserved instead of 687.
AUTOGRAD_THREAD_BYTES = _ref.autograd_thread_bytes

# LLM.int8 inference loads bitsandbytes' int8 kernels and cuBLASLt's int8 matmul: 765 MiB over
# reserved instead of 687. (4-bit kernels and 8-bit optimizers showed no measurable addition.)
BNB_INT8_KERNELS_BYTES = _ref.bnb_int8_kernels_bytes

# The caching allocator reserves more than it hands out: freed blocks that later requests of other
# sizes cannot reuse stay cached. In a training step that is not traced (bitsandbytes' quantized
# linears, Liger, TRL's SFTTrainer, MoE blocks, a strategy's per-GPU share), beyond the logits'
# block (modelled in estimate.py), the holes grow with the memory that comes and goes during the
# step: this fraction of the peak's dynamic bytes (peak allocated less weights, adapters and
# optimizer state). Inference replays generate()'s requests (estimator/stream.py) and a traced
# training step its own (estimator/train_trace.py): neither uses a constant.
ALLOCATOR_FRAGMENTATION = 0.05

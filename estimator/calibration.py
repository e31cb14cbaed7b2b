"""The few constants that are measured rather than derived, each named, explained and sourced.

Everything else in the estimator follows from shapes, dtypes and the libraries' code. These
numbers depend on the GPU, the driver and the CUDA libraries, so they were measured by
`python -m validation.measure` on the reference box (an H100 80GB HBM3, driver 580, torch
2.11.0+cu130): see validation/results/ and validation/README.md for the rows they come from.
"""

from __future__ import annotations

MIB = 1024**2

# The CUDA context of a PyTorch process: device memory in use after `torch.cuda.init()` and a
# first allocation, less what the caching allocator reserved. It holds the driver's per-process
# state and the lazily loaded kernels of torch's libraries. Measured per case ("context_bytes").
CUDA_CONTEXT_BYTES = 530 * MIB

# cuBLAS's workspace, created by the first matmul through the caching allocator, so it counts in
# `memory_allocated()`: torch's default on this GPU is 32 MiB ("blas_workspace_allocated_bytes").
CUBLAS_WORKSPACE_BYTES = 32 * MIB

# The first matmul's cuBLAS/cuBLASLt handles and loaded kernels, outside the allocator: device use
# over reserved memory is 687 MiB in every inference case, of which the context is 527 MiB.
CUBLAS_HANDLES_BYTES = 160 * MIB

# The backward runs on the autograd engine's own thread, which creates its own cuBLAS handle and
# loads the backward kernels: training cases show 767 MiB over reserved instead of 687.
AUTOGRAD_THREAD_BYTES = 80 * MIB

# LLM.int8 inference loads bitsandbytes' int8 kernels and cuBLASLt's int8 matmul: 765 MiB over
# reserved instead of 687. (4-bit kernels and 8-bit optimizers showed no measurable addition.)
BNB_INT8_KERNELS_BYTES = 78 * MIB

# The caching allocator reserves more than it hands out: freed blocks that later requests of other
# sizes cannot reuse stay cached. Beyond the logits' block (modelled in estimate.py), the holes
# grow with the memory that comes and goes during the step: this fraction of the peak's dynamic
# bytes (peak allocated less weights, adapters and optimizer state).
ALLOCATOR_FRAGMENTATION = 0.05

# generate() grows each layer's keys and values with torch.cat, one token longer every step, so a
# freed block is always slightly too small for the next request and the allocator keeps
# reserving; the blocks it cannot reuse scale with the cache. Median of (reserved − allocated) /
# final KV cache over the 14 calibration inference cases (validation/results/h100-calibration-*).
KV_CAT_FRAGMENTATION = 0.38

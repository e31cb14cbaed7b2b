"""Bytes per element, and how PyTorch's caching allocator rounds a tensor's size.

Kept as data: every term asks here rather than writing its own 2s and 4s.
"""

from __future__ import annotations

BYTES_PER_ELEMENT: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "int8": 1.0,
    "uint8": 1.0,
    "bool": 1.0,
    "int64": 8.0,
    "nf4": 0.5,  # two 4-bit codes per byte (bitsandbytes packs them in uint8)
    "fp4": 0.5,
}

# PyTorch's CUDACachingAllocator hands out blocks in multiples of 512 bytes
# (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize), and `memory_allocated()` counts the block.
ALLOCATOR_BLOCK_BYTES = 512


def nbytes(numel: int, dtype: str) -> int:
    """Bytes of `numel` elements of `dtype`, as the tensor stores them (4-bit rounds up to a whole byte)."""
    size = BYTES_PER_ELEMENT[dtype]
    whole = numel * size
    return int(whole) if whole == int(whole) else int(whole) + 1


def block(size_bytes: int) -> int:
    """What one allocation of `size_bytes` costs in `memory_allocated()`: rounded up to 512 bytes."""
    if size_bytes <= 0:
        return 0
    return -(-size_bytes // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES


def tensor_bytes(numel: int, dtype: str) -> int:
    """One tensor's allocated bytes: its storage rounded to the allocator's block."""
    return block(nbytes(numel, dtype))

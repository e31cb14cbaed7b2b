"""Element types: the one bytes-per-element table, and how PyTorch's caching allocator rounds a size.

Kept as data: every term, the pre-quantized checkpoint reader and the regime ask here rather than
writing their own 2s and 4s. A `DType` is a float (its size in bytes, so `width * dtype` is bytes
per token) that also knows its name, so fp16 and bf16 are told apart although both are 2 bytes.
"""

from __future__ import annotations


class DType(float):
    """An element type: its size in bytes (it multiplies as a float) and its identity.

    `safetensors` is the code a safetensors header writes for it (safetensors/src/tensor.rs
    `Dtype`), `torch` the `torch.dtype` attribute name, where one exists.
    """

    name: str
    safetensors: str | None
    torch: str | None
    floating: bool

    def __new__(cls, size: float, name: str, safetensors: str | None = None, torch: str | None = None,
                floating: bool = False) -> "DType":
        obj = float.__new__(cls, size)
        obj.name, obj.safetensors, obj.torch, obj.floating = name, safetensors, torch, floating
        return obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DType) and self.name == other.name

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self):
        return (DType, (float(self), self.name, self.safetensors, self.torch, self.floating))


FP32 = DType(4.0, "fp32", "F32", "float32", floating=True)
BF16 = DType(2.0, "bf16", "BF16", "bfloat16", floating=True)
FP16 = DType(2.0, "fp16", "F16", "float16", floating=True)
INT8 = DType(1.0, "int8", "I8", "int8")
UINT8 = DType(1.0, "uint8", "U8", "uint8")
BOOL = DType(1.0, "bool", "BOOL", "bool")
INT64 = DType(8.0, "int64", "I64", "int64")
# bitsandbytes packs two 4-bit codes per byte (in a uint8 tensor): half a byte per weight.
NF4 = DType(0.5, "nf4")
FP4 = DType(0.5, "fp4")

DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        FP32, BF16, FP16, INT8, UINT8, BOOL, INT64, NF4, FP4,
        DType(8.0, "fp64", "F64", "float64", floating=True),
        DType(2.0, "int16", "I16", "int16"),
        DType(2.0, "uint16", "U16", "uint16"),
        DType(4.0, "int32", "I32", "int32"),
        DType(4.0, "uint32", "U32", "uint32"),
        DType(8.0, "uint64", "U64", "uint64"),
        DType(8.0, "complex64", "C64", "complex64"),
        DType(1.0, "fp8_e4m3", "F8_E4M3", "float8_e4m3fn", floating=True),
        DType(1.0, "fp8_e5m2", "F8_E5M2", "float8_e5m2", floating=True),
        DType(1.0, "fp8_e8m0", "F8_E8M0", "float8_e8m0fnu", floating=True),
        DType(0.5, "mxfp4", "F4", floating=True),  # safetensors' F4: two codes per byte
        DType(0.75, "fp6_e2m3", "F6_E2M3", floating=True),
        DType(0.75, "fp6_e3m2", "F6_E3M2", floating=True),
    )
}

# The safetensors header's codes, and the torch names configs use for `torch_dtype`.
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in DTYPES.values() if d.safetensors}
TORCH_NAMES: dict[str, DType] = {"float16": FP16, "half": FP16, "bfloat16": BF16, "float32": FP32, "float": FP32}

# PyTorch's CUDACachingAllocator hands out blocks in multiples of 512 bytes
# (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize), and `memory_allocated()` counts the block.
ALLOCATOR_BLOCK_BYTES = 512


def dtype(name: str | DType) -> DType:
    """The `DType` of a name of this table (a `DType` is returned as it is)."""
    return name if isinstance(name, DType) else DTYPES[name]


def nbytes(numel: int, of: str | DType) -> int:
    """Bytes of `numel` elements of `of`, as the tensor stores them (4-bit rounds up to a whole byte)."""
    whole = numel * dtype(of)
    return int(whole) if whole == int(whole) else int(whole) + 1


def block(size_bytes: int) -> int:
    """What one allocation of `size_bytes` costs in `memory_allocated()`: rounded up to 512 bytes."""
    if size_bytes <= 0:
        return 0
    return -(-size_bytes // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES


def tensor_bytes(numel: int, of: str | DType) -> int:
    """One tensor's allocated bytes: its storage rounded to the allocator's block."""
    return block(nbytes(numel, of))

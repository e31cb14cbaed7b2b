"""On-the-fly quantization schemes, as a registry: what one quantized linear stores, what platform
feature it needs, and what its kernels add.

Each entry follows its library's code (bitsandbytes 0.50.2):
- 4-bit (`bitsandbytes/functional.py: quantize_4bit`, `Params4bit`): two codes per byte, one fp32
  absmax per block of 64 weights and a 16-entry fp32 code table per layer. With double
  quantization (`compress_statistics`) the absmax is itself quantized to uint8 in blocks of 256,
  keeping one fp32 offset and one fp32 absmax per 256 blocks (and a shared 256-entry dynamic map,
  which a saved checkpoint writes per layer: see `estimator/prequantized.py`). `Linear4bit`
  computes in bf16 here and dequantizes its weight to bf16 for each matmul of more than one row.
- LLM.int8 (`int8_vectorwise_quant`, `Linear8bitLt`): one int8 per weight plus one fp32 scale per
  output row (SCB); its matmul accumulates in int32 before dequantizing, and its kernels and
  cuBLASLt's int8 matmul load outside the allocator (calibration.BNB_INT8_KERNELS_BYTES).

Which linears a scheme replaces is transformers' decision (`replace_with_bnb_linear`), recorded per
linear in the inventory. Adding a scheme is one `Quantizer` entry here plus its test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from estimator import calibration
from estimator.dtypes import BF16, FP4, INT8, NF4, DType, block, tensor_bytes

BNB_4BIT_BLOCKSIZE = 64  # Params4bit's default blocksize
BNB_NESTED_BLOCKSIZE = 256  # double quantization's blocksize for the absmax
BNB_4BIT_CODE_ENTRIES = 16  # nf4/fp4 code table, fp32, one per quantized layer
BNB_NESTED_MAP_ENTRIES = 256  # dynamic map of the quantized absmax, fp32 (as a checkpoint stores it)


def bnb_4bit_bytes(numel: int, rows: int, double_quant: bool) -> int:
    """Allocated bytes of one 4-bit linear: packed codes, absmax (possibly quantized), code table."""
    blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
    total = block(math.ceil(numel / 2)) + tensor_bytes(BNB_4BIT_CODE_ENTRIES, "fp32")
    if double_quant:
        total += block(blocks)  # uint8 absmax
        total += tensor_bytes(1, "fp32")  # offset
        total += tensor_bytes(math.ceil(blocks / BNB_NESTED_BLOCKSIZE), "fp32")  # nested absmax
    else:
        total += tensor_bytes(blocks, "fp32")
    return total


def bnb_int8_bytes(numel: int, rows: int, double_quant: bool) -> int:
    """LLM.int8 weight: int8 per weight, fp32 scale per output row (SCB). No double quantization."""
    return block(numel) + tensor_bytes(rows, "fp32")


@dataclass(frozen=True)
class Quantizer:
    """One on-the-fly quantization scheme.

    `stored_bytes(numel, rows, double_quant)` is one quantized weight's allocated bytes; `feature`
    the platform feature of gpu_db/platforms.yaml it needs; `compute` the dtype its matmuls run in;
    `dequantizes_per_matmul` whether each matmul of more than one row materializes the weight in
    `compute` (4-bit); `accumulator_bytes` the bytes per output element its matmul holds before
    dequantizing (int8's int32); `kernels_bytes` what its kernels load outside the allocator.
    """

    name: str
    storage: DType
    stored_bytes: Callable[[int, int, bool], int]
    feature: str
    compute: DType = BF16
    dequantizes_per_matmul: bool = False
    accumulator_bytes: float = 0.0
    kernels_bytes: int = 0

    @property
    def is_4bit(self) -> bool:
        return self.storage.name in ("nf4", "fp4")

    def bnb_config(self, double_quant: bool) -> dict:
        """The `transformers.BitsAndBytesConfig` keyword arguments that load this scheme (SPEC),
        dtypes named as torch names them."""
        if not self.is_4bit:
            return {"load_in_8bit": True}
        return {"load_in_4bit": True, "bnb_4bit_quant_type": self.name, "bnb_4bit_use_double_quant": double_quant,
                "bnb_4bit_compute_dtype": self.compute.torch}


QUANTIZERS: dict[str, Quantizer] = {
    q.name: q
    for q in (
        Quantizer("nf4", NF4, bnb_4bit_bytes, "bnb_4bit", dequantizes_per_matmul=True),
        Quantizer("fp4", FP4, bnb_4bit_bytes, "bnb_4bit", dequantizes_per_matmul=True),
        Quantizer("int8", INT8, bnb_int8_bytes, "bnb_int8", accumulator_bytes=4.0,
                  kernels_bytes=calibration.BNB_INT8_KERNELS_BYTES),
    )
}

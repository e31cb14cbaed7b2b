"""The optimizer registry: each entry's state and step temporaries by hand, and what a new entry needs."""

from __future__ import annotations

import math

from estimator.dtypes import block, dtype, tensor_bytes
from estimator.optimizers import OPTIMIZERS, Optimizer, optimizer_memory
from estimator.terms import weights


def _placed(numel: int, of: str = "fp32"):
    return (weights.Placed("w", numel, dtype(of), tensor_bytes(numel, of), True, "base"),)


def test_adamw_keeps_two_states_in_the_parameter_dtype():
    m = optimizer_memory(Optimizer.ADAMW_FUSED, _placed(1_000_000), {"w": (1000, 1000)})
    assert m.state_bytes == 2 * tensor_bytes(1_000_000, "fp32") + 512 and m.step_temp_bytes == 0
    bf = optimizer_memory(Optimizer.ADAMW, _placed(1_000_000, "bf16"), {"w": (1000, 1000)})
    assert bf.state_bytes == 2 * tensor_bytes(1_000_000, "bf16")
    assert bf.step_temp_bytes == tensor_bytes(1_000_000, "bf16")  # _foreach_sqrt


def test_8bit_adam_blockwise_and_small_tensors_in_fp32():
    big = optimizer_memory(Optimizer.ADAMW_8BIT, _placed(1_000_000), {"w": (1000, 1000)})
    assert big.state_bytes == 2 * block(1_000_000) + 2 * tensor_bytes(math.ceil(1_000_000 / 256), "fp32")
    small = optimizer_memory(Optimizer.ADAMW_8BIT, _placed(1000), {"w": (1000,)})
    assert small.state_bytes == 2 * tensor_bytes(1000, "fp32")


def test_paged_states_leave_the_allocator_above_100k_elements():
    m = optimizer_memory(Optimizer.PAGED_ADAMW_32BIT, _placed(1_000_000), {"w": (1000, 1000)})
    assert m.state_bytes == 0 and m.paged_bytes == 2 * tensor_bytes(1_000_000, "fp32")
    small = optimizer_memory(Optimizer.PAGED_ADAMW_32BIT, _placed(50_000), {"w": (50_000,)})
    assert small.paged_bytes == 0 and small.state_bytes > 0


def test_sgd_momentum_and_adafactor_factored_states():
    sgd = optimizer_memory(Optimizer.SGD, _placed(1_000_000), {"w": (1000, 1000)})
    assert sgd.state_bytes == tensor_bytes(1_000_000, "fp32")
    ada = optimizer_memory(Optimizer.ADAFACTOR, _placed(1_000_000), {"w": (1000, 1000)})
    assert ada.state_bytes == 2 * tensor_bytes(1000, "fp32")  # row and column vectors
    assert ada.step_temp_bytes == 2 * tensor_bytes(1_000_000, "fp32")
    half = optimizer_memory(Optimizer.ADAFACTOR, _placed(1_000_000, "bf16"), {"w": (1000, 1000)})
    assert half.step_temp_bytes == 4 * tensor_bytes(1_000_000, "fp32")  # plus fp32 copies of p and grad

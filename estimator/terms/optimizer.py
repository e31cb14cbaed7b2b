"""Gradients, optimizer state and the optimizer step's temporaries, per optimizer of SPEC.

Sources (state layouts and step code):
- `torch/optim/adamw.py` / `adam.py`: `exp_avg` and `exp_avg_sq` in the parameter's dtype. The
  fused path keeps `step` as a one-element tensor on the GPU per parameter; the foreach path
  (`_multi_tensor_adam`) allocates `torch._foreach_sqrt(exp_avg_sqs)`, one state-sized
  temporary for all parameters of a dtype at once.
- `torch/optim/sgd.py`: one `momentum_buffer` per parameter, cloned from the first gradient; the
  foreach update works in place.
- `transformers/optimization.py: Adafactor`: factored second moments (row and column vectors) for
  tensors of 2 or more dims, a full one for vectors, in fp32 (states follow `grad.float()`). Its
  step works one parameter at a time and holds up to two fp32 copies of that parameter alive
  (`grad**2 + eps`, then `update` and `-update`), plus fp32 copies of a half-precision parameter
  and its gradient.
- `bitsandbytes/optim/optimizer.py: Optimizer8bit`: tensors of at least 4096 elements keep both
  states in uint8 with one fp32 absmax per block of 256; smaller ones keep fp32 states. Paged
  optimizers put state tensors of at least 100,000 elements in CUDA managed memory
  (`get_paged`), outside PyTorch's allocator: they count in the device total only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from estimator.dtypes import tensor_bytes
from estimator.job import Optimizer
from estimator.terms.weights import Placed

BNB_MIN_8BIT_SIZE = 4096  # Optimizer8bit(min_8bit_size=4096)
BNB_OPTIMIZER_BLOCKSIZE = 256  # blockwise 8-bit optimizer state
BNB_PAGED_MIN_NUMEL = 100_000  # get_state_buffer pages only tensors at least this large


@dataclass(frozen=True)
class OptimizerMemory:
    state_bytes: int  # persistent, inside PyTorch's allocator
    paged_bytes: int  # persistent, CUDA managed memory (paged optimizers)
    step_temp_bytes: int  # extra allocated at the peak of optimizer.step()


def gradient_bytes(train: tuple[Placed, ...]) -> int:
    """One gradient per trainable tensor, in its dtype (autograd's AccumulateGrad)."""
    return sum(tensor_bytes(p.numel, p.dtype) for p in train)


def _state_dtype(p: Placed) -> str:
    return p.dtype


def optimizer_memory(name: Optimizer, train: tuple[Placed, ...], shapes: dict[str, tuple[int, ...]]) -> OptimizerMemory:
    """State and step temporaries for `train`, the trainable tensors; `shapes` gives tensor shapes."""
    if not train:
        return OptimizerMemory(0, 0, 0)
    if name in (Optimizer.ADAMW_FUSED, Optimizer.ADAMW):
        state = sum(2 * tensor_bytes(p.numel, _state_dtype(p)) for p in train)
        if name is Optimizer.ADAMW_FUSED:
            state += len(train) * tensor_bytes(1, "fp32")  # per-parameter `step` tensor on the GPU
            temp = 0
        else:
            temp = sum(tensor_bytes(p.numel, _state_dtype(p)) for p in train)  # _foreach_sqrt(exp_avg_sqs)
        return OptimizerMemory(state, 0, temp)
    if name is Optimizer.SGD:
        return OptimizerMemory(sum(tensor_bytes(p.numel, _state_dtype(p)) for p in train), 0, 0)
    if name is Optimizer.ADAFACTOR:
        state = 0
        temp = 0
        for p in train:
            shape = shapes.get(p.name, ())
            if len(shape) >= 2:  # exp_avg_sq_row over shape[:-1], exp_avg_sq_col over shape[:-2] + shape[-1:]
                state += tensor_bytes(math.prod(shape[:-1]), "fp32")
                state += tensor_bytes(math.prod(shape[:-2]) * shape[-1], "fp32")
            else:
                state += tensor_bytes(p.numel, "fp32")
            copies = 2 + (2 if p.dtype in ("bf16", "fp16") else 0)
            temp = max(temp, copies * tensor_bytes(p.numel, "fp32"))
        return OptimizerMemory(state, 0, temp)
    # bitsandbytes
    paged = name.is_paged
    eight_bit = name in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT)
    state = 0
    paged_bytes = 0
    for p in train:
        if eight_bit and p.numel >= BNB_MIN_8BIT_SIZE:
            one = tensor_bytes(p.numel, "uint8")
            absmax = tensor_bytes(math.ceil(p.numel / BNB_OPTIMIZER_BLOCKSIZE), "fp32")
            state += 2 * absmax
        else:
            one = tensor_bytes(p.numel, "fp32")
        if paged and p.numel >= BNB_PAGED_MIN_NUMEL:
            paged_bytes += 2 * one
        else:
            state += 2 * one
    return OptimizerMemory(state, paged_bytes, 0)

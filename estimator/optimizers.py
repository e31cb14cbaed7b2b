"""The optimizers, as a registry: each entry's state, step temporaries, platform feature and the
real optimizer it stands for.

Sources (state layouts and step code):
- `torch/optim/adamw.py` / `adam.py`: `exp_avg` and `exp_avg_sq` in the parameter's dtype. The
  fused path keeps `step` as a one-element tensor on the GPU per parameter; the foreach path
  (`_multi_tensor_adam`) allocates `torch._foreach_sqrt(exp_avg_sqs)`, one state-sized
  temporary for all parameters of a dtype at once.
- `torch/optim/sgd.py`: with momentum, one `momentum_buffer` per parameter, cloned from the first
  gradient; without momentum (`momentum=0`, the Trainer's `optim="sgd"`) the buffer list stays
  `None` and the foreach update `_foreach_add_(params, grads, alpha=-lr)` works in place.
- `transformers/optimization.py: Adafactor`: factored second moments (row and column vectors) for
  tensors of 2 or more dims, a full one for vectors, in fp32 (states follow `grad.float()`). Its
  step works one parameter at a time and holds up to two fp32 copies of that parameter alive
  (`grad**2 + eps`, then `update` and `-update`), plus fp32 copies of a half-precision parameter
  and its gradient.
- `bitsandbytes/optim/optimizer.py: Optimizer8bit`: tensors of at least 4096 elements keep both
  states in uint8 with one fp32 absmax per block of 256; smaller ones keep fp32 states. Paged
  optimizers put state tensors of at least 100,000 elements in CUDA managed memory
  (`get_paged`), outside PyTorch's allocator: they count in the device total only.

Adding an optimizer is one `OptimizerEntry` in `OPTIMIZERS` plus its test: the `Optimizer` enum,
the command line, the app's choices, the platform check and the validation harness all read this
registry.
"""

from __future__ import annotations

import enum
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from estimator.dtypes import DType, tensor_bytes

BNB_MIN_8BIT_SIZE = 4096  # Optimizer8bit(min_8bit_size=4096)
BNB_OPTIMIZER_BLOCKSIZE = 256  # blockwise 8-bit optimizer state
BNB_PAGED_MIN_NUMEL = 100_000  # get_state_buffer pages only tensors at least this large


class Trainable(Protocol):
    """A trainable tensor as the optimizer sees it."""

    name: str
    numel: int
    dtype: DType


@dataclass(frozen=True)
class OptimizerMemory:
    state_bytes: int  # persistent, inside PyTorch's allocator
    paged_bytes: int  # persistent, CUDA managed memory (paged optimizers)
    step_temp_bytes: int  # extra allocated at the peak of optimizer.step()


Shapes = dict[str, tuple[int, ...]]


def _adamw(fused: bool) -> Callable[[tuple[Trainable, ...], Shapes], OptimizerMemory]:
    def memory(train: tuple[Trainable, ...], shapes: Shapes) -> OptimizerMemory:
        state = sum(2 * tensor_bytes(p.numel, p.dtype) for p in train)
        if fused:
            state += len(train) * tensor_bytes(1, "fp32")  # per-parameter `step` tensor on the GPU
            return OptimizerMemory(state, 0, 0)
        temp = sum(tensor_bytes(p.numel, p.dtype) for p in train)  # _foreach_sqrt(exp_avg_sqs)
        return OptimizerMemory(state, 0, temp)

    return memory


def _sgd(momentum: bool) -> Callable[[tuple[Trainable, ...], Shapes], OptimizerMemory]:
    def memory(train: tuple[Trainable, ...], shapes: Shapes) -> OptimizerMemory:
        state = sum(tensor_bytes(p.numel, p.dtype) for p in train) if momentum else 0
        return OptimizerMemory(state, 0, 0)

    return memory


def _adafactor(train: tuple[Trainable, ...], shapes: Shapes) -> OptimizerMemory:
    state = 0
    temp = 0
    for p in train:
        shape = shapes.get(p.name, ())
        if len(shape) >= 2:  # exp_avg_sq_row over shape[:-1], exp_avg_sq_col over shape[:-2] + shape[-1:]
            state += tensor_bytes(math.prod(shape[:-1]), "fp32")
            state += tensor_bytes(math.prod(shape[:-2]) * shape[-1], "fp32")
        else:
            state += tensor_bytes(p.numel, "fp32")
        copies = 2 + (2 if p.dtype.name in ("bf16", "fp16") else 0)
        temp = max(temp, copies * tensor_bytes(p.numel, "fp32"))
    return OptimizerMemory(state, 0, temp)


def _bnb(eight_bit: bool, paged: bool) -> Callable[..., OptimizerMemory]:
    def memory(train: tuple[Trainable, ...], shapes: Shapes, fp32_state: frozenset[str] = frozenset()) -> OptimizerMemory:
        state = 0
        paged_bytes = 0
        for p in train:
            if eight_bit and p.numel >= BNB_MIN_8BIT_SIZE and p.name not in fp32_state:
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

    return memory


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer.

    `memory(trainable, shapes)` gives its state and step temporaries (8-bit entries also take
    `fp32_state`, names kept in 32-bit by a `GlobalOptimManager` override); `state_bits` is 8 for
    bitsandbytes' 8-bit states; `feature` is the platform
    feature of gpu_db/platforms.yaml it needs (None: any platform); `paged` whether its state lives
    in CUDA managed memory; `factory` the class and keyword arguments it stands for (the validation
    harness builds exactly that); `trainer_optim` the `TrainingArguments.optim` names that build it.
    """

    name: str
    what: str
    memory: Callable[[tuple[Trainable, ...], Shapes], OptimizerMemory]
    factory: tuple[str, dict] = field(compare=False)
    feature: str | None = None
    paged: bool = False
    trainer_optim: tuple[str, ...] = ()
    state_bits: int = 32

    @property
    def uses_bitsandbytes(self) -> bool:
        return self.factory[0].startswith("bitsandbytes.")

    def build(self, params: Iterable):
        """The real optimizer over `params` (imports torch, or bitsandbytes, on call)."""
        path, kwargs = self.factory
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)(params, **kwargs)


_LR = 1e-5
OPTIMIZERS: dict[str, OptimizerEntry] = {
    e.name: e
    for e in (
        OptimizerEntry("adamw_fused", "torch.optim.AdamW(fused=True), the Trainer's default", _adamw(fused=True),
                       ("torch.optim.AdamW", {"lr": _LR, "fused": True}), trainer_optim=("adamw_torch_fused",)),
        OptimizerEntry("adamw", "torch.optim.AdamW (foreach)", _adamw(fused=False),
                       ("torch.optim.AdamW", {"lr": _LR, "foreach": True}), trainer_optim=("adamw_torch",)),
        OptimizerEntry("adamw_8bit", "bitsandbytes.optim.AdamW8bit", _bnb(eight_bit=True, paged=False),
                       ("bitsandbytes.optim.AdamW8bit", {"lr": _LR}), feature="bnb_optim_8bit",
                       trainer_optim=("adamw_bnb_8bit", "adamw_8bit"), state_bits=8),
        OptimizerEntry("paged_adamw_8bit", "bitsandbytes.optim.PagedAdamW8bit", _bnb(eight_bit=True, paged=True),
                       ("bitsandbytes.optim.PagedAdamW8bit", {"lr": _LR}), feature="bnb_paged_optim", paged=True,
                       trainer_optim=("paged_adamw_8bit",), state_bits=8),
        OptimizerEntry("paged_adamw_32bit", "bitsandbytes.optim.PagedAdamW32bit", _bnb(eight_bit=False, paged=True),
                       ("bitsandbytes.optim.PagedAdamW32bit", {"lr": _LR}), feature="bnb_paged_optim", paged=True,
                       trainer_optim=("paged_adamw_32bit",)),
        OptimizerEntry("sgd", "torch.optim.SGD(momentum=0.9)", _sgd(momentum=True),
                       ("torch.optim.SGD", {"lr": _LR, "momentum": 0.9})),
        OptimizerEntry("adafactor", "transformers.Adafactor", _adafactor, ("transformers.Adafactor", {}),
                       trainer_optim=("adafactor",)),
        OptimizerEntry("sgd_no_momentum", "torch.optim.SGD without momentum, the Trainer's optim=\"sgd\"", _sgd(momentum=False),
                       ("torch.optim.SGD", {"lr": _LR}), trainer_optim=("sgd",)),
    )
}

# The enum every presenter offers, made from the registry so that a new entry needs nothing else.
Optimizer = enum.Enum("Optimizer", {name.upper(): name for name in OPTIMIZERS}, type=str, module=__name__)
Optimizer.__doc__ = "An optimizer of `OPTIMIZERS`, by name."
Optimizer.entry = property(lambda self: OPTIMIZERS[self.value])  # type: ignore[attr-defined]
Optimizer.uses_bitsandbytes = property(lambda self: OPTIMIZERS[self.value].uses_bitsandbytes)  # type: ignore[attr-defined]


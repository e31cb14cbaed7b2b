"""The optimizer registry: each entry's state and step temporaries by hand, and what a new entry needs."""

from __future__ import annotations

import math

from estimator.dtypes import block, dtype, tensor_bytes
from estimator.optimizers import OPTIMIZERS, Optimizer
from estimator.terms import weights


def _placed(numel: int, of: str = "fp32"):
    return (weights.Placed("w", numel, dtype(of), tensor_bytes(numel, of), True, "base"),)


def test_adamw_keeps_two_states_in_the_parameter_dtype():
    m = Optimizer.ADAMW_FUSED.entry.memory(_placed(1_000_000), {"w": (1000, 1000)})
    assert m.state_bytes == 2 * tensor_bytes(1_000_000, "fp32") + 512 and m.step_temp_bytes == 0
    bf = Optimizer.ADAMW.entry.memory(_placed(1_000_000, "bf16"), {"w": (1000, 1000)})
    assert bf.state_bytes == 2 * tensor_bytes(1_000_000, "bf16")
    assert bf.step_temp_bytes == tensor_bytes(1_000_000, "bf16")  # _foreach_sqrt


def test_8bit_adam_blockwise_and_small_tensors_in_fp32():
    big = Optimizer.ADAMW_8BIT.entry.memory(_placed(1_000_000), {"w": (1000, 1000)})
    assert big.state_bytes == 2 * block(1_000_000) + 2 * tensor_bytes(math.ceil(1_000_000 / 256), "fp32")
    small = Optimizer.ADAMW_8BIT.entry.memory(_placed(1000), {"w": (1000,)})
    assert small.state_bytes == 2 * tensor_bytes(1000, "fp32")


def test_paged_states_leave_the_allocator_above_100k_elements():
    m = Optimizer.PAGED_ADAMW_32BIT.entry.memory(_placed(1_000_000), {"w": (1000, 1000)})
    assert m.state_bytes == 0 and m.paged_bytes == 2 * tensor_bytes(1_000_000, "fp32")
    small = Optimizer.PAGED_ADAMW_32BIT.entry.memory(_placed(50_000), {"w": (50_000,)})
    assert small.paged_bytes == 0 and small.state_bytes > 0


def test_sgd_momentum_and_adafactor_factored_states():
    sgd = Optimizer.SGD.entry.memory(_placed(1_000_000), {"w": (1000, 1000)})
    assert sgd.state_bytes == tensor_bytes(1_000_000, "fp32")
    ada = Optimizer.ADAFACTOR.entry.memory(_placed(1_000_000), {"w": (1000, 1000)})
    assert ada.state_bytes == 2 * tensor_bytes(1000, "fp32")  # row and column vectors
    assert ada.step_temp_bytes == 2 * tensor_bytes(1_000_000, "fp32")
    half = Optimizer.ADAFACTOR.entry.memory(_placed(1_000_000, "bf16"), {"w": (1000, 1000)})
    assert half.step_temp_bytes == 4 * tensor_bytes(1_000_000, "fp32")  # plus fp32 copies of p and grad


def test_sgd_without_momentum_keeps_no_state():
    """The Trainer's optim="sgd" is torch.optim.SGD(momentum=0): no momentum_buffer, an in-place step."""
    m = Optimizer.SGD_NO_MOMENTUM.entry.memory(_placed(1_000_000), {"w": (1000, 1000)})
    assert (m.state_bytes, m.paged_bytes, m.step_temp_bytes) == (0, 0, 0)
    assert OPTIMIZERS["sgd_no_momentum"].trainer_optim == ("sgd",)
    assert OPTIMIZERS["sgd_no_momentum"].factory == ("torch.optim.SGD", {"lr": 1e-5})


def test_every_entry_is_offered_everywhere():
    """The enum, the command line and the Trainer's names come from the registry alone."""
    from estimator.cli import build_parser

    assert [o.value for o in Optimizer] == list(OPTIMIZERS)
    action = next(a for a in build_parser()._actions if a.dest == "optimizer")
    assert list(action.choices) == list(OPTIMIZERS)
    trainer_names = [n for e in OPTIMIZERS.values() for n in e.trainer_optim]
    assert len(trainer_names) == len(set(trainer_names))
    assert {"adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit",
            "paged_adamw_32bit", "adafactor", "sgd"} <= set(trainer_names)


def test_every_entry_builds_its_real_optimizer():
    """`build` makes the class the entry names, with its arguments (bitsandbytes where installed)."""
    import importlib.util

    import torch

    for entry in OPTIMIZERS.values():
        if entry.uses_bitsandbytes and importlib.util.find_spec("bitsandbytes") is None:
            continue
        params = [torch.nn.Parameter(torch.zeros(4, 4))]
        try:
            built = entry.build(params)
        except (RuntimeError, ValueError) as err:  # fused AdamW and bitsandbytes want a GPU for their kernels
            assert entry.name in ("adamw_fused",) or entry.uses_bitsandbytes, f"{entry.name}: {err}"
            continue
        path = entry.factory[0]
        assert f"{type(built).__module__}.{type(built).__name__}".endswith(path.rpartition(".")[2])
        for key, value in entry.factory[1].items():
            assert built.defaults[key] == value, (entry.name, key)

"""Gradients and optimizer state for a regime's trainable tensors.

- Gradients: one per trainable tensor, in its dtype (autograd's `AccumulateGrad`).
- Optimizer state and step temporaries: the regime's optimizer entry (`estimator/optimizers.py`,
  where each optimizer's sources are cited) over the trainable tensors and their shapes.
- The Trainer with a bitsandbytes 8-bit optimizer (`Trainer.create_optimizer`, transformers 5.17)
  registers every `nn.Embedding`'s weight with bitsandbytes' `GlobalOptimManager` for 32-bit
  states, so the embeddings (and a tied lm_head) keep fp32 states.
"""

from __future__ import annotations

from estimator.dtypes import tensor_bytes
from estimator.inventory_types import Inventory
from estimator.optimizers import OptimizerMemory
from estimator.regime import Regime
from estimator.terms import weights
from estimator.terms.weights import Placed


def gradient_bytes(train: tuple[Placed, ...]) -> int:
    """One gradient per trainable tensor, in its dtype."""
    return sum(tensor_bytes(p.numel, p.dtype) for p in train)


def optimizer_and_gradients(inv: Inventory, regime: Regime) -> tuple[OptimizerMemory, int]:
    """(optimizer memory, gradient bytes) of a training regime, computed once per inventory and regime."""
    return inv.derived(("optimizer", regime), lambda: _optimizer_and_gradients(inv, regime))


def _optimizer_and_gradients(inv: Inventory, regime: Regime) -> tuple[OptimizerMemory, int]:
    train = weights.trainable(weights.placements(inv, regime))
    if regime.optimizer is None or not train:
        return OptimizerMemory(0, 0, 0), gradient_bytes(train)
    shapes = {p.name: p.shape for p in inv.params}
    if regime.adapter is not None:
        r = regime.adapter.r
        for lin in weights.lora_targets(inv, regime):
            shapes[lin.name + ".lora_A"] = (r, lin.in_features)
            shapes[lin.name + ".lora_B"] = (lin.out_features, r)
        for t in weights.param_targets(inv, regime):
            shapes[t.name + ".lora_A"] = (t.rows_per_rank * r, t.in_features)
            shapes[t.name + ".lora_B"] = (t.out_features, t.rows_per_rank * r)
    entry = regime.optimizer
    if regime.trainer and entry.state_bits == 8:
        fp32_state = frozenset(p.name for p in inv.params if p.kind == "embedding")
        return entry.memory(train, shapes, fp32_state), gradient_bytes(train)
    return entry.memory(train, shapes), gradient_bytes(train)

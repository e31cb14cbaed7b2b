"""The KV cache that `generate` keeps, as the installed transformers grows it.

Source: `transformers/cache_utils.py` (DynamicCache). Per layer it stores keys
[B, kv_heads, T, head_dim] and values [B, kv_heads, T, v_head_dim] in the compute dtype, and grows
them with `torch.cat` at every step, so while one layer appends, its old key (or value) tensor and
the new one, one token longer, are both alive.

- Full-attention layers hold every token: after the last of N new tokens is chosen, the cache has
  the prompt plus N − 1 tokens (the last token is never fed back).
- Sliding-window layers (`DynamicSlidingWindowLayer`) keep a view of the last `window − 1`
  tokens of the concatenation, which keeps that whole concatenation's storage alive: right after
  the prefill that is the whole prompt; in decoding it is `window` tokens.
"""

from __future__ import annotations

from estimator.dtypes import DType, tensor_bytes
from estimator.inventory_types import Inventory


def _per_token_elements(inv: Inventory, batch: int) -> tuple[int, int]:
    """Key and value elements per position of one layer, for `batch` sequences."""
    k = batch * inv.num_kv_heads * inv.kv_head_dim
    v = batch * inv.num_kv_heads * inv.v_head_dim
    return k, v


def layer_cache_bytes(inv: Inventory, batch: int, tokens: int, dtype: DType) -> int:
    """Keys plus values of one layer holding `tokens` positions."""
    k, v = _per_token_elements(inv, batch)
    return tensor_bytes(k * tokens, dtype) + tensor_bytes(v * tokens, dtype)


def cache_bytes(inv: Inventory, batch: int, tokens: int, dtype: DType, *, after_prefill: bool = False) -> int:
    """The whole cache once `tokens` positions have been seen."""
    total = 0
    for kind in inv.layer_types:
        held = tokens
        if kind in ("sliding_attention", "chunked_attention") and inv.sliding_window and not after_prefill:
            held = min(tokens, inv.sliding_window)
        total += layer_cache_bytes(inv, batch, held, dtype)
    return total


def append_transient_bytes(inv: Inventory, batch: int, tokens: int, dtype: DType) -> int:
    """`torch.cat` keeps the old key (or value) tensor of one layer alive beside its successor."""
    k, v = _per_token_elements(inv, batch)
    return tensor_bytes(max(k, v) * tokens, dtype)

"""Logits and the loss: often the single largest term for a large vocabulary.

Source: `transformers/loss/loss_utils.py: ForCausalLMLoss` and PyTorch's cross entropy
(`log_softmax` then `nll_loss`). N = B·S tokens, V the vocabulary, c the logits' bytes per element
(the compute dtype: bf16 under autocast).

Forward, inside the loss: the model's logits (c·N·V, alive until the output object is dropped),
their fp32 upcast `logits.float()` (4·N·V, not a copy when they are already fp32) and
`log_softmax`'s fp32 output (4·N·V, saved for backward).

Backward, at its start: `nll_loss`'s gradient (4·N·V, a zeroed tensor), `log_softmax`'s gradient
(4·N·V) and the saved output (4·N·V) are alive together: 12·N·V bytes, the step's usual peak.

Gemma-style final soft-capping (`logits / cap`, `tanh`, `* cap`) adds the saved `tanh` output
(c·N·V) and one more c·N·V temporary in the forward.

Liger's fused linear cross-entropy (`liger_kernel/ops/fused_linear_cross_entropy.py`, 0.8.5)
never materializes the N×V logits: it walks the tokens in chunks of
`next_power_of_2(ceil(N / ceil(V / H)))` (at most N) and, in the forward, computes each chunk's
logits (in the matmul's dtype), the loss and its gradient in place, the chunk's input gradient and
its share of lm_head's weight gradient. It keeps `grad_input` (N×H, the hidden state's dtype) and
`grad_weight` (lm_head's shape and dtype, when it trains) for the backward, which hands them on
as the gradients. Under autocast a weight of another dtype is cast for the chunk's matmuls.

Inference: `generate` asks for the last position only (`logits_to_keep=1`) and copies it to fp32
(`outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.dtypes import FP32, DType, tensor_bytes


@dataclass(frozen=True)
class LogitsMemory:
    forward_peak_bytes: int  # alive at the peak inside the loss's forward
    backward_peak_bytes: int  # alive at the start of the backward


def training_logits(tokens: int, vocab: int, logits_dtype: DType, softcap: bool) -> LogitsMemory:
    """The loss's buffers for `tokens` positions of a `vocab`-wide head, in bytes."""
    nv = tokens * vocab
    model_logits = tensor_bytes(nv, logits_dtype)
    upcast = 0 if logits_dtype == FP32 else tensor_bytes(nv, "fp32")
    log_softmax = tensor_bytes(nv, "fp32")
    softcap_saved = tensor_bytes(nv, logits_dtype) if softcap else 0
    forward_peak = model_logits + upcast + log_softmax + softcap_saved
    backward_peak = 3 * tensor_bytes(nv, "fp32") + softcap_saved
    return LogitsMemory(forward_peak, backward_peak)


def liger_chunk(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk of Liger's fused linear cross-entropy (its `chunk_size`)."""
    inc_factor = -(-vocab // hidden)
    chunk = 1 << max(0, (-(-tokens // inc_factor) - 1).bit_length())  # triton.next_power_of_2
    return min(chunk, tokens)


def fused_linear_cross_entropy(tokens: int, vocab: int, hidden: int, hidden_dtype: DType, matmul_dtype: DType,
                               weight_dtype: DType, weight_trains: bool) -> LogitsMemory:
    """Liger's fused loss, in bytes: what it keeps for the backward, and its forward's peak."""
    grad_input = tensor_bytes(tokens * hidden, hidden_dtype)
    grad_weight = tensor_bytes(vocab * hidden, weight_dtype) if weight_trains else 0
    kept = grad_input + grad_weight
    chunk = liger_chunk(tokens, vocab, hidden)
    per_token = tensor_bytes(tokens, "fp32") + tensor_bytes(tokens, "bool") + 2 * tensor_bytes(tokens, "int64")
    chunk_work = tensor_bytes(chunk * vocab, matmul_dtype) + 2 * tensor_bytes(chunk * hidden, matmul_dtype)
    cast = tensor_bytes(vocab * hidden, matmul_dtype) if weight_dtype != matmul_dtype else 0
    return LogitsMemory(kept + per_token + chunk_work + cast, kept)


def generate_logits_bytes(batch: int, vocab: int, dtype: DType) -> int:
    """The last position's logits and generate's fp32 copy of them."""
    return tensor_bytes(batch * vocab, dtype) + tensor_bytes(batch * vocab, "fp32")

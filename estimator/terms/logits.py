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


def generate_logits_bytes(batch: int, vocab: int, dtype: DType) -> int:
    """The last position's logits and generate's fp32 copy of them."""
    return tensor_bytes(batch * vocab, dtype) + tensor_bytes(batch * vocab, "fp32")

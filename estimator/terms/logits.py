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

TRL's chunked head (`--loss chunked`; trl 1.16.0, `trl/trainer/utils.py: add_fused_lm_head` and
`trl/kernels/chunked_logprob.py: ChunkedLogProbFunction`), which SFTTrainer installs on every
model (`outputs=("log_probs", "entropy", "is_top1")`) and calls with `fused_lm_head=True` from
`SFTTrainer.compute_loss`: the backbone runs, the final norm's output is shifted
(`last_hidden_state[:, :-1]`) and only the N positions whose next-token label is not -100 are
gathered (`hidden_states[mask]`, a copy: N = B·(S−1) when every label counts; completion-only and
assistant-only losses score fewer). The function never builds the N×V logits. Its forward:
- saves the gathered hidden states (N×H, the norm output's dtype) and the gathered labels
  (N int64); `log_z` and, when asked for, the entropy (N fp32 each) are saved too;
- keeps seven fp32 running statistics per token (max, Σexp, Σexp·z, Σexp², Σz, the max before the
  label, the label's logit): 28 bytes per token;
- projects 4,096 tokens (TOKEN_CHUNK_SIZE) against 32,768 vocabulary rows
  (`_CHUNKED_LOGPROB_CHUNK_SIZE`) at a time into one reused buffer
  `torch.empty((min(N, 4096), 32768))` in the matmul dtype (autocast's, else the hidden state's),
  whatever the vocabulary (a 32,000-row vocabulary still gets the 32,768-wide buffer); a hidden
  chunk of another dtype is cast per tile (`hidden[...].to(compute_dtype)`, 4,096×H), as is each
  weight chunk (`weight[start:end].to(compute_dtype)`, 32,768×H) of an fp32 lm_head.
The entropy and token-accuracy metrics are per-token vectors of that same pass (`entropy`,
`is_top1`: N fp32 and N bool), read under `.detach()`; they add no vocabulary-wide tensor, and the
entropy gets no gradient (`ctx.set_materialize_grads(False)`). Its backward recomputes each tile,
turns it into the logits' gradient in place, and accumulates in fp32: `grad_hidden`
(zeros N×H fp32) and, when lm_head trains, `grad_weight` (zeros V×H fp32), with the same tile
buffer and casts; at its end they are converted to the hidden state's and the weight's dtype
(`grad_hidden.to(hidden.dtype)`, `grad_weight.to(weight.dtype)`: a copy each unless fp32) while
the fp32 ones are alive. What follows (the hidden gradient scattered back to [B, S, H] by the
indexing's and the slice's backward) is hidden-wide; the step's peak comes after, when the
checkpointed top layer is recomputed (`terms/activations.py`, `Trace._lora_transient`), by which
time the head's saved tensors and buffers are freed.

Inference: `generate` asks for the last position only (`logits_to_keep=1`) and copies it to fp32
(`outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.dtypes import FP32, DType, tensor_bytes

# trl 1.16.0: trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE and trl/trainer/utils.py
# _CHUNKED_LOGPROB_CHUNK_SIZE, the tile of the chunked head's projection (tokens × vocabulary rows)
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = 32768
TRL_RUNNING_STATS = 7  # fp32 per token: running max, Σexp, Σexp·z, Σexp², Σz, max before the label, label logit


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


def chunked_logprob(scored: int, vocab: int, hidden: int, hidden_dtype: DType, matmul_dtype: DType,
                    weight_dtype: DType, weight_trains: bool, entropy: bool) -> LogitsMemory:
    """TRL's chunked head over `scored` tokens, in bytes: its forward's peak (at a tile's fold) and its
    backward's (at the conversion of its fp32 gradients). `entropy`: SFTTrainer asks for the
    entropy (and `is_top1`) besides the log-probabilities."""
    n = scored
    kept = tensor_bytes(n * hidden, hidden_dtype) + tensor_bytes(n, "int64") + tensor_bytes(n, "fp32")  # hidden, labels, log_z
    if entropy:
        kept += tensor_bytes(n, "fp32")
    rows = min(n, TRL_TOKEN_CHUNK)
    tile = tensor_bytes(rows * TRL_VOCAB_CHUNK, matmul_dtype)
    hidden_cast = tensor_bytes(rows * hidden, matmul_dtype) if hidden_dtype != matmul_dtype else 0
    weight_cast = tensor_bytes(min(vocab, TRL_VOCAB_CHUNK) * hidden, matmul_dtype) if weight_dtype != matmul_dtype else 0
    stats = TRL_RUNNING_STATS * tensor_bytes(n, "fp32")
    forward_peak = kept + stats + tile + hidden_cast + weight_cast
    grad_logprobs = tensor_bytes(n, "fp32")
    grad_hidden = tensor_bytes(n * hidden, "fp32")
    grad_weight = tensor_bytes(vocab * hidden, "fp32") if weight_trains else 0
    # The backward binds its casts to locals (`hidden_chunk`, `w_chunk`): the next weight chunk is cast
    # while the last one is still bound, and the last ones stay bound until it returns.
    loop = tile + hidden_cast + weight_cast * (2 if vocab > TRL_VOCAB_CHUNK else 1)
    last_rows = n - TRL_TOKEN_CHUNK * ((n - 1) // TRL_TOKEN_CHUNK) if n else 0
    last_vocab = vocab - TRL_VOCAB_CHUNK * ((vocab - 1) // TRL_VOCAB_CHUNK)
    last_casts = (tensor_bytes(last_rows * hidden, matmul_dtype) if hidden_cast else 0) + (
        tensor_bytes(last_vocab * hidden, matmul_dtype) if weight_cast else 0)
    converted = (tensor_bytes(n * hidden, hidden_dtype) if hidden_dtype != FP32 else 0) + (
        tensor_bytes(vocab * hidden, weight_dtype) if weight_trains and weight_dtype != FP32 else 0)
    backward_peak = kept + grad_logprobs + grad_hidden + grad_weight + max(loop, tile + last_casts + converted)
    return LogitsMemory(forward_peak, backward_peak)


def generate_logits_bytes(batch: int, vocab: int, dtype: DType) -> int:
    """The last position's logits and generate's fp32 copy of them."""
    return tensor_bytes(batch * vocab, dtype) + tensor_bytes(batch * vocab, "fp32")

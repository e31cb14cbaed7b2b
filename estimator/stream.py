"""generate()'s allocations and frees, in order, replayed through the caching allocator (issue 12).

The phase model sums what is alive at each phase's peak; what the caching allocator reserves also
depends on the order and the sizes of everything allocated and freed before it. A freed block is
reused only by a request that fits in it, so tensors that grow from step to step strand the
segments of their earlier, smaller selves: DynamicCache's `torch.cat` makes every layer's keys and
values one token longer at each decoded token, and without a KV cache (config `use_cache=false`)
every step reruns the whole, one token longer, sequence. This module writes generate()'s stream of
requests tensor by tensor, as the pinned libraries' code creates and drops them, and feeds it to
`estimator.allocator.Allocator`; the reserved peak it reads is the device's dynamic reserve.

Sources (transformers 5.17, bitsandbytes 0.50.2, torch 2.11), checked request for request against
the allocator history of a measured decode (tests/test_stream.py):
- `generation/utils.py: GenerationMixin._sample`: one forward per step with `logits_to_keep=1`,
  then `next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)` and the
  logits processors; both loop variables live until the next step rebinds them, and
  `del outputs` drops the step's logits.
- `models/llama/modeling_llama.py` (the decoder layer most families share): the embedding (kept
  to the end of the forward as `inputs_embeds`), the rotary embedding's fp32 cos and sin and their
  casts, then per layer the input norm (alive until attention returns), q/k/v projections (Qwen3
  norms q and k per head), RoPE (`q * cos + rotate_half(q) * sin`, rotate_half a `cat` of a negated
  half; the projections die once both are embedded), the cache update, SDPA, the output projection
  and the residual add; then the post-attention norm and the gated MLP (`down(act(gate(x)) * up(x))`)
  and its residual add; the layer's input lives until the layer returns. The final norm and
  lm_head on the last position. `LlamaRMSNorm` upcasts to fp32 (`x.to(float32)`, `x.pow(2).mean(-1)`,
  `x * rsqrt(...)`, then `weight * x.to(dtype)`); Gemma's norm keeps fp32 through `x * (1 + weight)`.
- `cache_utils.py: DynamicLayer.update`: `torch.cat` onto the layer's keys and values, empty before
  the first update, so the prefill's keys and values are copied too; the old tensors die as the
  attributes are rebound. Sliding-window layers keep a view of the last `window - 1` positions of
  the concatenation, which keeps its whole storage alive.
- `integrations/sdpa_attention.py`: with no mask (SPEC's unpadded prompts) SDPA gets keys and values
  with their own heads (`enable_gqa`); its flash and efficient kernels write [B, T, H, D] memory, so
  `transpose(1, 2).contiguous()` copies nothing.
- bitsandbytes 4-bit (`backends/cuda/ops.py: gemm_4bit`): a shape rule picks its fused kernel or
  `_dequant_linear_fallback` (the fp32 absmax rebuilt twice under double quantization, a bf16
  [out, in] weight, F.linear); see `bnb_4bit_fused`. LLM.int8 (`MatMul8bitLt`) casts the input to
  fp16, quantizes it to int8, multiplies into int32 and dequantizes to fp16, then casts back (its
  outlier columns are not written yet).

Gemma 2 and 3 add a norm after attention and after the MLP (`post_attention_layernorm`,
`post_feedforward_layernorm`), each on the sublayer's output before the residual add.

Only large-pool requests (over 1 MiB) are written: the small pool's 2 MiB segments never serve
them, and its own reserve is a few MiB. Mixture-of-experts blocks are written as the meta-device
trace of the model's own block recorded them (`meta_trace.trace_block`: grouped_mm's sorted
copies in the prefill, batched_mm's gathered experts in the decode steps, Llama 4's dense pass).
MLA layers are written with the shapes the inventory gives (an approximation: their latent
projections are not).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from estimator.allocator import SMALL_SIZE, Allocator
from estimator.cuda_kernels import SM_COUNT
from estimator.dtypes import BF16, FP32
from estimator.inventory_types import POST_ATTN, POST_MLP, PRE_ATTN, PRE_MLP, Inventory
from estimator.regime import Regime, Sizes
from estimator.terms.activations import attention_kernel



class Tape:
    """Requests fed straight into an Allocator: `alloc(bytes)` returns a handle, `free(*handles)`."""

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator

    def alloc(self, nbytes: float) -> int | None:
        nbytes = int(nbytes)
        if nbytes <= SMALL_SIZE:  # the small pool's requests are left out (see the module docstring)
            return None
        return self.allocator.malloc(nbytes)

    def free(self, *handles: int | None) -> None:
        for h in handles:
            if h is not None:
                self.allocator.free(h)


@dataclass(frozen=True)
class Shapes:
    """What one decoder layer's requests are sized by (bytes per element in `c`, the compute dtype's)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    k_dim: int
    v_dim: int
    c: float  # bytes per element of activations (bf16/fp16 2, fp32 4)
    upcast_norm: bool  # the norm's fp32 copy of its input is a new tensor (compute dtype below fp32)
    gemma_norm: bool
    layer_norm: bool
    qk_norm: bool
    norms: tuple[str, ...]  # where each layer's norms sit (Inventory.norm_places)
    parallel: bool  # Cohere: the MLP reads the attention's normed input; both add to the residual
    rope: bool
    layers: tuple[tuple, ...]  # per layer: (attention linears, MLP linears, gated, sliding)
    vocab: int
    softcap: bool
    gelu_new: bool  # GPT-2's composite tanh GELU
    quant: str | None  # "4bit", "int8" or None
    double_quant: bool
    kernel: str  # the attention kernel (terms/activations.attention_kernel)
    # eager attention in bf16 whose softmax(dtype=float32) first copies the scores to fp32 (ATen's
    # softmax fuses the upcast for fp16 on CUDA only): the traced peak per score shows the copy
    # (scores 2 + copy 4 + softmax 4 bytes, Inventory.eager_working_per_score)
    eager_copy: bool = False
    # MoE layers' blocks as traced on the meta device (Inventory.moe): which layers, and the
    # prefill's and the decode steps' request programs with their outputs ((), -1: not traced)
    moe_layers: frozenset = frozenset()
    moe_prefill: tuple = ((), -1)
    moe_decode: tuple = ((), -1)


def shapes_of(inv: Inventory, regime: Regime) -> Shapes:
    c = 4 if regime.compute == FP32 else 2
    layers = []
    for i in range(inv.num_layers):
        lins = [lin for lin in inv.linears if lin.layer == i]
        attn = tuple((lin.in_features, lin.out_features, lin.bnb_quantized) for lin in lins if lin.role in ("attn_in", "attn_out"))
        mlp = tuple((lin.in_features, lin.out_features, lin.bnb_quantized) for lin in lins if lin.role in ("mlp_in", "mlp_out"))
        sliding = i < len(inv.layer_types) and inv.layer_types[i] != "full_attention" and bool(inv.sliding_window)
        layers.append((attn, mlp, inv.mlp_gated, sliding))
    kernel = attention_kernel(regime.attn, FP32 if c == 4 else BF16, inv.head_dim, False, inv.num_kv_heads != inv.num_heads)
    quant = None
    if regime.quantizer is not None:
        quant = "4bit" if regime.quantizer.is_4bit else "int8"
    moe = inv.moe
    traced = moe is not None and bool(moe.prefill_program)
    # the programs were traced in bf16; under fp32 compute every request is scaled, the routing's
    # fp32 products and int64 indices too, which do not grow with the compute dtype (an
    # over-estimate, fp32 MoE inference only)
    scale = c / 2
    def scaled(program, output):
        return tuple((a, n, f * scale, p * scale) for a, n, f, p in program), output
    return Shapes(
        eager_copy=regime.compute == BF16 and inv.eager_working_per_score >= 2 + 4 + 4,
        moe_layers=frozenset(moe.layers) if traced else frozenset(),
        moe_prefill=scaled(moe.prefill_program, moe.prefill_output) if traced else ((), -1),
        moe_decode=scaled(moe.decode_program or moe.prefill_program,
                          moe.decode_output if moe.decode_program else moe.prefill_output) if traced else ((), -1),
        hidden=inv.hidden_size, heads=inv.num_heads, kv_heads=inv.num_kv_heads, head_dim=inv.head_dim,
        k_dim=inv.kv_head_dim, v_dim=inv.v_head_dim, c=c, upcast_norm=c < 4,
        gemma_norm=inv.norm_style == "gemma", layer_norm=inv.norm_kind == "layer", qk_norm=inv.qk_norm,
        rope=not inv.learned_positions, layers=tuple(layers), vocab=inv.vocab_size,
        norms=inv.norm_places, parallel=inv.parallel_block, softcap=inv.final_logit_softcapping is not None, gelu_new=inv.hidden_act == "gelu_new",
        quant=quant, double_quant=regime.double_quant, kernel=kernel,
    )


# ---- one forward ------------------------------------------------------------------------------
def _norm(t: Tape, s: Shapes, rows: int, width: int) -> int | None:
    """A norm over `width`, for `rows` rows; returns its output (the input stays alive: the residual)."""
    if s.layer_norm:
        return t.alloc(rows * width * s.c)
    x32 = t.alloc(rows * width * 4) if s.upcast_norm else None
    sq = t.alloc(rows * width * 4)  # x.pow(2)
    var = t.alloc(rows * 4)
    t.free(sq)
    scale = t.alloc(rows * 4)  # rsqrt(var + eps)
    y32 = t.alloc(rows * width * 4)
    t.free(x32, var, scale)
    if s.gemma_norm:  # x * (1 + weight) in fp32, then the cast
        z32 = t.alloc(rows * width * 4)
        t.free(y32)
        out = t.alloc(rows * width * s.c)
        t.free(z32)
        return out
    cast = t.alloc(rows * width * s.c) if s.upcast_norm else None
    out = t.alloc(rows * width * s.c)  # weight * x
    t.free(cast, y32)
    return out


def bnb_4bit_fused(rows: int, fan_out: int, fan_in: int, sms: int = SM_COUNT) -> bool:
    """Whether bitsandbytes 0.50.2 multiplies `rows` rows by a 4-bit [fan_out, fan_in] weight with
    its fused kernel (no bf16 copy of the weight) rather than dequantizing it for F.linear, in
    inference (`backends/cuda/ops.py`: `gemm_4bit`, `_gemm_4bit_use_custom_cuda`). The rule is its
    sm90 branch (H100 and H200, 132 SMs), which this replay applies to every GPU."""
    m, n, k = rows, fan_out, fan_in
    if m > 1536 or k % 64:
        return False
    if m <= 4:
        return True
    blocks = (n + 63) // 64
    if n * k < 4 * 1024 * 1024:  # small weights
        if k * 2 < n:
            return m <= (512 if blocks * 3 < sms else 320)
        if blocks * 4 <= sms:
            return m <= 32
        if blocks * 2 <= sms:
            return m <= 16
        return False
    if m > 512:
        return False
    if m < 8:
        if m >= 6 and blocks >= 36:
            under_75 = blocks * 4 < sms * 3
            if k > n and under_75:
                return False
            if k == n and under_75 and not blocks * 5 < sms * 3:
                return False
        return True
    if blocks >= sms * 3:
        return m <= 64
    if blocks >= sms * 2:
        return m <= 48
    if blocks >= sms:
        return m <= 32
    if blocks >= sms // 2:
        if k >= n and blocks * 4 < sms * 3:
            return False
        return m <= 16
    return False


def _linear(t: Tape, s: Shapes, rows: int, lin: tuple) -> int | None:
    fan_in, fan_out, quantized = lin
    if quantized and s.quant == "4bit":
        if bnb_4bit_fused(rows, fan_out, fan_in):
            return t.alloc(rows * fan_out * s.c)
        # _dequant_linear_fallback: the absmax rebuilt in fp32 (double quantization: its 8-bit
        # codes dequantized, then the offset added), the bf16 weight, F.linear; all freed on return.
        absmax = [t.alloc(fan_in * fan_out / 64 * 4) for _ in range(2)] if s.double_quant else []
        weight = t.alloc(fan_in * fan_out * 2)
        out = t.alloc(rows * fan_out * s.c)
        t.free(*absmax, weight)
        return out
    if quantized and s.quant == "int8":
        a16 = t.alloc(rows * fan_in * 2)  # the input cast to fp16 (bf16 inputs too)
        a8 = t.alloc(rows * fan_in)
        t.free(a16)
        acc = t.alloc(rows * fan_out * 4)
        t.free(a8)
        o16 = t.alloc(rows * fan_out * 2)
        t.free(acc)
        out = t.alloc(rows * fan_out * s.c)
        t.free(o16)
        return out
    return t.alloc(rows * fan_out * s.c)


def _rope(t: Tape, s: Shapes, elements: int) -> int | None:
    """q * cos + rotate_half(q) * sin: the embedded tensor (its input is freed with the layer's)."""
    a = t.alloc(elements * s.c)
    neg = t.alloc(elements / 2 * s.c)
    rot = t.alloc(elements * s.c)
    t.free(neg)
    b = t.alloc(elements * s.c)
    t.free(rot)
    out = t.alloc(elements * s.c)
    t.free(a, b)
    return out


class _Cache:
    """DynamicCache: per layer, the keys' and values' handles and the positions they hold."""

    def __init__(self, layers: int) -> None:
        self.k: list = [None] * layers
        self.v: list = [None] * layers


def forward(t: Tape, s: Shapes, batch: int, new: int, total: int, cache: _Cache | None, window: int | None,
            carried: dict) -> None:
    """One model forward of `new` tokens per sequence with `total` positions after it (`cache`: the
    KV cache to update, None without one), then generate()'s fp32 copy of the last logits."""
    rows = batch * new
    d = s.hidden
    hidden = t.alloc(rows * d * s.c)  # the embedding
    kept = [hidden]  # the model's forward keeps `inputs_embeds` (and GPT-2's position embeddings) to the end
    if s.gemma_norm:  # Gemma scales the embedding by sqrt(hidden)
        scaled = t.alloc(rows * d * s.c)
        t.free(hidden)
        hidden = scaled
        kept = [hidden]
    if not s.rope:  # learned positions (GPT-2): wpe(position_ids), then inputs_embeds + position_embeds
        kept.append(t.alloc(new * d * s.c))
        hidden = t.alloc(rows * d * s.c)
    rotary = []
    if s.rope:  # the rotary embedding: freqs, cat(freqs, freqs), cos and sin in fp32 (each scaled), cast
        freqs = t.alloc(rows * s.head_dim / 2 * 4)
        emb = t.alloc(rows * s.head_dim * 4)
        scaled = []
        for _ in range(2):
            raw = t.alloc(rows * s.head_dim * 4)
            scaled.append(t.alloc(rows * s.head_dim * 4))
            t.free(raw)
        rotary = [t.alloc(rows * s.head_dim * s.c) for _ in range(2)]
        t.free(freqs, emb, *scaled)
    for i, (attn, mlp, gated, sliding) in enumerate(s.layers):
        # the attention's input, alive until the attention module returns (None: it reads the
        # layer's input itself, as OLMo-2's does)
        x = _norm(t, s, rows, d) if PRE_ATTN in s.norms else None
        q_el, k_el = rows * s.heads * s.head_dim, rows * s.kv_heads * s.k_dim
        if len(attn) == 2:  # one fused qkv projection; q, k and v are views of it
            fused = _linear(t, s, rows, attn[0])
            q = k = v = fused
            drop = {fused}
        else:
            q = _linear(t, s, rows, attn[0])
            if s.qk_norm:  # q_norm(q_proj(x)): the projection dies once normed
                q, raw = _norm(t, s, rows * s.heads, s.head_dim), q
                t.free(raw)
            k = _linear(t, s, rows, attn[1])
            if s.qk_norm:
                k, raw = _norm(t, s, rows * s.kv_heads, s.k_dim), k
                t.free(raw)
            v = _linear(t, s, rows, attn[2])
            drop = {q, k, v}
        if s.rope:  # q_embed, k_embed = apply_rotary_pos_emb(q, k, ...): the inputs die after both
            qe, ke = _rope(t, s, q_el), _rope(t, s, k_el)
            if len(attn) != 2:
                t.free(q, k)
                drop -= {q, k}
            q, k = qe, ke
            drop |= {q, k}
        if cache is not None:
            held = min(total, window) if (sliding and window) else total
            # torch.cat onto the layer's keys and values (empty before the first update); the old
            # ones are freed as the attributes are rebound, and this step's k and v as
            # `key_states, value_states = past_key_values.update(...)` rebinds them.
            nk = t.alloc(batch * s.kv_heads * held * s.k_dim * s.c)
            t.free(cache.k[i])
            nv = t.alloc(batch * s.kv_heads * held * s.v_dim * s.c)
            if cache.v[i] != cache.k[i]:
                t.free(cache.v[i])
            cache.k[i], cache.v[i] = nk, nv
            if len(attn) != 2:
                t.free(*({k, v} & drop))
                drop -= {k, v}
        # SDPA's flash and efficient kernels write [B, T, H, D] memory, so transformers'
        # transpose(1, 2).contiguous() copies nothing. Its math fallback (fp32 with GQA) repeats k
        # and v to every head and materializes the scores and the probabilities; eager attention
        # (repeat_kv, q @ kᵀ · scale, an fp32 softmax cast back) likewise.
        kv_len = min(total, window) if (sliding and window and cache is not None) else total
        if s.kernel in ("math", "eager"):
            reps = [t.alloc(batch * s.heads * kv_len * dim * s.c) for dim in (s.k_dim, s.v_dim)] if s.kv_heads != s.heads else []
            scores = t.alloc(batch * s.heads * new * kv_len * s.c)
            if s.kernel == "eager" and s.eager_copy:
                # attn_weights = softmax(attn_weights, dtype=float32).to(q.dtype): the fp32 copy and the
                # softmax beside the scores, the cast beside the softmax, then the rebinding frees the scores
                copy = t.alloc(batch * s.heads * new * kv_len * 4)
                probs32 = t.alloc(batch * s.heads * new * kv_len * 4)
                t.free(copy)
                probs = t.alloc(batch * s.heads * new * kv_len * s.c)
                t.free(probs32, scores)
            else:
                if s.kernel == "eager":
                    probs32 = t.alloc(batch * s.heads * new * kv_len * 4)
                    t.free(scores)
                    scores = probs32
                probs = t.alloc(batch * s.heads * new * kv_len * s.c)
                t.free(scores)
            o = t.alloc(rows * s.heads * s.v_dim * s.c)
            t.free(probs, *reps)
            if s.kernel == "eager":  # attn_output.transpose(1, 2).contiguous() copies
                ctg = t.alloc(rows * s.heads * s.v_dim * s.c)
                t.free(o)
                o = ctg
        else:
            o = t.alloc(rows * s.heads * s.v_dim * s.c)
        proj = _linear(t, s, rows, attn[-1])
        t.free(o, *(drop - {None}))
        if not s.parallel:
            t.free(x)
        if POST_ATTN in s.norms:  # a norm on the attention's output (Gemma 2/3, OLMo-2)
            normed = _norm(t, s, rows, d)
            t.free(proj)
            proj = normed
        if s.parallel:  # the MLP reads the attention's input; the attention's output waits for it
            h2 = None
        else:
            h2 = t.alloc(rows * d * s.c)  # the residual add; the layer's input lives until it returns
            t.free(proj)
            x = _norm(t, s, rows, d) if PRE_MLP in s.norms else None  # None: the MLP reads h2
        if i in s.moe_layers:  # the MoE block's own requests, as traced (decode: batched_mm's gathers)
            program, output = s.moe_decode if new == 1 else s.moe_prefill
            live: dict = {}
            for is_alloc, n, fixed, per_token in program:
                if is_alloc:
                    live[n] = t.alloc(fixed + per_token * rows)
                else:
                    t.free(live.pop(n, None))
            down = live.pop(output, None)
            t.free(*live.values())
        elif gated and len(mlp) == 3:
            gate = _linear(t, s, rows, mlp[0])
            act = t.alloc(rows * mlp[0][1] * s.c)
            t.free(gate)
            up = _linear(t, s, rows, mlp[1])
            prod = t.alloc(rows * mlp[1][1] * s.c)
            t.free(act, up)
            down = _linear(t, s, rows, mlp[2])
            t.free(prod)
        elif gated and len(mlp) == 2:  # one fused gate_up projection
            gu = _linear(t, s, rows, mlp[0])
            act = t.alloc(rows * mlp[0][1] / 2 * s.c)
            prod = t.alloc(rows * mlp[0][1] / 2 * s.c)
            t.free(gu, act)
            down = _linear(t, s, rows, mlp[1])
            t.free(prod)
        elif mlp and s.gelu_new:
            # GPT-2's NewGELUActivation, op by op: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))
            up = _linear(t, s, rows, mlp[0])
            n = rows * mlp[0][1] * s.c
            half = t.alloc(n)
            prev = t.alloc(n)  # x ** 3
            for _ in range(4):  # * 0.044715, x +, * sqrt(2/pi), tanh
                nxt = t.alloc(n)
                t.free(prev)
                prev = nxt
            one = t.alloc(n)  # 1 + tanh
            t.free(prev)
            act = t.alloc(n)
            t.free(half, one, up)
            down = _linear(t, s, rows, mlp[-1])
            t.free(act)
        elif mlp:
            up = _linear(t, s, rows, mlp[0])
            act = t.alloc(rows * mlp[0][1] * s.c)
            t.free(up)
            down = _linear(t, s, rows, mlp[-1])
            t.free(act)
        else:
            down = t.alloc(rows * d * s.c)
        t.free(x)
        if POST_MLP in s.norms:  # a norm on the MLP's output
            normed = _norm(t, s, rows, d)
            t.free(down)
            down = normed
        if s.parallel:  # residual + attention output, then + the MLP's
            h2 = t.alloc(rows * d * s.c)
            t.free(proj)
        h3 = t.alloc(rows * d * s.c)
        t.free(down, h2)
        if hidden not in kept:  # the model's forward keeps `inputs_embeds` to the end
            t.free(hidden)
        hidden = h3
    final = _norm(t, s, rows, d)
    t.free(*({hidden} | set(kept)), *rotary)
    logits = t.alloc(batch * s.vocab * s.c)  # lm_head on the last position
    if s.softcap:  # logits / cap, tanh, * cap
        for _ in range(3):
            nxt = t.alloc(batch * s.vocab * s.c)
            t.free(logits)
            logits = nxt
    t.free(final)
    # generate(): the fp32 copy of the last logits, then its logits processors. SPEC's generate
    # (min_new_tokens = max_new_tokens) runs two that each clone the scores and write an
    # EOS-masked copy (MinNewTokensLengthLogitsProcessor: `scores.clone()`, then `torch.where`);
    # both appear in the allocator history of every step of a measured decode. The copy and the
    # processed scores are loop variables (`next_token_logits`, `next_token_scores`): they live
    # until the next step rebinds them.
    copy = t.alloc(batch * s.vocab * 4)
    t.free(carried.pop("copy", None))
    scores = copy
    for _ in range(2):
        clone = t.alloc(batch * s.vocab * 4)
        masked = t.alloc(batch * s.vocab * 4)
        t.free(clone)
        if scores != copy:
            t.free(scores)
        scores = masked
    t.free(carried.pop("scores", None), logits)  # `del outputs` drops the step's logits
    carried.update(copy=copy, scores=scores)


class _Recorder:
    """A tape that records requests instead of making them: handles are names, sizes exact."""

    def __init__(self) -> None:
        self.ops: list[tuple[bool, object, int]] = []
        self._n = 0

    def alloc(self, nbytes: float) -> tuple:
        self._n += 1
        handle = ("t", self._n)
        self.ops.append((True, handle, int(nbytes)))
        return handle

    def free(self, *handles) -> None:
        self.ops.extend((False, h, 0) for h in handles if h is not None)


def _record_step(s: Shapes, batch: int, total: int, cached: bool, layers: int, window: int | None):
    """One generate() step at `total` positions, recorded with named persistent slots: the cache's
    keys and values ("k", i) / ("v", i) and generate()'s carried copy and scores. Returns the ops and
    the renames (this step's new names of the persistent slots)."""
    rec = _Recorder()
    carried = {"copy": ("copy",), "scores": ("scores",)}
    if cached:
        cache = _Cache(layers)
        cache.k = [("k", i) for i in range(layers)]
        cache.v = [("v", i) for i in range(layers)]
        forward(rec, s, batch, 1, total, cache, window, carried)
        renames = {cache.k[i]: ("k", i) for i in range(layers)} | {cache.v[i]: ("v", i) for i in range(layers)}
    else:
        forward(rec, s, batch, total, total, None, window, carried)
        renames = {}
    renames |= {carried["copy"]: ("copy",), carried["scores"]: ("scores",)}
    return rec.ops, renames


def _template(s: Shapes, batch: int, first: int, last: int, cached: bool, layers: int, window: int | None):
    """The steps from `first` to `last` positions as one program whose sizes are polynomials of
    degree two in the position count (they are products of at most two lengths), or None when the
    steps differ in structure (a kernel choice that flips with the length): then each step is
    written out. Requests that stay in the small pool through the last step are dropped."""
    if last - first < 3:
        return None
    points = [first, first + 1, first + 2]
    runs = [_record_step(s, batch, t, cached, layers, window) for t in points + [last]]
    shape = [(a, h) for a, h, _ in runs[0][0]]
    if any([(a, h) for a, h, _ in ops] != shape or ren != runs[0][1] for ops, ren in runs[1:]):
        return None
    program = []
    for i, (is_alloc, handle, y0) in enumerate(runs[0][0]):
        y1, y2, y_last = runs[1][0][i][2], runs[2][0][i][2], runs[3][0][i][2]
        c2 = (y2 - 2 * y1 + y0) / 2  # exact: integer sizes of a quadratic
        c1 = (y1 - y0) - c2 * (2 * first + 1)
        c0 = y0 - c1 * first - c2 * first * first
        if is_alloc and c0 + c1 * last + c2 * last * last != y_last:
            return None
        program.append((is_alloc, handle, c0, c1, c2, max(y0, y_last)))
    small = {h for a, h, *_, top in program if a and top <= SMALL_SIZE}
    program = [op for op in program if op[1] not in small]
    return program, runs[0][1]


def _converts_experts(inv: Inventory, regime: Regime) -> bool:
    """Whether from_pretrained builds the 3-D expert stacks from per-expert checkpoint tensors on the
    GPU (transformers 5's weight conversion), unquantized: the load whose transients `load` writes."""
    return regime.quantizer is None and inv.moe is not None and inv.moe.converted_at_load


def load(t: Tape, inv: Inventory, nbytes: int) -> None:
    """from_pretrained's requests for a model whose experts transformers 5.17 converts as it loads
    (core_model_loading: per-expert checkpoint tensors materialized on the device, stacked, gate and
    up concatenated), checked against the H200 histories of MoE decodes (tests/test_stream.py):
    - `caching_allocator_warmup` reserves one block of every parameter's bytes and frees it, so the
      parameters land in one cached segment;
    - the parameters that are loaded as they are stored;
    - per MoE layer, every expert's gate, up and down tensors, then one stack per projection (its
      sources freed after it), then gate_up's concatenation (the two stacks freed after it). What
      the stacks and the concatenation add beyond the warm segment stays reserved, cached.
    The loader's threads prefetch the next layer's tensors while a layer is being stacked; that
    overlap is not written (it reserves more on some models: Mixtral-8x22B, Qwen3-30B)."""
    params = list(inv.params)
    warm = t.alloc(sum(p.numel for p in params) * nbytes)
    t.free(warm)
    experts = [p for p in params if len(p.shape) == 3 and p.kind == "expert"]
    for p in params:
        if not (len(p.shape) == 3 and p.kind == "expert"):
            t.alloc(p.numel * nbytes)
    for layer in sorted({p.layer for p in experts}):
        groups = []  # (bytes of one expert's tensor, experts, projection), gate, up and down in order
        for p in (p for p in experts if p.layer == layer):
            e, rows, cols = p.shape
            if "gate_up" in p.name:
                groups += [(rows // 2 * cols * nbytes, e, "gate"), (rows // 2 * cols * nbytes, e, "up")]
            else:
                groups.append((rows * cols * nbytes, e, p.name))
        sources = {name: [t.alloc(size) for _ in range(e)] for size, e, name in groups}
        stacks = {}
        for size, e, name in groups:
            stacks[name] = (t.alloc(size * e), size * e)
            t.free(*sources[name])
        if "gate" in stacks:
            t.alloc(stacks["gate"][1] + stacks["up"][1])
            t.free(stacks["gate"][0], stacks["up"][0])


def generate_reserve(inv: Inventory, regime: Regime, sizes: Sizes, capacity_bytes: int = 1 << 50,
                     stepwise: bool = False) -> tuple[int, int]:
    """(peak reserved, peak allocated) of generate()'s dynamic requests; see `_generate_reserve`.
    Cached by what generate() is sized by (the training fields of the job do not enter)."""
    return _generate_reserve(inv, regime, sizes.batch, sizes.prompt_len, sizes.new_tokens, capacity_bytes, stepwise)


@lru_cache(maxsize=512)
def _generate_reserve(inv: Inventory, regime: Regime, b: int, p: int, n: int, capacity_bytes: int,
                      stepwise: bool) -> tuple[int, int]:
    """(peak reserved, peak allocated) of generate()'s dynamic requests (the weights are not in the
    stream), replayed through the caching allocator.

    The decoding steps differ only in the lengths their tensors are sized by, so they are recorded
    once as a program (`_template`) and replayed with each step's sizes: the same requests in the
    same order as writing every step out (tests/test_stream.py checks both ways agree), at a
    fraction of the cost. `stepwise` writes every step out instead."""
    s = shapes_of(inv, regime)
    allocator = Allocator(capacity_bytes=capacity_bytes)
    t = Tape(allocator)
    static = 0
    if _converts_experts(inv, regime):
        # the load's cached transients are where generate()'s requests land first
        load(t, inv, regime.storage)
        static = allocator.allocated_bytes
        allocator.peak_allocated_bytes = static  # torch.cuda.reset_peak_memory_stats before generate()
    window = inv.sliding_window
    layers = inv.num_layers
    cached = inv.use_cache
    cache = _Cache(layers) if cached else None
    carried: dict = {}
    if cached:
        forward(t, s, b, p, p, cache, window, carried)
        first, last = p + 1, p + n - 1
    else:
        first, last = p, p + n - 1
    windowed = bool(window) and any(sliding for *_, sliding in s.layers) and last > window
    program = None if (windowed or stepwise) else _template(s, b, first, last, cached, layers, window)
    if program is None:
        for total in range(first, last + 1):
            forward(t, s, b, 1 if cached else total, total, cache, window, carried)
        return allocator.peak_reserved_bytes - static, allocator.peak_allocated_bytes - static
    ops, renames = program
    slots: dict = {("copy",): carried.get("copy"), ("scores",): carried.get("scores")}
    if cached:
        slots |= {("k", i): cache.k[i] for i in range(layers)} | {("v", i): cache.v[i] for i in range(layers)}
    malloc, free = allocator.malloc, allocator.free
    for total in range(first, last + 1):
        for is_alloc, handle, c0, c1, c2, _ in ops:
            if is_alloc:
                size = int(c0 + c1 * total + c2 * total * total)
                slots[handle] = malloc(size) if size > SMALL_SIZE else None
            else:
                h = slots.pop(handle, None)
                if h is not None:
                    free(h)
        for new, old in renames.items():
            slots[old] = slots.pop(new, None)
    return allocator.peak_reserved_bytes - static, allocator.peak_allocated_bytes - static

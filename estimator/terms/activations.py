"""What autograd saves for backward: a symbolic trace of one forward, per token.

The trace walks a decoder layer op by op (norm, projections, RoPE, attention, MLP, residual adds)
carrying, for every tensor, its width per token, its dtype and whether it needs a gradient. Each
op applies PyTorch's rule for what its backward reads, and saves it only when a gradient needs it
(the generated autograd code saves conditionally). Storages are counted once, so q/k/v reading
one shared input save it once, while autocast's per-call casts save one copy each.

The rules, each from the installed sources (torch 2.11 autograd formulas, transformers 5.17,
peft 0.21, bitsandbytes 0.50) and checked against the saved-tensor census that
`python -m validation.measure --diag` records (validation/results/*.jsonl, "saved_tensors"):

- `torch.autocast` casts a matmul's input to the compute dtype on every call; only leaf weights
  that require grad are cached. A frozen fp32 weight is cast per call and its copy is saved when
  the input needs a gradient (QLoRA's `lm_head`, a LoRA fp32 base).
- A trainable linear saves its (cast) input; a frozen one saves none. bitsandbytes'
  `Linear4bit.forward` casts its input to bf16 and returns its output in the input's dtype, and its
  `MatMul4Bit` saves nothing of the input.
- LoRA (`peft/tuners/lora/layer.py`): the input is cast to the adapter's fp32 (non-bnb layers),
  dropout saves a bool mask when its input needs a gradient, `lora_A` saves its bf16 input under
  autocast, `lora_B` saves `lora_A`'s r-wide output.
- RMSNorm (Llama style: `weight * x.to(fp32)…to(dtype)`, Gemma style: `(x.float()…) * (1 + w)`):
  `x.to(float32)` is saved by `pow`; the normalized tensor is saved when the weight trains.
  LayerNorm (`native_layer_norm`, an fp32 op under autocast) saves its fp32 input plus mean and
  rstd.
- RoPE multiplies by cos/sin in the embedding's dtype (fp32 under amp and QLoRA), so q and k leave
  RoPE in fp32 there and the attention kernel's autocast casts them back.
- SDPA, as torch picks its kernel: flash (bf16/fp16, head_dim ≤ 256, no explicit mask; GQA native)
  and memory-efficient (an explicit mask, e.g. a sliding window shorter than the sequence, or fp32
  without GQA) save q, k, v, the output (whose transpose is already contiguous) and an fp32
  logsumexp; with an explicit boolean mask, SDPA converts it to a float mask per call and the
  efficient kernel saves that B·S·S copy. With a mask transformers repeats k/v to every head.
  The math fallback (fp32 with GQA) saves scaled q, repeated k and v and the S×S probabilities.
  `eager` saves q, repeated k and v, the fp32 softmax and its compute-dtype cast.
- SiLU/GELU save their input; GPT-2's `gelu_new` is a composite that saves its input's fp32 copy
  (pow is an fp32 op under autocast), `tanh`'s output, `1 + tanh` and `0.5·x`.
- Dropout (p > 0, training) saves a bool mask when its input needs a gradient.
- In LoRA and QLoRA the embedding is frozen, so nothing before layer 0's first adapter needs a
  gradient: layer 0 saves less than the others.
- Liger's kernels (`use_liger_kernel=True`, liger-kernel 0.8.5, for the model types it patches):
  `LigerRMSNorm` saves its input as given and an fp32 rstd per row (`ops/rms_norm.py`), not an
  fp32 copy; `LigerSiLUMulFunction` saves the gate and up projections and recomputes the
  activation (`ops/swiglu.py`); `LigerRopeFunction` saves only cos and sin and keeps q and k in
  their dtype (`ops/rope.py`); the fused linear cross-entropy replaces `lm_head`, so its input is
  not saved (the loss term counts what it keeps: `terms/logits.py`).
- TRL's chunked head (`--loss chunked`, every SFTTrainer job) replaces `lm_head` and the loss as
  well: the final norm's output goes to `ChunkedLogProbFunction`, which saves its own gathered copy
  (the loss term counts it), so nothing of `lm_head` is traced here; `SavedActivations.head_input`
  is that output's dtype.
- The forward's own peak inside a layer (`SavedActivations.layer_transients`), at an adapted
  linear's `lora_A` matmul (`peft/tuners/lora/layer.py: Linear.forward`; `bnb.py: Linear4bit.forward`
  skips the cast under autocast): the base layer's `result`, the input the caller still holds (for
  down_proj the I-wide product `act(gate) * up`, which a frozen base does not save), its cast to
  the fp32 adapter (`_cast_input_dtype`) and dropout's output, both locals until the branch
  returns, and the layer's residual and normed MLP input (`Qwen2MLP.forward`/`LlamaMLP.forward`
  hold `x` until `up_proj` has run), counted where the trace has not saved them. With
  non-reentrant checkpointing (transformers 5.17 `gradient_checkpointing_enable` picks
  `use_reentrant=False` when given no kwargs) the backward reruns the top layer's forward at the
  first unpack of one of its saved tensors (`torch/utils/checkpoint.py: _checkpoint_hook`), so this
  peak comes back then, on top of every checkpoint; `estimate._training_phases` "recompute_layer".
  Checked against a CPU replay of SFTTrainer's step (peft, trl's fused head with CUDA's compact
  path) that tracked every storage: the top layer's recompute at down_proj's `lora_A` is the peak.
- SFTTrainer with PEFT and gradient checkpointing calls `model.enable_input_require_grads()`
  (`SFTTrainer.__init__`), so the embedding's output needs a gradient and layer 0 saves what the
  others save.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from estimator.dtypes import BF16, BOOL, FP16, FP32, INT64, DType
from estimator.inventory_types import POST_ATTN, POST_MLP, PRE_ATTN, PRE_MLP, Inventory, Linear
from estimator.job import Attention, Loss
from estimator.regime import Regime, Sizes
from estimator.terms import weights

def promote(a: DType, b: DType) -> DType:
    """torch's type promotion between floating dtypes: fp16 with bf16 gives fp32."""
    if a == b:
        return a
    if FP32 in (a, b) or {a.name, b.name} == {"fp16", "bf16"}:
        return FP32
    return a if a >= b else b


FLASH_MAX_HEAD_DIM = 256  # torch's flash/efficient SDPA kernels accept head_dim ≤ 256


@dataclass
class T:
    """A tensor, per token: `width` elements of `dtype` bytes."""

    width: float
    dtype: float
    grad: bool
    sid: int  # storage identity: views share it


@dataclass(frozen=True)
class Flow:
    """What the trace needs of a job: its regime, and which linears are adapted or stored in 4-bit."""

    regime: Regime
    adapted: frozenset[str] = frozenset()  # LoRA-adapted linears
    quantized: frozenset[str] = frozenset()  # linears bitsandbytes stores in 4-bit

    @property
    def compute(self) -> DType:
        return self.regime.compute

    @property
    def autocast(self) -> bool:
        return self.regime.autocast

    @property
    def residual(self) -> DType:
        return self.regime.residual

    @property
    def base_dtype(self) -> DType:
        return self.regime.storage

    @property
    def base_trainable(self) -> bool:
        return self.regime.base_trainable

    @property
    def base_is_compute(self) -> bool:
        return self.regime.base_is_compute

    @property
    def training(self) -> bool:
        return self.regime.training

    @property
    def attn(self) -> Attention:
        return self.regime.attn

    @property
    def lora_r(self) -> int:
        return self.regime.adapter.r if self.regime.adapter is not None else 0

    @property
    def liger(self) -> bool:
        """Liger's kernels replace the norms, the gated activation and RoPE."""
        return self.regime.liger_kernels and self.liger_supported

    @property
    def head_replaced(self) -> bool:
        """A fused loss takes lm_head's place: Liger's linear cross-entropy, or TRL's chunked head."""
        return self.regime.loss is Loss.CHUNKED or (self.regime.loss is Loss.LIGER and self.liger)

    liger_supported: bool = False  # the model type is one liger-kernel patches
    # The experts' weights as they sit in training (3-D parameters, never 4-bit: QLoRA's
    # preparation upcasts them to fp32). transformers' grouped_mm is not autocast-enabled: it casts
    # the tokens to the weights' dtype (integrations/moe.py, _grouped_mm), so the expert path runs
    # in it. None: the compute dtype (no 3-D experts).
    expert_dtype: DType | None = None
    # lora.ParamWrapper (PEFT 0.21.2) folds each wrapped parameter's update into a fresh tensor the
    # size of the parameter in every forward (_LoraFactorsProxy: baddbmm(W, lhs, rhs) for an expert
    # stack; W + B@A for a 2-D router), and the matmul that reads it saves it for the backward
    # (its gradient flows to the adapters). Bytes per layer, and the largest single one.
    merged_by_layer: tuple[tuple[int, float], ...] = ()

    def merged_in(self, layer: int) -> float:
        """ParamWrapper's merged bytes in `layer` (0 where it wraps nothing)."""
        return dict(self.merged_by_layer).get(layer, 0.0)

    @property
    def lora_dropout(self) -> float:
        return self.regime.adapter.dropout if self.regime.adapter is not None else 0.0


@dataclass
class Trace:
    """Records saved storages (bytes per token) and autocast weight copies (bytes)."""

    f: Flow
    inv: Inventory
    seq_len: int
    layer_type: str = "full_attention"
    saved: dict[int, float] = field(default_factory=dict)
    sizes: dict[int, float] = field(default_factory=dict)  # a storage's bytes per token (views share it)
    weight_copies_saved: float = 0.0  # fp32 weights cast for a matmul whose input needs a gradient
    weight_copies_cached: float = 0.0  # trainable fp32 weights cast under autocast (cache until exit)
    merged_saved: float = 0.0  # ParamWrapper's merged parameters saved for backward (Flow.merged_by_layer)
    layer_start: float = 0.0  # saved bytes per token before the current layer
    context: tuple = ()  # tensors the layer's forward holds while a sub-block runs (residual, normed input)
    transient: float = 0.0  # the current layer's peak of live-but-unsaved bytes per token above what it saves
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # ---- primitives -------------------------------------------------------------------------
    def new(self, width: float, dtype: float, grad: bool) -> T:
        t = T(width, dtype, grad, next(self._ids))
        self.sizes[t.sid] = width * dtype
        return t

    def save(self, t: T) -> None:
        if self.f.training and t.sid not in self.saved:
            self.saved[t.sid] = self.sizes.get(t.sid, t.width * t.dtype)

    def save_bytes(self, per_token: float) -> None:
        if self.f.training:
            self.saved[next(self._ids)] = per_token

    def cast(self, t: T, dtype: float) -> T:
        return t if t.dtype == dtype else self.new(t.width, dtype, t.grad)

    def autocast_in(self, t: T) -> T:
        return self.cast(t, self.f.compute) if self.f.autocast else t

    def dropout(self, t: T, p: float) -> T:
        if p <= 0 or not self.f.training:
            return t
        if t.grad:
            self.save_bytes(t.width * BOOL)
        return self.new(t.width, t.dtype, t.grad)

    def add(self, a: T, b: T) -> T:
        return self.new(a.width, promote(a.dtype, b.dtype), a.grad or b.grad)

    def mul(self, a: T, b: T) -> T:
        if b.grad:
            self.save(a)
        if a.grad:
            self.save(b)
        return self.new(max(a.width, b.width), promote(a.dtype, b.dtype), a.grad or b.grad)

    # ---- modules ----------------------------------------------------------------------------
    def linear(self, x: T, lin: Linear) -> T:
        f = self.f
        quantized = lin.name in f.quantized
        trainable = f.base_trainable
        if quantized:
            out = self.new(lin.out_features, x.dtype, x.grad)  # Linear4bit: .to(inp_dtype)
        else:
            xin = self.autocast_in(x)
            if trainable:
                self.save(xin)
            weight_bytes = lin.weight_params * f.compute
            if f.autocast and not f.base_is_compute:
                if trainable:
                    self.weight_copies_cached += weight_bytes
                if x.grad:
                    self.weight_copies_saved += weight_bytes
            out_dtype = f.compute if f.autocast else x.dtype
            out = self.new(lin.out_features, out_dtype, x.grad or trainable)
        if lin.name not in f.adapted:
            return out
        xl = x
        if not quantized and f.autocast:  # peft casts to the fp32 adapter; bnb layers skip it under autocast
            xl = self.cast(x, FP32)
        d = self.dropout(xl, f.lora_dropout)
        a_in = self.autocast_in(d)
        self.save(a_in)  # lora_A's weight gradient
        self._lora_transient(x, xl, d, out)
        a_out = self.new(f.lora_r, f.compute, True)
        self.save(a_out)  # lora_B's weight gradient
        b_out = self.new(lin.out_features, f.compute, True)
        return self.new(lin.out_features, promote(out.dtype, b_out.dtype) if quantized else out.dtype, True)

    def _lora_transient(self, x: T, xl: T, d: T, out: T) -> None:
        """What is alive, besides the saved tensors, while `lora_A` multiplies (peft/tuners/lora/layer.py
        `Linear.forward`, bnb.py `Linear4bit.forward`): the base layer's `result`, the input `x` the
        caller holds, its cast to the adapter's dtype (`_cast_input_dtype`) and dropout's output, both
        kept as locals until the adapter's branch returns, and the layer's residual and normed input."""
        live = {}
        for t in (x, xl, d, out, *self.context):
            if t.sid not in self.saved:
                live[t.sid] = t.width * t.dtype
        saved_in_layer = sum(self.saved.values()) - self.layer_start
        self.transient = max(self.transient, saved_in_layer + sum(live.values()))

    def rms_norm(self, x: T, width: int | None = None, gemma: bool = False) -> T:
        w = width or x.width
        trainable = self.f.base_trainable
        if self.f.liger:  # LigerRMSNorm: saves X as given and rstd; Y in X's dtype
            if x.grad or trainable:
                self.save(x)
                self.save_bytes(FP32 * (x.width / w))
            return self.new(x.width, x.dtype, x.grad or trainable)
        if x.grad:
            self.save(self.cast(x, FP32))  # x.to(float32), read by pow and by * rsqrt
            self.save_bytes(FP32 * (x.width / w))  # rsqrt, one per normalized row
        normed32 = self.new(x.width, FP32, x.grad)
        if gemma:
            if trainable:
                self.save(normed32)
            return self.new(x.width, x.dtype, x.grad or trainable)
        xn = self.cast(normed32, x.dtype)
        if trainable:
            self.save(xn)
        return self.new(x.width, promote(self.f.base_dtype, x.dtype), x.grad or trainable)

    def layer_norm(self, x: T) -> T:
        xin = self.cast(x, FP32) if self.f.autocast else x
        if x.grad or self.f.base_trainable:
            self.save(xin)
            self.save_bytes(2 * FP32)  # mean and rstd
        return self.new(x.width, xin.dtype, x.grad or self.f.base_trainable)

    def norm(self, x: T) -> T:
        if self.inv.norm_kind == "layer":
            return self.layer_norm(x)
        return self.rms_norm(x, gemma=self.inv.norm_style == "gemma")

    def activation(self, x: T) -> T:
        act = self.inv.hidden_act
        if act == "gelu_new":  # 0.5*x*(1+tanh(√(2/π)(x+0.044715·x³))), op by op
            x3 = self.cast(x, FP32) if self.f.autocast else x
            if x.grad:
                self.save(x3)  # pow's input
            t = self.new(x.width, x3.dtype, x.grad)
            if x.grad:
                self.save(t)  # tanh's output
            half = self.new(x.width, x.dtype, x.grad)
            one_plus = self.new(x.width, x3.dtype, x.grad)
            return self.mul(half, one_plus)
        if act == "relu":
            out = self.new(x.width, x.dtype, x.grad)
            if x.grad:
                self.save(out)
            return out
        if x.grad:
            self.save(x)
        return self.new(x.width, x.dtype, x.grad)

    # ---- attention --------------------------------------------------------------------------
    def attention(self, q: T, k: T, v: T) -> T:
        inv, f = self.inv, self.f
        heads, kv_heads = inv.num_heads, inv.num_kv_heads
        gqa = kv_heads != heads
        mask = self.needs_mask()
        kind = self.kernel(q.dtype if not f.autocast else f.compute, mask, gqa)
        s = self.seq_len
        grad = q.grad or k.grad or v.grad
        if kind == "eager":
            qc, kc = self.autocast_in(q), self.autocast_in(k)
            vc = self.autocast_in(v)
            if gqa:
                kc = self.new(heads * inv.kv_head_dim, kc.dtype, kc.grad)
                vc = self.new(heads * inv.v_head_dim, vc.dtype, vc.grad)
            if grad:
                self.save(qc)
                self.save(kc)
                self.save(vc)
                if qc.dtype == BF16 and not f.autocast and inv.eager_saved_per_score:
                    # the model's own eager_attention_forward, traced in bf16 without autocast
                    # (inventory._eager_attention): Llama's fp32 softmax and its cast, gpt-oss' bf16
                    # softmax, dropout's mask if any
                    self.save_bytes(heads * s * inv.eager_saved_per_score)
                else:
                    self.save_bytes(heads * s * FP32)  # softmax output, fp32
                    self.save_bytes(heads * s * qc.dtype)  # its cast, read by attn @ v
                    if inv.attention_dropout > 0:
                        self.save_bytes(heads * s * BOOL)
            out = self.new(heads * inv.v_head_dim, qc.dtype, grad)
            return self.new(out.width, out.dtype, grad)  # transpose(1, 2).contiguous() copies
        qc, kc, vc = self.autocast_in(q), self.autocast_in(k), self.autocast_in(v)
        if kind == "math":
            if grad:
                self.save(self.new(qc.width, qc.dtype, grad))  # q * scale
                self.save(self.new(heads * inv.kv_head_dim, kc.dtype, grad) if gqa else kc)
                self.save(self.new(heads * inv.v_head_dim, vc.dtype, grad) if gqa else vc)
                self.save_bytes(heads * s * qc.dtype)  # probabilities
            out = self.new(heads * inv.v_head_dim, qc.dtype, grad)
            return self.new(out.width, out.dtype, grad)
        if mask and gqa:  # transformers' repeat_kv when SDPA cannot take enable_gqa
            kc = self.new(heads * inv.kv_head_dim, kc.dtype, kc.grad)
            vc = self.new(heads * inv.v_head_dim, vc.dtype, vc.grad)
        out = self.new(heads * inv.v_head_dim, qc.dtype, grad)
        if grad:
            for t in (qc, kc, vc, out):
                self.save(t)
            self.save_bytes(heads * FP32)  # logsumexp
            if mask:
                self.save_bytes(s * qc.dtype)  # the float copy of the boolean mask, per layer
        return out  # the kernel's output is already laid out so its transpose is contiguous

    def needs_mask(self) -> bool:
        """SDPA gets an explicit mask when this layer's sliding window is shorter than the sequence."""
        w = self.inv.sliding_window
        return bool(w) and self.seq_len > w and self.layer_type != "full_attention"

    def kernel(self, dtype: float, mask: bool, gqa: bool) -> str:
        return attention_kernel(self.f.attn, dtype, self.inv.head_dim, mask, gqa)


def attention_kernel(attn: Attention, dtype: float, head_dim: int, mask: bool, gqa: bool) -> str:
    """Which attention kernel runs: "eager", "flash", "efficient" or SDPA's "math" fallback."""
    if attn is Attention.EAGER:
        return "eager"
    if attn is Attention.FLASH_ATTENTION_2:
        return "flash"
    half = dtype in (BF16, FP16)
    if half and not mask and head_dim <= FLASH_MAX_HEAD_DIM:
        return "flash"
    if (mask or not gqa) and head_dim <= FLASH_MAX_HEAD_DIM:
        return "efficient"
    return "math"


# -------------------------------------------------------------------------------------------------
# Layers
# -------------------------------------------------------------------------------------------------
def _split(lins: tuple[Linear, ...]) -> dict[str, list[Linear]]:
    groups: dict[str, list[Linear]] = {"attn_in": [], "attn_out": [], "mlp_in": [], "mlp_out": [], "router": [], "shared": []}
    for lin in lins:
        if "shared_expert" in lin.name and lin.role != "router":
            groups["shared"].append(lin)
        elif lin.role in groups:
            groups[lin.role].append(lin)
    return groups


def _gated_mlp(tr: Trace, x: T, ins: list[Linear], outs: list[Linear]) -> T:
    if not ins or not outs:
        return x
    liger = tr.f.liger and tr.inv.mlp_gated
    if len(ins) == 1:  # fused gate_up (Phi-3) or a plain fc1 (GPT-2, OPT)
        h = tr.linear(x, ins[0])
        if liger:  # LigerSiLUMulFunction(gate, up): saves both halves (one storage), recomputes the activation
            if h.grad:
                tr.save(h)
            p = tr.new(h.width / 2, h.dtype, h.grad)
        elif tr.inv.mlp_gated:
            gate = T(h.width / 2, h.dtype, h.grad, h.sid)  # chunk(2): views of one storage
            up = T(h.width / 2, h.dtype, h.grad, h.sid)
            a = tr.activation(gate)
            p = tr.mul(up, a)
        else:
            p = tr.activation(h)
    elif liger:  # LigerSiLUMulFunction(gate_proj(x), up_proj(x)): saves gate and up
        gate = tr.linear(x, ins[0])
        up = tr.linear(x, ins[1])
        grad = gate.grad or up.grad
        if grad:
            tr.save(gate)
            tr.save(up)
        p = tr.new(gate.width, gate.dtype, grad)
    else:
        gate = tr.linear(x, ins[0])
        a = tr.activation(gate)
        up = tr.linear(x, ins[1])
        p = tr.mul(a, up)
    return tr.linear(p, outs[0])


def _moe(tr: Trace, x: T, groups: dict[str, list[Linear]], layer: int) -> T:
    """transformers 5's fused experts (grouped_mm): top-k copies of each token through gate_up/down."""
    inv, f = tr.inv, tr.f
    moe = inv.moe
    assert moe is not None
    k, width = moe.top_k, moe.expert_intermediate_size
    ed = f.expert_dtype or f.compute
    if x.grad:
        tr.save_bytes(moe.num_experts * FP32)  # router probabilities (softmax in fp32)
        tr.save_bytes(k * inv.hidden_size * ed)  # tokens gathered per expert, cast to the experts' dtype
        tr.save_bytes(k * 2 * width * ed)  # gate_up output (the activation reads the gate half)
        tr.save_bytes(k * width * ed)  # activation output
        if f.base_trainable:
            tr.save_bytes(k * width * ed)  # down's input, for the experts' weight gradient
    if f.training:
        tr.merged_saved += f.merged_in(layer)
    out = tr.new(inv.hidden_size, f.compute if f.autocast else x.dtype, True)
    shared = groups["shared"]
    if shared:
        ins = [lin for lin in shared if lin.role == "mlp_in"]
        outs = [lin for lin in shared if lin.role == "mlp_out"]
        s = _gated_mlp(tr, x, ins, outs)
        gates = [lin for lin in groups["router"] if lin.out_features == 1]
        if gates:
            g = tr.linear(x, gates[0])
            sig = tr.new(1, g.dtype, g.grad)
            if g.grad:
                tr.save(sig)  # sigmoid saves its output
            s = tr.mul(sig, s)
        out = tr.add(out, s)
    return out


def trace_layer(tr: Trace, x: T, layer: int) -> T:
    """One decoder layer; returns its output. Saved tensors accumulate in `tr`."""
    inv, f = tr.inv, tr.f
    groups = _split(inv.layer_linears[layer] if layer < len(inv.layer_linears) else ())
    tr.layer_type = inv.layer_types[layer] if layer < len(inv.layer_types) else "full_attention"
    residual = x
    h = tr.norm(x) if PRE_ATTN in inv.norm_places else x  # OLMo-2's attention reads the residual itself
    attn_in = groups["attn_in"]
    if len(attn_in) == 1:  # fused qkv: q, k, v are views of one output
        qkv = tr.linear(h, attn_in[0])
        q = T(inv.num_heads * inv.head_dim, qkv.dtype, qkv.grad, qkv.sid)
        k = T(inv.num_kv_heads * inv.kv_head_dim, qkv.dtype, qkv.grad, qkv.sid)
        v = T(inv.num_kv_heads * inv.v_head_dim, qkv.dtype, qkv.grad, qkv.sid)
    elif len(attn_in) >= 3 and inv.model_type not in ("deepseek_v2", "deepseek_v3"):
        q, k, v = (tr.linear(h, lin) for lin in attn_in[:3])
    else:  # MLA and other layouts: project everything, then treat as q/k/v of the stated widths
        outs = [tr.linear(h, lin) for lin in attn_in]
        grad = any(o.grad for o in outs)
        dtype = outs[0].dtype if outs else h.dtype
        q = tr.new(inv.num_heads * inv.head_dim, dtype, grad)
        k = tr.new(inv.num_heads * inv.kv_head_dim, dtype, grad)
        v = tr.new(inv.num_heads * inv.v_head_dim, dtype, grad)
    if inv.qk_norm:
        q = tr.rms_norm(q, width=inv.head_dim)
        k = tr.rms_norm(k, width=inv.kv_head_dim)
    if f.liger and not inv.learned_positions:  # LigerRopeFunction: q and k keep their dtype, cos/sin saved
        q = tr.new(q.width, q.dtype, q.grad)
        k = tr.new(k.width, k.dtype, k.grad)
    elif not inv.learned_positions:  # RoPE: q*cos + rotate_half(q)*sin, cos/sin in the embedding dtype
        q = tr.new(q.width, promote(q.dtype, f.residual), q.grad)
        k = tr.new(k.width, promote(k.dtype, f.residual), k.grad)
    o = tr.attention(q, k, v)
    for lin in groups["attn_out"][:1]:
        o = tr.linear(o, lin)
    if POST_ATTN in inv.norm_places:  # Gemma 2/3, OLMo-2: a norm on the attention's output
        o = tr.norm(o)
    o = tr.dropout(o, inv.hidden_dropout)
    if not inv.parallel_block:
        x = tr.add(residual, o)
        residual = x
        h = tr.norm(x) if PRE_MLP in inv.norm_places else x
    # a parallel block (Cohere) feeds the attention's normed input to the MLP as well
    tr.context = (residual, h, o) if inv.parallel_block else (residual, h)
    if inv.moe is not None and layer in inv.moe.layers:
        m = _moe(tr, h, groups, layer)
    else:
        m = _gated_mlp(tr, h, groups["mlp_in"], groups["mlp_out"])
    tr.context = ()
    if POST_MLP in inv.norm_places:
        m = tr.norm(m)
    m = tr.dropout(m, inv.hidden_dropout)
    if inv.parallel_block:  # residual + attention + mlp
        return tr.add(tr.add(residual, o), m)
    return tr.add(residual, m)


def _layer_signature(inv: Inventory, layer: int, f: Flow, x: T) -> tuple:
    lins = inv.layer_linears[layer] if layer < len(inv.layer_linears) else ()
    shape = tuple(
        (lin.name.rsplit(".", 1)[-1], lin.role, lin.in_features, lin.out_features, lin.name in f.adapted, lin.name in f.quantized)
        for lin in lins
    )
    moe = inv.moe is not None and layer in inv.moe.layers
    kind = inv.layer_types[layer] if layer < len(inv.layer_types) else "full_attention"
    return (shape, moe, kind, x.width, x.dtype, x.grad)


@dataclass(frozen=True)
class SavedActivations:
    """Bytes per token (× B·S) unless named otherwise."""

    layers: tuple[float, ...]  # per decoder layer, without checkpointing
    checkpointed_input: float  # per layer, with checkpointing: the layer's input
    outside: float  # embeddings, final norm, lm_head input
    weight_copies_saved_bytes: float  # autocast copies saved for backward (not per token), all layers
    weight_copies_cached_bytes: float  # autocast cache at the end of the forward (not per token)
    layer_weight_copies_bytes: tuple[float, ...]  # per layer, saved copies
    lm_head_copy_bytes: float
    head_input: DType = FP32  # the final norm's output, which lm_head (or a fused head) reads
    # per decoder layer: the peak of its forward above what it saves, at an adapter's matmul (Trace._lora_transient)
    layer_transients: tuple[float, ...] = ()
    head_saved: float = 0.0  # of `outside`, what the final norm and lm_head save (freed before the layers' backward)
    layer_output: float = 0.0  # bytes per token of a layer's output (and of the gradient the backward hands it)
    layer_merged_bytes: tuple[float, ...] = ()  # per layer, ParamWrapper's merged parameters (not per token)


def saved_activations(inv: Inventory, regime: Regime, sizes: Sizes) -> SavedActivations:
    """What one training forward saves, per token, at `sizes.seq_len` (once per inventory, regime and length)."""
    return inv.derived(("saved", regime, sizes.seq_len), lambda: _saved_activations(inv, regime, sizes.seq_len))


def flow_of(inv: Inventory, regime: Regime) -> Flow:
    """The regime with the linears that PEFT adapts and that bitsandbytes stores in 4-bit."""
    adapted = frozenset(lin.name for lin in weights.lora_targets(inv, regime))
    placed = weights.placements(inv, regime)
    quantized = frozenset(p.name.removesuffix(".weight") for p in placed if p.kind == "quantized")
    experts = [p for p in placed if p.kind == "base" and p.name in _expert_params(inv)]
    return Flow(regime, adapted, quantized, liger_supported=liger_patches(inv),
                expert_dtype=experts[0].dtype if experts else None, merged_by_layer=merged_weights(inv, regime))


def _expert_params(inv: Inventory) -> frozenset[str]:
    return inv.derived("expert_params", lambda: frozenset(p.name for p in inv.params if len(p.shape) == 3))


def _wrapped(inv: Inventory, regime: Regime) -> list[tuple[int, float]]:
    """(layer, bytes at its training dtype) of each parameter lora.ParamWrapper re-materializes in
    each forward (see Flow.merged_by_layer); none outside training."""
    targets = {t.name for t in weights.param_targets(inv, regime)}
    if not regime.training or not targets:
        return []
    layer_of = {p.name: p.layer for p in inv.params}
    return [(layer_of[p.name], p.numel * p.dtype) for p in weights.placements(inv, regime)
            if (p.name in targets or p.name.removesuffix(".weight") in targets) and layer_of.get(p.name) is not None]


def merged_weights(inv: Inventory, regime: Regime) -> tuple[tuple[int, float], ...]:
    """Per layer, the bytes of the parameters lora.ParamWrapper re-materializes in each forward."""
    out: dict[int, float] = {}
    for layer, size in _wrapped(inv, regime):
        out[layer] = out.get(layer, 0.0) + size
    return tuple(sorted(out.items()))


def merged_backward_extra(inv: Inventory, regime: Regime) -> float:
    """What a layer's backward holds beyond its merged parameters, at worst: the gradient of one
    merged parameter (as large, in its dtype) exists while the backward reaches it, before
    baddbmm's backward turns it into the adapters' gradients; by then the merged parameters the
    forward used after it (down after gate_up) have been freed, their grouped_mm nodes having run
    and released what they saved. The backward visits a layer's parameters in the reverse of the
    forward's order, which is their registration order (gate_up_proj before down_proj)."""
    by_layer: dict[int, list[float]] = {}
    for layer, size in _wrapped(inv, regime):
        by_layer.setdefault(layer, []).append(size)
    worst = 0.0
    for sizes in by_layer.values():
        for i, size in enumerate(sizes):
            worst = max(worst, size - sum(sizes[i + 1:]))
    return worst


# The model types liger-kernel 0.8.5 patches (liger_kernel/transformers/monkey_patch.py,
# MODEL_TYPE_TO_APPLY_LIGER_FN); for any other, `use_liger_kernel=True` changes nothing.
LIGER_MODEL_TYPES = frozenset((
    "deepseek_v2", "deepseek_v3", "deepseek_v4", "gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4",
    "glm4", "glm4v", "glm4v_moe", "gpt_oss", "internvl", "llama", "llama4_text", "llama4", "llava", "granite",
    "mllama", "mllama_text_model", "ministral", "mistral", "mixtral", "nemotron", "olmo2", "pixtral", "olmo3",
    "qwen2", "qwen3", "qwen3_moe", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text", "qwen3_next",
    "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl", "qwen3_vl_text", "qwen3_vl_moe",
    "qwen3_vl_moe_text", "smollm3", "phi3", "paligemma", "falcon_h1", "smolvlm", "hunyuan_v1_dense",
    "hunyuan_v1_moe", "exaone4",
))


def liger_patches(inv: Inventory) -> bool:
    return inv.model_type in LIGER_MODEL_TYPES


def _saved_activations(inv: Inventory, regime: Regime, seq_len: int) -> SavedActivations:
    f = flow_of(inv, regime)
    tr = Trace(f, inv, seq_len)
    embed_grad = f.base_trainable
    if embed_grad:
        tr.save_bytes(INT64)  # token ids, for the embedding's gradient
    # SFTTrainer: enable_input_require_grads() for PEFT with checkpointing (the module's docstring)
    input_grad = embed_grad or (regime.sft and regime.adapter is not None and regime.gradient_checkpointing)
    x = tr.new(inv.hidden_size, f.residual, input_grad)
    if inv.learned_positions:
        if embed_grad:
            tr.save_bytes(INT64)
        x = tr.add(x, tr.new(inv.hidden_size, f.residual, embed_grad))
    x = tr.dropout(x, inv.embedding_dropout)
    outside = sum(tr.saved.values())
    layers: list[float] = []
    transients: list[float] = []
    layer_copies: list[float] = []
    layer_merged: list[float] = []
    input_widths = []
    seen: dict[tuple, tuple[float, float, float, T]] = {}
    for i in range(inv.num_layers):
        # Layers with the same structure and input save the same: trace each kind once (the merged
        # parameters are traced per layer: they are not part of the signature).
        signature = _layer_signature(inv, i, f, x)
        merged_before = tr.merged_saved
        if signature in seen:
            saved_bytes, copies, cached, out, transient = seen[signature]
            tr.merged_saved += f.merged_in(i)
            layer_merged.append(tr.merged_saved - merged_before)
            tr.saved[next(tr._ids)] = saved_bytes
            transients.append(transient)
            tr.weight_copies_saved += copies
            tr.weight_copies_cached += cached
            layers.append(saved_bytes)
            layer_copies.append(copies)
            input_widths.append(x.width * x.dtype)
            x = tr.new(out.width, out.dtype, out.grad)
            continue
        before = sum(tr.saved.values())
        copies_before = tr.weight_copies_saved
        cached_before = tr.weight_copies_cached
        input_widths.append(x.width * x.dtype)
        tr.layer_start, tr.transient = before, 0.0
        x = trace_layer(tr, x, i)
        layer_merged.append(tr.merged_saved - merged_before)
        layers.append(sum(tr.saved.values()) - before)
        transients.append(max(tr.transient - layers[-1], 0.0))
        layer_copies.append(tr.weight_copies_saved - copies_before)
        seen[signature] = (layers[-1], layer_copies[-1], tr.weight_copies_cached - cached_before, x, transients[-1])
    before = sum(tr.saved.values())
    copies_before = tr.weight_copies_saved
    h = tr.norm(x)
    lm_head = inv.lm_head
    if lm_head is not None and not f.head_replaced:  # a fused loss replaces lm_head (terms/logits.py)
        tr.linear(h, lm_head)
    head_saved = sum(tr.saved.values()) - before
    outside += head_saved
    return SavedActivations(
        layers=tuple(layers),
        checkpointed_input=max(input_widths[1:] or input_widths or [0.0]),
        outside=outside,
        weight_copies_saved_bytes=tr.weight_copies_saved,
        weight_copies_cached_bytes=tr.weight_copies_cached,
        layer_weight_copies_bytes=tuple(layer_copies),
        lm_head_copy_bytes=tr.weight_copies_saved - copies_before,
        head_input=h.dtype if isinstance(h.dtype, DType) else f.compute,
        layer_transients=tuple(transients),
        head_saved=head_saved,
        layer_output=x.width * x.dtype,
        layer_merged_bytes=tuple(layer_merged),
    )


# -------------------------------------------------------------------------------------------------
# Working memory that is not saved: the backward's gradients of intermediates, inference's forward
# -------------------------------------------------------------------------------------------------
def _widest(inv: Inventory) -> int:
    """The widest intermediate per token of one layer's MLP (all routed experts for MoE)."""
    if inv.moe is not None:
        return max(inv.moe.top_k * inv.moe.expert_intermediate_size + inv.moe.shared_intermediate_size, inv.intermediate_size)
    return max(inv.intermediate_size, inv.hidden_size)


def moe_forward_bytes(inv: Inventory, dtype: DType, tokens: int, decode: bool = False) -> float | None:
    """The MoE block's inference working set at `tokens` tokens, as traced on the meta device when the
    inventory was built (in bf16; scaled to `dtype`), or None when it was not traced. `decode`: as
    generate() runs its decode steps on a GPU (grouped_mm switched to batched_mm, which gathers each
    token's experts' weights), where the block switches."""
    moe = inv.moe
    if moe is None or not moe.forward_bytes_per_token:
        return None
    if decode and moe.decode_bytes_per_token:
        return (moe.decode_bytes_per_token * tokens + moe.decode_fixed_bytes) * dtype / BF16
    return (moe.forward_bytes_per_token * tokens + moe.forward_fixed_bytes) * dtype / BF16


def backward_working_bytes(inv: Inventory, regime: Regime) -> float:
    """Per token, while one layer's backward runs: the product's backward holds the gradient of the
    product and the two it produces (for the activation output and the up projection), each as wide
    as the MLP's intermediate, in the compute dtype."""
    return 3 * _widest(inv) * regime.compute


def _attention_working(inv: Inventory, dtype: DType, kind: str, prompt: int, bf16: bool) -> float:
    """Per token, attention's working set in the prefill; `bf16`: the compute dtype is bf16 (not
    fp16, whose fp32 softmax ATen fuses on CUDA without a copy), where eager's traced figure holds."""
    q = inv.num_heads * inv.head_dim
    kv = inv.num_kv_heads * (inv.kv_head_dim + inv.v_head_dim)
    projections = q + kv + 2 * q  # q, k, v, and RoPE's two temporaries (q·cos, rotate_half(q)·sin)
    scores = 0.0
    if kind == "eager" and bf16 and inv.eager_working_per_score:
        # the model's own eager_attention_forward at its peak, traced (inventory._eager_attention):
        # Llama's masked scores, their fp32 copy and its softmax (bf16 has no fused upcast), 10 bytes
        scores = inv.num_heads * prompt * inv.eager_working_per_score
    elif kind == "eager":  # q@kᵀ·scale (+mask) in dtype, its fp32 softmax and the softmax's cast
        scores = inv.num_heads * prompt * (dtype + FP32 + dtype)
    elif kind == "math":  # scores and probabilities
        scores = inv.num_heads * prompt * 2 * dtype
    return projections * dtype + scores


def _mlp_working(inv: Inventory, widest: int, dtype: DType, quantizer) -> float:
    """Per token, the MLP's intermediates alive at once: gated, the activation output, the up
    projection and their product (and the fused gate_up output); GPT-2's composite GELU holds four."""
    if inv.hidden_act == "gelu_new":
        mlp = 4 * widest * dtype
    elif inv.mlp_gated:
        fused = any(lin.role == "mlp_in" and lin.out_features >= 2 * inv.intermediate_size for lin in inv.linears if inv.intermediate_size)
        mlp = (4 if fused else 3) * widest * dtype
    else:
        mlp = 2 * widest * dtype
    if quantizer is not None and quantizer.accumulator_bytes:
        mlp += widest * quantizer.accumulator_bytes  # int8 matmul accumulates into int32 before dequantizing
    return mlp


def prefill_working_bytes(inv: Inventory, regime: Regime, sizes: Sizes) -> int:
    """The largest transient of `generate`'s prefill: one layer's working set at B·P tokens.

    Alive throughout: the embedding output (the model's forward keeps `inputs_embeds`), the residual
    and the normed input. On top, the larger of attention's (projections, RoPE temporaries, and for
    eager/math the S×S scores) and the MLP's (gated: activation output, up projection and their
    product; GPT-2's composite GELU holds four intermediates; an MoE block's as traced on the meta
    device, `moe_forward_bytes`). LLM.int8 adds its int32 matmul
    output; bitsandbytes 4-bit dequantizes one weight to bf16 per matmul when more than one row
    goes through it.
    """
    dtype = FP32 if regime.compute == FP32 else BF16
    quantizer = regime.quantizer
    # Without a KV cache (config use_cache=false) every step reruns the whole sequence: the last
    # step, at prompt + new − 1 tokens, is the largest.
    prompt = sizes.prompt_len if inv.use_cache else sizes.final_len
    tokens = sizes.batch * prompt
    h = inv.hidden_size
    widest = _widest(inv)
    gqa = inv.num_kv_heads != inv.num_heads
    trace = Trace(Flow(regime), inv, prompt)
    kind = trace.kernel(dtype, False, gqa)
    attn = _attention_working(inv, dtype, kind, prompt, regime.compute == BF16)
    if inv.linear_attention_bytes_per_token:  # linear-attention layers' own block, as traced (bf16)
        attn = max(attn, inv.linear_attention_bytes_per_token * dtype / BF16)
    traced = moe_forward_bytes(inv, dtype, tokens)
    if traced is not None:  # the MoE block as transformers runs it; dense layers' MLPs (if any) by the formula
        dense = _mlp_working(inv, inv.intermediate_size, dtype, quantizer) if len(inv.moe.layers) < inv.num_layers else 0
        mlp = max(dense, traced / tokens)
    else:
        mlp = _mlp_working(inv, widest, dtype, quantizer)
    window = inv.sliding_window
    masked = bool(window) and prompt > window and any(t != "full_attention" for t in inv.layer_types)
    if masked:
        # A sliding window shorter than the prompt needs an explicit boolean mask (B·P·P bytes, built
        # once and alive through the forward); in each sliding layer SDPA turns it into a float copy
        # and transformers repeats k and v to every head (no native GQA with a mask).
        attn += prompt * dtype + (2 * inv.num_heads * inv.head_dim * dtype if gqa else 0)
    extra_h = 3 if inv.learned_positions else 2  # GPT-2 keeps token and position embeddings too
    per_token = (extra_h + 1) * h * dtype + max(attn, mlp)
    total = per_token * tokens
    if masked:
        total += sizes.batch * prompt * prompt
    if quantizer is not None and quantizer.dequantizes_per_matmul:
        total += max((lin.weight_params for lin in inv.linears if lin.bnb_quantized), default=0) * BF16
    return int(total)


def decode_working_bytes(inv: Inventory, regime: Regime, sizes: Sizes) -> int:
    """One decoding step's activations (a single new token per sequence): small for dense models;
    for MoE models whose decode gathers each token's experts' weights (batched_mm), the gathered
    copies, as traced (`moe_forward_bytes`)."""
    dtype = FP32 if regime.compute == FP32 else BF16
    quantizer = regime.quantizer
    per_token = (3 * inv.hidden_size + 3 * _widest(inv)) * dtype
    total = per_token * sizes.batch
    traced = moe_forward_bytes(inv, dtype, sizes.batch, decode=True)
    if traced is not None:  # the MoE block's own working set at one token per sequence
        total = max(total, 3 * inv.hidden_size * dtype * sizes.batch + traced)
    if quantizer is not None and quantizer.dequantizes_per_matmul and sizes.batch > 1:
        total += max((lin.weight_params for lin in inv.linears if lin.bnb_quantized), default=0) * BF16
    return int(total)

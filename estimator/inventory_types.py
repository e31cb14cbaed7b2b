"""The model's inventory as data: its parameters, linears, MoE layout and the facts memory depends
on. `estimator.inventory` builds it; the terms and `prequantized` read it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Literal, TypeVar

_T = TypeVar("_T")

ParamKind = Literal["linear", "bias", "embedding", "norm", "expert", "router", "other"]
LinearRole = Literal["attn_in", "attn_out", "mlp_in", "mlp_out", "router", "lm_head", "other"]


class JobRefused(ValueError):
    """A job the libraries refuse or cannot run (PEFT's ParamWrapper with dropout, a wrapped forward
    that fails): the CLI's exit 2 with the reason and the way out, and a refused row in the reports."""


class UnsupportedModelError(ValueError):
    """The config names a model the estimator cannot size (not a causal LM, unknown to transformers…)."""


# Where a decoder layer's hidden-size norms sit (Inventory.norm_places): read by running layer 0 of
# the meta model (inventory._block).
PRE_ATTN, POST_ATTN, PRE_MLP, POST_MLP = "pre_attn", "post_attn", "pre_mlp", "post_mlp"


@dataclass(frozen=True)
class Param:
    """One parameter tensor, counted once even when tied."""

    name: str
    shape: tuple[int, ...]
    kind: ParamKind
    layer: int | None  # decoder layer index; None outside the layer stack
    in_quantized_linear: bool = False  # the weight of a linear that bitsandbytes converts

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Linear:
    """A linear layer (nn.Linear or GPT-2's Conv1D) with what memory depends on."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    layer: int | None
    role: LinearRole
    bnb_quantized: bool  # bitsandbytes converts it (transformers' replace_with_bnb_linear rules)
    peft_all_linear: bool  # PEFT's "all-linear" adapts it
    exact_linear: bool  # `type(m) is nn.Linear` or Conv1D, as bitsandbytes requires

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ParamAdapter:
    """A parameter PEFT adapts directly under all-linear (its `target_parameters`, wrapped by
    `lora.ParamWrapper`): a 3-D expert tensor or a router weight. lora_A is (rows_per_rank·r × in),
    lora_B (out × rows_per_rank·r): rows_per_rank is the experts (times the branches PEFT fuses,
    with its rank doubled for gate_up_proj), 1 for a 2-D router."""

    name: str
    in_features: int
    out_features: int
    rows_per_rank: int


@dataclass(frozen=True)
class MoE:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: int  # 0 when there is no shared expert
    layers: tuple[int, ...]  # which decoder layers are MoE
    # The MoE block's inference forward as transformers runs it, traced on the meta device in bf16
    # (estimator/meta_trace.py): peak live bytes beyond its input, per token and fixed. 0 when the
    # trace could not run; the estimate then falls back to the top-k formula.
    forward_bytes_per_token: float = 0.0
    forward_fixed_bytes: float = 0.0
    # The same block as generate() decodes with it: on a GPU, transformers 5.17 switches grouped_mm
    # experts to batched_mm for the decode steps (GenerationMixin._optimize_model_for_decode), which
    # gathers each token's k experts' whole weights. 0 when the block does not switch (then decode
    # runs the prefill's implementation) or could not be traced.
    decode_bytes_per_token: float = 0.0
    decode_fixed_bytes: float = 0.0
    # The same block's requests in order, for generate()'s written stream (estimator/stream.py):
    # ((is_alloc, number, fixed bytes, bytes per token), ...) and the number of its output, for the
    # prefill and for the decode steps (meta_trace.trace_block). Empty when not traced.
    # Whether from_pretrained builds the 3-D stacks from per-expert checkpoint tensors as it loads
    # (transformers' conversion_mapping has a MergeModulelist for the model type: Mixtral, Qwen MoE,
    # DeepSeek V2/V3…), not gpt-oss or Llama 4, whose checkpoints store the stacks
    converted_at_load: bool = False
    prefill_program: tuple = ()
    prefill_output: int = -1
    decode_program: tuple = ()
    decode_output: int = -1


@dataclass(frozen=True)
class Inventory:
    model_type: str
    architecture: str
    params: tuple[Param, ...]
    linears: tuple[Linear, ...]
    buffer_bytes: int  # buffers as built (rotary inv_freq, masks…), at their own dtypes
    tied_embeddings: bool
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_head_dim: int  # per-head width of cached keys (MLA caches differ from q's head_dim)
    v_head_dim: int
    intermediate_size: int  # dense MLP width (0 if every layer is MoE)
    mlp_gated: bool  # SwiGLU/GeGLU style: act(gate) * up
    hidden_act: str
    norm_kind: Literal["rms", "layer"]
    norm_style: Literal["llama", "gemma", "layer"]  # how the norm casts: see terms/activations.py
    norms_per_layer: int  # hidden-size norms in one decoder layer (q/k norms are per head, not counted)
    # Where layer 0's hidden-size norms sit, in call order ("pre_attn", "post_attn", "pre_mlp",
    # "post_mlp"): Llama (pre_attn, pre_mlp), OLMo-2 (post_attn, post_mlp), Gemma 2/3 all four.
    norm_places: tuple[str, ...]
    parallel_block: bool  # the MLP reads the attention's input and both add to the residual (Cohere)
    layer_types: tuple[str, ...]  # "full_attention" / "sliding_attention" per layer
    sliding_window: int | None
    moe: MoE | None
    attention_dropout: float
    hidden_dropout: float
    embedding_dropout: float
    final_logit_softcapping: float | None
    attn_logit_softcapping: float | None
    qk_norm: bool
    learned_positions: bool
    use_cache: bool = True  # config.use_cache: generate keeps a KV cache (false: it recomputes every step)
    max_positions: int | None = None  # config.max_position_embeddings: the positions the model was trained for
    rope_scaling: str | None = None  # the config's RoPE scaling type (yarn, llama3, linear…), if any
    # A pre-quantized checkpoint (GPTQ, AWQ, FP8, bitsandbytes-saved…): stored bytes per replaced
    # parameter name (estimator/prequantized.py), and a one-line description.
    prequantized: tuple[tuple[str, int], ...] = ()
    # PEFT 0.21.2's all-linear on models whose MoE layout transformers 5 converted (Mixtral, Qwen3-MoE,
    # DeepSeek V2/V3…): the parameters it adapts besides linears. Empty elsewhere.
    peft_param_targets: tuple[ParamAdapter, ...] = ()
    # Why PEFT's all-linear LoRA fails in the forward on this model, when it does: the wrapped meta
    # model's first layers are run (Llama 4's router is an nn.Linear that returns a tuple, and PEFT's
    # lora.Linear reads `.dtype` of what its base layer returned). None when it runs.
    peft_all_linear_error: str | None = None
    # Eager attention as the model's own eager_attention_forward runs it, per score (one head, one
    # query, one key), traced on the meta device in bf16: the peak without grad and what autograd
    # saves (inventory._eager_attention). 0 when not traced; the formula's figures then stand.
    eager_working_per_score: float = 0.0
    eager_saved_per_score: float = 0.0
    # Linear-attention layers (Qwen3-Next's gated delta net): the first one's forward without a
    # cache, traced on the meta device in bf16 (inventory._linear_attention): bytes per token at its
    # peak beyond its input, as transformers' reference PyTorch path runs it (no
    # flash-linear-attention or causal-conv1d kernels). 0 without such layers.
    linear_attention_bytes_per_token: float = 0.0
    quantization: str | None = None
    quant_method: str | None = None  # the checkpoint's quantization_config quant_method (gptq, fp8, mxfp4…), if any
    # transformers' `_supports_sdpa` for the class AutoModelForCausalLM builds: without it, the
    # default attention falls back to eager and an explicit sdpa is refused
    # (modeling_utils.PreTrainedModel.get_correct_attn_implementation, _sdpa_can_dispatch)
    supports_sdpa: bool = True
    text_only_of: str | None = None  # set when a multimodal config was sized by its text model
    notes: tuple[str, ...] = field(default=())
    # The config.json this inventory was built from, canonical (sorted keys): what a traced training
    # step rebuilds the model from (estimator/train_trace.py, whose cache is keyed by it). Not stored
    # in the prebuilt file, and not part of equality: inventories of one shape compare equal.
    config_json: str = field(default="", repr=False, compare=False)
    # Values derived from this inventory and hashable inputs (a regime, sizes): see `derived`.
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---- totals -----------------------------------------------------------------------------
    @functools.cached_property
    def params_total(self) -> int:
        return sum(p.numel for p in self.params)

    @functools.cached_property
    def layer_linears(self) -> tuple[tuple[Linear, ...], ...]:
        """Linears per decoder layer, in module order."""
        rows: list[list[Linear]] = [[] for _ in range(self.num_layers)]
        for lin in self.linears:
            if lin.layer is not None and lin.layer < self.num_layers:
                rows[lin.layer].append(lin)
        return tuple(tuple(r) for r in rows)

    @functools.cached_property
    def lm_head(self) -> Linear | None:
        for lin in self.linears:
            if lin.role == "lm_head":
                return lin
        return None

    def derived(self, key: tuple, compute: Callable[[], _T]) -> _T:
        """`compute()`, once per `key`. The key names the function and every input it reads besides
        this inventory (a `Regime`, `Sizes`): hashable values, never a hand-picked set of job fields."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def layer_param_numel(self, layer: int) -> int:
        return sum(p.numel for p in self.params if p.layer == layer)

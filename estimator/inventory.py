"""The model's inventory: every parameter and every module that matters for memory, built exactly.

The model is built on the meta device (`with torch.device("meta"):` around
`AutoModelForCausalLM.from_config`), so nothing is downloaded or allocated and the counts are the
installed transformers' own: fused qkv, GQA, MoE experts, biases and tied weights come out as the
real model has them. Which linears bitsandbytes quantizes and which PEFT's `all-linear` targets
are decided by those libraries' own rules, run on the meta model.

Building costs a transformers import and a meta build (about a second), so inventories are cached
per config: they are pure functions of it.

Builds are safe from several threads (Streamlit runs each session as one). The meta device is a
torch function mode, which is per thread; accelerate's `init_empty_weights` instead patches
`nn.Module.register_parameter` for the whole process, so overlapping builds counted tied
embeddings twice and could leave the patch on. What stays process-wide, transformers'
`local_torch_dtype` (`torch.set_default_dtype`), its logging verbosity and Python's warning
filters, is set and restored under one lock, so builds run one at a time and torch is left as found.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

# The inventory's data types live in inventory_types (prequantized.py reads them too); they are
# re-exported here, where callers have always found them.
from estimator.inventory_types import (POST_ATTN, POST_MLP, PRE_ATTN, PRE_MLP, Inventory, Linear, LinearRole, MoE, Param, ParamAdapter,
                                       ParamKind, UnsupportedModelError)

# Inventories of every catalog config, built with the pinned transformers by
# `python -m estimator.catalog.prebuild`; tests check each against a fresh build.
PREBUILT_PATH = Path(__file__).resolve().parent / "catalog" / "inventories.json.gz"

__all__ = ["Inventory", "Linear", "LinearRole", "MoE", "Param", "ParamAdapter", "ParamKind", "UnsupportedModelError",
           "build_inventory", "config_key", "inventory_from_config"]


# -------------------------------------------------------------------------------------------------
# Serialization: prebuilt inventories for the catalog, so catalog models need no torch import
# -------------------------------------------------------------------------------------------------
def inventory_to_dict(inv: Inventory) -> dict:
    out = {}
    for f in dataclasses.fields(inv):
        if not f.init or f.name == "config_json":
            continue
        value = getattr(inv, f.name)
        if f.name == "params":
            value = [[p.name, list(p.shape), p.kind, p.layer, p.in_quantized_linear] for p in value]
        elif f.name == "linears":
            value = [
                [l.name, l.in_features, l.out_features, l.bias, l.layer, l.role, l.bnb_quantized, l.peft_all_linear, l.exact_linear]
                for l in value
            ]
        elif f.name == "moe" and value is not None:
            value = dataclasses.asdict(value)
        elif f.name == "prequantized":
            value = [[n, b] for n, b in value]
        elif f.name == "peft_param_targets":
            value = [[t.name, t.in_features, t.out_features, t.rows_per_rank] for t in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def inventory_from_dict(data: dict) -> Inventory:
    data = dict(data)
    data["params"] = tuple(Param(n, tuple(shape), kind, layer, q) for n, shape, kind, layer, q in data["params"])
    data["linears"] = tuple(Linear(*row) for row in data["linears"])
    if data.get("moe") is not None:
        moe = dict(data["moe"])
        moe["layers"] = tuple(moe["layers"])
        for name in ("prefill_program", "decode_program"):
            moe[name] = tuple(tuple(step) for step in moe.get(name) or ())
        data["moe"] = MoE(**moe)
    for name in ("layer_types", "notes", "norm_places"):
        data[name] = tuple(data.get(name) or ())
    data["prequantized"] = tuple((n, int(b)) for n, b in data.get("prequantized") or ())
    data["peft_param_targets"] = tuple(ParamAdapter(*row) for row in data.get("peft_param_targets") or ())
    return Inventory(**data)


def config_key(config: dict) -> str:
    """A stable digest of a config: the key of the inventory cache and of the prebuilt store."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=1)
def _prebuilt() -> dict[str, dict]:
    path = PREBUILT_PATH
    if not path.exists():
        return {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    return data.get("inventories", {})


# -------------------------------------------------------------------------------------------------
# Building
# -------------------------------------------------------------------------------------------------
_OUT_NAMES = {"o_proj", "out_proj", "dense", "c_proj", "down_proj", "fc2", "dense_4h_to_h", "w2", "wo", "proj_out"}
_ATTN_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn", "moe", "expert")
_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")


def _canonical(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def inventory_from_config(config: dict) -> Inventory:
    """Build (or fetch from the cache) the inventory of a `config.json` dict."""
    if not isinstance(config, dict):
        raise UnsupportedModelError("a model config must be a JSON object")
    return _build_cached(_canonical(config))


@functools.lru_cache(maxsize=64)
def _build_cached(canonical: str) -> Inventory:
    config = json.loads(canonical)
    prebuilt = _prebuilt().get(config_key(config))
    if prebuilt is not None:
        return dataclasses.replace(inventory_from_dict(prebuilt), config_json=canonical)
    return dataclasses.replace(_build(config), config_json=canonical)


def build_inventory(config: dict) -> Inventory:
    """Always build on the meta device (no prebuilt lookup, no cache): for the prebuild script and tests."""
    canonical = _canonical(config)
    return dataclasses.replace(_build(json.loads(canonical)), config_json=canonical)


def _text_config(raw: dict) -> tuple[dict, str | None]:
    """Multimodal configs (LLaVA-like, Gemma 3) keep the language model in `text_config`."""
    if "text_config" in raw and isinstance(raw["text_config"], dict) and "vision_config" in raw:
        return raw["text_config"], raw.get("model_type")
    return raw, None


def _make_config(raw: dict):
    import transformers

    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise UnsupportedModelError(f"model_type must be a string like \"llama\", not {type(model_type).__name__}")
    if not model_type:
        raise UnsupportedModelError("the config has no model_type, so transformers cannot tell which model it is")
    if model_type not in transformers.CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not known to transformers {transformers.__version__}; "
            "it may need trust_remote_code, which the estimator never runs"
        )
    kwargs = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        return transformers.CONFIG_MAPPING[model_type](**kwargs)
    except Exception as err:  # noqa: BLE001 - any failure here is a malformed config
        raise UnsupportedModelError(f"the {model_type} config is malformed: {err}") from None


def _build(raw: dict) -> Inventory:
    """Build, turning any malformed value the model tolerated but the reading below does not into a
    clear refusal rather than a traceback."""
    try:
        return _build_unchecked(raw)
    except (TypeError, OverflowError, ValueError, AttributeError, KeyError) as err:
        if isinstance(err, UnsupportedModelError):
            raise
        raise UnsupportedModelError(f"the config is malformed: {type(err).__name__}: {err}") from None


# The largest values a real model uses, with a wide margin: beyond them a config is a typo, and
# building it on the meta device would run for hours (one module per layer).
_SIZE_LIMITS = {
    ("num_hidden_layers", "n_layer", "num_layers"): 4_096,
    ("hidden_size", "n_embd", "d_model"): 262_144,
    ("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size"): 4_194_304,
    ("vocab_size",): 16_777_216,
    ("num_attention_heads", "n_head", "num_key_value_heads"): 16_384,
    ("num_local_experts", "num_experts", "n_routed_experts"): 65_536,
}


def _check_sizes(raw: dict) -> None:
    for names, limit in _SIZE_LIMITS.items():
        for name in names:
            value = raw.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if value < 0 or value != value:
                raise UnsupportedModelError(f"{name} is {value}: a size must be a positive number; check the config")
            if value > limit:
                raise UnsupportedModelError(
                    f"{name} of {value:,.0f} is beyond any real model (at most {limit:,}); check the config"
                )


# One meta build at a time: transformers sets the process's default dtype while it builds, and the
# logging and warning settings below are process-wide too.
_BUILD_LOCK = threading.RLock()


@contextmanager
def _quiet_transformers():
    """transformers' logging and Python warnings silenced (a config's deprecation notices would
    otherwise add lines around the CLI's one error line), and both restored afterwards."""
    import warnings

    import transformers

    verbosity = transformers.logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(verbosity)


def _build_unchecked(raw: dict) -> Inventory:
    with _BUILD_LOCK, _quiet_transformers():
        return _build_locked(raw)


def _build_locked(raw: dict) -> Inventory:
    """The inventory of `raw`: the model built on the meta device, read module by module."""
    text_raw, multimodal_type = _text_config(raw)
    _check_sizes(text_raw)
    model, whole = _meta_model(raw, text_raw, multimodal_type)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    num_layers = int(getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer", 0))
    layer_of = _layer_index(model, num_layers)
    linears, module_kind, quantized_weights = _linears(model, layer_of)
    params = _params(model, module_kind, quantized_weights, layer_of)
    linears, param_targets, peft_error = _peft_all_linear(model, linears, params, num_layers)
    shapes = _attention_shapes(text_cfg)
    hidden, vocab = shapes["hidden_size"], shapes["vocab_size"]
    intermediate, gated = _mlp_shape(linears)
    norms = _norms(model, params, hidden)
    notes: list[str] = []
    if multimodal_type is not None and whole:
        tower = sum(p.numel for p in params if p.layer is None and ("vision" in p.name or "multi_modal" in p.name))
        notes.append(f"{multimodal_type}: AutoModelForCausalLM builds the whole {type(model).__name__}, so its vision tower "
                     f"and projector ({tower / 1e6:,.0f} M parameters) are loaded and counted; text-only inputs leave them idle")
    elif multimodal_type is not None:
        notes.append(f"{multimodal_type}: only the language model is sized; AutoModelForCausalLM builds no vision tower for it")

    def _float(*names: str) -> float:
        for n in names:
            v = getattr(text_cfg, n, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        return 0.0

    layer_types, sliding = _layer_types(text_cfg, num_layers)
    buffer_bytes = int(sum(b.numel() * b.element_size() for _, b in model.named_buffers()))
    block = _block(model, num_layers, params)  # runs layer 0 (and casts the meta model to bf16)
    moe = _moe_forward(model, num_layers, hidden, _moe(text_cfg, params, num_layers), params)
    linear = _linear_attention(model, num_layers, hidden, layer_types)
    eager = _eager_attention(model, num_layers, shapes["num_heads"], layer_types)  # last to run the meta model
    act = str(getattr(text_cfg, "hidden_act", None) or getattr(text_cfg, "activation_function", None)
              or getattr(text_cfg, "hidden_activation", "") or "")
    inventory = Inventory(
        model_type=str(cfg.model_type),
        architecture=type(model).__name__,
        params=tuple(params),
        linears=tuple(linears),
        buffer_bytes=buffer_bytes,
        tied_embeddings=bool(getattr(model, "all_tied_weights_keys", None)),
        num_layers=num_layers,
        **shapes,
        intermediate_size=int(intermediate),
        mlp_gated=bool(gated),
        hidden_act=act,
        **norms,
        **block,
        **eager,
        **linear,
        layer_types=layer_types,
        sliding_window=int(sliding) if sliding else None,
        moe=moe,
        attention_dropout=_float("attention_dropout", "attn_pdrop"),
        hidden_dropout=_float("hidden_dropout", "resid_pdrop", "dropout"),
        embedding_dropout=_float("embd_pdrop"),
        final_logit_softcapping=getattr(text_cfg, "final_logit_softcapping", None),
        attn_logit_softcapping=getattr(text_cfg, "attn_logit_softcapping", None),
        qk_norm=any(p.layer == 0 and p.kind == "norm" and any(k in p.name for k in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"))
                    for p in params),
        learned_positions=any(p.kind == "embedding" and p.shape[0] != vocab for p in params),
        use_cache=bool(getattr(text_cfg, "use_cache", True)),
        max_positions=_positive_or_none(getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)),
        rope_scaling=_rope_scaling(text_cfg),
        peft_param_targets=param_targets,
        peft_all_linear_error=peft_error,
        supports_sdpa=bool(getattr(type(model), "_supports_sdpa", True)),
        text_only_of=multimodal_type,
        notes=tuple(notes),
    )
    return _with_prequantized(inventory, text_raw if multimodal_type is None else raw)


def _positive_or_none(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _rope_scaling(text_cfg) -> str | None:
    """The RoPE scaling a config names (transformers 5 keeps it in rope_parameters; older configs in rope_scaling)."""
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(text_cfg, name, None)
        if isinstance(value, dict):
            kind = value.get("rope_type") or value.get("type")
            if kind and kind != "default":
                return str(kind)
    return None


def _meta_model(raw: dict, text_raw: dict, multimodal_type: str | None, **build):
    """`AutoModelForCausalLM.from_config` on the meta device, tied as from_pretrained ties it; a
    config that is no causal LM, or that transformers cannot build, is one clear error.

    A multimodal config is built whole where `AutoModelForCausalLM` itself builds it whole
    (transformers 5 maps gemma3 to Gemma3ForConditionalGeneration, so its vision tower is loaded
    and takes memory), and as its language model elsewhere. Returns (model, built whole).
    `build` goes to from_config (dtype, attn_implementation: estimator/train_trace.py)."""
    import torch
    import transformers

    if multimodal_type is not None:
        try:
            full = _make_config(raw)
        except UnsupportedModelError:
            full = None
        if full is not None and type(full) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
            try:
                with torch.device("meta"):
                    model = transformers.AutoModelForCausalLM.from_config(full, **build)
                model.tie_weights()
                return model, True
            except Exception as err:  # noqa: BLE001
                raise UnsupportedModelError(f"transformers could not build {full.model_type} from this config: {err}") from None
    config = _make_config(text_raw)
    if multimodal_type is not None and getattr(config, "model_type", "") == multimodal_type:
        raise UnsupportedModelError(f"cannot find the language model inside the {multimodal_type} config")
    mapping = transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    encoder_like = type(config) in transformers.MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    if type(config) not in mapping or encoder_like or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{config.model_type} is not a causal language model in transformers "
            "(encoder-only, encoder-decoder and non-text models are not supported; give a decoder-only LLM)"
        )
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, **build)
        # from_pretrained ties the embeddings after loading; from_config on the meta device leaves
        # them as built, so tie here (named_parameters() then yields the shared tensor once).
        model.tie_weights()
    except Exception as err:  # noqa: BLE001
        raise UnsupportedModelError(f"transformers could not build {config.model_type} from this config: {err}") from None
    return model, False


def _layer_stack(model, num_layers: int):
    """(name, ModuleList) of the decoder layers: the list with one entry per hidden layer, or None."""
    import torch

    for name, module in model.named_modules():
        if "vision" in name or "visual" in name:
            continue  # a multimodal model's vision encoder has a layer list of its own
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and name.split(".")[-1] in _LAYER_LIST_NAMES:
            return name, module
    return None


def _layer_index(model, num_layers: int) -> Callable[[str], int | None]:
    """A function from a parameter or module name to its decoder layer (None outside the stack):
    the stack is the ModuleList with one entry per hidden layer."""
    stack = _layer_stack(model, num_layers)
    stack_prefix = stack[0] + "." if stack else None

    def layer_of(name: str) -> int | None:
        if stack_prefix and name.startswith(stack_prefix):
            head = name[len(stack_prefix) :].split(".", 1)[0]
            if head.isdigit():
                return int(head)
        return None

    return layer_of


def _linears(model, layer_of) -> tuple[list[Linear], dict[str, str], set[str]]:
    """Every linear with its role and what bitsandbytes and PEFT do with it; each module's kind;
    the weights bitsandbytes converts (transformers' own skip list and matching rule)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = sorted(set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or []))
    output_embeddings = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output_embeddings), None)
    linears: list[Linear] = []
    module_kind: dict[str, str] = {}
    quantized_weight_names: set[str] = set()
    for name, module in model.named_modules():
        is_conv1d = isinstance(module, Conv1D)
        if isinstance(module, torch.nn.Linear) or is_conv1d:
            in_f, out_f = module.weight.shape if is_conv1d else (module.in_features, module.out_features)
            exact = is_conv1d or type(module) is torch.nn.Linear
            quantized = exact and should_convert_module(name, skip)
            linears.append(
                Linear(
                    name=name,
                    in_features=int(in_f),
                    out_features=int(out_f),
                    bias=getattr(module, "bias", None) is not None,
                    layer=layer_of(name),
                    role=_role(name, output_name, layer_of),
                    bnb_quantized=quantized,
                    peft_all_linear=name != output_name,
                    exact_linear=exact,
                )
            )
            module_kind[name] = "linear"
            if quantized:
                quantized_weight_names.add(name + ".weight")
        elif isinstance(module, torch.nn.Embedding):
            module_kind[name] = "embedding"
        elif "norm" in type(module).__name__.lower():
            module_kind[name] = "norm"
        elif "expert" in type(module).__name__.lower():
            module_kind[name] = "expert"
        elif "router" in type(module).__name__.lower():
            module_kind[name] = "router"
    return linears, module_kind, quantized_weight_names


def _stop_after(module):
    """A hook that ends a meta forward once `module` has returned (the probes need nothing after)."""
    def stop(*_):
        raise _StopForward
    return module.register_forward_hook(stop)


def _run_until(model, layer, length: int = 8, grad: bool = False) -> BaseException | None:
    """Run the meta model on a [1, length] batch (an all-True 4-D mask, used as given) until `layer`
    has returned; what the forward raised on the way, or None. Nothing is allocated."""
    import torch

    handle = _stop_after(layer)
    try:
        with torch.set_grad_enabled(grad):
            model(input_ids=torch.zeros((1, length), dtype=torch.long, device="meta"),
                  attention_mask=torch.ones((1, 1, length, length), dtype=torch.bool, device="meta"), use_cache=False)
    except _StopForward:
        return None
    except Exception as err:  # noqa: BLE001 - the failure is the caller's answer
        return err
    finally:
        handle.remove()
    return None


def _meta_forward_failure(model, params: list[Param], num_layers: int) -> BaseException | None:
    """Run the (PEFT-wrapped or bare) meta model in bf16 until its first MoE layer (the first with a
    3-D parameter) has returned; what it raised on the way, or None."""
    import torch

    moe_layer = min((p.layer for p in params if len(p.shape) == 3 and p.layer is not None), default=0)
    stack = _layer_stack(model.get_base_model() if hasattr(model, "get_base_model") else model, num_layers)
    if stack is None:
        return None
    model.to(torch.bfloat16)
    return _run_until(model, stack[1][moe_layer])


def _peft_forward_error(model, wrapped, params: list[Param], num_layers: int) -> str | None:
    """PEFT's failure in the forward, as one line: an error the wrapped model raises in PEFT's own
    code (its innermost frame is in peft/) where the bare model runs the same way cleanly. Errors of
    torch ops that do not run on the meta device (autocast on "meta"…) are not PEFT's."""
    import copy
    import traceback

    if _meta_forward_failure(copy.deepcopy(model), params, num_layers) is not None:
        return None  # the bare model does not run on meta: nothing to compare with
    err = _meta_forward_failure(wrapped, params, num_layers)
    if err is None:
        return None
    innermost = traceback.extract_tb(err.__traceback__)[-1].filename.replace("\\", "/")
    if "/peft/" not in innermost:
        return None
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def _peft_all_linear(model, linears: list[Linear], params: list[Param],
                     num_layers: int = 0) -> tuple[list[Linear], tuple[ParamAdapter, ...], str | None]:
    """What PEFT's all-linear adapts, where PEFT's own answer differs from the rule in `_linears`:
    for MoE models whose layout transformers 5 converted (3-D expert tensors), PEFT 0.21.2
    (`utils/transformers_weight_conversion.py: _convert_peft_config_moe`) turns all-linear into the
    attention linears plus `target_parameters` for the experts and the router, and leaves out every
    MLP linear whose name is an expert's. PEFT itself is run here, on the meta model at rank 1, and
    its adapters are read off: no table of families. Other models keep the rule, which matches
    PEFT on all of them (tests/test_inventory.py checks every catalog model)."""
    if not any(len(p.shape) == 3 for p in params):
        return linears, (), None
    import copy

    import peft

    probe = copy.deepcopy(model)
    config = peft.LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    try:
        wrapped = peft.get_peft_model(probe, config)
    except Exception as err:  # noqa: BLE001 - PEFT refusing the model is not ours to hide, but not fatal here
        raise UnsupportedModelError(f"PEFT {peft.__version__} cannot apply all-linear LoRA to this model: {err}") from None
    adapted: set[str] = set()
    targets: list[ParamAdapter] = []
    prefix = "base_model.model."
    for name, module in wrapped.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        base = name.removeprefix(prefix)
        a, b = lora_a["default"].weight, module.lora_B["default"].weight
        kind = type(module).__name__
        if kind == "ParamWrapper":
            param_name = getattr(module, "parameter_name", None) or base.rsplit(".", 1)[-1]
            owner = base.replace(".base_layer", "")
            targets.append(ParamAdapter(f"{owner}.{param_name}" if not owner.endswith(param_name) else owner,
                                        int(a.shape[1]), int(b.shape[0]), int(a.shape[0])))
        else:
            adapted.add(base)
    linears = [dataclasses.replace(lin, peft_all_linear=lin.name in adapted) for lin in linears]
    return linears, tuple(sorted(targets, key=lambda t: t.name)), _peft_forward_error(model, wrapped, params, num_layers)


def _role(name: str, output_name: str | None, layer_of) -> LinearRole:
    leaf = name.split(".")[-1]
    lower = name.lower()
    if name == output_name:
        return "lm_head"
    if leaf in ("gate", "router", "shared_expert_gate") or "router" in lower:
        return "router"
    if any(h in lower for h in _ATTN_HINTS):
        return "attn_out" if leaf in _OUT_NAMES else "attn_in"
    if any(h in lower for h in _MLP_HINTS) or layer_of(name) is not None:
        return "mlp_out" if leaf in _OUT_NAMES else "mlp_in"
    return "other"


def _params(model, module_kind: dict[str, str], quantized_weights: set[str], layer_of) -> list[Param]:
    params: list[Param] = []
    for pname, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        owner, _, leaf = pname.rpartition(".")
        kind = module_kind.get(owner, "other")
        if kind == "linear" and leaf == "bias":
            kind = "bias"
        elif kind == "other" and "norm" in pname.lower():
            kind = "norm"
        params.append(
            Param(
                name=pname,
                shape=tuple(int(d) for d in p.shape),
                kind=kind,  # type: ignore[arg-type]
                layer=layer_of(pname),
                in_quantized_linear=pname in quantized_weights,
            )
        )
    return params


def _attention_shapes(text_cfg) -> dict[str, int]:
    """The widths the activation and cache terms need, read from the built config."""
    hidden = int(getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "n_embd"))
    heads = int(getattr(text_cfg, "num_attention_heads", None) or getattr(text_cfg, "n_head"))
    kv_heads = getattr(text_cfg, "num_key_value_heads", None)
    if kv_heads is None:
        kv_heads = 1 if getattr(text_cfg, "multi_query", False) and not getattr(text_cfg, "new_decoder_architecture", False) else (
            getattr(text_cfg, "num_kv_heads", None) or heads
        )
    head_dim = getattr(text_cfg, "head_dim", None) or hidden // heads
    kv_lora_rank = getattr(text_cfg, "kv_lora_rank", None)
    qk_rope = getattr(text_cfg, "qk_rope_head_dim", None)
    v_head_dim = getattr(text_cfg, "v_head_dim", None) or head_dim
    if kv_lora_rank and qk_rope:  # MLA: transformers caches decompressed k (nope+rope) and v per head
        kv_head_dim = int(getattr(text_cfg, "qk_nope_head_dim", 0)) + int(qk_rope)
        head_dim = kv_head_dim
    else:
        kv_head_dim = int(head_dim)
    return {"hidden_size": hidden, "vocab_size": int(text_cfg.vocab_size), "num_heads": heads, "num_kv_heads": int(kv_heads),
            "head_dim": int(head_dim), "kv_head_dim": int(kv_head_dim), "v_head_dim": int(v_head_dim)}


def _layer_types(text_cfg, num_layers: int) -> tuple[tuple[str, ...], int | None]:
    """Each layer's attention type and the sliding window, as transformers' cache reads them."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_cfg)
        sliding = layer_kwargs.get("sliding_window")
    except Exception:  # noqa: BLE001
        layer_types, sliding = ["full_attention"] * num_layers, None
    layer_types = tuple(layer_types) + ("full_attention",) * (num_layers - len(layer_types))
    return layer_types[:num_layers], sliding


def _mlp_shape(linears: list[Linear]) -> tuple[int, bool]:
    """(the dense MLP's intermediate width, whether it is gated), from the first dense layer's linears."""
    dense_mlp = [lin for lin in linears if lin.role == "mlp_out" and lin.layer is not None and "expert" not in lin.name]
    intermediate = dense_mlp[0].in_features if dense_mlp else 0
    mlp_in = [lin for lin in linears if lin.role == "mlp_in" and lin.layer == (dense_mlp[0].layer if dense_mlp else -1)]
    gated = len(mlp_in) >= 2 or any(lin.out_features == 2 * intermediate and intermediate for lin in mlp_in)
    return intermediate, gated


def _norms(model, params: list[Param], hidden: int) -> dict:
    """How the norms are built: LayerNorm or RMSNorm, its cast style, how many per layer, sandwich or not."""
    import torch

    norm_params = [p for p in params if p.kind == "norm" and p.layer == 0 and p.name.endswith("weight") and p.shape == (hidden,)]
    norm_layer = any(type(m).__name__ == "LayerNorm" or isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    norm_classes = {type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()}
    if norm_layer:
        norm_style = "layer"
    elif any(name.startswith("Gemma") for name in norm_classes):
        norm_style = "gemma"  # (x.float() normalized) * (1 + weight.float()), then .type_as(x)
    else:
        norm_style = "llama"  # weight * normalized.to(input_dtype)
    return {"norm_kind": "layer" if norm_layer else "rms", "norm_style": norm_style, "norms_per_layer": len(norm_params)}


class _StopForward(Exception):
    """Raised by a hook when the layer a meta probe needed has returned: nothing after it is needed."""


def _block(model, num_layers: int, params: list[Param]) -> dict:
    """The decoder layer's plan as its forward runs it: which norms sit where (before or after the
    attention and the MLP) and whether the MLP reads the attention's input (a parallel block, as
    Cohere's). Layer 0 of the meta model runs on a meta batch, with hooks on the layer's children
    recording which tensor each one reads; nothing is allocated. OLMo-2 has only the two norms after
    its sub-blocks, Gemma 2/3 all four, Llama the two before. A model whose forward does not run on
    the meta device (OPT's decoder reshapes its input itself) falls back to the names: two norms
    before, and Gemma's post_feedforward_layernorm meaning norms after as well."""
    import torch

    names = {p.name.rsplit(".", 2)[-2] for p in params if p.kind == "norm" and p.layer == 0}
    fallback = {"norm_places": (PRE_ATTN, POST_ATTN, PRE_MLP, POST_MLP) if "post_feedforward_layernorm" in names
                else (PRE_ATTN, PRE_MLP), "parallel_block": False}
    stack = _layer_stack(model, num_layers)
    if stack is None:
        return fallback
    layer = stack[1][0]
    # (child, "in"/"out", tensor), in call order; holding the tensors keeps every id unique
    calls: list[tuple[str, str, object]] = []

    def first_tensor(value):
        while isinstance(value, (tuple, list)) and value:
            value = value[0]
        return value if isinstance(value, torch.Tensor) else None

    def before(name):
        def hook(module, args, kwargs):
            calls.append((name, "in", first_tensor(args) if args else first_tensor(kwargs.get("hidden_states"))))
        return hook

    def after(name):
        def hook(module, args, kwargs, output):
            calls.append((name, "out", first_tensor(output)))
        return hook

    handles = []
    kinds = {}
    for name, child in layer.named_children():
        cls = type(child).__name__.lower()
        if "norm" in cls:
            kinds[name] = "norm"
        elif any(h in name.lower() for h in _ATTN_HINTS):
            kinds[name] = "attn"
        elif any(h in name.lower() for h in _MLP_HINTS):
            kinds[name] = "mlp"
        else:
            continue
        handles.append(child.register_forward_pre_hook(before(name), with_kwargs=True))
        handles.append(child.register_forward_hook(after(name), with_kwargs=True))
    try:
        model.to(torch.bfloat16)  # grouped_mm (gpt-oss, MiniMax) takes bf16 only; the later meta traces run it so
        failed = _run_until(model, layer)
    finally:
        for handle in handles:
            handle.remove()
    if failed is not None:  # any failure of the meta forward: the names decide
        return fallback
    produced: dict[int, str] = {}  # id of an output tensor -> the kind of child that produced it
    places: list[str] = []
    attn_in = mlp_in = None
    done: set[str] = set()
    for name, direction, tensor in calls:
        kind = kinds[name]
        if direction == "out":
            if tensor is not None:
                produced[id(tensor)] = kind
            done.add(kind)
            continue
        source = produced.get(id(tensor)) if tensor is not None else None
        if kind == "attn" and attn_in is None:
            attn_in = tensor
        elif kind == "mlp" and mlp_in is None:
            mlp_in = tensor
        elif kind == "norm":
            if source in ("attn", "mlp"):
                places.append(POST_ATTN if source == "attn" else POST_MLP)
            elif "attn" not in done:
                places.append(PRE_ATTN)
            elif "mlp" not in done:
                places.append(PRE_MLP)
    if attn_in is None or mlp_in is None:
        return fallback
    return {"norm_places": tuple(places), "parallel_block": mlp_in is attn_in}


def _with_prequantized(inv: Inventory, raw: dict) -> Inventory:
    """Record a pre-quantized checkpoint's stored bytes per parameter it replaces."""
    from estimator import prequantized

    description = prequantized.describe_quantization(raw)
    if description is None:
        return inv
    inv = dataclasses.replace(inv, quant_method=prequantized.quant_method(raw))
    tensors = prequantized.prequantized_linear_tensors(raw, inv)
    if tensors is None:
        return dataclasses.replace(inv, quantization=description, notes=inv.notes + (description,))
    expert_names = {p.name for p in inv.params if p.kind == "expert"}
    stored: list[tuple[str, int]] = []
    for key, group in tensors.items():
        name = key if key in expert_names else key + ".weight"
        stored.append((name, sum(t.nbytes for t in group)))
    return dataclasses.replace(inv, prequantized=tuple(sorted(stored)), quantization=description, notes=inv.notes + (description,))


def _first_positive_int(cfg, *names: str) -> int:
    """The first of `names` the config sets to a positive int (families name MoE fields differently)."""
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _eager_attention(model, num_layers: int, heads: int, layer_types: tuple[str, ...]) -> dict:
    """What eager attention holds per score (one head, one query, one key), as the model's own
    eager_attention_forward writes it, traced on the meta device in bf16 (estimator/meta_trace.py):
    the peak inside layer 0's attention without grad, and what autograd saves inside it. Three
    sequence lengths give the S² coefficient. Llama's eager keeps an fp32 softmax and its bf16 cast;
    gpt-oss' softmax stays in bf16 (with its sink column). Zeros when it cannot be traced (the
    formula's figures then stand)."""
    from estimator.meta_trace import child_costs, quadratic

    none = {"eager_working_per_score": 0.0, "eager_saved_per_score": 0.0}
    stack = _layer_stack(model, num_layers)
    if stack is None:
        return none
    # the first layer with softmax attention (Qwen3-Next's first is linear attention)
    first = next((i for i, t in enumerate(layer_types) if t != "linear_attention"), 0)
    layer = stack[1][first]
    attn = next((child for name, child in layer.named_children() if any(h in name.lower() for h in _ATTN_HINTS)), None)
    if attn is None:
        return none
    # the last probe to run the meta model, which nothing uses afterwards; the top-level
    # implementation is put back all the same (sub-configs then follow it)
    previous = getattr(model.config, "_attn_implementation", None)

    def run(length: int, grad: bool) -> None:
        failed = _run_until(model, layer, length, grad)
        if failed is not None:
            raise failed

    try:
        model.set_attn_implementation("eager")
        # long enough that the S x S moment is the peak at all three (q, k, v and RoPE grow with S only)
        working, saved = child_costs(run, attn, lengths=(1024, 2048, 4096))
        per_work, per_saved = quadratic(working)[2] / heads, quadratic(saved)[2] / heads
    except Exception:  # noqa: BLE001 - a forward that does not run on meta keeps the formula
        return none
    finally:
        try:
            model.set_attn_implementation(previous)
        except Exception:  # noqa: BLE001
            pass
    if per_work < 1 or per_saved < 1:  # no S x S scores in layer 0 (linear attention): nothing to read
        return none
    return {"eager_working_per_score": round(per_work, 4), "eager_saved_per_score": round(per_saved, 4)}


def _linear_attention(model, num_layers: int, hidden: int, layer_types: tuple[str, ...]) -> dict:
    """The first linear-attention layer's attention block (Qwen3-Next's gated delta net) run on the
    meta device without a cache (estimator/meta_trace.py): its prefill working set per token, as
    the reference PyTorch path transformers falls back to without flash-linear-attention writes
    it (the chunked delta rule's chunks and their decay masks). 0 when the model has no such layer
    or its forward does not run on meta."""
    from estimator.meta_trace import forward_bytes

    none = {"linear_attention_bytes_per_token": 0.0}
    first = next((i for i, t in enumerate(layer_types) if t == "linear_attention"), None)
    stack = _layer_stack(model, num_layers)
    if first is None or stack is None:
        return none
    block = next((child for name, child in stack[1][first].named_children() if "linear_attn" in name), None)
    if block is None:
        return none
    try:
        traced = forward_bytes(block, hidden, tokens=(1024, 2048))  # whole chunks of the delta rule (64)
    except Exception:  # noqa: BLE001 - a block that does not run on meta keeps the formula
        return none
    return {"linear_attention_bytes_per_token": round(traced.per_token, 4)}


def _moe_forward(model, num_layers: int, hidden: int, moe: MoE | None, params: list[Param]) -> MoE | None:
    """The first MoE layer's MoE block run on the meta device (estimator/meta_trace.py): its working
    set as transformers writes it. grouped_mm's path holds each token's top-k copies, sorted, with
    out-of-place masks and fp32 routing products; Llama 4's block runs every expert over every token.
    The block is the layer's child that holds the experts' parameters (kind "expert", as `_params`
    reads them). A forward that fails on meta
    leaves the fields 0 (the top-k formula then stands)."""
    if moe is None:
        return None
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        rules = get_checkpoint_conversion_mapping(model.config.get_text_config().model_type) or []
        converted = any(type(op).__name__ == "MergeModulelist" for rule in rules for op in getattr(rule, "operations", ()))
    except Exception:  # noqa: BLE001 - an older transformers without the mapping converts nothing
        converted = False
    moe = dataclasses.replace(moe, converted_at_load=converted)
    stack = _layer_stack(model, num_layers)
    if stack is None:
        return moe
    first = moe.layers[0]
    prefix = f"{stack[0]}.{first}."
    expert_names = [p.name[len(prefix):] for p in params if p.kind == "expert" and p.name.startswith(prefix)]
    children = dict(stack[1][first].named_children())
    owners = {name.split(".", 1)[0] for name in expert_names}
    if len(owners) != 1 or next(iter(owners)) not in children:
        return moe
    block = children[next(iter(owners))]  # the layer's child that holds the experts (mlp, feed_forward, block_sparse_moe…)
    from estimator.meta_trace import trace_block

    try:
        traced, program = trace_block(block, hidden)
    except Exception:  # noqa: BLE001 - a block that does not run on meta keeps the formula
        return moe
    moe = dataclasses.replace(moe, forward_bytes_per_token=traced.per_token, forward_fixed_bytes=traced.fixed)
    if program is not None:  # else the written stream keeps the dense MLP's shapes
        moe = dataclasses.replace(moe, prefill_program=program[0], prefill_output=program[1])
    # generate()'s decode on a GPU: every grouped_mm becomes batched_mm (generation/utils.py,
    # _optimize_model_for_decode), traced at decode's few tokens
    implementations = model.get_experts_implementation() if hasattr(model, "get_experts_implementation") else {}
    if "grouped_mm" not in (implementations or {}).values():
        return moe
    try:
        model.set_experts_implementation({k: "batched_mm" if v == "grouped_mm" else v for k, v in implementations.items()})
        decode, program = trace_block(block, hidden, tokens=(4, 8))
        moe = dataclasses.replace(moe, decode_bytes_per_token=decode.per_token, decode_fixed_bytes=decode.fixed)
        if program is not None:
            moe = dataclasses.replace(moe, decode_program=program[0], decode_output=program[1])
    except Exception:  # noqa: BLE001 - what was not traced keeps the prefill's implementation
        pass
    finally:
        model.set_experts_implementation(implementations)
    return moe


def _moe(cfg, params: list[Param], num_layers: int) -> MoE | None:
    experts = [p for p in params if p.kind == "expert" and p.layer is not None]
    if not experts:
        return None
    num = _first_positive_int(cfg, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    top_k = _first_positive_int(cfg, "num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")
    width = _first_positive_int(cfg, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
    shared = getattr(cfg, "shared_expert_intermediate_size", None) or 0
    n_shared = getattr(cfg, "n_shared_experts", None) or 0
    if not shared and n_shared:
        shared = n_shared * width
    layers = tuple(sorted({p.layer for p in experts if p.layer is not None}))
    return MoE(num_experts=num, top_k=top_k, expert_intermediate_size=width, shared_intermediate_size=int(shared), layers=layers)

"""A case's `config_overrides`: the catalog config changed before the checkpoint is built, and the
same change before the estimator sees it (issue 13: "measure configs with fewer layers, the same
layer shapes otherwise, and say so in the case").

    config_overrides: {num_hidden_layers: 4}            # Qwen3-30B-A3B with 4 of its 48 layers
    config_overrides: {quantization_config: null}       # gpt-oss: the bf16 (dequantized) path

Rules, in this order:
- A key names a field of the config, or of its `text_config` where the config keeps its language
  model there (Gemma 3, Llama 4): a key the text config has, or a layer count, goes there.
  `vision_config.num_hidden_layers` (a dotted key) names a sub-config explicitly.
- `null` removes a key (a checkpoint's `quantization_config`: the random checkpoint is bf16).
- A key must already be in the config or be a field transformers' config class has (so a typo is
  refused, not silently ignored).
- A new `num_hidden_layers` n carries the per-layer fields with it, unless the overrides give them:
  lists with one entry per layer (`layer_types`, `no_rope_layers`) keep their first n entries, and
  lists of layer indices (`mlp_only_layers`, `moe_layers`) keep the indices below n. Scalars that
  place layer kinds (`first_k_dense_replace`, `interleave_moe_layer_step`, `full_attention_interval`,
  `decoder_sparse_step`, `sliding_window_pattern`) are left as they are: choose them in the case.
- The reduced model is then built on the meta device beside the full one, and every decoder layer
  is reduced to its kind: its parameters' names and shapes, plus its entries in the per-layer lists
  of the config as transformers completes it (attention type, RoPE or none). The reduced model must
  keep exactly the full model's kinds, every one of them: fewer layers, the same layers otherwise.

Every failure is a `ValueError` whose message is one line saying what to change.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any, Mapping

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")
# Lists of layer indices (not one entry per layer): kept below the new count.
INDEX_LIST_KEYS = ("mlp_only_layers", "moe_layers")

# Short labels for a case id's suffix; other keys are named by themselves without underscores.
_ID_LABELS = {"num_hidden_layers": "L", "n_layer": "L", "quantization_config": "quant",
              "first_k_dense_replace": "dense", "no_rope_layers": "nope", "layer_types": "types",
              "vision_config.num_hidden_layers": "VL"}


def check_shape(overrides: Any, where: str = "config_overrides") -> dict:
    """The cheap checks, at case load: a mapping of field names to values, layer counts positive ints."""
    if not isinstance(overrides, Mapping) or not overrides:
        raise ValueError(f"{where}: expected a non-empty mapping of config fields to values, e.g. {{num_hidden_layers: 4}}")
    out = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", key):
            raise ValueError(f"{where}: {key!r} is not a config field name (one name, or sub_config.name)")
        if key.rsplit(".", 1)[-1] in LAYER_COUNT_KEYS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {key} must be a positive int, not {value!r}")
        out[key] = value
    return out


def id_suffix(overrides: Mapping) -> str:
    """What a case id says about its overrides: `L4`, `L4-noquant`, …, in the mapping's order."""
    parts = []
    for key, value in overrides.items():
        label = _ID_LABELS.get(key, key.replace("_", "").replace(".", "-"))
        if value is None:
            parts.append(f"no{label}")
        elif isinstance(value, (bool, int, float, str)):
            parts.append(f"{label}{str(value).lower()}")
        elif isinstance(value, list) and len(value) <= 8 and all(isinstance(v, int) for v in value):
            parts.append(label + "".join(str(v) for v in value))
        else:  # a longer list or a mapping: named by a short digest of its JSON
            parts.append(label + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6])
    return "-".join(parts)


def _target(config: dict, key: str) -> tuple[dict, str, str]:
    """(the dict the key lives in, the field name, where it is, for messages)."""
    if "." in key:
        sub, name = key.split(".", 1)
        if not isinstance(config.get(sub), dict):
            raise ValueError(f"config_overrides: {key}: the config has no {sub} mapping")
        return config[sub], name, sub
    text = config.get("text_config")
    if isinstance(text, dict) and (key in text or (key in LAYER_COUNT_KEYS and key not in config)):
        return text, key, "text_config"
    if isinstance(text, dict) and key not in config and _config_class_has(text, key):
        return text, key, "text_config"
    return config, key, "config"


def _config_class_has(raw: dict, key: str) -> bool:
    """Whether transformers' config class for `raw` has the field `key` (a default or a derived one)."""
    import transformers

    model_type = raw.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        return False
    try:
        built = transformers.CONFIG_MAPPING[model_type](**{k: v for k, v in raw.items() if k != "model_type"})
    except Exception:  # noqa: BLE001 - a config that cannot be built is refused later, with its reason
        return False
    return hasattr(built, key)


def apply_overrides(config: dict, overrides: Mapping | None) -> dict:
    """A copy of `config` with the overrides applied by the rules above (no building, no checks of
    layer kinds: `reduced_config` does both)."""
    config = copy.deepcopy(config)
    if not overrides:
        return config
    overrides = check_shape(overrides)
    for key, value in overrides.items():
        target, name, where = _target(config, key)
        if value is None:
            if name not in target:
                raise ValueError(f"config_overrides: {key}: null removes a field, and the {where} has no {name!r}")
            del target[name]
            continue
        if name not in target and not _config_class_has(target, name):
            raise ValueError(f"config_overrides: {key!r} is not a field of the {where} ({target.get('model_type', '?')}); check its spelling")
        old = target.get(name)
        target[name] = copy.deepcopy(value)
        if name in LAYER_COUNT_KEYS and isinstance(old, int):
            if value > old:
                raise ValueError(f"config_overrides: {key}={value} is more than the model's {old} layers; give fewer")
            given = {k.rsplit(".", 1)[-1] for k in overrides}
            for field, entries in list(target.items()):
                if field in given:
                    continue
                if isinstance(entries, list) and len(entries) == old:
                    target[field] = entries[:value]
                elif field in INDEX_LIST_KEYS and isinstance(entries, list):
                    target[field] = [i for i in entries if isinstance(i, int) and i < value]
    return config


def _meta_model(raw: dict):
    import torch
    import transformers

    with torch.device("meta"):
        config = transformers.AutoConfig.for_model(**raw)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model, config


def layer_kinds(raw: dict) -> list[tuple]:
    """Each decoder layer of `raw`, built on the meta device, as its kind: the names and shapes of
    its parameters, and its entries in the per-layer lists of the completed text config."""
    model, config = _meta_model(raw)
    text = config.get_text_config()
    count = int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0))
    # Index lists (moe_layers) show in the parameters; their entries are indices, not kinds.
    per_layer = {k: v for k, v in sorted(vars(text).items())
                 if isinstance(v, list) and len(v) == count and count > 1 and k not in INDEX_LIST_KEYS}
    shapes: list[list] = [[] for _ in range(count)]
    for name, param in model.get_decoder().named_parameters():
        match = re.match(r"(?:.*\.)?(?:layers|h|blocks)\.(\d+)\.(.*)", name)
        if match and int(match.group(1)) < count:
            shapes[int(match.group(1))].append((match.group(2), tuple(param.shape)))
    return [(tuple(sorted(shapes[i])), tuple((k, str(v[i])) for k, v in per_layer.items())) for i in range(count)]


def _describe(kind: tuple) -> str:
    params, lists = kind
    names = sorted({p[0].split(".")[0] + "." + p[0].split(".")[1] if "." in p[0] else p[0] for p in params})
    tags = ", ".join(f"{k}={v}" for k, v in lists)
    return (tags + "; " if tags else "") + ", ".join(names)[:120]


def reduced_config(config: dict, overrides: Mapping | None) -> dict:
    """`apply_overrides`, then the check that the reduced model keeps every layer kind of the full one
    and no other (only when the overrides change a layer count). ValueError with one line otherwise."""
    reduced = apply_overrides(config, overrides)
    if not overrides or not any(k.rsplit(".", 1)[-1] in LAYER_COUNT_KEYS and "." not in k for k in overrides):
        return reduced
    reference = apply_overrides(config, {k: v for k, v in overrides.items() if k.rsplit(".", 1)[-1] not in LAYER_COUNT_KEYS
                                         and k not in _LAYER_PLACEMENT_KEYS})
    try:
        want, got = layer_kinds(reference), layer_kinds(reduced)
    except Exception as err:  # noqa: BLE001 - transformers refusing the reduced config
        raise ValueError(f"config_overrides {dict(overrides)}: transformers cannot build the reduced config: "
                         f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    missing = [k for k in dict.fromkeys(want) if k not in got]
    extra = [k for k in dict.fromkeys(got) if k not in want]
    if missing:
        raise ValueError(f"config_overrides {dict(overrides)}: the reduced model drops {len(missing)} of the model's "
                         f"{len(set(want))} layer kinds (first: {_describe(missing[0])}); keep more layers or place them "
                         "(layer_types, first_k_dense_replace, no_rope_layers)")
    if extra:
        raise ValueError(f"config_overrides {dict(overrides)}: the reduced model has a layer the full model lacks "
                         f"({_describe(extra[0])}); the layers must keep their shapes")
    return reduced


# Keys that only place the layer kinds (which layers are dense, NoPE, full attention): a reduction
# may choose them, and the reference model keeps the model's own.
_LAYER_PLACEMENT_KEYS = ("layer_types", "no_rope_layers", "first_k_dense_replace", "mlp_only_layers", "moe_layers",
                         "interleave_moe_layer_step", "full_attention_interval", "decoder_sparse_step",
                         "moe_layer_freq", "sliding_window_pattern")

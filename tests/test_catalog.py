"""The offline catalog: it loads, covers the families we promise, and every entry builds.

Each entry is built on the meta device exactly as the estimator's inventory would see it, and
where the catalog records a published parameter count, the build must reproduce it exactly.
No test here touches the network.
"""

from __future__ import annotations

import functools
import json
import shutil
import warnings
from pathlib import Path

import pytest
import yaml

from estimator.catalog import CATALOG_PATH, CONFIGS_DIR, CatalogEntry, find_entry, load_catalog

CATALOG = load_catalog()
WITH_COUNT = [e for e in CATALOG if e.published_params is not None]

# The families the catalog promises, by Hub repo id. Where only an -Instruct/-it file could be
# found, that repo stands for its family (see the entry's note).
REQUIRED_REPOS = [
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-hf",
    "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Meta-Llama-3-70B",
    "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.1-405B",
    "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B",
    "meta-llama/Llama-3.3-70B-Instruct",
    "mistralai/Mistral-7B-v0.1",
    "mistralai/Mistral-7B-v0.3",
    "mistralai/Mistral-Nemo-Base-2407",
    "mistralai/Mixtral-8x7B-v0.1",
    "Qwen/Qwen2.5-0.5B",
    "Qwen/Qwen2.5-3B",
    "Qwen/Qwen2.5-7B",
    "Qwen/Qwen2.5-14B",
    "Qwen/Qwen2.5-32B",
    "Qwen/Qwen2.5-72B",
    "Qwen/Qwen3-0.6B",
    "Qwen/Qwen3-4B",
    "Qwen/Qwen3-8B",
    "Qwen/Qwen3-30B-A3B",
    "google/gemma-2-2b-it",
    "google/gemma-2-9b-it",
    "google/gemma-2-27b-it",
    "google/gemma-3-1b-it",
    "google/gemma-3-4b-it",
    "microsoft/Phi-3-mini-4k-instruct",
    "microsoft/Phi-3.5-mini-instruct",
    "microsoft/phi-4",
    "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-ai/DeepSeek-R1",
    "openai-community/gpt2",
    "openai-community/gpt2-medium",
    "openai-community/gpt2-large",
    "openai-community/gpt2-xl",
    "facebook/opt-1.3b",
    "Qwen/Qwen1.5-MoE-A2.7B-Chat",
    "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    # Issue 13: the models people run now.
    "allenai/OLMo-2-1124-7B",
    "allenai/OLMo-2-1124-13B",
    "HuggingFaceTB/SmolLM3-3B",
    "google/gemma-3-27b-it",
    "Qwen/Qwen3-235B-A22B",
    "Qwen/Qwen3-Next-80B-A3B-Thinking",
    "openai/gpt-oss-20b",
    "openai/gpt-oss-120b",
    "THUDM/glm-4-9b-chat-hf",
    "microsoft/Phi-4-mini-instruct",
    "meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
    "deepseek-ai/DeepSeek-V3",
    "meta-llama/Llama-3.2-1B-Instruct",
    "meta-llama/Llama-3.2-3B-Instruct",
    "mistralai/Mistral-Small-24B-Instruct-2501",
    "ibm-granite/granite-3.3-8b-instruct",
]


@functools.lru_cache(maxsize=None)
def _meta_build(name: str) -> tuple[str, int]:
    """Build an entry's model on the meta device; return its class name and parameter count.

    ``AutoConfig.for_model(**raw)`` then ``AutoModelForCausalLM.from_config`` under
    ``torch.device("meta")``: every parameter is created on the meta device, as under
    ``accelerate.init_empty_weights()`` (which gives the same counts but took 259 s for Llama 4
    Maverick's 128 experts against half a second here). A meta build can leave tied embeddings
    untied (the head gets its own meta Parameter), so ``tie_weights()`` is called explicitly: the
    count must see one shared Parameter, as a real checkpoint does. ``model.parameters()`` then
    yields it once.
    """
    import torch
    import transformers

    entry = find_entry(name)
    assert entry is not None
    raw = entry.config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(**raw)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.tie_weights()
    params = sum(p.numel() for p in model.parameters())
    return type(model).__name__, params


# --------------------------------------------------------------------------- the catalog itself


def test_catalog_loads_with_enough_entries():
    assert len(CATALOG) >= 80
    assert all(isinstance(e, CatalogEntry) for e in CATALOG)


def test_required_families_are_present():
    repos = {e.repo for e in CATALOG}
    missing = [r for r in REQUIRED_REPOS if r not in repos]
    assert not missing, f"catalog lacks {missing}"


def test_at_least_twelve_entries_carry_a_published_count():
    assert len(WITH_COUNT) >= 12


def test_every_config_file_belongs_to_an_entry():
    listed = {e.file for e in CATALOG}
    on_disk = {p.name for p in CONFIGS_DIR.glob("*.json")}
    assert on_disk == listed


@pytest.mark.parametrize("entry", CATALOG, ids=lambda e: e.name)
def test_entry_cites_its_sources(entry: CatalogEntry):
    assert entry.source == f"https://huggingface.co/{entry.repo}/blob/main/config.json"
    assert entry.copy_from.startswith("https://")
    if entry.published_params is not None:
        assert entry.published_params_source and entry.published_params_source.startswith("https://")
    if entry.reconstructed:
        assert entry.note


@pytest.mark.parametrize("entry", CATALOG, ids=lambda e: e.name)
def test_entry_config_is_a_json_object_with_a_model_type(entry: CatalogEntry):
    raw = entry.config()
    assert isinstance(raw, dict)
    assert isinstance(raw.get("model_type"), str)
    assert raw.get("architectures"), "every catalog config names its architecture"
    raw["model_type"] = "mutated"  # config() hands out a copy
    assert entry.config()["model_type"] != "mutated"


# --------------------------------------------------------------------------- building on meta


@pytest.mark.slow
@pytest.mark.parametrize("entry", CATALOG, ids=lambda e: e.name)
def test_entry_builds_on_meta(entry: CatalogEntry):
    cls_name, params = _meta_build(entry.name)
    assert params > 0
    assert cls_name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))


@pytest.mark.slow
@pytest.mark.parametrize("entry", WITH_COUNT, ids=lambda e: e.name)
def test_meta_build_matches_published_count(entry: CatalogEntry):
    _, params = _meta_build(entry.name)
    assert params == entry.published_params, (
        f"{entry.name}: meta build has {params:_} parameters, "
        f"{entry.published_params_source} publishes {entry.published_params:_}"
    )


# --------------------------------------------------------------------------- find_entry


@pytest.mark.parametrize(
    "query",
    [
        "Llama-3.1-8B",
        "llama-3.1-8b",
        "meta-llama/Llama-3.1-8B",
        "META-LLAMA/llama-3.1-8b",
        "meta-llama/Llama-3.1-8B/",
        "https://huggingface.co/meta-llama/Llama-3.1-8B",
        "https://huggingface.co/meta-llama/Llama-3.1-8B/",
        "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json",
        "  Llama-3.1-8B  ",
    ],
)
def test_find_entry_matches_name_repo_and_url(query: str):
    entry = find_entry(query)
    assert entry is not None
    assert entry.repo == "meta-llama/Llama-3.1-8B"


@pytest.mark.parametrize("query", ["", "   ", "no-such-model", "meta-llama/Llama-9-1T", "https://huggingface.co/"])
def test_find_entry_returns_none_for_unknown(query: str):
    assert find_entry(query) is None


# --------------------------------------------------------------------------- validation


def _good_entry() -> dict:
    return {
        "name": "Tiny",
        "repo": "org/tiny",
        "file": "org--tiny.json",
        "source": "https://huggingface.co/org/tiny/blob/main/config.json",
        "copy_from": "https://github.com/org/repo/blob/0000000/config.json",
        "gated": False,
    }


def _write_catalog(tmp_path: Path, entries: list) -> Path:
    (tmp_path / "configs").mkdir()
    shutil.copy(CONFIGS_DIR / "openai-community--gpt2.json", tmp_path / "configs" / "org--tiny.json")
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def test_a_good_temporary_catalog_loads(tmp_path: Path):
    path = _write_catalog(tmp_path, [_good_entry()])
    (entry,) = load_catalog(path)
    assert entry.config()["model_type"] == "gpt2"
    assert find_entry("org/tiny", path) == entry


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda e: e.pop("repo"), "repo"),
        (lambda e: e.pop("copy_from"), "copy_from"),
        (lambda e: e.update(gated="yes"), "gated"),
        (lambda e: e.update(published_params="8B", published_params_source="https://example.org"), "published_params"),
        (lambda e: e.update(published_params=True, published_params_source="https://example.org"), "published_params"),
        (lambda e: e.update(published_params=123), "published_params_source"),
        (lambda e: e.update(colour="red"), "colour"),
        (lambda e: e.update(file="org--missing.json"), "file"),
        (lambda e: e.update(source="huggingface.co/org/tiny"), "source"),
        (lambda e: e.update(reconstructed=True), "note"),
    ],
)
def test_a_malformed_entry_raises_naming_the_field(tmp_path: Path, mutate, field: str):
    entry = _good_entry()
    mutate(entry)
    path = _write_catalog(tmp_path, [entry])
    with pytest.raises(ValueError, match=rf"'{field}'") as info:
        load_catalog(path)
    assert "catalog entry 0" in str(info.value)


@pytest.mark.parametrize("field", ["name", "repo"])
def test_a_duplicate_raises_naming_the_entry_and_field(tmp_path: Path, field: str):
    first, second = _good_entry(), _good_entry()
    second["name" if field == "repo" else "repo"] = "Other" if field == "repo" else "org/other"
    second[field] = second[field].upper()  # duplicates are found case-insensitively
    path = _write_catalog(tmp_path, [first, second])
    with pytest.raises(ValueError, match=rf"catalog entry 1 .*'{field}' duplicates entry 0"):
        load_catalog(path)


def test_a_catalog_that_is_not_a_list_raises(tmp_path: Path):
    path = _write_catalog(tmp_path, [])
    path.write_text("name: Tiny\n")
    with pytest.raises(ValueError, match="list"):
        load_catalog(path)


def test_the_shipped_catalog_file_is_the_default():
    assert load_catalog(CATALOG_PATH) is load_catalog()
    assert json.loads((CONFIGS_DIR / CATALOG[0].file).read_text()) == CATALOG[0].config()

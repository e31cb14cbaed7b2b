"""Inventories built from several threads at once, as Streamlit runs sessions: same answers, torch left as found.

accelerate's `init_empty_weights` patches `nn.Module.register_parameter` for the whole process and
restores whatever it found on entry, so two overlapping builds can count a tied embedding twice
and leave the patch behind (every later `nn.Linear` on the meta device). transformers'
`local_torch_dtype` does the same with the default dtype. The configs here are small, varied and
have tied embeddings (the count that went wrong), and none is in the prebuilt store.
"""

from __future__ import annotations

import threading

import pytest

from estimator import inventory as inventory_module
from estimator.inventory import build_inventory, inventory_from_config

THREADS = 12


def _llama(i: int) -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32 + 16 * (i % 3), "intermediate_size": 64 + 8 * i,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1 + i % 3, "vocab_size": 300 + 7 * i,
        "max_position_embeddings": 256, "tie_word_embeddings": True, "torch_dtype": ["bfloat16", "float16", "float32"][i % 3],
    }


def _gpt2(i: int) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32 + 16 * (i % 2), "n_head": 4, "n_layer": 1 + i % 2,
        "vocab_size": 400 + 11 * i, "n_positions": 128, "torch_dtype": ["float16", "bfloat16"][i % 2],
    }


CONFIGS = [(_llama if i % 2 == 0 else _gpt2)(i) for i in range(THREADS)]


def _concurrent(configs: list[dict]) -> list:
    barrier = threading.Barrier(len(configs))
    results: list = [None] * len(configs)

    def work(k: int) -> None:
        barrier.wait()
        try:
            results[k] = inventory_from_config(configs[k])
        except BaseException as err:  # noqa: BLE001 - reported below
            results[k] = err

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


@pytest.mark.slow
def test_concurrent_builds_equal_serial_builds_and_leave_torch_as_found():
    import torch

    serial = [build_inventory(c) for c in CONFIGS]
    dtype_before = torch.get_default_dtype()
    register_before = torch.nn.Module.register_parameter
    for _ in range(3):  # the race needs the builds to overlap; a few rounds make that near certain
        inventory_module._build_cached.cache_clear()
        got = _concurrent(CONFIGS)
        for k, (want, have) in enumerate(zip(serial, got)):
            assert not isinstance(have, BaseException), (k, have)
            assert have.params_total == want.params_total, (k, have.params_total, want.params_total)
            assert have == want, k
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    assert torch.nn.Module.register_parameter is register_before
    assert torch.get_default_dtype() == dtype_before
    assert torch.empty(1).device.type == "cpu"

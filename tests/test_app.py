"""The app through Streamlit's AppTest (widgets found by key=), and app_support directly.

No test touches the network: HF_HUB_OFFLINE=1 everywhere, except the gated-model tests, which talk
to the fake Hub on 127.0.0.1 (tests/fake_hub.py) and to a closed local port for "no network".
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import app_support as S
from page_state import url as U
from page_state import values as P
import gpu_db
from estimator import Job, estimate
from estimator import fit as fitting
from estimator import present
from estimator.catalog import find_entry
from estimator.fit import Strategy
from estimator.sources import ModelConfig, ModelSourceError
from fake_hub import offline_hub_env

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")

BERT = {
    "architectures": ["BertForMaskedLM"],
    "model_type": "bert",
    "hidden_size": 768,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "intermediate_size": 3072,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    offline_hub_env(monkeypatch, tmp_path)


def app(**params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = str(value)
    return at.run()


ICONS = {"fits": ":green[:material/check_circle:]", "tight": ":orange[:material/warning:]", "needs": ":orange[:material/group_work:]",
         "no": ":red[:material/block:]"}


def headline(at: AppTest) -> str:
    """The headline as "<status>: <sentence>", status being fits, needs or no (from its icon)."""
    heads = [m.value for m in at.markdown if m.value.startswith("### ")]
    assert heads, "no headline"
    for status, icon in ICONS.items():
        if heads[0].startswith(f"### {icon} "):
            return f"{status}: " + heads[0][len(f"### {icon} "):]
    raise AssertionError(f"a headline without a status icon: {heads[0]!r}")


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def frame(at: AppTest, column: str):
    """The first dataframe on the page with this column (AppTest does not expose a dataframe's key)."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no dataframe with a {column!r} column")


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, errors(at)


def model(name: str) -> S.Model:
    entry = find_entry(name)
    return S.model_from_source(ModelConfig(entry.config(), name=entry.name, origin="catalog", source=entry.source))


# -------------------------------------------------------------------------------------------------
# The page
# -------------------------------------------------------------------------------------------------
def test_default_page_answers_first():
    at = app()
    assert_clean(at)
    expected = fitting.fit(estimate(model("Llama-3.1-8B").inventory, Job()), gpu_db.find_gpu("H100 SXM 80GB"))
    assert expected.gpus_needed == 1
    assert headline(at) == "fits: " + present.describe_fit(expected)[0]  # "Fits on 1 × H100 SXM 80GB: x of 79.6 GiB"
    assert at.selectbox(key="model").value == "Llama-3.1-8B"
    assert at.selectbox(key="gpu").value == "H100 SXM 80GB"
    assert [c.key for c in at.get("plotly_chart")] == ["breakdown_chart", "memory_plot"]
    grid = frame(at, "mixed (AMP)")
    assert list(grid.columns) == list(S.GRID_COLUMNS)
    assert grid.loc["inference", "16-bit"] == f"▶ 1 · {expected.per_gpu.device_total_bytes / 1024**3:.1f} GiB"
    table = frame(at, "GPUs needed")
    assert table.iloc[0]["GPUs needed"] == 1 and "H100 SXM 80GB" in set(table["GPU"])
    labels = [m.label for m in at.metric]
    assert "Largest batch" in labels and any(label.startswith("Longest prompt") for label in labels)
    assert at.download_button(key="download_csv").label == "Breakdown as CSV"
    assert at.download_button(key="download_json").label == "Estimate as JSON"
    # Only the inference knobs are shown
    assert at.number_input(key="prompt_len").value == 512
    with pytest.raises(KeyError):
        at.number_input(key="seq_len")
    with pytest.raises(KeyError):
        at.selectbox(key="optimizer")


JOB_DTYPES = (
    [("inference", "weights", w) for w in ("fp32", "bf16", "fp16", "int8", "nf4", "fp4")]
    + [("full", "precision", p) for p in ("amp_bf16", "amp_fp16", "bf16", "fp16", "fp32")]
    + [("lora", "base_dtype", d) for d in ("bf16", "fp16", "fp32")]
    + [("qlora", "quant", q) for q in ("nf4", "fp4")]
)


@pytest.mark.parametrize("mode,field,value", JOB_DTYPES, ids=[f"{m}-{v}" for m, _, v in JOB_DTYPES])
def test_every_job_and_dtype_renders(mode, field, value):
    at = app()
    at.radio(key="mode").set_value(mode).run()
    at.selectbox(key=field).set_value(value).run()
    assert_clean(at)
    text = headline(at)
    assert "GiB" in text or "Does not" in text
    assert at.query_params["mode"] == mode and at.query_params[field] == value
    assert [c.key for c in at.get("plotly_chart")] == ["breakdown_chart", "memory_plot"]
    relevant = set(Job(mode=mode).relevant_fields())
    for name in ("seq_len", "prompt_len", "lora_r", "optimizer", "weights", "precision", "quant"):
        shown = any(w.key == name for w in list(at.number_input) + list(at.selectbox))
        assert shown == (name in relevant), name


def test_the_sft_knob_reaches_the_estimate_and_the_link():
    at = app()
    at.radio(key="mode").set_value("lora").run()
    before = headline(at)
    at.checkbox(key="sft").check().run()
    assert_clean(at)
    assert headline(at) != before and at.query_params["sft"] == "true"
    again = app(**{k: v for k, v in at.query_params.items()})
    assert again.checkbox(key="sft").value is True and headline(again) == headline(at)


def test_accumulation_loss_and_trainer_knobs_reach_the_estimate_and_the_link():
    at = app()
    at.radio(key="mode").set_value("full").run()
    before = headline(at)
    at.number_input(key="gradient_accumulation_steps").set_value(4).run()
    at.selectbox(key="loss").set_value("liger").run()
    at.checkbox(key="trainer").check().run()
    assert_clean(at)
    assert headline(at) != before
    assert (at.query_params["gradient_accumulation_steps"], at.query_params["loss"], at.query_params["trainer"]) == ("4", "liger", "true")
    again = app(**{k: v for k, v in at.query_params.items()})
    assert again.number_input(key="gradient_accumulation_steps").value == 4 and again.checkbox(key="trainer").value is True
    assert headline(again) == headline(at)
    at.radio(key="mode").set_value("inference").run()
    assert not any(w.key == "gradient_accumulation_steps" for w in at.number_input)


def test_mode_switch_shows_only_relevant_knobs_and_keeps_hidden_values():
    at = app()
    at.number_input(key="prompt_len").set_value(1000).run()
    at.radio(key="mode").set_value("qlora").run()
    assert_clean(at)
    assert at.number_input(key="lora_r").value == 16
    assert at.selectbox(key="quant").value == "nf4"
    assert at.checkbox(key="double_quant").value is True
    assert at.selectbox(key="strategy").value == "zero3"  # the training default
    at.radio(key="mode").set_value("inference").run()
    assert at.number_input(key="prompt_len").value == 1000
    assert at.selectbox(key="strategy").value == "pipeline"


def test_batch_size_changes_the_answer():
    at = app()
    before = headline(at)
    at.number_input(key="batch_size").set_value(64).run()
    assert_clean(at)
    assert headline(at) != before
    assert at.query_params["batch_size"] == "64"


def test_gpu_filters_and_picker():
    at = app()
    at.selectbox(key="vendor").set_value("amd").run()
    assert_clean(at)
    options = at.selectbox(key="gpu").options
    amd = {g.name for g in gpu_db.filter_gpus(vendor="amd")}
    assert options and all(any(o.startswith(name + " (") for name in amd) for o in options)
    assert at.selectbox(key="gpu").value in amd  # the H100 was filtered out: the first AMD GPU is picked
    at.selectbox(key="vendor").set_value("any").run()
    at.number_input(key="min_memory_gib").set_value(100.0).run()
    big = {g.name for g in gpu_db.filter_gpus(min_memory_bytes=100 * 1024**3)}
    assert {o.rsplit(" (", 1)[0] for o in at.selectbox(key="gpu").options} == big
    at.number_input(key="min_memory_gib").set_value(0.0).run()
    at.selectbox(key="gpu").set_value("GeForce RTX 4090").run()
    assert_clean(at)
    assert "RTX 4090" in headline(at)
    assert at.query_params["gpu"] == "GeForce RTX 4090"


def test_training_on_a_small_gpu_needs_several_and_a_count_can_be_chosen():
    at = app()
    at.radio(key="mode").set_value("full").run()
    at.selectbox(key="gpu").set_value("A100 SXM 80GB").run()
    assert_clean(at)
    needed = fitting.fit(estimate(model("Llama-3.1-8B").inventory, Job(mode="full")), gpu_db.find_gpu("A100 SXM 80GB")).gpus_needed
    assert 1 < needed < 8
    assert headline(at).startswith(f"needs: Needs {needed} × A100 SXM 80GB with zero3")
    at.selectbox(key="num_gpus").set_value(8).run()
    assert_clean(at)
    assert headline(at).startswith("fits: On 8 × A100 SXM 80GB with zero3:")
    assert any(m.label == "Largest batch" for m in at.metric)
    at.selectbox(key="strategy").set_value("ddp").run()
    assert_clean(at)
    assert "does not fit (no count up to 64 fits)" in headline(at)  # DDP replicates everything: 8B full fine-tuning never fits 80 GB


def test_unsupported_platform_says_why():
    t4 = gpu_db.find_gpu("Tesla T4").name
    at = app(gpu="Tesla T4")  # Turing: no bf16
    assert_clean(at)
    assert at.selectbox(key="gpu").value == t4
    assert headline(at).startswith(f"no: Does not run on {t4}") and "bf16" in headline(at)
    at.selectbox(key="weights").set_value("fp16").run()
    assert_clean(at)
    assert headline(at).startswith(f"needs: Needs 2 × {t4} with pipeline")  # 15 GiB: fp16 8B needs two


def test_accuracy_page():
    at = app()
    at.radio(key="page").set_value("accuracy").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error
    assert len(at.get("plotly_chart")) == 1
    cases = frame(at, "device error %")
    assert len(cases) > 40 and cases["device error %"].abs().median() < 10
    text = "\n".join(m.value for m in at.markdown)
    assert "median |error|" in text and "can-it-run-llm" in text and "gpu_poor" in text
    assert at.query_params["page"] == "accuracy"
    assert at.query_params["batch_size"] == "1"  # the job stays in the link
    at.radio(key="page").set_value("estimate").run()
    assert_clean(at)
    assert at.selectbox(key="gpu").value == "H100 SXM 80GB"


# -------------------------------------------------------------------------------------------------
# Bad input: an error that says what to do, the other inputs unchanged, never an exception
# -------------------------------------------------------------------------------------------------
def test_unknown_hub_model_offline():
    at = app()
    at.number_input(key="batch_size").set_value(3).run()
    at.text_input(key="hub_id").input("no-such-org/no-such-model").run()
    assert not at.exception
    assert len(at.error) == 1 and "no-such-org/no-such-model" in errors(at)[0]
    assert "catalog" in errors(at)[0]  # says what to do instead
    assert at.number_input(key="batch_size").value == 3
    assert at.selectbox(key="model").value == "Llama-3.1-8B"
    at.text_input(key="hub_id").input("").run()  # clearing the box brings the catalog model back
    assert_clean(at)


def test_not_a_model_reference():
    at = app()
    at.text_input(key="hub_id").input("this is not a model").run()
    assert not at.exception
    assert "Hub repo id" in errors(at)[0]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    fake_hub = pytest.importorskip("fake_hub")
    from estimator import hub as hub_module

    with fake_hub.FakeHub() as server:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        hub_module.clear_cache()
        yield server, fake_hub
    hub_module.clear_cache()


def test_gated_model_without_and_with_a_token(fake_hub):
    server, module = fake_hub
    at = app()
    at.number_input(key="batch_size").set_value(2).run()
    at.text_input(key="hub_id").input("acme/gated").run()
    assert not at.exception
    assert len(at.error) == 1
    message = errors(at)[0]
    assert "gated" in message and "token" in message and "https://huggingface.co/acme/gated" in message
    assert at.number_input(key="batch_size").value == 2
    # With a token the Hub is asked with it; the fake Hub never grants this repo, and says so.
    at.text_input(key="hf_token").input(module.VALID_TOKEN).run()
    assert not at.exception
    assert "not been granted access" in errors(at)[0]
    assert any(auth and module.VALID_TOKEN in auth for _, path, auth in server.requests if "acme/gated" in path)
    assert_token_hidden(at, module.VALID_TOKEN)


def test_hub_model_with_a_token(fake_hub):
    server, module = fake_hub
    at = app()
    at.text_input(key="hf_token").input(module.VALID_TOKEN).run()
    at.text_input(key="hub_id").input("https://huggingface.co/acme/good").run()
    assert_clean(at)
    assert "Hugging Face Hub" in " ".join(c.value for c in at.caption)
    assert headline(at).startswith("fits: Fits on 1 × H100 SXM 80GB")
    assert at.query_params["hub"] == "https://huggingface.co/acme/good" and "model" not in at.query_params
    assert_token_hidden(at, module.VALID_TOKEN)


def assert_token_hidden(at: AppTest, token: str) -> None:
    """The token is never in the link or on the page."""
    page = json.dumps(dict(at.query_params)) + " ".join(
        e.value for e in list(at.markdown) + list(at.caption) + list(at.error) + list(at.info) + list(at.warning)
    )
    assert token not in page
    assert not {"token", "hf_token"} & set(at.query_params)


def test_wrong_token_is_not_echoed(fake_hub):
    server, module = fake_hub
    at = app()
    at.text_input(key="hf_token").input(module.INVALID_TOKEN).run()
    at.text_input(key="hub_id").input("acme/good").run()
    assert not at.exception
    assert at.error
    assert_token_hidden(at, module.INVALID_TOKEN)


def test_no_network(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    from estimator import hub as hub_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    hub_module.clear_cache()
    at = app()
    at.text_input(key="hub_id").input("acme/good").run()
    assert not at.exception
    assert len(at.error) == 1 and "acme/good" in errors(at)[0]
    hub_module.clear_cache()


def test_malformed_upload():
    at = app()
    at.file_uploader(key="upload").set_value(("config.json", b"{ not json", "application/json")).run()
    assert not at.exception
    assert len(at.error) == 1 and "not valid JSON" in errors(at)[0] and "upload the model's config.json" in errors(at)[0]
    at.file_uploader(key="upload").set_value(("config.json", json.dumps([1, 2]).encode(), "application/json")).run()
    assert "JSON object" in errors(at)[0]
    at.file_uploader(key="upload").set_value(None).run()
    assert_clean(at)
    assert "Llama-3.1-8B" in " ".join(c.value for c in at.caption)


def test_good_upload_is_used():
    config = find_entry("Qwen3-0.6B").config()
    at = app()
    at.file_uploader(key="upload").set_value(("config.json", json.dumps(config).encode(), "application/json")).run()
    assert_clean(at)
    assert "uploaded config" in " ".join(c.value for c in at.caption)
    assert "upload" not in at.query_params  # an upload cannot travel in a link


def test_non_causal_upload():
    at = app()
    at.number_input(key="batch_size").set_value(5).run()
    at.file_uploader(key="upload").set_value(("config.json", json.dumps(BERT).encode(), "application/json")).run()
    assert not at.exception
    assert len(at.error) == 1 and "not a causal language model" in errors(at)[0]
    assert at.number_input(key="batch_size").value == 5


def test_absurd_sizes_from_a_link_are_refused_and_the_rest_applies():
    at = app(batch_size=10**9, seq_len=-4, mode="full", gpu="A100 SXM 80GB", lora_r="x")
    assert not at.exception
    text = " ".join(errors(at))
    assert "batch_size" in text and "beyond any real job" in text
    assert "seq_len" in text and "at least 1" in text
    assert "lora_r" in text and "whole number" in text
    assert at.number_input(key="batch_size").value == 1
    assert at.number_input(key="seq_len").value == 2048
    assert at.radio(key="mode").value == "full"
    assert at.selectbox(key="gpu").value == "A100 SXM 80GB"


def test_absurd_sizes_are_stopped_by_the_widgets():
    at = app()
    at.number_input(key="batch_size").set_value(10**9).run()  # beyond max_value: the widget keeps its value
    assert not at.exception
    assert at.number_input(key="batch_size").value == 1
    assert at.number_input(key="batch_size").max == P.LIMITS["batch_size"]
    assert at.number_input(key="prompt_len").max == P.LIMITS["prompt_len"]


def test_bad_lora_targets_and_a_bad_count():
    at = app(mode="lora")
    at.text_input(key="lora_targets").input("all-linear,q_proj").run()
    assert not at.exception
    assert "lora_targets" in errors(at)[0]
    at.text_input(key="lora_targets").input("q_proj,v_proj").run()
    assert_clean(at)
    at = app(mode="inference", strategy="tensor_parallel", num_gpus=3)  # 32 heads: 3 does not divide them
    assert not at.exception
    assert "tensor_parallel cannot use 3 GPUs" in errors(at)[0]


def test_unknown_link_values():
    at = app(model="Not-A-Model", gpu="Voodoo 5", strategy="zero3", token="hf_secret", colour="red")
    assert not at.exception
    text = " ".join(errors(at))
    assert "model=" in text and "gpu=" in text and "strategy=" in text and "token=" in text and "colour=" in text
    assert "hf_secret" not in text
    assert at.selectbox(key="model").value == "Llama-3.1-8B" and at.selectbox(key="strategy").value == "pipeline"
    assert at.text_input(key="hf_token").value == ""


# -------------------------------------------------------------------------------------------------
# The URL
# -------------------------------------------------------------------------------------------------
def test_link_restores_the_view():
    at = app(model="Qwen3-8B", mode="qlora", batch_size=2, seq_len=2048, lora_r=64, lora_alpha=128, quant="fp4",
             double_quant="false", optimizer="paged_adamw_8bit", gradient_checkpointing="true",
             gpu="GeForce RTX 4090", strategy="zero2", num_gpus=2, vendor="nvidia", min_memory_gib=16)
    assert_clean(at)
    assert at.selectbox(key="model").value == "Qwen3-8B"
    assert at.radio(key="mode").value == "qlora"
    assert at.number_input(key="batch_size").value == 2
    assert at.number_input(key="seq_len").value == 2048
    assert at.number_input(key="lora_r").value == 64
    assert at.number_input(key="lora_alpha").value == 128
    assert at.selectbox(key="quant").value == "fp4"
    assert at.checkbox(key="double_quant").value is False
    assert at.selectbox(key="optimizer").value == "paged_adamw_8bit"
    assert at.checkbox(key="gradient_checkpointing").value is True
    assert at.selectbox(key="gpu").value == "GeForce RTX 4090"
    assert at.selectbox(key="strategy").value == "zero2"
    assert at.selectbox(key="num_gpus").value == 2
    assert at.selectbox(key="vendor").value == "nvidia"
    assert at.number_input(key="min_memory_gib").value == 16
    assert "On 2 × GeForce RTX 4090 with zero2" in headline(at)


def test_widgets_write_the_link():
    at = app()
    assert at.query_params["model"] == "Llama-3.1-8B" and at.query_params["mode"] == "inference"
    at.radio(key="mode").set_value("lora").run()
    at.number_input(key="lora_r").set_value(8).run()
    at.number_input(key="lora_dropout").set_value(0.1).run()
    at.checkbox(key="gradient_checkpointing").check().run()
    at.selectbox(key="attn").set_value("eager").run()
    at.text_input(key="hf_token").input("hf_must_not_leak").run()
    q = dict(at.query_params)
    assert q["mode"] == "lora" and q["lora_r"] == "8" and q["lora_dropout"] == "0.1"
    assert q["gradient_checkpointing"] == "true" and q["attn"] == "eager"
    assert "weights" not in q and "prompt_len" not in q  # only the knobs the mode uses
    assert "hf_must_not_leak" not in json.dumps(q)
    # The link round-trips into a new session.
    again = app(**q)
    assert_clean(again)
    assert dict(again.query_params) == q
    assert headline(again) == headline(at)


# -------------------------------------------------------------------------------------------------
# app_support
# -------------------------------------------------------------------------------------------------
def test_parse_upload():
    good = S.parse_upload(json.dumps({"model_type": "llama", "_name_or_path": "me/mine"}).encode(), "config.json")
    assert good.origin == "upload" and good.name == "me/mine"
    assert S.parse_upload(b'\xef\xbb\xbf{"model_type": "gpt2"}', "c.json").config == {"model_type": "gpt2"}  # a BOM
    for data, needle in [
        (b"{ nope", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'{"hidden_size": 4}', "no model_type"),
        ("{}".encode("utf-16"), "not UTF-8"),
        (b" " * (S.MAX_UPLOAD_BYTES + 1), "a config.json is a few KiB"),
        (b"[" * 100_000, "config.json"),
    ]:
        with pytest.raises(ModelSourceError, match=needle):
            S.parse_upload(data, "config.json")


def test_redact():
    assert S.redact("bad token hf_abc for x", "hf_abc") == "bad token *** for x"
    assert S.redact("fine", None) == "fine"


FIT_CASES = [
    ("Llama-3.1-8B", Job(mode="full"), Strategy.ZERO3),
    ("Llama-3.1-8B", Job(mode="full", batch_size=6), Strategy.ZERO3),
    ("Llama-3.1-8B", Job(mode="full", precision="fp32"), Strategy.DDP),
    ("Llama-3.1-8B", Job(mode="qlora", batch_size=8), Strategy.ZERO2),
    ("Llama-3.1-8B", Job(mode="lora", batch_size=2), Strategy.ZERO3_OFFLOAD),
    ("Llama-3.1-8B", Job(), Strategy.PIPELINE),
    ("Llama-3.1-8B", Job(batch_size=64, prompt_len=8192), Strategy.TENSOR_PARALLEL),
    ("Llama-3.1-70B-Instruct", Job(), Strategy.PIPELINE),
    ("Qwen3-0.6B", Job(mode="full", batch_size=4), Strategy.ZERO1),
    ("Mixtral-8x7B-v0.1", Job(weights="nf4"), Strategy.SINGLE),
]


@pytest.mark.parametrize("name,job,strategy", FIT_CASES, ids=[f"{n}-{j.mode.value}-{s.value}" for n, j, s in FIT_CASES])
def test_fast_gpu_counts_equal_the_library(name, job, strategy):
    """fits_for_gpus shares one fit() among GPUs of the same capacity and limits: it must equal which_gpus."""
    m = model(name)
    result = estimate(m.inventory, job)
    gpus = gpu_db.load_gpus()[::4]  # every vendor and size class, a quarter of the database
    ours = S.fits_for_gpus(m, job, gpus, strategy)
    theirs = fitting.which_gpus(result, gpus, strategy)
    assert [(f.gpu_name, f.gpus_needed) for f in ours] == [(f.gpu_name, f.gpus_needed) for f in theirs]
    assert ours == theirs
    gpu = gpu_db.find_gpu("A10")
    for n in (None, 1, 2, 4):
        try:
            expected = fitting.fit(result, gpu, strategy, n)
        except ValueError as err:
            with pytest.raises(ValueError, match=str(err)[:30]):
                S.fit_job(m, job, gpu, strategy, n)
        else:
            assert S.fit_job(m, job, gpu, strategy, n) == expected


@pytest.mark.parametrize("name,job,field_name,gpu", [
    ("Llama-3.1-8B", Job(), "batch_size", "H100 SXM 80GB"),
    ("Llama-3.1-8B", Job(), "prompt_len", "GeForce RTX 4090"),
    ("Llama-3.1-8B", Job(mode="qlora"), "seq_len", "GeForce RTX 4090"),
    ("Llama-3.1-8B", Job(mode="lora", gradient_checkpointing=True), "batch_size", "A100 SXM 80GB"),
    ("Qwen3-0.6B", Job(mode="full"), "seq_len", "L4"),
])
def test_largest_fitting_is_the_edge(name, job, field_name, gpu):
    m = model(name)
    g = gpu_db.find_gpu(gpu)
    limit = S.largest_fitting(m, job, field_name, g.name, Strategy.SINGLE, 1)
    assert 0 < limit.value < limit.upper

    def fits(n):  # the app's solvers run on its overview estimates (a training step's reserve by the formula)
        j = job.with_(**{field_name: n})
        e = estimate(m.inventory, j) if j == job else estimate(m.inventory, j, trace=False)
        return fitting.fit(e, g, Strategy.SINGLE).gpus_needed == 1

    assert fits(limit.value) and not fits(limit.value + 1)


def test_largest_fitting_on_several_gpus_and_on_an_unsupported_gpu():
    m = model("Llama-3.1-70B-Instruct")
    job = Job(mode="qlora", gradient_checkpointing=True)
    g = gpu_db.find_gpu("A100 SXM 80GB")
    limit = S.largest_fitting(m, job, "batch_size", g.name, Strategy.ZERO3, 4)
    assert limit.value > 0
    for n, ok in ((limit.value, True), (limit.value + 1, False)):
        per = fitting.fit(estimate(m.inventory, job.with_(batch_size=n)), g, Strategy.ZERO3, 4).per_gpu
        assert (per.device_total_bytes <= g.usable_by_default_bytes) is ok
    t4 = S.largest_fitting(m, Job(), "batch_size", "Tesla T4", Strategy.SINGLE, 1)
    assert t4.value == 0 and "bf16" in t4.reason


def test_grid_covers_every_job_and_dtype():
    m = model("Llama-3.1-8B")
    cells = S.grid(m, Job(), gpu_db.find_gpu("H100 SXM 80GB"), Strategy.PIPELINE)
    got = {(c.mode, c.column) for c in cells}
    assert got == {(mode, column) for mode, columns in S.GRID.items() for column in columns}
    by = {(c.mode, c.column): c for c in cells}
    assert re.fullmatch(r"1 · \d+\.\d GiB", by[("inference", "16-bit")].text)
    assert by[("inference", "16-bit")].fit.strategy is Strategy.PIPELINE
    assert by[("full", "mixed (AMP)")].fit.strategy is Strategy.ZERO3
    assert by[("qlora", "4-bit nf4")].job.quant.value == "nf4" and by[("qlora", "4-bit nf4")].fit.gpus_needed == 1
    assert S.current_column(Job(mode="full", precision="amp_fp16")) is None
    assert S.current_column(Job(mode="lora", base_dtype="fp32")) == "32-bit"


def test_query_params_round_trip_in_app_support():
    names = [e.name for e in __import__("estimator.catalog", fromlist=["load_catalog"]).load_catalog()]
    job = Job(mode="lora", batch_size=3, lora_alpha=16.5, lora_targets=("q_proj", "v_proj"))
    values = {"model": "Qwen3-8B", "gpu": "L4", "vendor": "any", "min_memory_gib": 8.0, "strategy": "zero3", "num_gpus": P.AUTO,
              "hf_token": "hf_secret", "hub_id": ""}
    params = U.query_params_for(values, job)
    assert "hf_secret" not in json.dumps(params) and "hf_token" not in params
    assert params["lora_targets"] == "q_proj,v_proj" and params["lora_alpha"] == "16.5"
    back, errs = U.parse_query_params(params, names)
    assert errs == []
    assert P.job_from_values(back) == job
    assert back["model"] == "Qwen3-8B" and back["gpu"] == "L4" and back["num_gpus"] == P.AUTO


def test_exports():
    m = model("Llama-3.1-8B")
    job = Job(mode="full")
    result = estimate(m.inventory, job)
    f = S.fit_job(m, job, gpu_db.find_gpu("H100 SXM 80GB"))
    csv_text = present.breakdown_csv(result, f)
    lines = csv_text.splitlines()
    assert lines[0] == "component,one_gpu_bytes,one_gpu_gib,per_gpu_bytes,per_gpu_gib"
    assert lines[-1].startswith(f"device_total,{result.device_total_bytes},")
    assert len(lines) == 1 + len(result.breakdown) + 2
    data = json.loads(present.export_json(m.name, m.origin, m.source, result, f))
    for key in ("peak_allocated_bytes", "device_total_bytes", "breakdown", "params_total", "params_trainable", "gpus_needed"):
        assert key in data
    assert data["gpus_needed"] == f.gpus_needed and f.gpus_needed > 1 and data["fit"]["strategy"] == "zero3"


def test_an_unexpected_failure_is_an_error_not_a_traceback(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(S, "fit_job", boom)
    at = app()
    assert not at.exception
    assert errors(at) == ["Unexpected RuntimeError while estimating Llama-3.1-8B: boom. The other inputs are unchanged; try another model or setting."]
    assert at.selectbox(key="gpu").value == "H100 SXM 80GB"


def test_suggestions_show_under_the_headline_when_it_does_not_fit():
    """Issue 15: a Qwen3-8B QLoRA on a 4090 gets 'turn on gradient checkpointing' with its figure."""
    at = app(model="Qwen3-8B", mode="qlora", gpu="GeForce RTX 4090")
    assert_clean(at)
    shown = [m.value for m in at.markdown if m.value.startswith("**What would make it fit**")]
    assert shown and "turn on gradient checkpointing:" in shown[0] and "of 23.6 GiB" in shown[0]
    at.checkbox(key="gradient_checkpointing").check().run()
    assert headline(at).startswith("fits: Fits on 1 × GeForce RTX 4090")
    assert not [m for m in at.markdown if m.value.startswith("**What would make it fit**")]


def test_a_long_refused_link_value_is_not_echoed_whole():
    names = [e.name for e in __import__("estimator.catalog", fromlist=["load_catalog"]).load_catalog()]
    _, errors = U.parse_query_params({"vendor": "x" * 100_000}, names)
    assert len(errors) == 1 and len(errors[0]) < 300 and "100,000 characters" in errors[0]


def test_the_longest_prompt_is_capped_at_the_window_and_says_so():
    """Issue 13: a length past max_position_embeddings is not offered as fitting."""
    at = app(model="Qwen2.5-0.5B", gpu="H200 SXM 141GB")  # 32,768 positions; memory allows far more
    assert_clean(at)
    metric = next(m for m in at.metric if m.label.startswith("Longest prompt"))
    assert metric.value == f"{32_768 - 255:,} tokens"
    assert any("Capped at the model's 32,768-position window" in c.value for c in at.caption)


def test_notes_for_a_context_past_the_window_and_unquantized_experts():
    from estimator import estimate

    long = estimate(model("Llama-3.2-1B").inventory, Job(prompt_len=200_000))
    assert any("beyond the 131,072 positions" in n and "llama3" in n for n in long.notes)
    moe = estimate(model("Mixtral-8x7B-v0.1").inventory, Job(weights="nf4"))
    assert any("3-D expert tensors stay unquantized, in bf16" in n for n in moe.notes)
    assert not any("unquantized" in n for n in estimate(model("Llama-3.2-1B").inventory, Job(weights="nf4")).notes)


def test_the_gpu_table_shows_verdict_and_headroom():
    at = app(model="Qwen3-8B", mode="qlora", gradient_checkpointing="true", gpu="GeForce RTX 4090")
    assert_clean(at)
    table = next(d for d in at.dataframe if "verdict" in d.value.columns).value
    assert {"verdict", "headroom (GiB)", "usable (GiB)"} <= set(table.columns)
    assert set(table["verdict"]) <= {"fits", "tight"} and (table["headroom (GiB)"] >= 0).all()
    row = table[table["GPU"] == "GeForce RTX 4090"].iloc[0]
    assert row["usable (GiB)"] == 23.6


def test_speed_shows_beside_the_memory_answer_and_in_the_gpu_table():
    """Issue 16: prefill and decode tokens/s for inference, step and tokens/s for training, and
    GPU-hours and cost once tokens and a price are given; the GPU table has a tokens/s column."""
    from estimator.speed import speed

    at = app(model="Qwen2.5-0.5B", gpu="H200 SXM 141GB")
    assert_clean(at)
    labels = {m.label: m.value for m in at.metric}
    assert "Prefill, one GPU (est.)" in labels and "Decode tokens/s (est.)" in labels
    expected = speed(model("Qwen2.5-0.5B").inventory, Job(), gpu_db.find_gpu("H200"))
    assert labels["Decode tokens/s (est.)"] == f"{expected.decode_tokens_per_second:,.1f}"
    assert labels["GPU-hours (est.)"] == "—"

    at = app(model="Qwen2.5-0.5B", mode="full", gpu="H200 SXM 141GB")
    at.number_input(key="speed_tokens").set_value(2048 * 1000).run()
    at.number_input(key="speed_price").set_value(3.0).run()
    assert_clean(at)
    labels = {m.label: m.value for m in at.metric}
    s = speed(model("Qwen2.5-0.5B").inventory, Job(mode="full"), gpu_db.find_gpu("H200"), tokens=2048 * 1000, price=3.0)
    assert labels["Training tokens/s (est.)"] == f"{s.tokens_per_second:,.0f}"
    assert labels["GPU-hours (est.)"] == f"{s.gpu_hours:,.2f}"
    assert any(f"{s.cost:,.2f}" in m.value for m in at.markdown)
    table = next(d for d in at.dataframe if "verdict" in d.value.columns).value
    column = "tokens/s, one GPU (est.)"
    h200 = table[table["GPU"] == "H200 SXM 141GB"].iloc[0]
    assert h200[column] == round(s.tokens_per_second, 1)
    assert table[column].notna().sum() > 50

"""Can I run it? The Streamlit page: widgets → a typed `Job` → `estimate()` → render.

A thin presenter. Everything that is not UI (sources, the job from widget values, URL state, GPU
counts, the largest batch and sequence that fit, exports) lives in `app_support.py`; the memory
model itself lives in `estimator/`. Every input is mirrored into the URL (never the token).

    streamlit run app.py
"""

from __future__ import annotations

import dataclasses

# pandas at the script's first run, not inside a function: a rerun that Streamlit stops while a
# lazy `import pandas` is half done leaves a partially initialized module in sys.modules, and the
# next run fails with "partially initialized module 'pandas' has no attribute 'Series'" (seen in
# Chromium when the GPU was changed right after the mode).
import pandas as pd
import streamlit as st

import app_support as S
from page_state import url as U
from page_state import values as P
import gpu_db
from estimator import Attention, BaseDtype, Component, Loss, Mode, Optimizer, Precision, Quant, Weights
from estimator import present
from estimator.fit import MULTI_GPU_NOTE, Strategy
from estimator.sources import ModelConfig

GIB = S.GIB

st.set_page_config(page_title="Can I run it?", page_icon="🧮", layout="wide")


# -------------------------------------------------------------------------------------------------
# Cached data
# -------------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def catalog():
    from estimator.catalog import load_catalog

    return load_catalog()


@st.cache_resource(show_spinner=False)
def all_gpus() -> tuple:
    return gpu_db.load_gpus()


@st.cache_resource(show_spinner=False)
def catalog_model(name: str) -> S.Model:
    from estimator.catalog import find_entry

    entry = find_entry(name)
    if entry is None:
        raise ValueError(f"{name!r} is not in the catalog; pick a model from the list")
    return S.model_from_source(ModelConfig(entry.config(), name=entry.name, origin="catalog", source=entry.source))


@st.cache_data(show_spinner=False)
def accuracy_data() -> dict:
    """The committed validation figures (validation/accuracy.json, written by `python -m validation.report`)."""
    return S.load_accuracy()


# -------------------------------------------------------------------------------------------------
# Session state: defaults, the link's values on first load, and values kept while widgets hide
# -------------------------------------------------------------------------------------------------
def init_state() -> list[str]:
    """Defaults, then (first run of a session only) the URL's values; returns the link's refusals."""
    state = st.session_state
    for key, value in P.DEFAULTS.items():
        if key in state:
            state[key] = state[key]  # keeps a hidden widget's value (Streamlit drops unrendered widgets' state)
        else:
            state[key] = value
    if "_restored" in state:
        return []
    state["_restored"] = True
    values, errors = U.parse_query_params(st.query_params.to_dict(), [e.name for e in catalog()])
    for key, value in values.items():
        if key == "lora_alpha" or key == "lora_dropout" or key == "min_memory_gib":
            value = float(value)
        state[key] = value
    return errors


def sync_query_params(values: dict, job) -> None:
    wanted = U.query_params_for(values, job)
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


# -------------------------------------------------------------------------------------------------
# Inputs (sidebar)
# -------------------------------------------------------------------------------------------------
def model_inputs() -> None:
    st.sidebar.header("Model")
    names = [e.name for e in catalog()]
    st.sidebar.selectbox("Catalog model", names, key="model", help=f"{len(names)} popular causal LMs, offline. Type to search.")
    st.sidebar.text_input(
        "…or any Hugging Face model",
        key="hub_id",
        placeholder="org/name or https://huggingface.co/org/name",
        help="A Hub repo id or URL (a catalog name works too). When filled, it is used instead of the catalog and the upload.",
    )
    st.sidebar.text_input(
        "Hugging Face token (gated models)",
        key="hf_token",
        type="password",
        help="Sent to the Hub only to read config.json; never stored in the link, logged or shown.",
    )
    st.sidebar.file_uploader(
        "…or upload a config.json",
        type=["json"],
        key="upload",
        help="Used instead of the catalog model when present (the Hub box still wins).",
    )


def _values(kind) -> list[str]:
    return [member.value for member in kind]


def job_inputs() -> None:
    state = st.session_state
    st.sidebar.header("Job")
    st.sidebar.radio(
        "Mode",
        _values(Mode),
        key="mode",
        horizontal=True,
        format_func={"inference": "inference", "full": "full", "lora": "LoRA", "qlora": "QLoRA"}.get,
        help="inference: generate(); full: every parameter trains; LoRA / QLoRA: adapters on a frozen base.",
    )
    relevant = set(P.job_from_values({"mode": state["mode"]}).relevant_fields())
    col = st.sidebar.columns(2)
    col[0].number_input("Batch size", min_value=1, max_value=P.LIMITS["batch_size"], step=1, key="batch_size")
    if "seq_len" in relevant:
        col[1].number_input("Sequence length", min_value=1, max_value=P.LIMITS["seq_len"], step=256, key="seq_len")
    else:
        col[1].number_input("Prompt tokens", min_value=1, max_value=P.LIMITS["prompt_len"], step=256, key="prompt_len")
        st.sidebar.number_input("New tokens", min_value=1, max_value=P.LIMITS["new_tokens"], step=64, key="new_tokens")
    if "weights" in relevant:
        st.sidebar.selectbox("Weights", _values(Weights), key="weights",
                             help="int8 = bitsandbytes LLM.int8; nf4/fp4 = bitsandbytes 4-bit with double quantization.")
    if "precision" in relevant:
        st.sidebar.selectbox("Precision", _values(Precision), key="precision",
                             help="amp_*: fp32 weights with an autocast forward (the HF Trainer's bf16=True / fp16=True).")
    if "base_dtype" in relevant:
        st.sidebar.selectbox("Base weights", _values(BaseDtype), key="base_dtype")
    if "quant" in relevant:
        st.sidebar.selectbox("4-bit storage", _values(Quant), key="quant")
    if "double_quant" in relevant:
        st.sidebar.checkbox("Double quantization", key="double_quant")
    if "lora_r" in relevant:
        col = st.sidebar.columns(3)
        col[0].number_input("Rank r", min_value=1, max_value=P.LIMITS["lora_r"], step=8, key="lora_r")
        col[1].number_input("Alpha", min_value=0.001, max_value=1e6, step=8.0, format="%g", key="lora_alpha")
        col[2].number_input("Dropout", min_value=0.0, max_value=0.99, step=0.05, format="%.2f", key="lora_dropout")
        st.sidebar.text_input("Target modules", key="lora_targets", help="all-linear, or module names separated by commas (q_proj,v_proj).")
    if "optimizer" in relevant:
        st.sidebar.selectbox("Optimizer", _values(Optimizer), key="optimizer")
        st.sidebar.checkbox("Gradient checkpointing", key="gradient_checkpointing")
    if "gradient_accumulation_steps" in relevant:
        col = st.sidebar.columns(2)
        col[0].number_input("Gradient accumulation", min_value=1, max_value=P.LIMITS["gradient_accumulation_steps"], step=1,
                            key="gradient_accumulation_steps", help="micro-batches per optimizer step (the Trainer's gradient_accumulation_steps)")
        col[1].selectbox("Loss", _values(Loss), key="loss",
                         help="standard: transformers' cross-entropy over the logits; liger: use_liger_kernel=True (fused loss and kernels); "
                              "chunked: TRL's chunked LM head")
        st.sidebar.checkbox("Through the HF Trainer", key="trainer",
                            help="transformers.Trainer's loop: micro-batches fetched up front, 8-bit optimizers keep embeddings in 32-bit")
        st.sidebar.checkbox("Through TRL's SFTTrainer", key="sft",
                            help="trl 1.16's SFTTrainer: a Trainer whose loss is its chunked LM head (no full logits); "
                                 "QLoRA adapters in bf16")
    st.sidebar.selectbox("Attention", _values(Attention), key="attn")
    st.sidebar.checkbox("Expandable segments", key="expandable_segments",
                        help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: PyTorch's allocator grows one mapping instead of "
                             "caching segments, so far less memory is reserved but unused")


def gpu_inputs() -> list:
    """The GPU widgets; returns the GPUs that pass the filters (all of them when none does)."""
    state = st.session_state
    st.sidebar.header("GPU")
    col = st.sidebar.columns(2)
    col[0].selectbox("Vendor", list(P.VENDORS), key="vendor")
    col[1].number_input("Min. memory (GiB)", min_value=0.0, max_value=P.MAX_MIN_MEMORY_GIB, step=8.0, format="%g", key="min_memory_gib")
    vendor = None if state["vendor"] == "any" else state["vendor"]
    pool = list(gpu_db.filter_gpus(vendor=vendor, min_memory_bytes=int(state["min_memory_gib"] * GIB), gpus=all_gpus()))
    if not pool:
        st.sidebar.warning("No GPU matches these filters; showing every GPU.")
        pool = list(all_gpus())
    names = [g.name for g in pool]
    if state["gpu"] not in names:
        state["gpu"] = P.DEFAULT_GPU if P.DEFAULT_GPU in names else names[0]
    by_name = {g.name: g for g in pool}
    st.sidebar.selectbox("GPU", names, key="gpu", format_func=lambda n: f"{n} ({by_name[n].memory_gib:.1f} GiB)")
    options = [s.value for s in P.strategies_for(state["mode"])]
    if state["strategy"] not in options:
        state["strategy"] = P.default_strategy_for(state["mode"]).value
    # Each on its own row: a half-width box clipped "fewest that fit" (issue 15).
    st.sidebar.selectbox("Multi-GPU strategy", options, key="strategy",
                         help="Used when one GPU is not enough. Training: DDP / ZeRO (FSDP); inference: device_map pipeline or tensor parallel.")
    st.sidebar.selectbox("GPU count", [P.AUTO] + list(range(1, 65)), key="num_gpus",
                         format_func=lambda v: "fewest that fit" if v == P.AUTO else str(v))
    return pool


# -------------------------------------------------------------------------------------------------
# The estimate page
# -------------------------------------------------------------------------------------------------
def resolve_model(stage) -> S.Model:
    state = st.session_state
    hub = str(state["hub_id"] or "").strip()
    upload = state.get("upload")
    if hub:
        from estimator.sources import resolve

        stage.text = f"loading {hub!r}"
        with st.spinner(f"Fetching {hub}'s config.json…"):
            # An empty field must not fall back to the server's own HF_TOKEN: a Space owner's secret
            # would otherwise read gated configs for every visitor.
            # allow_paths=False: a visitor's text never opens a file on the server (issue 14).
            source = resolve(hub, token=state["hf_token"] or False, allow_paths=False)
        with st.spinner("Building the model on the meta device (the first time imports transformers: ~10 s)…"):
            return S.model_from_source(source)
    if upload is not None:
        stage.text = f"reading the uploaded {upload.name!r}"
        source = S.parse_upload(upload.getvalue(), upload.name)
        with st.spinner("Building the model on the meta device (the first time imports transformers: ~10 s)…"):
            return S.model_from_source(source)
    stage.text = f"loading {state['model']}"
    return catalog_model(state["model"])


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def show_headline(fit, num_gpus) -> None:
    status, text = present.headline(fit, num_gpus)
    # Material icons ship with Streamlit's frontend, so they render where no emoji font is installed.
    icon = {"fits": ":green[:material/check_circle:]", "tight": ":orange[:material/warning:]", "needs": ":orange[:material/group_work:]",
            "no": ":red[:material/block:]"}[status]
    st.markdown(f"### {icon} {text}")


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s" if seconds < 120 else f"{seconds / 3600:.2f} h"


def show_speed(model, job, gpu, fit) -> None:
    """Speed beside the memory answer (estimator/speed.py): one GPU's, with GPU-hours and cost for
    the tokens and price the user gives (0: not asked)."""
    state = st.session_state
    tokens = int(state.get("speed_tokens") or 0) or None
    price = float(state.get("speed_price") or 0.0) or None
    s = S.speed_job(model, job, gpu, tokens, price if tokens else None)
    if s is None:
        st.caption(f"ℹ️ No speed estimate on {gpu.name}: gpu_db has no {job.mode.value} compute figure for its dtype.")
        return
    cols = st.columns(3)
    if s.step_seconds is not None:
        cols[0].metric("Step, one GPU (est.)", _duration(s.step_seconds),
                       help="One optimizer step: forward, backward (and recomputation) of every micro-batch, then the optimizer")
        cols[1].metric("Training tokens/s (est.)", f"{s.tokens_per_second:,.0f}")
    else:
        cols[0].metric("Prefill, one GPU (est.)", _duration(s.prefill_seconds), help="generate() up to the first new token")
        cols[1].metric("Decode tokens/s (est.)", f"{s.decode_tokens_per_second:,.1f}",
                       help=f"All {job.batch_size} sequences together; one step {_duration(s.decode_step_seconds)}")
    if s.gpu_hours is not None:
        cost = f" · {s.cost:,.2f} at that price" if s.cost is not None else ""
        cols[2].metric("GPU-hours (est.)", f"{s.gpu_hours:,.2f}", help=f"For {s.tokens:,} tokens{cost}")
    else:
        cols[2].metric("GPU-hours (est.)", "—", help="Give a number of tokens below")
    with st.expander("GPU-hours and cost"):
        left, right = st.columns(2)
        what = "Training tokens" if job.is_training else "Tokens to generate"
        left.number_input(what, min_value=0, max_value=10**15, step=1_000_000, key="speed_tokens")
        right.number_input("Price per GPU-hour", min_value=0.0, max_value=1e6, step=0.5, key="speed_price")
        if s.cost is not None:
            st.markdown(f"**{s.gpu_hours:,.2f} GPU-hours, {s.cost:,.2f}** for {s.tokens:,} tokens on one {gpu.name}")
    multi = " Speed is one GPU's; multi-GPU speed is not modelled." if fit.per_gpu.num_gpus > 1 else ""
    fitted = "" if s.constants_status.startswith("fitted") else " The speed model's rates are priors, not fitted on measured steps yet."
    st.caption(f"ℹ️ Speed: FLOPs over the card's dense peak, bytes over its bandwidth, and per-layer launch overheads.{fitted}{multi}")


def show_suggestions(model, job, gpu) -> None:
    """What would make it fit one GPU, cheapest first (estimator.suggest), under the headline."""
    suggestions = S.suggestions(model, job, gpu.name)
    if not suggestions:
        return
    capacity = gpu.usable_by_default_bytes
    lines = [f"- {present.suggestion_line(s, capacity)}" for s in suggestions]
    with st.container(key="suggestions"):
        st.markdown("**What would make it fit**, cheapest first:\n" + "\n".join(lines))


def breakdown_chart(result, fit) -> dict:
    """A horizontal stacked bar per row (one GPU; per GPU under the strategy), in GiB, with the capacity.

    Built as a plain plotly dict: a `go.Figure` with a template costs ~100 ms of validation per rerun.
    """
    rows = [("one GPU", result.breakdown)]
    if fit.per_gpu.num_gpus > 1:
        rows.append((f"per GPU, {fit.per_gpu.num_gpus} × {fit.strategy.value}", fit.per_gpu.breakdown))
    palette = ["#4c78a8", "#9ecae9", "#f58518", "#ffbf79", "#54a24b", "#88d27a", "#b79a20", "#f2cf5b",
               "#439894", "#83bcb6", "#e45756", "#ff9d98"]
    labels = [label for label, _ in rows]
    traces = []
    for i, name in enumerate(Component):  # the palette repeats rather than drop a component
        color = palette[i % len(palette)]
        values = [breakdown.get(name, 0) / GIB for _, breakdown in rows]
        if any(values):
            traces.append({
                "type": "bar", "orientation": "h", "name": name.replace("_", " "), "y": labels, "x": values,
                "marker": {"color": color}, "hovertemplate": "%{fullData.name}: %{x:.2f} GiB<extra></extra>",
            })
    capacity = fit.capacity_bytes / GIB
    layout = {
        "barmode": "stack",
        "height": 190 + 45 * len(rows),
        "margin": {"l": 10, "r": 10, "t": 30, "b": 10},
        "xaxis": {"title": {"text": "GiB (1024³ bytes)"}, "rangemode": "tozero"},
        "yaxis": {"autorange": "reversed"},
        "legend": {"orientation": "h", "yanchor": "top", "y": -0.45, "traceorder": "normal"},
        "shapes": [{"type": "line", "x0": capacity, "x1": capacity, "xref": "x", "y0": 0, "y1": 1, "yref": "paper",
                    "line": {"dash": "dash", "color": "#555", "width": 2}}],
        "annotations": [{"x": capacity, "y": 1, "xref": "x", "yref": "paper", "yanchor": "bottom", "showarrow": False,
                         "text": f"{fit.gpu_name}: {capacity:.1f} GiB"}],
    }
    return {"data": traces, "layout": layout}


def show_grid(model, job, gpu, strategy) -> None:

    cells = S.grid(model, job, gpu, strategy)
    here = (job.mode.value, S.current_column(job))
    columns = {column: [""] * len(S.GRID) for column in S.GRID_COLUMNS}
    modes = list(S.GRID)
    for cell in cells:
        mark = "▶ " if (cell.mode, cell.column) == here else ""
        columns[cell.column][modes.index(cell.mode)] = mark + cell.text
    table = pd.DataFrame(columns, index=[S.GRID_LABELS[m] for m in modes])
    st.markdown(f"**GPUs needed on {gpu.name}, job × dtype**")
    st.dataframe(table, width="stretch", key="dtype_grid")
    others = sorted({c.fit.strategy.value for c in cells if c.mode != job.mode.value})
    st.caption(
        f"With your batch, lengths and LoRA settings; ▶ is your job (with {strategy.value}), other modes use {', '.join(others)}. "
        "✗ no GPU: this GPU cannot run it (no bf16, no bitsandbytes); ✗ >64: no count fits. "
        "Training cells other than ▶ size the allocator reserve by its formula, not a traced step "
        "(as do the plot, the largest sizes and the suggestions: a traced step takes about a second)."
    )


def show_limits(model, job, gpu, strategy, num_gpus) -> None:
    n = num_gpus or 1
    length_field = "seq_len" if job.is_training else "prompt_len"
    batch = S.largest_fitting(model, job, "batch_size", gpu.name, strategy, n)
    length = S.largest_fitting(model, job, length_field, gpu.name, strategy, n)
    where = f"1 × {gpu.name}" if n == 1 else f"{n} × {gpu.name} with {strategy.value}"
    st.markdown(f"**What fits on {where}**", help="Solved, not guessed: the estimate is monotone in batch and length, "
                "so an exponential search from your value, then bisection, finds the exact edge.")
    if batch.reason:
        st.markdown(f":red[:material/block:] {batch.reason}")
        return
    cols = st.columns(2)

    def show(col, limit, label, unit, other):
        if limit.value == 0:
            col.metric(label, "none", help=f"even 1 does not fit with {other}")
        else:
            col.metric(label, f"{'≥ ' if limit.at_cap else ''}{limit.value:,}{unit}", help=f"with {other}")

    length_text = f"sequence length {job.seq_len:,}" if job.is_training else f"a {job.prompt_len:,}-token prompt"
    show(cols[0], batch, "Largest batch", "", length_text)
    # The longest length is capped at the model's window: memory may allow more, the model does not.
    extra = 0 if job.is_training else job.new_tokens - 1
    window = model.max_positions
    shown = length
    if window and length.value + extra > window:
        shown = dataclasses.replace(length, value=max(window - extra, 0))
    label = "Longest sequence" if job.is_training else f"Longest prompt (+{job.new_tokens:,} new)"
    show(cols[1], shown, label, " tokens", f"batch {job.batch_size}")
    if shown is not length:
        st.caption(f"Capped at the model's {window:,}-position window (max_position_embeddings): memory alone would allow "
                   f"{length.value:,} tokens.")


def _rate(s) -> float | None:
    rate = present.speed_rate(s)
    return round(rate, 1) if rate is not None else None


def show_gpu_table(model, job, pool, strategy) -> None:

    fits = S.fits_for_gpus(model, job, pool, strategy)
    by_name = {g.name: g for g in pool}
    can = [f for f in fits if f.gpus_needed is not None]
    cannot = [f for f in fits if f.gpus_needed is None]
    frame = pd.DataFrame([
        {
            "GPU": f.gpu_name,
            "GPUs needed": f.gpus_needed,
            "verdict": f.verdict.value.replace("_", " "),
            "per GPU (GiB)": round(f.per_gpu.device_total_bytes / GIB, 1),
            "headroom (GiB)": round(f.headroom_bytes / GIB, 1),
            "usable (GiB)": round(f.capacity_bytes / GIB, 1),
            "vendor": by_name[f.gpu_name].vendor.value,
            "segment": by_name[f.gpu_name].segment.value,
            "bandwidth (GB/s)": by_name[f.gpu_name].memory_bandwidth_gb_s,
            "bf16 TFLOPS": by_name[f.gpu_name].bf16_tflops_dense,
            "tokens/s, one GPU (est.)": _rate(S.speed_job(model, job, by_name[f.gpu_name])),
            "year": by_name[f.gpu_name].release_year,
        }
        for f in can
    ])
    st.markdown(f"**Every GPU that can run it** ({len(can)} of {len(fits)}; {strategy.value} when one is not enough; click a column to sort, "
                "tokens/s for speed)")
    if can:
        st.dataframe(frame, hide_index=True, width="stretch", height=min(420, 38 + 35 * len(can)), key="gpu_table")
    if cannot:
        with st.expander(f"{len(cannot)} GPUs that cannot run it, and why"):
            st.dataframe(
                pd.DataFrame([{"GPU": f.gpu_name, "usable (GiB)": round(f.capacity_bytes / GIB, 1), "why": f.reason} for f in cannot]),
                hide_index=True, width="stretch",
            )


def estimate_page(pool: list, stage) -> None:
    state = st.session_state
    model = resolve_model(stage)
    stage.text = "checking the job"
    job = P.job_from_values({k: state[k] for k in P.JOB_FIELDS})
    gpu = next(g for g in pool if g.name == state["gpu"])
    strategy = Strategy(state["strategy"])
    num_gpus = None if state["num_gpus"] == P.AUTO else int(state["num_gpus"])

    stage.text = f"estimating {model.name}"
    result = S.cached_estimate(model, job)
    fit = S.fit_job(model, job, gpu, strategy, num_gpus)
    show_headline(fit, num_gpus)
    show_suggestions(model, job, gpu)
    origin = {"catalog": "offline catalog", "hub": "Hugging Face Hub", "hub-cache": "local Hub cache", "upload": "uploaded config", "file": "file"}
    st.caption(
        f"**{model.name}** ({origin.get(model.origin, model.origin)}: {model.source}) · "
        f"{_count(result.params_total)} parameters, {_count(result.params_trainable)} trainable · "
        f"peak in {result.peak_phase.replace('_', ' ')}"
    )
    cols = st.columns(3)
    cols[0].metric("Peak allocated, one GPU", f"{result.peak_allocated_bytes / GIB:.2f} GiB", help="torch.cuda.max_memory_allocated()")
    cols[1].metric("Device total, one GPU", f"{result.device_total_bytes / GIB:.2f} GiB", help="What nvidia-smi shows: the allocator's reserve, the CUDA context, paged memory. This decides whether it fits (with expandable segments, what it runs in near the card's limit does: the note says how much).")
    measured = "measured" if gpu.process_total_measured else "the driver's reservation interpolated from two measured cards"
    cols[2].metric(f"{gpu.name} usable", f"{fit.capacity_bytes / GIB:.1f} GiB",
                   help=f"What one process can allocate: the driver reports {gpu.memory_gib:.1f} GiB "
                        f"({gpu.memory_source.value}); less its own reservation ({measured}) where that is known")
    show_speed(model, job, gpu, fit)
    st.plotly_chart(breakdown_chart(result, fit), key="breakdown_chart", config={"displayModeBar": False})
    st.plotly_chart(present.memory_plot(S.overview_of(model, job), job, fit.capacity_bytes, gpu.name),
                    key="memory_plot", config={"displayModeBar": False})

    notes = list(model.notes) + list(result.notes) + [n for n in fit.notes if n != MULTI_GPU_NOTE]
    if fit.per_gpu.num_gpus > 1 or (fit.gpus_needed or 1) > 1:
        notes.append(MULTI_GPU_NOTE)
    if job.attn.value == "flash_attention_2":
        ok, why = gpu.supports("flash_attention_2")
        notes.append(f"FlashAttention-2 on {gpu.name}: {why}" if ok else f"FlashAttention-2 does not run on {gpu.name}: {why}")
    for note in notes:
        st.caption(f"ℹ️ {note}")

    stage.text = "solving for the largest batch and length"
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    with left:
        show_limits(model, job, gpu, strategy, num_gpus)
    with right:
        slug = f"{model.name.replace('/', '--')}-{job.mode.value}"
        st.download_button("Breakdown as CSV", present.breakdown_csv(result, fit), file_name=f"{slug}.csv", mime="text/csv",
                           key="download_csv", icon=":material/download:")
        st.download_button("Estimate as JSON", present.export_json(model.name, model.origin, model.source, result, fit), file_name=f"{slug}.json",
                           mime="application/json", key="download_json", icon=":material/download:")
    st.divider()
    stage.text = "filling the table of jobs × dtypes"
    show_grid(model, job, gpu, strategy)
    st.divider()
    stage.text = "counting GPUs for every GPU in the database"
    show_gpu_table(model, job, pool, strategy)


# -------------------------------------------------------------------------------------------------
# The accuracy page
# -------------------------------------------------------------------------------------------------
def accuracy_page() -> None:
    import plotly.graph_objects as go

    STAGE.text = "reading the validation runs"
    st.subheader("How close is it? Measured vs estimated, on an H100 80GB")
    data = accuracy_data()
    comparisons, summary, PEERS = data["comparisons"], data["summary"], data["peers"]
    ok = [c for c in comparisons if c["status"] == "ok"]
    peer_names = {"can_it_run_llm": "can-it-run-llm", "accelerate": "accelerate estimate-memory", "gpu_poor": "gpu_poor"}

    def pct(stat):
        n, median, worst = stat
        return "—" if not n else f"{median * 100:.1f}% / {worst * 100:.0f}%"

    overall = next(r for r in summary if r["group"] == "all")
    holdout = next(r for r in summary if r["group"] == "holdout")
    lines = [
        f"- **{overall['cases']} runs** measured to completion ({sum(1 for c in ok if c['holdout'])} of them holdouts, written down before measuring).",
        f"- This estimator, peak allocated: median |error| {overall['peak'][1] * 100:.1f}%, worst {overall['peak'][2] * 100:.1f}%; "
        f"device total: median {overall['device'][1] * 100:.1f}%, worst {overall['device'][2] * 100:.1f}%.",
        f"- On the holdouts only: peak median {pct(holdout['peak']).split(' / ')[0]}, device median {pct(holdout['device']).split(' / ')[0]}.",
    ]
    for p in PEERS:
        n, median, worst = overall[p]
        if n:
            lines.append(f"- {peer_names[p]}: median |error| {median * 100:.0f}%, worst {worst * 100:.0f}% against the device total ({n} runs it has a figure for).")
    st.markdown("\n".join(lines))

    fig = go.Figure()
    top = max(max(c["measured_device"] or 0, c["estimated_device"]) for c in ok) / GIB * 1.15
    fig.add_trace(go.Scatter(x=[0.3, top], y=[0.3, top], mode="lines", name="exact", line=dict(color="gray", dash="dot")))
    fig.add_trace(go.Scatter(x=[c["measured_peak"] / GIB for c in ok], y=[c["estimated_peak"] / GIB for c in ok], mode="markers",
                             name="this estimator: peak allocated", text=[c["case"] for c in ok], marker=dict(size=9, color="#1f77b4"),
                             hovertemplate="%{text}<br>measured %{x:.2f} GiB<br>estimated %{y:.2f} GiB<extra></extra>"))
    fig.add_trace(go.Scatter(x=[c["measured_device"] / GIB for c in ok], y=[c["estimated_device"] / GIB for c in ok], mode="markers",
                             name="this estimator: device total", text=[c["case"] for c in ok], marker=dict(size=8, color="#17becf", symbol="diamond"),
                             hovertemplate="%{text}<br>measured %{x:.2f} GiB<br>estimated %{y:.2f} GiB<extra></extra>"))
    colors = {"can_it_run_llm": "#d62728", "accelerate": "#ff7f0e", "gpu_poor": "#2ca02c"}
    for p in PEERS:
        pts = [c for c in ok if c["peers"].get(p)]
        fig.add_trace(go.Scatter(x=[c["measured_device"] / GIB for c in pts], y=[c["peers"][p] / GIB for c in pts], mode="markers",
                                 name=f"{peer_names[p]} (vs device total)", text=[c["case"] for c in pts],
                                 marker=dict(size=7, color=colors[p], symbol="x"),
                                 hovertemplate="%{text}<br>measured %{x:.2f} GiB<br>estimated %{y:.2f} GiB<extra></extra>"))
    fig.update_layout(xaxis=dict(title="measured (GiB)", type="log"), yaxis=dict(title="estimated (GiB)", type="log"),
                      height=560, template="plotly_white", margin=dict(l=10, r=10, t=30, b=10))
    st.plotly_chart(fig, key="accuracy_chart")

    st.markdown("**Median / worst |error| by group** (error = (estimate − measured) / measured)")
    st.dataframe(pd.DataFrame([
        {"group": r["group"], "runs": r["cases"], "peak allocated": pct(r["peak"]), "device total": pct(r["device"]),
         **{peer_names[p]: pct(r[p]) for p in PEERS}}
        for r in summary
    ]), hide_index=True, width="stretch")

    st.markdown("**Every run** (GiB; errors in %)")
    st.dataframe(pd.DataFrame([
        {
            "case": c["case"], "model": c["model"], "mode": c["mode"], "set": "holdout" if c["holdout"] else "calibration",
            "measured peak": round(c["measured_peak"] / GIB, 2), "estimated peak": round(c["estimated_peak"] / GIB, 2),
            "peak error %": round(c["peak_error"] * 100, 1),
            "measured device": round(c["measured_device"] / GIB, 2), "estimated device": round(c["estimated_device"] / GIB, 2),
            "device error %": round(c["device_error"] * 100, 1),
            **{f"{peer_names[p]} error %": (None if c["peer_errors"][p] is None else round(c["peer_errors"][p] * 100, 1)) for p in PEERS},
        }
        for c in ok
    ]), hide_index=True, width="stretch", key="accuracy_table")
    failed = [c for c in comparisons if c["status"] != "ok"]
    if failed:
        st.caption("Runs that did not complete (out of memory on the 80 GB card; the estimate should say they do not fit): "
                   + "; ".join(f"{c['case']} ({c['status']}, estimated {c['estimated_device'] / GIB:.1f} GiB)" for c in failed))
    with st.expander("The peers' formulas, with their sources"):
        st.markdown(data["peers_doc"])
        for fn in data["peer_formulas"]:
            st.markdown(f"**`{fn['name']}`**: {fn['doc']}")
        st.code(data["gpu_poor_source"], language="python")
    st.caption("Measured by validation/measure.py; the same figures as validation/REPORT.md "
               f"(validation/accuracy.json, written by `{data['command']}`).")


def state_job():
    """The job the widgets describe, or (while a field is invalid) the mode's defaults, for the URL."""
    state = st.session_state
    try:
        return P.job_from_values({k: state[k] for k in P.JOB_FIELDS})
    except ValueError:
        return P.job_from_values({"mode": state["mode"]})


# -------------------------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------------------------
def main() -> None:
    link_errors = init_state()
    st.title("Can I run it?")
    st.radio("View", list(P.PAGES), key="page", horizontal=True, label_visibility="collapsed",
             format_func={"estimate": "Estimate", "accuracy": "Accuracy"}.get)
    for message in link_errors:
        st.error(message)
    state = st.session_state
    if state["page"] == "accuracy":
        sync_query_params(dict(state), state_job())
        accuracy_page()
        return
    model_inputs()
    job_inputs()
    pool = gpu_inputs()
    sync_query_params(dict(state), state_job())
    estimate_page(pool, STAGE)


class Stage:
    """What the page was doing, so an error can say so."""

    text = "preparing the page"


STAGE = Stage()
try:
    main()
except ValueError as err:  # every user-facing error of the library is a ValueError subclass
    st.error(f"Problem while {STAGE.text}: {S.redact(str(err), st.session_state.get('hf_token'))}")
except Exception as err:  # noqa: BLE001 - the page never shows a traceback
    st.error(f"Unexpected {type(err).__name__} while {STAGE.text}: {S.redact(str(err), st.session_state.get('hf_token'))}. "
             "The other inputs are unchanged; try another model or setting.")

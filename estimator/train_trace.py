"""A training step's allocations and frees, traced rather than written (issue 12).

The phase model sums what is alive at each phase's peak; what the caching allocator reserves also
depends on the order and sizes of everything allocated and freed before it, and a training step
makes thousands of requests (each layer's saved tensors, autograd's gradients, the loss's N×V
buffers, the optimizer's state and temporaries). Instead of writing them out by hand, this module
runs the step itself on tensors that have no memory behind them:

- the model is built from its config.json by `AutoModelForCausalLM.from_config` under
  `torch._subclasses.fake_tensor.FakeTensorMode` (CPU fake tensors: shapes, dtypes and strides,
  no data), PEFT's `get_peft_model` wraps it for LoRA, and gradient checkpointing is turned on as
  the validation harness turns it on (`use_reentrant=False`);
- SPEC's loop runs one step (the second is made from it: `_later_steps`): the forward (under bf16 autocast where the job uses it:
  CPU autocast casts the same matmul inputs to bf16 and caches the casts of fp32 leaf weights, as
  CUDA's does), `.loss.backward()`, `optimizer.step()`, `zero_grad(set_to_none=True)`;
- a dispatch mode (meta_trace's) sees every aten op, autograd's backward ops included, and logs
  each new storage and its release in order. Fake tensors are a tensor subclass, so a tensor that
  autograd still holds keeps its Python object and is released only when it really dies.

The load comes first, as from_pretrained makes it: `caching_allocator_warmup`'s one block of every
parameter's bytes, freed, then each parameter (estimator/stream.py: `load`). The whole history goes
through `estimator.allocator.Allocator`; its reserved peak less its allocated peak is the step's
allocator reserve.

What runs on a CPU differs from the GPU's run in places, each handled here:
- optimizers: torch's default on CUDA tensors is the foreach implementation (`_default_to_fused_or_foreach`),
  on CPU the for-loop one, so the foreach flag is set where the registry's entry leaves it open;
- the autograd engine sums two gradients for one input in place on plain tensors, never on a tensor
  subclass (`_in_place_accumulation`);
- dropout: ATen's fused CUDA kernel (`native_dropout`: the output and a bool mask) where the CPU
  path multiplies by a float noise tensor (`_native_dropout`);
- what CUDA kernels request inside an op, beyond its outputs (`CudaTransients`): the staging
  buffer of a reduction split across thread blocks (norm and bias gradients), the embedding
  backward's per-segment partial sums, cuDNN attention's backward workspace, and the autograd
  thread's cuBLAS workspace;
- bitsandbytes' 8-bit and paged optimizers have no CPU path that allocates as the GPU does: a stand-in
  makes the state `Optimizer2State.init_state` makes (uint8 states with one fp32 absmax per 256-block
  for tensors of at least 4096 elements, fp32 states below; paged: tensors of at least 100,000
  elements in CUDA managed memory, outside the allocator) at the first step, and its update kernels
  work in place (bitsandbytes 0.50.2, `optim/optimizer.py`);

Not traced (the caller keeps the phase model's reserve): bitsandbytes' quantized linears (QLoRA,
LLM.int8), Liger's Triton kernels and TRL's chunked head, flash-attention-2, the Trainer's loop,
and models whose forward does not run on fake tensors.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from functools import lru_cache

from estimator import calibration

from estimator.allocator import Allocator
from estimator.inventory_types import Inventory
from estimator.job import Attention, Loss, Mode
from estimator.optimizers import BNB_MIN_8BIT_SIZE, BNB_OPTIMIZER_BLOCKSIZE, BNB_PAGED_MIN_NUMEL
from estimator.regime import Regime, Sizes

# SPEC's loop runs three steps; the first makes the optimizer state and the second is the steady
# state, which the third repeats request for request.
TRACED_STEPS = 2

_LOCK = threading.Lock()  # FakeTensorMode and transformers' build are not meant to run concurrently


def untraced_reason(inv: Inventory, regime: Regime) -> str | None:
    """Why this job's step is not traced (None: it is)."""
    if not regime.training:
        return "not a training job"
    if not inv.config_json:
        return "the inventory has no config to rebuild the model from"
    if regime.quantizer is not None:
        return "bitsandbytes' quantized linears have no fake-tensor path"
    if regime.liger_kernels or regime.loss is not Loss.STANDARD:
        return "Liger's kernels and TRL's chunked head are not traced"
    if regime.attn is Attention.FLASH_ATTENTION_2:
        return "flash-attention-2 is not installed here"
    if regime.trainer or regime.sft:
        return "the Trainer's loop is not traced yet"
    if inv.moe is not None:
        return "MoE blocks are not traced in training yet"
    if regime.optimizer is None:
        return "no optimizer"
    return None


def step_reserve(inv: Inventory, regime: Regime, sizes: Sizes) -> tuple[int, int] | None:
    """(peak reserved, peak allocated) of the load and the traced steps replayed through the
    caching allocator, or None where the step is not traced (`untraced_reason`) or its trace fails."""
    if untraced_reason(inv, regime) is not None:
        return None
    return _step_reserve(inv.config_json, regime, sizes.batch, sizes.seq_len)


@lru_cache(maxsize=64)
def _step_reserve(config_json: str, regime: Regime, batch: int, seq_len: int) -> tuple[int, int] | None:
    try:
        with _LOCK:
            events, param_sizes, adapter_sizes = _trace(config_json, regime, batch, seq_len)
    except Exception:  # noqa: BLE001 - a forward that does not run on fake tensors: no trace
        return None
    allocator = Allocator(capacity_bytes=1 << 50, expandable_segments=regime.expandable_segments)
    warm = allocator.malloc(sum(param_sizes))  # caching_allocator_warmup
    allocator.free(warm)
    for size in param_sizes + adapter_sizes:
        allocator.malloc(size)
    handles: dict[int, int | None] = {}
    for event in events:
        if event[0] == "A":
            handles[event[1]] = allocator.malloc(event[2]) if event[2] > 0 else None
        else:
            h = handles.pop(event[1], None)
            if h is not None:
                allocator.free(h)
    return allocator.peak_reserved_bytes, allocator.peak_allocated_bytes


class _Bnb8bitStandIn:
    """bitsandbytes' Optimizer2State as the caching allocator sees it (see the module docstring)."""

    def __init__(self, params, eight_bit: bool, paged: bool) -> None:
        self.params = [p for p in params]
        self.eight_bit, self.paged = eight_bit, paged
        self.state: dict[int, list] = {}

    def _buffer(self, p, dtype):
        import torch

        if self.paged and p.numel() >= BNB_PAGED_MIN_NUMEL:
            return None  # F.get_paged: cudaMallocManaged, outside PyTorch's allocator
        return torch.zeros_like(p, dtype=dtype)

    def step(self) -> None:
        import torch

        for p in self.params:
            if p.grad is None or id(p) in self.state:
                continue
            if self.eight_bit and p.numel() >= BNB_MIN_8BIT_SIZE:
                blocks = math.ceil(p.numel() / BNB_OPTIMIZER_BLOCKSIZE)
                self.state[id(p)] = [self._buffer(p, torch.uint8), self._buffer(p, torch.uint8),
                                     torch.zeros((blocks,), dtype=torch.float32),
                                     torch.zeros((blocks,), dtype=torch.float32)]
            else:
                self.state[id(p)] = [self._buffer(p, torch.float32), self._buffer(p, torch.float32)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _optimizer(regime: Regime, params):
    entry = regime.optimizer
    path, kwargs = entry.factory
    if entry.uses_bitsandbytes:
        return _Bnb8bitStandIn(params, eight_bit=entry.state_bits == 8, paged=entry.paged)
    kwargs = dict(kwargs)
    if path.startswith("torch.optim.") and "fused" not in kwargs:
        kwargs.setdefault("foreach", True)  # CUDA tensors' default (torch/optim/optimizer.py)
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)(params, **kwargs)


def _no_data():
    """A dispatch mode that answers a fake tensor's `.item()` (`aten._local_scalar_dense`) with
    zero of its kind, which fake tensors cannot answer. Memory does not depend on these values
    where the libraries read them: Adafactor's learning-rate scale (`_get_lr`, `_rms`), LongRoPE's
    longest position, picking the short or the long factors of one size."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    scalar = torch.ops.aten._local_scalar_dense.default

    class NoData(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is scalar:
                dtype = args[0].dtype
                return False if dtype is torch.bool else (0.0 if dtype.is_floating_point else 0)
            return func(*args, **(kwargs or {}))

    return NoData()


@contextlib.contextmanager
def _quiet_bitsandbytes():
    import logging

    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _unpacked_positions():
    """transformers' mask creation as it runs on real tensors for SPEC's inputs (one unpadded
    sequence per row): `find_packed_sequence_indices` finds no packed sequences and returns None,
    so SDPA gets no mask and runs causal. On fake tensors it cannot look at the values
    (`is_tracing` is true for them), keeps the packed-sequence mask and a materialized [B, 1, S, S]
    mask follows, which also makes SDPA repeat grouped keys and values (`use_gqa_in_sdpa`)."""
    from transformers import masking_utils

    kept = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = kept


# ---- what CUDA kernels request beyond their outputs -------------------------------------------
# The device the trace stands for: an H100/H200 (sm90), 132 SMs of 2048 threads each (a reduction's
# grid is sized by them), as `stream.bnb_4bit_fused` assumes too.
SM_COUNT = 132
THREADS_PER_SM = 2048
WARP = 32


def _last_pow2(n: int) -> int:
    return max(1, 1 << (int(n).bit_length() - 1))


def reduce_staging_bytes(shape, stride, dims, out_elements_per_vec: int = 4, element_size: int = 4,
                         input_bytes: int = 2, sms: int = SM_COUNT) -> int:
    """The global-memory staging buffer ATen's CUDA reduction allocates when it splits each output's
    inputs across thread blocks (aten/src/ATen/native/cuda/Reduce.cuh: `setReduceConfig`,
    `ReduceConfig::global_memory_size`; read from the pinned CPU torch 2.13's headers, whose
    reduction config the box's 2.11 shares), for a reduction of a tensor of `shape` and `stride`
    (elements) over `dims`. `element_size` is the accumulator's (float for half, bfloat16 and float
    inputs), `input_bytes` the input's element size. 0 when the reduction stays inside one block."""
    ndim = len(shape)
    dims = {d % ndim for d in dims} if ndim else set()
    # TensorIterator: reduced dims first, each group by the input's strides (fastest first), then
    # adjacent dims of one kind coalesced where their strides chain
    order = sorted(range(ndim), key=lambda d: (d not in dims, stride[d]))
    groups: list[list] = []  # [size, stride, reduced]
    for d in order:
        if shape[d] == 1:
            continue
        if groups and groups[-1][2] == (d in dims) and groups[-1][1] * groups[-1][0] == stride[d]:
            groups[-1][0] *= shape[d]
        else:
            groups.append([shape[d], stride[d], d in dims])
    reduce_groups = [g for g in groups if g[2]]
    out_groups = [g for g in groups if not g[2]]
    num_outputs = math.prod(g[0] for g in out_groups)
    inputs = math.prod(g[0] for g in reduce_groups)
    if not reduce_groups or inputs <= 1:
        return 0
    on_fastest = not out_groups or reduce_groups[0][1] < out_groups[0][1]
    if on_fastest:
        dim0, dim1, fastest = inputs, num_outputs, reduce_groups[0][1]
    else:
        dim0, dim1, fastest = num_outputs, inputs, out_groups[0][1]
    output_vec = 1
    if fastest == 1:
        if on_fastest and dim0 >= 128 and len(reduce_groups) == 1:
            dim0 //= 4  # vectorized along the input (input_vec_size = vt0 = 4)
        elif not on_fastest:
            output_vec = out_elements_per_vec
            strides = [g[1] for g in reduce_groups] + [g[1] for g in out_groups[1:]]
            for n in [out_groups[0][0]] + strides:
                while n % output_vec:
                    output_vec //= 2
            dim0 //= output_vec
    max_threads = 512 // output_vec
    d0 = _last_pow2(dim0) if dim0 < max_threads else max_threads
    d1 = _last_pow2(dim1) if dim1 < max_threads else max_threads
    width = min(d0, WARP)
    height = min(d1, max_threads // width)
    width = min(d0, max_threads // height)
    step_input, step_output = 1, 1
    x_reduce = on_fastest
    if on_fastest:
        step_input *= width
    else:
        step_output *= width
    per_thread = -(-inputs // step_input)
    split_warps = per_thread >= min(height * 16, 256)
    if split_warps:
        step_input *= height
    else:
        step_output *= height
    per_thread = -(-inputs // step_input)
    grid = -(-(num_outputs // output_vec) // step_output)
    target = sms * (THREADS_PER_SM // (width * height))
    if not (split_warps and per_thread >= 256 and grid <= target):
        return 0
    ctas = max(min(-(-target // grid), -(-per_thread // 16)), -(-per_thread // 256))
    if ctas <= 1:
        return 0
    size = element_size * num_outputs * ctas
    if not x_reduce:
        size *= width * output_vec
    return size


# cuDNN's fused attention backward (the SDPA kernel torch 2.11 picks on the H200 for bf16 and fp16
# without a mask) requests one workspace per call, B·H·S·(8·D + 4) + 256 bytes: read off the
# allocator histories of three training steps on the H200 (Qwen2.5-0.5B D=64, Llama-3.2-3B D=128,
# Gemma-3-4B D=256; validation/results_h200/streams/), where it is the only request between the
# gradients of q, k and v and their release. Its code is cuDNN's, not open, so this is a measured
# layout: fp32 accumulators of 2·D per row and one fp32 statistic.
CUDNN_SDPA_BACKWARD_BYTES_PER_ROW = (8, 4)  # (per head dim, fixed), bytes per (batch, head, position)
CUDNN_SDPA_BACKWARD_FIXED_BYTES = 256

# embedding_dense_backward_cuda sorts the indices for N > 3072 and sums each index's rows in
# partial segments: `grad_weight_per_segment` is [N / NROWS_PER_THREAD + min(N, V), hidden rounded
# to a warp] in the accumulator's dtype (aten/src/ATen/native/cuda/Embedding.cu,
# EmbeddingBackwardKernel.cu)
EMBEDDING_NROWS_PER_THREAD = 10
EMBEDDING_SORT_THRESHOLD = 3072


class CudaTransients:
    """`meta_trace._live_bytes_mode`'s `transients` for a CUDA device (see the module docstring)."""

    def __init__(self) -> None:
        import torch

        aten = torch.ops.aten
        self.torch = torch
        self.reductions = {aten.sum.dim_IntList, aten.mean.dim}
        self.matmuls = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
        self.attention_backward = {aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
        self.embedding_backward = aten.embedding_dense_backward.default
        self.cublas_backward = False

    def __call__(self, func, args, kwargs, out):
        torch = self.torch
        if func in self.reductions:
            x = args[0]
            dims = args[1] if len(args) > 1 and args[1] is not None else list(range(x.dim()))
            if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
                size = reduce_staging_bytes(tuple(x.shape), tuple(x.stride()), dims,
                                            input_bytes=x.element_size())
                if size:
                    return ((size, False),)
            return ()
        if func in self.matmuls:
            if not self.cublas_backward and torch._C._current_graph_task_id() != -1:
                # the autograd thread's first matmul: its cuBLAS handle's workspace, cached for good
                self.cublas_backward = True
                return ((calibration.CUBLAS_WORKSPACE_BYTES, True),)
            return ()
        if func is self.embedding_backward:
            grad, indices = args[0], args[1]
            n = indices.numel()
            if n <= EMBEDDING_SORT_THRESHOLD:
                return ()
            width = -(-grad.shape[-1] // WARP) * WARP
            segments = n // EMBEDDING_NROWS_PER_THREAD + min(n, args[2])
            return ((segments * width * (8 if grad.dtype == torch.float64 else 4), False),)
        if func in self.attention_backward:
            q = args[1]  # grad_out, query, key, value, out, logsumexp, ...
            if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
                b, h, s, d = q.shape
                per_d, fixed = CUDNN_SDPA_BACKWARD_BYTES_PER_ROW
                return ((b * h * s * (per_d * d + fixed) + CUDNN_SDPA_BACKWARD_FIXED_BYTES, False),)
        return ()


@contextlib.contextmanager
def _fused_dropout():
    """`F.dropout` in training as ATen runs it on a CUDA tensor: `at::native::dropout` takes the
    fused kernel (`native_dropout`: the output and a bool mask, which autograd keeps) where the
    tensor is on CUDA, and multiplies by a float noise tensor elsewhere (`_dropout_impl`).
    `torch.nn.functional.dropout` is replaced for the trace's duration (under the trace lock): a
    function mode would not reach the forward that gradient checkpointing reruns in the backward."""
    import torch

    functional = torch.nn.functional
    dropout = functional.dropout

    def fused(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and input.numel() > 0 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    functional.dropout = fused
    try:
        yield
    finally:
        functional.dropout = dropout


def _storages(tensors) -> list[int]:
    """The bytes of each distinct storage among `tensors`, in order (a tied weight once)."""
    seen: set[int] = set()
    sizes = []
    for t in tensors:
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            sizes.append(t.untyped_storage().nbytes())
    return sizes


def _trace(config_json: str, regime: Regime, batch: int, seq_len: int):
    """The traced steps' events (("A", number, bytes) / ("F", number), in order), the base
    parameters' bytes as loaded and then the adapters' (each storage once), for the job's model and
    regime."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from estimator import inventory as inventory_module
    from estimator.meta_trace import _live_bytes_mode

    raw = json.loads(config_json)
    text_raw, multimodal = inventory_module._text_config(raw)
    dtype = getattr(torch, regime.load.torch)
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta tensors
    with inventory_module._quiet_transformers():
        model, _ = inventory_module._meta_model(raw, text_raw, multimodal, dtype=dtype,
                                                 attn_implementation=regime.attn.value)
        model.config.use_cache = False
        if regime.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base = {id(p) for p in model.parameters()}
        if regime.mode in (Mode.LORA, Mode.QLORA):
            with _quiet_bitsandbytes():  # PEFT imports bitsandbytes, whose CPU backend logs a warning
                from peft import LoraConfig, get_peft_model

            adapter = regime.adapter
            targets = "all-linear" if adapter.targets == ("all-linear",) else list(adapter.targets)
            model = get_peft_model(model, LoraConfig(r=adapter.r, lora_alpha=adapter.alpha,
                                                     lora_dropout=adapter.dropout, target_modules=targets,
                                                     bias="none", task_type="CAUSAL_LM"))
        adapters = [name for name, p in model.named_parameters() if id(p) not in base]
        with fake:  # the meta model's tensors become fake CPU ones, uninitialized
            model.to_empty(device="cpu")
            model.get_base_model().tie_weights() if hasattr(model, "get_base_model") else model.tie_weights()
        named = dict(model.named_parameters())
        param_sizes = _storages(p for name, p in named.items() if name not in adapters)
        # PEFT moves each new adapter to its base layer's device as it builds it: one request each
        adapter_sizes = _storages(named[name] for name in adapters)
        mode = _live_bytes_mode(transients=CudaTransients())
        with fake, mode, _no_data(), _unpacked_positions(), _fused_dropout():
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = _optimizer(regime, params)
            ids = torch.zeros((batch, seq_len), dtype=torch.long)
            start = len(mode.events)
            if regime.autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            events = _in_place_accumulation(list(mode.events), mode.accumulations)
    first = events[start:] if start <= len(events) else []
    return events + _later_steps(first, mode.count, TRACED_STEPS - 1), param_sizes, adapter_sizes


def _later_steps(step: list[tuple], numbered: int, count: int) -> list[tuple]:
    """The steps after the first, made from its events: the same requests in the same order, less
    what the first step made for good (the optimizer's state, cached workspaces: allocated in it
    and alive at its end), which a later step finds in place. Each copy gets new numbers from
    `numbered` on. (Tracing the second step too gives the same requests; this halves the cost.)"""
    freed = {e[1] for e in step if e[0] == "F"}
    kept = {e[1] for e in step if e[0] == "A" and e[1] not in freed}
    out: list[tuple] = []
    for k in range(count):
        offset = numbered * (k + 1)
        out += [(e[0], e[1] + offset) + tuple(e[2:]) for e in step if e[1] not in kept]
    return out


def _in_place_accumulation(events: list[tuple], accumulations: list[tuple[int, int]]) -> list[tuple]:
    """The events as CUDA tensors make them where autograd's engine sums two gradients for one input.

    `InputBuffer::accumulate` (torch/csrc/autograd/input_buffer.cpp) adds the arriving gradient into
    the buffered one in place (`old_var.add_(var)`) when it holds the last reference to it and its
    storage and the buffered tensor is a plain dense tensor (`can_accumulate_inplace`); a tensor
    subclass never qualifies, so on fake tensors it always runs `old_var + var`, a new tensor, and
    the buffered one dies right after. Where that is what the trace shows (the buffered gradient is
    released by the very next event), the pair is undone: the sum lives on in the buffered
    gradient's storage, as on the GPU. The embedding's gradient of a tied LM head (lm_head's and the
    embedding's, each vocab × hidden) and the residual stream's gradients are summed this way."""
    position = {e[1]: i for i, e in enumerate(events) if e[0] == "A"}
    alias: dict[int, int] = {}
    drop: set[int] = set()
    for made, first in accumulations:
        i = position.get(made)
        if i is None or i + 1 >= len(events) or events[i + 1] != ("F", first):
            continue
        drop |= {i, i + 1}
        alias[made] = first
    out = []
    for i, event in enumerate(events):
        if i in drop:
            continue
        if event[0] == "F" and event[1] in alias:
            target = event[1]
            while target in alias:
                target = alias[target]
            event = ("F", target)
        out.append(event)
    return out

"""A training step's allocations and frees, traced rather than written (issue 12).

The phase model sums what is alive at each phase's peak; what the caching allocator reserves also
depends on the order and sizes of everything allocated and freed before it, and a training step
makes thousands of requests (each layer's saved tensors, autograd's gradients, the loss's N×V
buffers, the optimizer's state and temporaries). Instead of writing them out by hand, this module
runs the step itself on tensors that have no memory behind them:

- the model is built from its config.json by `AutoModelForCausalLM.from_config` on the meta device,
  wrapped by PEFT's `get_peft_model` for LoRA, with gradient checkpointing turned on as the
  validation harness turns it on (`use_reentrant=False`), then moved onto fake CPU tensors
  (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and strides, no data);
- SPEC's loop runs one step (the second is made from it: `_later_steps`): the forward (under bf16
  autocast where the job uses it: CPU autocast casts the same matmul inputs to bf16 and caches the
  casts of fp32 leaf weights, as CUDA's does), `.loss.backward()`, `optimizer.step()`,
  `zero_grad(set_to_none=True)`; under transformers.Trainer, its micro-batches, accelerate's fp32
  outputs and the gradient clipping (`_trainer_micro_batches`);
- a dispatch mode (meta_trace's) sees every aten op, autograd's backward ops included, and logs
  each new storage and its release in order. Fake tensors are a tensor subclass, so a tensor that
  autograd still holds keeps its Python object and is released only when it really dies;
- a deep stack of alike layers is traced with a few of them and composed (`_composed_step`).

The load comes first, as from_pretrained makes it: `caching_allocator_warmup`'s one block of every
parameter's bytes, freed, then each parameter, then PEFT's adapters. The whole history goes
through `estimator.allocator.Allocator` under the job's allocator setting, with room to spare; its
reserved peak is what the device holds (with expandable segments, what a job needs near a card's
capacity is less: the out-of-memory retry unmaps every free page, and estimate.py sizes that
figure by whole pages). fp16 autocast (`amp_fp16`) is traced as bf16's,
whose tensors have the same sizes; GradScaler's few scalars are not.

What runs on a CPU differs from the GPU's run in places, each handled here:
- optimizers: torch's default on CUDA tensors is the foreach implementation (`_default_to_fused_or_foreach`),
  on CPU the for-loop one, so the foreach flag is set where the registry's entry leaves it open;
- the autograd engine sums two gradients for one input in place on plain tensors, never on a tensor
  subclass (`_in_place_accumulation`);
- dropout: ATen's fused CUDA kernel (`native_dropout`: the output and a bool mask) where the CPU
  path multiplies by a float noise tensor; attention dropout inside CUDA's fused SDPA kernels,
  where the CPU falls back to the math kernel (`_fused_dropout`);
- transformers' mask creation cannot look at fake values; SPEC's unpadded rows give no mask
  (`_unpacked_positions`), and the few `.item()` reads the libraries make get zero (`_no_data`);
- what CUDA kernels request inside an op, beyond its outputs (`CudaTransients`): the staging
  buffer of a reduction split across thread blocks (norm and bias gradients), the embedding
  backward's per-segment partial sums, cuDNN attention's backward workspace, and the autograd
  thread's cuBLAS workspace;
- bitsandbytes' 8-bit and paged optimizers have no CPU path that allocates as the GPU does: a stand-in
  makes the state `Optimizer2State.init_state` makes (uint8 states with one fp32 absmax per 256-block
  for tensors of at least 4096 elements, fp32 states below; paged: tensors of at least 100,000
  elements in CUDA managed memory, outside the allocator) at the first step, and its update kernels
  work in place (bitsandbytes 0.50.2, `optim/optimizer.py`).

Checked against the allocator histories of real training steps on the H200 (SPEC's loop, the
Trainer, QLoRA, two MoE steps and two SFTTrainer steps; tests/test_train_trace.py): each reaches
the real reserved and allocated peaks within 0.5%.

Traced with stand-ins written from the libraries' code: bitsandbytes' 4-bit linears
(train_trace_bnb.py), TRL 1.16's chunked head and SFTTrainer's step (`_sft_forward`), grouped_mm
on fp32 experts. Not traced (the caller keeps the phase model's reserve): LLM.int8's linears,
Liger's Triton kernels, TRL's chunked head outside SFTTrainer, flash-attention-2, MoE stacks whose
layers differ beyond COMPOSE_ABOVE layers, and models whose forward does not run on fake tensors. Attention with a materialized mask
(a sliding window shorter than the sequence) is traced as the CPU's kernel runs it; which CUDA
kernel takes a masked call, and its workspace, is not modelled.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from functools import lru_cache

from estimator import calibration
from estimator import train_trace_bnb as bnb_trace
from estimator.allocator import Allocator
from estimator.cuda_kernels import SM_COUNT, WARP, reduce_staging_bytes  # noqa: F401 - SM_COUNT: re-exported
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
    if regime.quantizer is not None and not regime.quantizer.is_4bit:
        return "LLM.int8's linears are not traced yet"
    if regime.liger_kernels or regime.loss is Loss.LIGER:
        return "Liger's kernels are not traced"
    if regime.loss is Loss.CHUNKED and not regime.sft:
        return "TRL's chunked head outside SFTTrainer is not traced"
    if regime.attn is Attention.FLASH_ATTENTION_2:
        return "flash-attention-2 is not installed here"
    if inv.moe is not None and inv.num_layers > COMPOSE_ABOVE and (
            len(inv.moe.layers) != inv.num_layers or not _composable(inv.config_json)):
        # DeepSeek's dense first layers, Llama 4's interleaved ones, Qwen3-Next's two attentions: the
        # stack is not composed from a few traced layers, and tracing every layer of such a model
        # takes a minute or more
        return "an MoE stack whose layers differ is not composed from a few traced layers"
    if regime.optimizer is None:
        return "no optimizer"
    return None


def step_reserve(inv: Inventory, regime: Regime, sizes: Sizes) -> tuple[int, int] | None:
    """(peak reserved, peak allocated) of the load and the traced steps replayed through the
    caching allocator under the job's setting (default or expandable segments), with room to spare,
    or None where the step is not traced (`untraced_reason`) or its trace fails (`trace_failure`
    says why)."""
    if untraced_reason(inv, regime) is not None:
        return None
    result = _step_reserve(inv.config_json, regime, sizes.batch, sizes.seq_len, sizes.accumulation)
    return None if isinstance(result, str) else result


def trace_failure(inv: Inventory, regime: Regime, sizes: Sizes) -> str | None:
    """Why a traceable job's trace failed (the exception, in a line), or None."""
    if untraced_reason(inv, regime) is not None:
        return None
    result = _step_reserve(inv.config_json, regime, sizes.batch, sizes.seq_len, sizes.accumulation)
    return result if isinstance(result, str) else None


@lru_cache(maxsize=64)
def _step_reserve(config_json: str, regime: Regime, batch: int, seq_len: int, accumulation: int = 1):
    """(peak reserved, peak allocated), or the failure as one line."""
    from estimator import inventory as inventory_module

    try:
        # the trace changes process-wide state (logging and warning filters, three library
        # functions it stands in for, SDPA's backend flags): no other trace or model build meanwhile
        with _LOCK, inventory_module._BUILD_LOCK:
            events, param_sizes, adapter_sizes = _trace(config_json, regime, batch, seq_len, accumulation)
    except Exception as err:  # noqa: BLE001 - a forward that does not run on fake tensors: no trace
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    allocator = replay(events, param_sizes, adapter_sizes, expandable_segments=regime.expandable_segments)
    return allocator.peak_reserved_bytes, allocator.peak_allocated_bytes


def replay(events: list[tuple], param_sizes: list[int], adapter_sizes: list[int],
           capacity_bytes: int = 1 << 50, expandable_segments: bool = False) -> Allocator:
    """The load (caching_allocator_warmup's one block, freed, then each parameter and adapter; none
    where `param_sizes` is empty and the events begin with the load, as a 4-bit one does) and the
    traced events (("C",): torch.cuda.empty_cache) through the caching allocator (with room to
    spare, under the job's allocator setting); returns it after the last event."""
    allocator = Allocator(capacity_bytes=capacity_bytes, expandable_segments=expandable_segments)
    if param_sizes:  # a load written in the events themselves (4-bit: train_trace_bnb) has none
        allocator.free(allocator.malloc(warmup_bytes(sum(param_sizes), load_unused_bytes(expandable_segments))))
    for size in param_sizes + adapter_sizes:
        allocator.malloc(size)
    handles: dict[int, int | None] = {}
    for event in events:
        if event[0] == "A":
            handles[event[1]] = allocator.malloc(event[2]) if event[2] > 0 else None
        elif event[0] == "F":
            h = handles.pop(event[1], None)
            if h is not None:
                allocator.free(h)
        elif event[0] == "C":  # torch.cuda.empty_cache()
            allocator.empty_cache()
    return allocator


def load_unused_bytes(expandable_segments: bool) -> int:
    """Reserved but unallocated memory as from_pretrained starts under SPEC's protocol: the context
    probe's freed 2 MiB small-pool segment (calibration.LOAD_UNUSED_RESERVED_BYTES) and, with
    expandable segments, the unused part of the 20 MiB pages mapped for cuBLAS's workspace (the
    probe's first matmul made it; without them it is a segment of its own size)."""
    unused = calibration.LOAD_UNUSED_RESERVED_BYTES
    if expandable_segments:
        unused += -calibration.CUBLAS_WORKSPACE_BYTES % (20 * 1024**2)  # CUDACachingAllocator.cpp: kLargeBuffer pages
    return unused


def warmup_bytes(byte_count: int, unused: int = calibration.LOAD_UNUSED_RESERVED_BYTES) -> int:
    """The block transformers' `caching_allocator_warmup` allocates and frees before the weights
    load, for weights of `byte_count` bytes (transformers 5.17 modeling_utils.py), when `unused`
    bytes are already reserved but unallocated (`load_unused_bytes`). Its cap (the device's memory
    less 1.2 GiB) never binds on the GPUs the replay stands for."""
    if byte_count - unused > unused:
        return byte_count - unused
    if byte_count - unused > 1.5 * 1024**3:
        return unused + 1
    return 0


class _Bnb8bitStandIn:
    """bitsandbytes' Optimizer2State as the caching allocator sees it (see the module docstring)."""

    def __init__(self, params, eight_bit: bool, paged: bool, fp32: frozenset = frozenset()) -> None:
        self.params = [p for p in params]
        self.eight_bit, self.paged = eight_bit, paged
        self.fp32 = fp32  # ids of parameters registered for 32-bit states (GlobalOptimManager)
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
            if self.eight_bit and p.numel() >= BNB_MIN_8BIT_SIZE and id(p) not in self.fp32:
                blocks = math.ceil(p.numel() / BNB_OPTIMIZER_BLOCKSIZE)
                self.state[id(p)] = [self._buffer(p, torch.uint8), self._buffer(p, torch.uint8),
                                     torch.zeros((blocks,), dtype=torch.float32),
                                     torch.zeros((blocks,), dtype=torch.float32)]
            else:
                self.state[id(p)] = [self._buffer(p, torch.float32), self._buffer(p, torch.float32)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _optimizer(regime: Regime, params, embeddings: frozenset = frozenset()):
    """The job's optimizer over `params` as it runs on CUDA tensors. Under the Trainer, bitsandbytes'
    8-bit optimizers keep every nn.Embedding's weight (`embeddings`: their ids) in 32-bit states
    (`Trainer.create_optimizer` registers them with GlobalOptimManager)."""
    entry = regime.optimizer
    path, kwargs = entry.factory
    if entry.uses_bitsandbytes:
        fp32 = embeddings if regime.trainer else frozenset()
        return _Bnb8bitStandIn(params, eight_bit=entry.state_bits == 8, paged=entry.paged, fp32=fp32)
    kwargs = dict(kwargs)
    if path.startswith("torch.optim.") and "fused" not in kwargs:
        kwargs.setdefault("foreach", True)  # CUDA tensors' default (torch/optim/optimizer.py)
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)(params, **kwargs)


def _no_data():
    """A dispatch mode that answers a fake tensor's `.item()` (`aten._local_scalar_dense`) that the
    fake tensor cannot answer (it holds no data) with zero of its kind. Memory does not depend on these values
    where the libraries read them: Adafactor's learning-rate scale (`_get_lr`, `_rms`), LongRoPE's
    longest position, picking the short or the long factors of one size."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    scalar = torch.ops.aten._local_scalar_dense.default

    from torch._subclasses.fake_tensor import DataDependentOutputException

    class NoData(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is scalar:
                try:  # a fake tensor made from a constant (an optimizer's step count) knows its value
                    return func(*args, **(kwargs or {}))
                except DataDependentOutputException:
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
# (the launch configurations: estimator.cuda_kernels)


# cuDNN's fused attention backward (the SDPA kernel torch 2.11 picks on the H200 for bf16 and fp16
# without a mask) requests one workspace per call, B·H·S·(8·D + 4) + 256 bytes: read off the
# allocator histories of three training steps on the H200 (Qwen2.5-0.5B D=64, Llama-3.2-3B D=128,
# Gemma-3-4B D=256; validation/results_h200/streams/), where it is the only request between the
# gradients of q, k and v and their release. Its code is cuDNN's, not open, so this is a measured
# layout: fp32 accumulators of 2·D per row and one fp32 statistic.
CUDNN_SDPA_BACKWARD_BYTES_PER_ROW = (8, 4)  # (per head dim, fixed), bytes per (batch, head, position)
CUDNN_SDPA_BACKWARD_FIXED_BYTES = 256

# _foreach_norm on CUDA (aten/src/ATen/native/cuda/ForeachReduceOp.cu, foreach_tensor_norm_cuda)
# first zeros one partial result per chunk of kChunkSize elements (MultiTensorApply.cuh) for every
# tensor, as many chunks per tensor as its largest has, in the op-math dtype (fp32 below double),
# and frees it when the norms are out: the Trainer's gradient clipping requests it once per step
FOREACH_CHUNK_SIZE = 65536

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
        self.matmuls = {aten.mm.default, aten.mm.out, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
        self.attention_backward = {aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
        self.embedding_backward = aten.embedding_dense_backward.default
        self.foreach_norm = aten._foreach_norm.Scalar
        self.addmm = aten.addmm.default
        self.native_dropout = aten.native_dropout.default
        self.cublas_backward = False
        self.lt_threads: set[bool] = set()  # threads (the autograd engine's or not) with a cuBLASLt workspace

    def order(self, func, outputs):
        """The order in which CUDA allocates an op's outputs, where it differs from the returned
        tuple's: `dropout_cuda` (aten/src/ATen/native/cuda/Dropout.cu) makes the mask before the
        output."""
        if func is self.native_dropout:
            return list(reversed(outputs))
        return outputs

    def __call__(self, func, args, kwargs, out):
        torch = self.torch
        if func in self.reductions:
            x = args[0]
            dims = args[1] if len(args) > 1 and args[1] is not None else list(range(x.dim()))
            if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
                size = reduce_staging_bytes(tuple(x.shape), tuple(x.stride()), dims)
                if size:
                    return ((size, False),)
            return ()
        if func in self.matmuls:
            made = []
            backward = torch._C._current_graph_task_id() != -1
            if not self.cublas_backward and backward:
                # the autograd thread's first matmul: its cuBLAS handle's workspace, cached for good
                self.cublas_backward = True
                made.append((calibration.CUBLAS_WORKSPACE_BYTES, True))
            if (func is self.addmm and args[0].dim() == 1 and kwargs.get("beta", 1) == 1
                    and backward not in self.lt_threads):  # the bias epilogue: cuBLASLt's workspace
                self.lt_threads.add(backward)
                made.append((calibration.CUBLASLT_WORKSPACE_BYTES, True))
            return tuple(made)
        if func is self.foreach_norm:
            tensors = [t for t in args[0] if t.numel() > 0]
            if not tensors:
                return ()
            chunks = max(-(-t.numel() // FOREACH_CHUNK_SIZE) for t in tensors)
            width = 8 if tensors[0].dtype == torch.float64 else 4
            return ((len(args[0]) * chunks * width, False),)
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
def _fused_dropout(keep_attention_dropout: bool = False):
    """`F.dropout` in training as ATen runs it on a CUDA tensor: `at::native::dropout` takes the
    fused kernel (`native_dropout`: the output and a bool mask, which autograd keeps) where the
    tensor is on CUDA, and multiplies by a float noise tensor elsewhere (`_dropout_impl`).
    Attention dropout likewise: SDPA runs as its CUDA kernels do (see `fused_attention`).
    `torch.nn.functional.dropout` and `scaled_dot_product_attention` are replaced for the trace's
    duration (under the trace lock): a function mode would not reach the forward that gradient
    checkpointing reruns in the backward."""
    import torch

    functional = torch.nn.functional
    dropout = functional.dropout

    def fused(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and input.numel() > 0 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    sdpa = functional.scaled_dot_product_attention

    def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        # SDPA with dropout on the CPU falls back to its math kernel (scores and masks of B·H·S²);
        # CUDA's fused kernels apply dropout inside and keep only the RNG's seed and offset for the
        # backward, so their memory is that of the kernel without dropout (where CUDA runs the
        # math kernel too, its dropout stays)
        p = dropout_p if keep_attention_dropout else 0.0
        narrow = value.shape[-1] < query.shape[-1]
        if narrow and not keep_attention_dropout:
            # a value head narrower than the query's (MLA: DeepSeek's 128 against 192): CUDA's
            # memory-efficient kernel takes it in O(S) memory, where the CPU's flash kernel refuses
            # it and its math kernel would hold the B·H·S² scores. The trace runs the flash kernel
            # on the value zero-padded to the query's width and keeps the value's columns: the
            # fused kernel's memory, plus the padded value (B·H·S·(Dq − Dv) more per layer)
            width = value.shape[-1]
            padded = functional.pad(value, (0, query.shape[-1] - width))
            return sdpa(query, key, padded, attn_mask, p, *args, **kwargs)[..., :width]
        return sdpa(query, key, value, attn_mask, p, *args, **kwargs)

    functional.dropout = fused
    functional.scaled_dot_product_attention = fused_attention
    try:
        yield
    finally:
        functional.dropout = dropout
        functional.scaled_dot_product_attention = sdpa


_GROUPED_MM: list = []


def _grouped_mm_function():
    """`torch._grouped_mm` for inputs other than bf16, as CUDA runs it: ATen's fallback (one
    `mm_out` per group into an output made once, GroupedBlas.cpp) whose backward is another grouped
    matmul per input that needs a gradient (derivatives.yaml). The meta kernel, which fake tensors
    run, accepts bf16 only, so QLoRA's experts, which prepare_model_for_kbit_training upcasts to
    fp32, would not trace."""
    import torch

    class GroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, input, weight, offs):
            ctx.save_for_backward(input, weight)
            return input.new_empty((input.shape[0], weight.shape[-1]))

        @staticmethod
        def backward(ctx, grad):
            input, weight = ctx.saved_tensors
            grad_input = torch.empty_like(input) if ctx.needs_input_grad[0] else None
            grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
            return grad_input, grad_weight, None

    return GroupedMM


@contextlib.contextmanager
def _grouped_mm_any_dtype():
    """`torch.nn.functional.grouped_mm` (what transformers' grouped_mm experts call) made to take
    fp32 inputs as CUDA does (`_grouped_mm_function`); bf16 goes to the real op."""
    import torch

    functional = torch.nn.functional
    kept = getattr(functional, "grouped_mm", None)
    if kept is None:
        yield
        return
    if not _GROUPED_MM:
        _GROUPED_MM.append(_grouped_mm_function())

    def grouped_mm(input, weight, offs=None, *args, **kwargs):
        if input.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
            return kept(input, weight, *args, offs=offs, **kwargs)
        return _GROUPED_MM[0].apply(input, weight, offs)

    functional.grouped_mm = grouped_mm
    try:
        yield
    finally:
        functional.grouped_mm = kept


def _load_order(named: list[tuple], model, distinct: bool = True) -> list[int]:
    """The bytes of each base parameter's storage (a tied weight once) in the order from_pretrained
    materializes them: the checkpoint's names sorted (transformers 5.17 core_model_loading sorts
    the state dict by `dot_natural_key`; PEFT's `base_model.model.` prefix and plain renamings
    undone, `_checkpoint_names`). Its four loader threads finish near that order; which of the
    first few lands first is a race, not written. `distinct=False`: one request per entry (a
    composed stack's middle layers share the traced layer's tensors)."""
    from transformers.core_model_loading import dot_natural_key

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    checkpoint_name, _ = _checkpoint_names(base)
    keyed = sorted(((dot_natural_key(checkpoint_name(name.removeprefix("base_model.model."))), i, p)
                    for i, (name, p) in enumerate(named)), key=lambda row: (row[0], row[1]))
    if not distinct:
        return [p.untyped_storage().nbytes() for _, _, p in keyed]
    return _storages(p for _, _, p in keyed)


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


def _trace(config_json: str, regime: Regime, batch: int, seq_len: int, accumulation: int = 1):
    """The traced steps' events (("A", number, bytes) / ("F", number), in order), the base
    parameters' bytes as loaded and then the adapters' (each storage once), for the job's model and
    regime. A stack of more than COMPOSE_ABOVE alike layers is traced with TEMPLATE_LAYERS of them
    and composed (`_composed_step`); any other, whole."""
    import torch

    raw = json.loads(config_json)
    layers = _alike_layers(raw)
    composed = None
    if layers > COMPOSE_ABOVE and accumulation == 1:
        try:
            composed = _composed_step(raw, regime, batch, seq_len, layers)
        except Exception:  # noqa: BLE001 - the few layers would not trace: try the whole stack
            composed = None
    if composed is not None:
        (prefix, first), count, param_sizes, adapter_sizes = composed
        return prefix + first + _later_steps(first, count, TRACED_STEPS - 1), param_sizes, adapter_sizes
    model, param_sizes, adapter_sizes, load = _build(raw, regime)
    if load is not None:  # 4-bit: the load's own requests come first, numbered apart from the step's
        load = _load_program(load, regime)
    with _step_context(model._trace_fake_mode, model, _math_attention(model, regime),
                       quantized=load is not None) as mode, _leaf_grads(model, mode) as pairs:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(regime, params, _embedding_weights(model))
        if regime.trainer:
            _trainer_micro_batches(model, regime, batch, seq_len, accumulation)
            _clip(params)
        else:  # SPEC's loop; with gradient accumulation, its micro-batches one after another
            ids = torch.zeros((batch, seq_len), dtype=torch.long)
            for _ in range(accumulation):
                _forward_backward(model, regime, ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    aliases: dict = {}
    first = _in_place_accumulation(list(mode.events), mode.accumulations, aliases)
    first = _grad_first(first, [(t, aliases.get(g, g)) for t, g in pairs])
    return (load or []) + first + _later_steps(first, mode.count, TRACED_STEPS - 1), param_sizes, adapter_sizes


def _embedding_weights(model) -> frozenset:
    import torch

    return frozenset(id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding))


def _build(raw: dict, regime: Regime):
    """The job's model on fake CPU tensors (LoRA-wrapped as PEFT wraps it, gradient checkpointing on
    as the harness turns it on), with its base parameters' and its adapters' bytes, and for a 4-bit
    job what its load is made of instead (`_load_spec`; the two byte lists are then empty)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from estimator import inventory as inventory_module

    text_raw, multimodal = inventory_module._text_config(raw)
    dtype = getattr(torch, regime.load.torch)
    quantized = regime.quantizer is not None
    # the inventory's lock too: transformers' model building is not meant to run concurrently
    with inventory_module._BUILD_LOCK, inventory_module._quiet_transformers():
        model, _ = inventory_module._meta_model(raw, text_raw, multimodal, dtype=dtype,
                                                 attn_implementation=regime.attn.value)
        model.config.use_cache = False
        spec = None
        if quantized:  # as the harness loads it: BitsAndBytesConfig, then prepare_model_for_kbit_training
            with _quiet_bitsandbytes():
                from peft import prepare_model_for_kbit_training

            bnb_trace.quantize_meta(model, regime)
            spec = _load_spec(model, regime)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=regime.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif regime.gradient_checkpointing:
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
        adapters = {name for name, p in model.named_parameters() if id(p) not in base}
        fake = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta tensors
        with fake:  # the meta model's tensors become fake CPU ones, uninitialized
            model.to_empty(device="cpu")
            (model.get_base_model() if hasattr(model, "get_base_model") else model).tie_weights()
            if quantized:
                bnb_trace.pack(model, regime)
    model._trace_fake_mode = fake
    named = dict(model.named_parameters())
    if regime.sft and regime.adapter is not None and regime.gradient_checkpointing:
        model.enable_input_require_grads()  # SFTTrainer.__init__, for PEFT with checkpointing
    if quantized:
        compute = getattr(torch, regime.quantizer.compute.torch).itemsize
        spec["adapters"] = [(name, (p.numel() * compute, p.untyped_storage().nbytes()))
                            for name, p in named.items() if name in adapters]
        if regime.sft:  # SFTTrainer.__init__: a quantized model's trainable parameters to bf16, one by one
            with fake:
                for name, p in named.items():
                    if p.requires_grad and "lora_magnitude_vector" not in name:
                        p.data = p.data.to(torch.bfloat16)
            spec["adapters"] = [(name, sizes + (named[name].untyped_storage().nbytes(),)) for name, sizes in spec["adapters"]]
        return model, [], [], spec
    param_sizes = _load_order([(name, p) for name, p in named.items() if name not in adapters], model)
    # PEFT moves each new adapter to its base layer's device as it builds it: one request each
    adapter_sizes = _storages(p for name, p in named.items() if name in adapters)
    return model, param_sizes, adapter_sizes, None


LOAD_NUMBERS = -(1 << 40)  # a 4-bit load's events are numbered from here, below any step's


def _load_program(spec: dict, regime: Regime) -> list[tuple]:
    """A 4-bit load's events (train_trace_bnb.load_events), its weights in the order from_pretrained
    loads them: the state dict sorted by name, layer indices as numbers (transformers'
    `core_model_loading.dot_natural_key`)."""
    from transformers.core_model_loading import dot_natural_key

    weights = [item for _, item in sorted(spec["weights"], key=lambda entry: dot_natural_key(entry[0]))]
    return bnb_trace.load_events(weights, spec["buffers"], spec["casts"], [a for _, a in spec["adapters"]],
                                 regime.double_quant, LOAD_NUMBERS,
                                 warmup=lambda n: warmup_bytes(n, load_unused_bytes(regime.expandable_segments)))[0]


def _whole_load_spec(spec: dict, stack_name: str, layers: int) -> dict:
    """A 4-bit load's spec (`_load_spec`) for the whole model, from that of TEMPLATE_LAYERS: as
    `_whole_parameters` does, the first and last layers as the traced ones, the middle one for
    every layer between, each renamed to its own index (the load's order sorts by name)."""
    k, last = TEMPLATE_LAYERS, layers - 1

    def expand(entries, prefix):
        head = f"{prefix}."
        before, after, per_layer = [], [], {i: [] for i in range(k)}
        seen = False
        for name, value in entries:
            if name.startswith(head) and name[len(head):].split(".", 1)[0].isdigit():
                index, rest = name[len(head):].split(".", 1)
                per_layer[int(index)].append((rest, value))
                seen = True
            else:
                (after if seen else before).append((name, value))
        out = list(before)
        for i in range(layers):
            t = i if i <= 1 else k - 1 - (last - i) if i >= last - 1 else 2
            out += [(f"{head}{i}.{rest}", value) for rest, value in per_layer[t]]
        return out + after

    def keyed(name, item):  # a plain weight or an expert stack keyed by its own layer's parameter name
        if item[0] == "q":
            return item
        head = f"{base_stack}."
        key = item[1]
        if name.startswith(head) and key.startswith(head):  # the layer the entry was expanded to
            index = name[len(head):].split(".", 1)[0]
            key = f"{head}{index}.{key[len(head):].split('.', 1)[1]}"
        return (item[0], key) + item[2:]

    base_stack = stack_name.removeprefix("base_model.model.")  # the weights' names are PEFT's base model's
    return {"weights": [(name, keyed(name, item)) for name, item in expand(spec["weights"], base_stack)],
            "buffers": spec["buffers"],
            "casts": expand(spec["casts"], base_stack),
            "adapters": expand(spec["adapters"], stack_name)}


def _load_spec(model, regime: Regime) -> dict:
    """What a 4-bit load requests, read off the quantized meta model before
    prepare_model_for_kbit_training (train_trace_bnb.load_events): the checkpoint's weights by name
    (a 4-bit one by its shape and 16-bit bytes, another by its bytes in the load dtype), the
    buffers, and the fp32 casts in `parameters()` order. PEFT's adapters are added once it has
    wrapped the model."""
    import torch

    linears = {id(m.weight): m for m in bnb_trace.linears_4bit(model)}
    size = getattr(torch, regime.load.torch).itemsize
    checkpoint_name, conversions = _checkpoint_names(model)
    weights, casts = [], []
    for name, p in model.named_parameters():  # a tied weight once
        m = linears.get(id(p))
        if m is not None:
            weights.append((checkpoint_name(name), ("q", m.out_features, m.in_features, m.out_features * m.in_features * size)))
        elif name in conversions:  # stacked from per-expert checkpoint tensors as it loads
            first, patterns = conversions[name]
            experts = p.shape[0]
            weights.append((first, ("x", name, experts, p.numel() * p.element_size() // (experts * patterns), patterns)))
            if p.dtype in (torch.float16, torch.bfloat16):
                casts.append((name, p.numel() * 4))
        else:
            weights.append((checkpoint_name(name), ("p", name, p.numel() * p.element_size())))
            if p.dtype in (torch.float16, torch.bfloat16):  # prepare_model_for_kbit_training's rule
                casts.append((name, p.numel() * 4))
    buffers = [b.numel() * b.element_size() for b in model.buffers()]
    return {"weights": weights, "buffers": buffers, "casts": casts}


def _checkpoint_names(model):
    """How the checkpoint names what the model holds, for the load's sorted order (transformers 5.17
    conversion_mapping, read backwards): a function from a parameter's name to its checkpoint name
    (plain WeightRenaming rules undone, as `.mlp.` back to Mixtral's `.block_sparse_moe.`), and the
    3-D expert parameters stacked from per-expert checkpoint tensors as they load (a WeightConverter
    with MergeModulelist), by name: (the checkpoint name of the first source, which places the stack
    in that order; how many source patterns it stacks, 2 where gate and up are concatenated). A
    model with no rules keeps its names and converts nothing."""
    import re

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        rules = get_checkpoint_conversion_mapping(model.config.model_type) or []
    except Exception:  # noqa: BLE001 - an older transformers converts nothing
        rules = []
    plain = [(rule.target_patterns[0], rule.source_patterns[0]) for rule in rules
             if type(rule).__name__ == "WeightRenaming" and len(rule.source_patterns) == len(rule.target_patterns) == 1
             and all(re.fullmatch(r"[\w.]+", x) for x in (rule.source_patterns[0], rule.target_patterns[0]))]

    def checkpoint_name(name: str) -> str:
        for target, source in plain:
            name = name.replace(target, source)
        return name

    conversions = {}
    for rule in rules:
        if not any(type(op).__name__ == "MergeModulelist" for op in getattr(rule, "operations", ())):
            continue
        target = rule.target_patterns[0]
        for name, p in model.named_parameters():
            if p.dim() == 3 and name.endswith(target):
                prefix = name[: len(name) - len(target)]
                first = checkpoint_name(prefix + rule.source_patterns[0].replace("*", "0"))
                conversions[name] = (first, len(rule.source_patterns))
    return checkpoint_name, conversions


class _FirstSeenSet(set):
    """A set that iterates in the order its elements were first added. transformers builds
    per-layer-type tensors (Gemma 3's two rotary tables, masks keyed by layer type) while iterating
    `set(config.layer_types)`, whose order follows the process's string hash seed: the same job
    makes the same requests in a different order from one process to the next, and reserves up to a
    segment more or less. The trace takes one order, the layer types' order in the config, so that
    an estimate is the same in every process."""

    def __init__(self, iterable=()) -> None:
        items = list(dict.fromkeys(iterable))
        super().__init__(items)
        self._order = items

    def add(self, item) -> None:
        if item not in self:
            self._order.append(item)
        super().add(item)

    def update(self, *iterables) -> None:
        for iterable in iterables:
            for item in iterable:
                self.add(item)

    def __iter__(self):
        ordered = [x for x in self._order if set.__contains__(self, x)]
        known = set(ordered)
        return iter(ordered + [x for x in set.__iter__(self) if x not in known])


@contextlib.contextmanager
def _first_seen_sets(model):
    """`set(...)` in the modules that define the model's layers, and in transformers' mask
    creation, made `_FirstSeenSet` for the step (see there)."""
    import sys

    names = {type(m).__module__ for m in model.modules()} | {"transformers.masking_utils"}
    modules = [sys.modules[n] for n in sorted(names)
               if n.startswith("transformers.") and n in sys.modules]
    missing = object()
    kept = [(m, m.__dict__.get("set", missing)) for m in modules]
    for m in modules:
        m.set = _FirstSeenSet
    try:
        yield
    finally:
        for m, old in kept:
            if old is missing:
                del m.set
            else:
                m.set = old


@contextlib.contextmanager
def _step_context(fake, model=None, math_attention: bool = False, quantized: bool = False):
    """The model's fake mode and the CUDA rules a step runs under; yields the recording mode.
    `model`: the one the step runs (its modules iterate sets in a fixed order: `_first_seen_sets`);
    `math_attention`: SDPA runs its math kernel, as CUDA's does for this job (`_math_attention`);
    `quantized`: bitsandbytes' 4-bit matmuls as their CUDA kernels allocate (train_trace_bnb)."""
    import torch.nn.attention

    from estimator import inventory as inventory_module
    from estimator.meta_trace import _live_bytes_mode

    mode = _live_bytes_mode(transients=CudaTransients())
    kernel = contextlib.nullcontext()
    if math_attention:
        kernel = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    ordered = _first_seen_sets(model) if model is not None else contextlib.nullcontext()
    matmuls = bnb_trace.cuda_matmuls() if quantized else contextlib.nullcontext()
    with inventory_module._quiet_transformers(), fake, mode, _no_data(), _unpacked_positions(), \
            _fused_dropout(keep_attention_dropout=math_attention), kernel, ordered, matmuls, _autocast_query(), \
            _grouped_mm_any_dtype():
        yield mode


def _math_attention(model, regime: Regime) -> bool:
    """Whether SDPA takes its math kernel on CUDA for this job (terms/activations.attention_kernel):
    fp32 compute with grouped keys, where the fused kernels take no `enable_gqa`. The CPU's flash
    kernel would run it in O(S) memory; the math kernel materializes the scores."""
    from estimator.dtypes import BF16, FP32
    from estimator.terms.activations import attention_kernel

    if regime.attn is not Attention.SDPA:
        return False
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    dtype = FP32 if regime.compute == FP32 else BF16
    return attention_kernel(regime.attn, dtype, head_dim, False, kv_heads != heads) == "math"


def _autocast(regime: Regime):
    """bf16 autocast where the job runs under it (CPU autocast stands for CUDA's), else nothing."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if regime.autocast else contextlib.nullcontext()


@contextlib.contextmanager
def _autocast_query():
    """`torch.is_autocast_enabled()` asked without a device (CUDA's, in torch 2.x) answered by the
    CPU autocast that stands for CUDA's, for the whole step: PEFT's LoRA layers cast their input
    and output only outside autocast, and gradient checkpointing's recomputed forwards run under
    the autocast state it saved."""
    import torch

    kept = torch.is_autocast_enabled

    def enabled(device_type=None):
        return kept("cpu") if device_type in (None, "cuda") else kept(device_type)

    torch.is_autocast_enabled = enabled
    try:
        yield
    finally:
        torch.is_autocast_enabled = kept


def _forward_backward(model, regime: Regime, ids) -> None:
    """SPEC's forward (under bf16 autocast where the job uses it) and `loss.backward()`."""
    model.train()
    with _autocast(regime):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    del loss


def _trainer_micro_batches(model, regime: Regime, batch: int, seq_len: int, accumulation: int) -> None:
    """transformers.Trainer's micro-batches of one optimizer step (transformers 5.17 `_run_epoch`,
    `training_step`, `compute_loss`; accelerate 1.15 `prepare_model`): all of the step's batches
    fetched first, each `input_ids` and `labels` [B, S] int64 on the device (`get_batch_samples`;
    the harness's data set gives no attention mask); each micro-batch's forward with the step's
    `num_items_in_batch`, under bf16 autocast where the job uses it, and then, as accelerate wraps
    the forward under native mixed precision, its outputs converted to fp32 (`convert_outputs_to_fp32`:
    the logits' fp32 copy, alive until `compute_loss` returns the loss); `loss.backward()`."""
    import torch
    from accelerate.utils import convert_to_fp32

    # SFTTrainer's collator (trl 1.16 DataCollatorForLanguageModeling.torch_call): input_ids, labels,
    # then an attention mask of ones, each int64 [B, S], moved to the device in that order
    count = 3 if regime.sft else 2
    batches = [tuple(torch.zeros((batch, seq_len), dtype=torch.long) for _ in range(count)) for _ in range(accumulation)]
    items = sum(b[1].ne(-100).sum() for b in batches)
    model.train()
    for ids, labels, *mask in batches:
        with _autocast(regime):
            if regime.sft:
                outputs = _sft_forward(model, ids, labels, mask[0], items)
            else:
                outputs = model(input_ids=ids, labels=labels, num_items_in_batch=items)
        if regime.autocast:  # accelerate's convert_to_fp32: every bf16/fp16 tensor of the outputs .float()
            outputs = convert_to_fp32(outputs)
        loss = outputs["loss"]
        if regime.sft:  # SFTTrainer.compute_loss's metrics: token counts, entropy and accuracy sums
            for t in (outputs["label_mask"].sum(), outputs["entropy"].detach().sum(), outputs["is_top1"].sum(),
                      mask[0].sum()):
                del t
        del outputs
        loss.backward()
        del loss
    del batches


# TRL 1.16's chunked head (trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE and trl/trainer/utils.py
# _CHUNKED_LOGPROB_CHUNK_SIZE): the projection's tile, tokens × vocabulary rows
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
_CHUNKED_HEAD: list = []


def _chunked_head_function():
    """TRL 1.16's `ChunkedLogProbFunction` as it runs on CUDA, where Triton kernels fold each tile
    into the per-token statistics in place: the requests it makes, written from its source. Forward:
    seven fp32 [N] statistics, one [min(N, 4096), 32768] tile buffer in the compute dtype, per tile
    the hidden chunk and the weight chunk cast to the compute dtype where they are of another, then
    log Z, the log-probabilities, the entropy and the top-1 flags; it saves the hidden states, the
    weight, the targets, log Z and the entropy. Backward: fp32 zeros for the hidden states' gradient
    (and the weight's, where it is trained), a tile buffer, the casts again, the fp32 accumulation in
    place (cuBLAS's fp32 output from bf16 inputs), and the gradients cast back to their inputs' dtypes."""
    import torch

    def compute_dtype(x):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype

    def tiles(hidden, weight, cd):
        """The tile buffer and each tile's projection: the hidden chunk and the weight chunk cast
        to the compute dtype (copies where they are of another), the product into the buffer.
        Returns the buffer, still alive."""
        n, vocab = hidden.shape[0], weight.shape[0]
        buffer = torch.empty((min(n, TRL_TOKEN_TILE), TRL_VOCAB_TILE), dtype=cd)
        for start in range(0, n, TRL_TOKEN_TILE):
            chunk = hidden[start:start + TRL_TOKEN_TILE].to(cd)
            for v in range(0, vocab, TRL_VOCAB_TILE):
                w = weight[v:v + TRL_VOCAB_TILE].to(cd)
                torch.mm(chunk, w.t(), out=buffer[: chunk.shape[0], : w.shape[0]])
                del w
            del chunk
        return buffer

    class ChunkedHead(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets):
            ctx.set_materialize_grads(False)
            n = hidden.shape[0]
            stats = [torch.empty((n,), dtype=torch.float32) for _ in range(7)]
            running_max, sum_exp, x_sum_exp, _sq, _z, max_before_target, target_logit = stats
            buffer = tiles(hidden, weight, compute_dtype(hidden))
            log_z = running_max + torch.log(sum_exp)
            log_probs = target_logit - log_z
            entropy = log_z - x_sum_exp / sum_exp
            is_top1 = (target_logit >= running_max) & (target_logit > max_before_target)
            del buffer, stats, running_max, sum_exp, x_sum_exp, _sq, _z, max_before_target, target_logit
            ctx.save_for_backward(hidden, weight, targets, log_z, entropy)
            ctx.mark_non_differentiable(is_top1)
            return log_probs, entropy, is_top1

        @staticmethod
        def backward(ctx, grad_log_probs, grad_entropy, _):
            hidden, weight, targets, log_z, entropy = ctx.saved_tensors
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            buffer = tiles(hidden, weight, compute_dtype(hidden))  # the fp32 sums accumulate in place
            # cast back while the buffer lives; the function's locals then go in the order made
            grads = (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
                     grad_weight.to(weight.dtype) if grad_weight is not None else None, None)
            del grad_hidden, grad_weight, buffer
            return grads

    return ChunkedHead


def _masked_rows_function():
    """`x[mask]` for a boolean mask over x's leading dimensions as CUDA runs it: the mask's nonzero,
    an int64 [N, 2] of positions, then the [N, ...] rows they pick, the positions then freed; its
    backward puts the gradient into zeros of x's shape (`index_put_` with accumulation, whose sort
    buffers are [N] int64). N, the mask's count, is given: fake tensors hold no mask to count."""
    import torch

    class MaskedRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, n):
            ctx.shape = x.shape
            where = torch.empty((n, 2), dtype=torch.long)
            rows = x.new_empty((n,) + tuple(x.shape[2:]))
            del where
            return rows

        @staticmethod
        def backward(ctx, grad):
            return grad.new_zeros(ctx.shape), None

    return MaskedRows


def _sft_forward(model, ids, labels, attention_mask, items) -> dict:
    """The forward SFTTrainer runs (trl 1.16 `add_fused_lm_head`'s `_fused_forward` with
    `fused_lm_head=True`, outputs log_probs, entropy and is_top1): the backbone without lm_head, its
    last hidden states and the labels shifted by one, the scored positions gathered (every label of
    the harness's data is scored: N = B·(S − 1); the boolean index's nonzero is an int64 [N, 2]), the
    chunked head over them (`_chunked_head_function`), each per-token output scattered back into
    zeros of [B, S − 1], and the loss."""
    import torch

    if not _CHUNKED_HEAD:
        _CHUNKED_HEAD.extend((_chunked_head_function(), _masked_rows_function()))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # the collator's mask is all ones (unpadded rows), which transformers' mask creation drops as no
    # mask (`masking_utils._ignore_causal_mask_sdpa`); on fake tensors it cannot see the ones
    # (`is_tracing`) and would materialize a [B, 1, S, S] mask, so the backbone gets none
    outputs = base.base_model(input_ids=ids, attention_mask=None, use_cache=False)
    hidden = outputs.last_hidden_state[:, :-1]
    shifted = labels[:, 1:]
    mask = shifted != -100
    n = mask.numel()
    lm_head = base.get_output_embeddings()
    scored = _CHUNKED_HEAD[1].apply(hidden, n)
    targets = _CHUNKED_HEAD[1].apply(shifted, n)
    per_token = _CHUNKED_HEAD[0].apply(scored, lm_head.weight, targets)
    log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
    del per_token, scored, targets, hidden, outputs
    loss = -log_probs.sum() / items
    return {"loss": loss, "log_probs": log_probs, "entropy": entropy, "is_top1": is_top1, "label_mask": mask}


def _clip(params) -> None:
    """The Trainer's `clip_grad_norm_` (max_grad_norm 1.0 by default; 0 still computes the norm):
    per-gradient norms, their norm, the in-place scaling; small tensors only."""
    import torch

    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)


# ---- a deep stack of alike layers, from a few of them -------------------------------------------
# A step's requests repeat layer for layer where the layers are alike: each layer's forward makes
# the same requests, and frees what the layer before it made, the same way. So a stack of more than
# COMPOSE_ABOVE alike layers is traced with TEMPLATE_LAYERS of them (the first, three in the middle
# whose requests must agree, the last), and the whole stack's forward and backward are composed
# from the middle one, its references to its neighbours carried over; the optimizer's step and
# zero_grad are traced over the whole model's parameters (their requests go parameter by
# parameter). tests/test_train_trace.py checks composed against whole traces. Where the middle
# layers' requests do not repeat (Qwen2.5-0.5B's full fine-tune with checkpointing orders one
# layer's backward unlike the next), the whole stack is traced.
TEMPLATE_LAYERS = 5
COMPOSE_ABOVE = 8
_IGNORED_ATTRIBUTES = {"layer_idx", "layer_id", "idx", "layer_number", "training", "_is_hf_initialized"}


@lru_cache(maxsize=256)
def _composable(config_json: str) -> bool:
    """Whether the config builds its decoder layers alike, so a few traced ones compose the stack."""
    return _alike_layers(json.loads(config_json)) > COMPOSE_ABOVE


def _alike_layers(raw: dict) -> int:
    """The number of decoder layers where the config builds them alike (no per-layer list in the
    built config, such as layer_types, that varies), else 0. The traced few are checked again
    (`_composed_step`: their modules' settings, then their requests)."""
    from estimator import inventory as inventory_module

    text_raw, _ = inventory_module._text_config(raw)
    num = text_raw.get("num_hidden_layers")
    if not isinstance(num, int) or isinstance(num, bool) or num <= 0:
        return 0
    try:
        with inventory_module._quiet_transformers():
            config = inventory_module._make_config(text_raw)
    except Exception:  # noqa: BLE001 - the whole trace will say what fails
        return 0
    for value in list(vars(config).values()) + list(text_raw.values()):
        if isinstance(value, (list, tuple)) and len(value) == num and len({json.dumps(v, sort_keys=True, default=str) for v in value}) > 1:
            return 0  # layers differ by position
    return num


def _alike(stack) -> bool:
    """Whether every layer of `stack` is built alike: the same modules with the same settings but
    their index."""
    def signature(layer):
        rows = []
        for name, module in layer.named_modules():
            settings = tuple(sorted((k, v) for k, v in vars(module).items()
                                    if isinstance(v, (bool, int, float, str, type(None))) and k not in _IGNORED_ATTRIBUTES))
            rows.append((name, type(module).__name__, settings))
        return tuple(rows)

    first = signature(stack[0])
    return all(signature(layer) == first for layer in stack)


def _truncated(raw: dict, layers: int) -> dict:
    """The config with `layers` decoder layers (per-layer lists cut to match)."""
    from estimator import inventory as inventory_module

    raw = json.loads(json.dumps(raw))
    text_raw, multimodal = inventory_module._text_config(raw)
    num = text_raw["num_hidden_layers"]
    for key, value in list(text_raw.items()):
        if isinstance(value, list) and len(value) == num:
            text_raw[key] = value[:layers]
    text_raw["num_hidden_layers"] = layers
    return raw


def _composed_step(raw: dict, regime: Regime, batch: int, seq_len: int, layers: int):
    """((the prefix's events, the first step's events), numbers used, the base parameters' bytes,
    the adapters' bytes) for the model with `layers` alike layers, composed from a trace of
    TEMPLATE_LAYERS of them; None where those layers are not alike or their requests do not repeat
    as they must (then the caller traces the whole stack). The whole model's parameters are the
    traced model's, its middle layer's repeated: no model of `layers` layers is built."""
    import torch

    from estimator import inventory as inventory_module

    small, _, _, spec = _build(_truncated(raw, TEMPLATE_LAYERS), regime)
    found = inventory_module._layer_stack(small, TEMPLATE_LAYERS)
    if found is None or not _alike(found[1]):
        return None
    with _step_context(small._trace_fake_mode, small, _math_attention(small, regime), quantized=spec is not None) as mode, \
            _leaf_grads(small, mode) as pairs:
        if not regime.trainer:
            ids = torch.zeros((batch, seq_len), dtype=torch.long)
        start = len(mode.events)
        handles = _markers(found[1], mode.events)
        try:
            if regime.trainer:
                _trainer_micro_batches(small, regime, batch, seq_len, 1)
            else:
                _forward_backward(small, regime, ids)
        finally:
            for h in handles:
                h.remove()
        mode.events.append(("M", "end", -1))
        grads = {mode.keys[p.grad.untyped_storage()._cdata] for p in small.parameters()
                 if p.grad is not None and p.grad.untyped_storage()._cdata in mode.keys}
    aliases: dict = {}
    events = _in_place_accumulation(list(mode.events), mode.accumulations, aliases)
    events = _grad_first(events, [(t, aliases.get(g, g)) for t, g in pairs])
    grads = {aliases.get(n, n) for n in grads}
    prefix, step = events[:start], events[start:]
    composed = _compose(step, grads, layers, mode.count)
    if composed is None:
        return None
    body, grad_numbers, used = composed
    # the whole model's parameters, in order: the traced model's with its middle layer's repeated
    params = _whole_parameters(small, found[0], layers)
    embeddings = _embedding_weights(small)
    param_sizes = _load_order([(name, p) for p, adapter, _, name in params if not adapter], small, distinct=False)
    adapter_sizes = [p.untyped_storage().nbytes() for p, adapter, _, _ in params if adapter]
    if spec is not None:  # 4-bit: the whole model's load, written out, comes first
        prefix = _load_program(_whole_load_spec(spec, found[0], layers), regime) + prefix
        param_sizes, adapter_sizes = [], []
    # the optimizer's step over them, their gradients in place, then zero_grad: it frees every
    # gradient the composed backward made
    with small._trace_fake_mode:
        stand_ins = []
        for p, _, original, _ in params:
            q = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
            if q.requires_grad:
                q.grad = torch.empty_like(q)
            stand_ins.append((q, original))
    trainable = [q for q, _ in stand_ins if q.requires_grad]
    fp32 = frozenset(id(q) for q, original in stand_ins if id(original) in embeddings)
    with _step_context(small._trace_fake_mode) as opt_mode:
        optimizer = _optimizer(regime, trainable, fp32)
        if regime.trainer:
            _clip(trainable)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    body += [(e[0], e[1] + used) + tuple(e[2:]) for e in opt_mode.events]
    body += [("F", n) for n in grad_numbers]
    return (prefix, body), used + opt_mode.count, param_sizes, adapter_sizes


def _whole_parameters(small, stack_name: str, layers: int) -> list[tuple]:
    """(parameter, is an adapter, the traced parameter it stands for, its name in the whole model)
    of the whole model, in `named_parameters` order (a tied weight once): the traced model's, its
    first and last layers as the whole model's, its middle layer standing for every layer between."""
    k = TEMPLATE_LAYERS
    head = f"{stack_name}."
    before, after, per_layer = [], [], {i: [] for i in range(k)}
    seen_layers = False
    for name, p in small.named_parameters():
        adapter = "lora_" in name
        if name.startswith(head):
            index, rest = name[len(head):].split(".", 1)
            per_layer[int(index)].append((p, adapter, p, rest))
            seen_layers = True
        else:
            (after if seen_layers else before).append((p, adapter, p, name))

    def layer(i, rows):
        return [(p, adapter, original, f"{head}{i}.{rest}") for p, adapter, original, rest in rows]

    middle = [row for i in range(1, layers - 1) for row in layer(i, per_layer[2])]
    return before + layer(0, per_layer[0]) + middle + layer(layers - 1, per_layer[k - 1]) + after


def _markers(stack, events: list) -> list:
    """Hooks that mark in `events` where each layer's forward starts (("M", "F", i)) and ends
    (("M", "f", i)), where its backward starts (("M", "B", i): the gradient of its output is
    ready), and where layer 0's
    backward ends (("M", "E", 0): the gradient of its input is ready, when it has one). Hooks on
    modules and tensors add no requests. Forwards that gradient checkpointing reruns in the backward
    are not marked (they belong to the layer's backward)."""
    import torch

    handles = []

    def pre(i):
        def hook(module, args, kwargs):
            if torch._C._current_graph_task_id() != -1:
                return
            events.append(("M", "F", i))
            x = args[0] if args else kwargs.get("hidden_states")
            if i == 0 and isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda g: events.append(("M", "E", 0)))
        return hook

    def post(i):
        def hook(module, args, kwargs, out):
            if torch._C._current_graph_task_id() != -1:
                return
            events.append(("M", "f", i))
            y = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(y, torch.Tensor) and y.requires_grad:
                y.register_hook(lambda g: events.append(("M", "B", i)))
        return hook

    for i, layer in enumerate(stack):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    return handles


def _compose(step: list[tuple], grads: set[int], layers: int, first_number: int = 0):
    """The forward and backward of `layers` alike layers from those of TEMPLATE_LAYERS (markers in
    `step`): (events, the numbers of the gradients' allocations, numbers used), or None where the
    middle layers' requests differ or a reference cannot be carried over. New allocations are
    numbered from `first_number` on (the traced run's own numbers, below it, stay with what was
    made before the step)."""
    k = TEMPLATE_LAYERS
    # cut the step into blocks: P, F0..F(k-1), M, B(k-1)..B0, E
    blocks: list[tuple[tuple, list]] = [(("P",), [])]
    for e in step:
        if e[0] == "M":
            kind, i = e[1], e[2]
            if kind == "F":
                blocks.append((("F", i), []))
            elif kind == "f" and i == k - 1:
                blocks.append((("M",), []))
            elif kind == "B":
                blocks.append((("B", i), []))
            elif kind == "E" or kind == "end":
                if blocks[-1][0] != ("E",):
                    blocks.append((("E",), []))
            continue
        blocks[-1][1].append(e)
    names = [b[0] for b in blocks]
    expected = [("P",)] + [("F", i) for i in range(k)] + [("M",)] + [("B", i) for i in reversed(range(k))] + [("E",)]
    if names != expected:
        return None
    role: dict[int, tuple] = {}  # allocation number -> (block, ordinal)
    for name, events in blocks:
        ordinal = 0
        for e in events:
            if e[0] == "A":
                role[e[1]] = (name, ordinal)
                ordinal += 1

    def relative(name, events):
        """The block's events with layer references relative to its own layer."""
        me = name[1] if len(name) == 2 else None
        out = []
        for e in events:
            if e[0] == "A":
                out.append(("A", e[2], e[1] in grads))
                continue
            target = role.get(e[1])
            if target is None:  # made before the step (the input ids…): a fixed reference
                out.append(("F", "outside", e[1]))
                continue
            (tname, ordinal) = target
            if len(tname) == 2 and me is not None:
                out.append(("F", tname[0], tname[1] - me, ordinal))
            elif len(tname) == 2:
                out.append(("F", tname[0], "abs", tname[1], ordinal))
            else:
                out.append(("F", tname[0], ordinal))
        return out

    rel = {name: relative(name, events) for name, events in blocks}
    for kind in ("F", "B"):
        # the template (traced layer 2) must make the requests its neighbour on the far side makes
        # (traced layer 3), its references to the layers around it included; traced layer 1 may
        # differ (it frees what layer 0, unlike the others, made) and stands only for layer 1
        if rel[(kind, 2)] != rel[(kind, 3)]:
            return None
        if any(r[0] == "F" and len(r) != 4 for r in rel[(kind, 2)]):
            return None  # a middle layer frees what is not a layer's: it would be freed once per layer
    last = layers - 1
    if layers < k + 1:
        return None

    def traced_of(i):  # the traced layer whose blocks composed layer i copies
        if i <= 1:
            return i
        if i >= last - 1:
            return k - 1 - (last - i)
        return 2

    def composed_of(traced: int, near: str) -> int:
        """The composed layer a reference to traced layer `traced` lands on, counted from the stack's
        start (`near="start"`) or its end."""
        if traced == 0:
            return 0
        if traced == k - 1:
            return last
        return traced if near == "start" else last - (k - 1 - traced)

    order = [(("P",), None)] + [(("F", traced_of(i)), i) for i in range(layers)] + [(("M",), None)] + \
        [(("B", traced_of(i)), i) for i in reversed(range(layers))] + [(("E",), None)]
    numbers: dict[tuple, int] = {}  # (block kind, composed layer or None, ordinal) -> number
    counter = first_number
    out: list[tuple] = []
    grad_numbers: list[int] = []
    for src, i in order:
        ordinal = 0
        for e, r in zip(blocks[names.index(src)][1], rel[src]):
            if e[0] == "A":
                numbers[(src[0], i, ordinal)] = counter
                if r[2]:
                    grad_numbers.append(counter)
                out.append(("A", counter, e[2]))
                counter += 1
                ordinal += 1
                continue
            if r[1] == "outside":
                out.append(("F", r[2]))  # made before the step: its own number
                continue
            if len(r) == 4:  # from a layer block to a layer block, `delta` layers away
                _, tkind, delta, tord = r
                traced = traced_of(i) + delta
                if traced_of(i) == 2:
                    target = i + delta  # a middle layer's neighbours (delta is -1, 0 or +1)
                else:
                    target = composed_of(traced, "start" if i <= 1 else "end")
                key = (tkind, target, tord)
            elif len(r) == 5:  # from a non-layer block to a traced layer
                _, tkind, _, traced, tord = r
                if traced == 2:
                    # what a non-layer block frees of the template layer it frees of every middle
                    # layer (autocast's cache of weight casts, emptied as autocast exits): one free
                    # each, the first and last middle layers coming from traced layers 1 and 3
                    targets = range(2, last - 1)
                elif traced in (1, k - 2):
                    targets = [1 if traced == 1 else last - 1]
                else:
                    targets = [composed_of(traced, "start")]
                for target in targets:
                    number = numbers.get((tkind, target, tord))
                    if number is None:
                        return None
                    out.append(("F", number))
                continue
            else:  # to a non-layer block
                key = (r[1], None, r[2])
            number = numbers.get(key)
            if number is None:
                return None
            out.append(("F", number))
    return out, grad_numbers, counter


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


@contextlib.contextmanager
def _leaf_grads(model, mode):
    """Yields the (tensor, its .grad) allocation numbers (the gradient's before
    `_in_place_accumulation` resolves a sum to the storage that holds it) of the step's leaf
    tensors that are not parameters and get a gradient: the input embeddings' output, made a leaf that requires grad by
    transformers' `enable_input_require_grads` (PEFT turns it on with gradient checkpointing)."""
    pairs: list[tuple[int, int]] = []

    def accumulated(t):
        keys = mode.keys.get(t.untyped_storage()._cdata), mode.keys.get(t.grad.untyped_storage()._cdata)
        if None not in keys and keys not in pairs:
            pairs.append(keys)

    def hook(module, args, out):
        if getattr(out, "is_leaf", False) and out.requires_grad:
            out.register_post_accumulate_grad_hook(accumulated)

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    handle = embeddings.register_forward_hook(hook) if embeddings is not None else None
    try:
        yield pairs
    finally:
        if handle is not None:
            handle.remove()


def _grad_first(events: list[tuple], pairs: list[tuple[int, int]]) -> list[tuple]:
    """A dying tensor releases its `.grad` before its own storage (C++ frees the TensorImpl's
    autograd meta first); on fake tensors the Python object's finalizer reports the tensor first.
    Where a pair's two frees come one right after the other in that order, they are swapped."""
    if not pairs:
        return events
    events = list(events)
    at = {e[1]: i for i, e in enumerate(events) if e[0] == "F"}
    for tensor, grad in pairs:
        i, j = at.get(tensor), at.get(grad)
        if i is not None and j == i + 1:
            events[i], events[j] = events[j], events[i]
            at[tensor], at[grad] = j, i
    return events


def _in_place_accumulation(events: list[tuple], accumulations: list[tuple[int, int]], aliases: dict | None = None) -> list[tuple]:
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
        if i is None:
            continue
        j = i + 1
        while j < len(events) and events[j][0] == "M":  # the layer markers of a composed trace
            j += 1
        if j >= len(events) or events[j] != ("F", first):
            continue
        drop |= {i, j}
        alias[made] = first
    def resolve(number):
        while number in alias:
            number = alias[number]
        return number

    out = []
    for i, event in enumerate(events):
        if i in drop:
            continue
        if event[0] == "F" and event[1] in alias:
            event = ("F", resolve(event[1]))
        out.append(event)
    if aliases is not None:  # the caller's numbers of sums, resolved to the gradient that holds them
        aliases.update({n: resolve(n) for n in alias})
    return out

"""bitsandbytes' 4-bit linears in a traced training step (QLoRA; issue 12), for estimator.train_trace.

bitsandbytes 0.50.2 quantizes a weight when it is moved to the GPU and multiplies through its CUDA
kernels, none of which run on fake tensors. What the caching allocator sees of them is a handful of
tensors per linear, and this module makes those same requests, in the same order, from the pinned
sources:

- the model: transformers' own quantizer (`Bnb4BitHfQuantizer`, its skip rules) turns the meta
  model's linears into `bnb.nn.Linear4bit`, so PEFT wraps them with its 4-bit LoRA layer (whose
  forward clones the base output) and `prepare_model_for_kbit_training` casts what is left in 16
  bits to fp32, as on the GPU. Each 4-bit weight then becomes its packed codes and its QuantState
  (`pack`) on fake tensors;
- the forward and backward (`matmul_4bit`, patched over `bitsandbytes.matmul_4bit` for the step):
  `MatMul4Bit` with the CUDA `gemm_4bit` kernel's choice (`backends/cuda/ops.py`): for more rows
  than its fused kernel takes (`stream.bnb_4bit_fused`, sm90's rule), `_dequant_linear_fallback`:
  the double-quantized absmax made fp32 and offset, the weight dequantized to the compute dtype,
  `F.linear`; else the fused kernel's output only. The backward dequantizes again
  (`functional.dequantize_4bit`: the absmax, then the weight) for `grad_output @ W`;
- the load (`load_events`): transformers' `caching_allocator_warmup` block (4-bit weights at half a
  byte per element), then weight by weight in the checkpoint's order: a plain one in the load
  dtype; a 4-bit one as its 16-bit value on the device, quantized by `Params4bit._quantize` →
  `quantize_4bit` (absmax, packed codes, the 16-entry code table, and with double quantization the
  offset, the shifted absmax, its 8-bit codes, their absmax and a copy of the 8-bit code), the value
  freed; the buffers; `prepare_model_for_kbit_training`'s fp32 casts, one by one, and its
  `torch.cuda.empty_cache()`; PEFT's adapters in the compute dtype, each then cast to fp32.
  Checked request by request against the allocator history of a real load (Llama-3.2-1B, NF4 with
  double quantization: validation/results_h200/streams/, recorded with each request's line).
"""

from __future__ import annotations

import contextlib
import math

from estimator.cuda_kernels import reduce_staging_bytes
from estimator.quantizers import BNB_4BIT_BLOCKSIZE, BNB_4BIT_CODE_ENTRIES, BNB_NESTED_BLOCKSIZE

DYNAMIC_MAP_ENTRIES = 256  # functional.create_dynamic_map: the 8-bit code of double quantization, fp32, made once


def quantize_meta(model, regime) -> None:
    """transformers' bitsandbytes quantizer on the meta model, as from_pretrained runs it before and
    after the weights load: its linears become Linear4bit, the model is marked loaded in 4-bit."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    import torch

    config = BitsAndBytesConfig(**regime.quantizer.bnb_config(regime.double_quant))
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    kept = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, regime.load.torch))  # from_pretrained builds in the load dtype:
    try:  # a new Linear4bit's bias is made in it
        quantizer._process_model_before_weight_loading(model, device_map={"": 0})
    finally:
        torch.set_default_dtype(kept)
    quantizer._process_model_after_weight_loading(model)


def linears_4bit(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def pack(model, regime) -> None:
    """Each Linear4bit's weight made its packed codes ([(N·K+1)/2, 1] uint8, frozen) with the
    QuantState `quantize_4bit` leaves (fp32 absmax per 64-block, or its 8-bit codes, offset and
    nested absmax), on fake tensors (call inside the model's fake mode)."""
    import torch
    from bitsandbytes.functional import QuantState

    nested = regime.double_quant
    dtype = getattr(torch, regime.load.torch)
    for m in linears_4bit(model):
        n, k = m.out_features, m.in_features
        blocks = math.ceil(n * k / BNB_4BIT_BLOCKSIZE)
        code = torch.empty(BNB_4BIT_CODE_ENTRIES, dtype=torch.float32)
        if nested:
            state2 = QuantState(absmax=torch.empty(math.ceil(blocks / BNB_NESTED_BLOCKSIZE), dtype=torch.float32),
                                code=torch.empty(DYNAMIC_MAP_ENTRIES, dtype=torch.float32),
                                blocksize=BNB_NESTED_BLOCKSIZE, dtype=torch.float32)
            state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8), shape=torch.Size([n, k]), code=code,
                               blocksize=BNB_4BIT_BLOCKSIZE, quant_type=regime.quantizer.name, dtype=dtype,
                               offset=torch.empty((), dtype=torch.float32), state2=state2)
        else:
            state = QuantState(absmax=torch.empty(blocks, dtype=torch.float32), shape=torch.Size([n, k]), code=code,
                               blocksize=BNB_4BIT_BLOCKSIZE, quant_type=regime.quantizer.name, dtype=dtype)
        weight = torch.nn.Parameter(torch.empty(((n * k + 1) // 2, 1), dtype=torch.uint8), requires_grad=False)
        weight.quant_state = state
        m.weight = weight
        m.quant_state = state


# ---- the step: MatMul4Bit and the CUDA gemm_4bit kernel ------------------------------------------
def _gemm_4bit(A, quant_state, bias):
    """`torch.ops.bitsandbytes.gemm_4bit` as its CUDA kernel allocates (backends/cuda/ops.py)."""
    import torch

    from estimator.stream import bnb_4bit_fused

    k = A.shape[-1]
    m, n = A.numel() // k, quant_state.shape[0]
    if bnb_4bit_fused(m, n, k):  # _gemm_4bit_kernel_impl: A made contiguous, the output
        A = A.contiguous()
        return torch.empty((*A.shape[:-1], n), dtype=A.dtype)
    return _dequant_linear_fallback(A, quant_state, bias)


def _dequant_linear_fallback(A, quant_state, bias):
    """`_dequant_linear_fallback`: the absmax rebuilt (double quantization), the weight dequantized
    into a new [N, K] tensor of A's dtype, F.linear; its locals live until it returns."""
    import torch

    absmax = quant_state.absmax
    if quant_state.nested:
        absmax_dq = torch.empty_like(quant_state.absmax, dtype=torch.float32)
        absmax = absmax_dq + quant_state.offset
    B_dq = torch.empty(tuple(quant_state.shape), dtype=A.dtype)
    return torch.nn.functional.linear(A, B_dq, bias)


def _dequantize_4bit(quant_state):
    """`functional.dequantize_4bit(B, quant_state)` as on CUDA: the nested absmax dequantized
    (dequantize_blockwise's fp32 output) and offset in place, then the weight in quant_state.dtype."""
    import torch

    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = torch.empty_like(quant_state.absmax, dtype=torch.float32)
        absmax += quant_state.offset
    return torch.empty(tuple(quant_state.shape), dtype=quant_state.dtype)


def _matmul_function():
    import torch

    class MatMul4Bit(torch.autograd.Function):
        """bitsandbytes' MatMul4Bit: the forward through gemm_4bit; it keeps the packed weight (a
        parameter: no new memory) and its state; the backward dequantizes for grad_A."""

        @staticmethod
        def forward(ctx, A, B, bias, quant_state):
            ctx.state = quant_state
            return _gemm_4bit(A, quant_state, bias)

        @staticmethod
        def backward(ctx, grad_output):
            grad_A = None
            if ctx.needs_input_grad[0]:
                grad_A = torch.matmul(grad_output, _dequantize_4bit(ctx.state).to(grad_output.dtype))
            grad_bias = grad_output.sum(0) if ctx.needs_input_grad[2] else None
            return grad_A, None, grad_bias, None

    return MatMul4Bit


def matmul_4bit(A, B, quant_state, out=None, bias=None):
    """`bitsandbytes.matmul_4bit` for the trace: gemm_4bit directly where no gradient is needed,
    MatMul4Bit otherwise (autograd/_functions.py)."""
    import torch

    needs_grad = torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad:
        return _gemm_4bit(A, quant_state, bias)
    return _MATMUL[0].apply(A, B, bias, quant_state)


_MATMUL: list = []


@contextlib.contextmanager
def cuda_matmuls():
    """`bitsandbytes.matmul_4bit` (what Linear4bit.forward calls) made `matmul_4bit` above."""
    import bitsandbytes

    if not _MATMUL:
        _MATMUL.append(_matmul_function())
    kept = bitsandbytes.matmul_4bit
    bitsandbytes.matmul_4bit = matmul_4bit
    try:
        yield
    finally:
        bitsandbytes.matmul_4bit = kept


# ---- the load ------------------------------------------------------------------------------------
def load_events(weights: list[tuple], buffers: list[int], casts: list[tuple], adapters: list[tuple],
                double_quant: bool, first_number: int, warmup=lambda byte_count: byte_count) -> tuple[list[tuple], int]:
    """The load's requests as trace events (("A", number, bytes), ("F", number), ("C",) for
    torch.cuda.empty_cache), numbered from `first_number`, and the next free number.

    `weights`, in the checkpoint's order (its names sorted, a tied weight once): ("q", out_features,
    in_features, value_bytes) for a weight the quantizer converts (its 16-bit value's bytes),
    ("p", key, bytes) for any other; ("x", key, experts, bytes of one source, patterns) for a 3-D
    expert parameter stacked from per-expert checkpoint tensors (train_trace._checkpoint_names),
    placed at its first source's name. `buffers`: the buffers from_pretrained moves off the meta device
    after the weights (`_move_missing_keys_from_meta_to_device`). `casts`, in `model.parameters()`
    order: (key, fp32 bytes) of each plain weight prepare_model_for_kbit_training casts to fp32.
    `adapters`, in PEFT's order: (bytes as made, bytes after cast_adapter_dtype[, bytes after
    SFTTrainer's cast]): PEFT moves each new adapter to its base layer's compute dtype, then casts
    16-bit adapters to fp32; SFTTrainer casts a quantized model's trainable ones to bf16 after it. `warmup(bytes)`:
    caching_allocator_warmup's block for the weights' bytes (train_trace.warmup_bytes)."""
    events: list[tuple] = []
    counter = [first_number]

    def alloc(size):
        number = counter[0]
        counter[0] += 1
        events.append(("A", number, int(size)))
        return number

    # caching_allocator_warmup: param_element_size is 0.5 for a weight the quantizer converts
    def loaded(w):
        if w[0] == "q":
            return int(w[1] * w[2] * 0.5)
        return w[2] * w[3] * w[4] if w[0] == "x" else w[2]

    warm = warmup(sum(loaded(w) for w in weights))
    if warm:
        events.append(("F", alloc(warm)))
    dynamic_made = False
    plain: dict = {}
    for w in weights:
        if w[0] == "p":
            plain[w[1]] = alloc(w[2])
            continue
        if w[0] == "x":  # experts stacked as they load (core_model_loading, no thread pool under a quantizer)
            _, key, experts, source_bytes, patterns = w
            # materialize_tensors: every source of the target, pattern after pattern
            sources = [[alloc(source_bytes) for _ in range(experts)] for _ in range(patterns)]
            stacks = []
            for group in sources:  # MergeModulelist: one torch.stack per pattern, then its list of
                stacks.append(alloc(source_bytes * experts))  # sources dropped (CPython frees a list's
                events.extend(("F", s) for s in reversed(group))  # items last to first)
            if patterns > 1:  # Concatenate: gate and up into gate_up, the two stacks then freed
                plain[key] = alloc(source_bytes * experts * patterns)
                events.extend(("F", s) for s in stacks)
            else:
                plain[key] = stacks[0]
            continue
        _, n, k, value_bytes = w
        blocks = math.ceil(n * k / BNB_4BIT_BLOCKSIZE)
        value = alloc(value_bytes)  # the checkpoint's tensor on the device (_materialize_copy)
        absmax = alloc(blocks * 4)  # the quantize_4bit CUDA op: absmax, then the packed codes
        alloc((n * k + 1) // 2)
        alloc(BNB_4BIT_CODE_ENTRIES * 4)  # get_4bit_type: torch.tensor(data, device), then
        made = alloc(BNB_4BIT_CODE_ENTRIES * 4), alloc(4)  # data.abs().max(), both freed once div_ has run
        events.extend(("F", m) for m in made)
        if double_quant:
            alloc(4)  # offset = _absmax.mean(): its output, then Reduce.cuh's staging and semaphores
            staging = reduce_staging_bytes((blocks,), (1,), [0])
            if staging:
                made = alloc(staging), alloc(4)
                events.extend(("F", m) for m in reversed(made))
            shifted = alloc(blocks * 4)  # _absmax - offset
            if not dynamic_made:  # name2qmap["dynamic"], once per process
                alloc(DYNAMIC_MAP_ENTRIES * 4)
                dynamic_made = True
            alloc(math.ceil(blocks / BNB_NESTED_BLOCKSIZE) * 4)  # quantize_blockwise: absmax, codes
            alloc(blocks)
            alloc(DYNAMIC_MAP_ENTRIES * 4)  # its QuantState's own copy of the code
            events.append(("F", shifted))
            events.append(("F", absmax))  # del _absmax
        events.append(("F", value))
    for size in buffers:
        alloc(size)
    for key, size in casts:  # prepare_model_for_kbit_training: param.data = param.data.to(fp32)
        alloc(size)
        events.append(("F", plain[key]))
    events.append(("C",))  # …then torch.cuda.empty_cache()
    made = [alloc(sizes[0]) for sizes in adapters]
    for stage in range(1, max((len(a) for a in adapters), default=1)):  # each pass of casts over them all
        for i, sizes in enumerate(adapters):
            if stage < len(sizes) and sizes[stage] != sizes[stage - 1]:
                number = made[i]
                made[i] = alloc(sizes[stage])
                events.append(("F", number))
    return events, counter[0]

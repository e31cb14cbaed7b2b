"""What CUDA kernels on the GPU the estimates stand for request beyond their outputs, and the
device figures their launch configurations depend on: shared by the traced training step
(estimator.train_trace, train_trace_bnb) and the written inference stream (estimator.stream).
"""

from __future__ import annotations

import math

# The device the estimates stand for: an H100/H200 (sm90), 132 SMs of 2048 threads each (a
# reduction's grid is sized by them, and bitsandbytes' choice of its fused 4-bit kernel).
SM_COUNT = 132
THREADS_PER_SM = 2048
WARP = 32


def _last_pow2(n: int) -> int:
    return max(1, 1 << (int(n).bit_length() - 1))


def reduce_staging_bytes(shape, stride, dims, out_elements_per_vec: int = 4, element_size: int = 4,
                         sms: int = SM_COUNT) -> int:
    """The global-memory staging buffer ATen's CUDA reduction allocates when it splits each output's
    inputs across thread blocks (aten/src/ATen/native/cuda/Reduce.cuh: `setReduceConfig`,
    `ReduceConfig::global_memory_size`; read from the pinned CPU torch 2.13's headers, whose
    reduction config the box's 2.11 shares), for a reduction of a tensor of `shape` and `stride`
    (elements) over `dims`. `element_size` is the accumulator's (float for half, bfloat16 and float
    inputs). 0 when the reduction stays inside one block."""
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
    if not on_fastest:  # no reduction across a block's x dimension: staged per lane
        size *= width * output_vec
    return size

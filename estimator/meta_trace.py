"""Live bytes of a module's forward, counted on the meta device: nothing is allocated.

A block whose working set depends on how its library writes it (transformers 5's MoE blocks:
grouped_mm's sorted copies and out-of-place masks, Llama 4's dense pass of every expert over every
token) is run once on a meta input, under a dispatch mode that sees every aten op. Each op's outputs
that are new storage (not a view or an in-place result of an input) are counted from the op that
makes them until the last tensor on them is gone; the peak of that count is the block's working set
beyond its input. Kernel-internal workspaces are not visible here (no op returns them).

Two token counts give the per-token slope, which is what the estimate scales by batch · prompt; the
intercept (bytes that do not grow with tokens) is kept too.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardBytes:
    per_token: float  # bytes per token at the peak, beyond the input
    fixed: float  # bytes at the peak that do not grow with the token count


def _live_bytes_mode(transients=None):
    """A dispatch mode that counts the bytes of storages created by ops while any tensor on them is
    alive (`live`, `peak`), and logs each new storage ("A", number, bytes) and its release ("F",
    number) in order (`events`). `accumulations` lists the (output, first input) allocation numbers
    of each out-of-place `add` that autograd's engine runs in a backward pass without grad mode
    (estimator/train_trace.py: `_in_place_accumulation`). `transients(func, args, kwargs, out)`,
    when given, names the requests a GPU kernel makes inside the op beyond its outputs, as
    (bytes, kept) pairs logged right after the outputs: a kept one is never released (a workspace
    the library caches), the others are released at once; its `order(func, outputs)`, where it
    has one, gives the order in which the GPU's kernel allocates the op's outputs."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    add = torch.ops.aten.add.Tensor

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.refs: dict[int, int] = {}  # storage id -> tensors alive on it
            self.sizes: dict[int, int] = {}
            self.keys: dict[int, int] = {}  # storage id -> its allocation's number
            self.events: list[tuple] = []
            self.accumulations: list[tuple[int, int]] = []
            self.count = 0
            self.live = 0
            self.peak = 0

        def _release(self, key: int) -> None:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                del self.refs[key]
                self.live -= self.sizes.pop(key)
                self.events.append(("F", self.keys.pop(key)))

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            out = func(*args, **kwargs)
            outputs = tree_flatten(out)[0]
            if transients is not None and hasattr(transients, "order"):
                outputs = transients.order(func, outputs)  # the GPU kernel's own allocation order
            for t in outputs:
                if not isinstance(t, torch.Tensor):
                    continue
                key = t.untyped_storage()._cdata
                if key in inputs and key not in self.refs:
                    continue  # a view or in-place result of a tensor from outside: not an allocation
                if key not in self.refs:
                    self.refs[key] = 0
                    self.sizes[key] = t.untyped_storage().nbytes()
                    self.keys[key] = self.count
                    self.count += 1
                    self.events.append(("A", self.keys[key], self.sizes[key]))
                    self.live += self.sizes[key]
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
            self.peak = max(self.peak, self.live)
            if transients is not None:
                for size, kept in transients(func, args, kwargs, out):
                    number = self.count
                    self.count += 1
                    self.events.append(("A", number, int(size)))
                    if not kept:
                        self.events.append(("F", number))
            if (func is add and len(args) == 2 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
                    and not kwargs and torch._C._current_graph_task_id() != -1 and not torch.is_grad_enabled()):
                held = args[0].untyped_storage()._cdata
                first, made = self.keys.get(held), self.keys.get(out.untyped_storage()._cdata)
                # the engine's in-place candidate: a dense tensor alone on its storage (a view, or a
                # tensor whose view is alive, shares it: `storage().use_count() == 1` fails)
                if (first is not None and made is not None and self.refs.get(held) == 1
                        and args[0].shape == out.shape and args[0].dtype == out.dtype
                        and _dense(args[0].shape, args[0].stride())):
                    self.accumulations.append((made, first))
            return out

    return LiveBytes()


def _dense(shape, stride) -> bool:
    """Whether a tensor's elements fill its memory span exactly once, in some order of its dims
    (ATen's `is_non_overlapping_and_dense`): its strides, sorted, are the running products of sizes."""
    expected = 1
    for size, step in sorted(((n, st) for n, st in zip(shape, stride) if n != 1), key=lambda d: d[1]):
        if step != expected:
            return False
        expected *= size
    return True


def _run(module, hidden: int, tokens: int, dtype):
    """`module(x)` for x of [1, tokens, hidden] on meta, without grad: (the mode, with its events cut
    at the block's return and what it returned other than its first output freed; the number of
    the allocation that is its first output, or -1 when it returns no new tensor)."""
    import torch

    x = torch.empty((1, tokens, hidden), dtype=dtype, device="meta")
    mode = _live_bytes_mode()
    with torch.no_grad(), mode:
        out = module(x)
        events = list(mode.events)  # to the block's return; what it returns is still alive
        first = out[0] if isinstance(out, (tuple, list)) else out
        output = mode.keys.get(first.untyped_storage()._cdata, -1)
        del out, first
    freed = {e[1] for e in events if e[0] == "F"}
    # the layer keeps the block's first output and drops the rest (router logits) as it returns
    events += [("F", e[1]) for e in events if e[0] == "A" and e[1] not in freed and e[1] != output]
    mode.events = events
    return mode, output


def trace_block(module, hidden: int, dtype=None, tokens: tuple[int, int] = (64, 128)):
    """`module(x)` for x of [1, T, hidden] on the meta device, without grad, run at two token counts:
    (its peak live bytes beyond the input as a per-token slope and a fixed part; its ordered
    allocations and frees as a program in T, or None where the two runs differ in their requests or
    the block returns no tensor of its own). The program is ((is_alloc, number, fixed bytes, bytes
    per token), ...) with the number of the allocation that is the block's output (alive when the
    program ends; every other tensor it returns, such as router logits, is freed at its end).
    Raises what the forward raises."""
    import torch

    dtype = dtype or torch.bfloat16
    small, large = tokens
    (ma, out_a), (mb, out_b) = _run(module, hidden, small, dtype), _run(module, hidden, large, dtype)
    slope = (mb.peak - ma.peak) / (large - small)
    peak = ForwardBytes(per_token=slope, fixed=max(0.0, ma.peak - slope * small))
    a, b = ma.events, mb.events
    if len(a) != len(b) or out_a != out_b or out_a < 0 or any(x[:2] != y[:2] for x, y in zip(a, b)):
        return peak, None
    program = []
    for x, y in zip(a, b):
        if x[0] == "A":
            per_token = (y[2] - x[2]) / (large - small)
            program.append((True, x[1], float(x[2] - per_token * small), float(per_token)))
        else:
            program.append((False, x[1], 0.0, 0.0))
    return peak, (tuple(program), out_a)


def forward_bytes(module, hidden: int, dtype=None, tokens: tuple[int, int] = (64, 128)) -> ForwardBytes:
    """The peak live bytes of `module(x)` for x of [1, T, hidden] on the meta device, without grad, as
    a per-token slope and a fixed part (`trace_block`'s first answer). Raises what the forward raises."""
    return trace_block(module, hidden, dtype, tokens)[0]


def _saved_bytes_mode(exclude: set[int]):
    """A saved-tensors hook pair that counts, once per storage, what autograd keeps for the backward,
    leaving out the storages in `exclude` (parameters, the block's input)."""
    import torch

    seen: set[int] = set()
    total = [0]

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in exclude and key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


def quadratic(points: dict[int, float]) -> tuple[float, float, float]:
    """(c, a, b) of c + a·S + b·S² through three (S, value) points."""
    import numpy as np

    s = sorted(points)
    m = np.array([[1.0, x, x * x] for x in s])
    c, a, b = np.linalg.solve(m, np.array([points[x] for x in s]))
    return float(c), float(a), float(b)


def child_costs(run, child, lengths=(32, 64, 128)) -> tuple[dict[int, int], dict[int, int]]:
    """For each sequence length S: the peak live bytes inside `child`'s forward (no grad) and the
    bytes autograd saves inside it (with grad), when `run(S, grad)` runs a forward that calls it."""
    import torch

    working: dict[int, int] = {}
    saved: dict[int, int] = {}
    for length in lengths:
        for grad in (False, True):
            state: dict = {}

            def before(module, args, kwargs):
                first = args[0] if args else kwargs.get("hidden_states")
                exclude = {p.untyped_storage()._cdata for p in module.parameters()}
                if isinstance(first, torch.Tensor):
                    exclude.add(first.untyped_storage()._cdata)
                if grad:
                    hooks, total = _saved_bytes_mode(exclude)
                    hooks.__enter__()
                    state.update(ctx=hooks, total=total)
                else:
                    mode = _live_bytes_mode()
                    mode.__enter__()
                    state.update(ctx=mode)

            def after(module, args, kwargs, output):
                ctx = state.pop("ctx", None)
                if ctx is None:
                    return
                ctx.__exit__(None, None, None)
                if grad:
                    saved[length] = state["total"][0]
                else:
                    working[length] = ctx.peak

            h1 = child.register_forward_pre_hook(before, with_kwargs=True)
            h2 = child.register_forward_hook(after, with_kwargs=True)
            try:
                run(length, grad)
            finally:
                h1.remove()
                h2.remove()
                leaked = state.pop("ctx", None)
                if leaked is not None:  # the child raised inside: leave no mode or hook behind
                    leaked.__exit__(None, None, None)
    return working, saved

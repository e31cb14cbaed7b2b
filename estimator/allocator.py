"""A replay of PyTorch's CUDA caching allocator: reserved memory and the point where allocation fails.

The rules are those of `c10/cuda/CUDACachingAllocator.cpp` (torch 2.11, the GPU box's; the CPU
side's pinned torch 2.13 has the same constants), for one stream:

- Every request is rounded up to a multiple of 512 bytes (kMinBlockSize; smaller ones to 512).
- Requests up to 1 MiB (kSmallSize) use the small pool, the rest the large pool; freed blocks go
  back to the pool they came from.
- A request is served by the smallest free block of its pool that is large enough (best fit;
  ties by address). With `max_split_size` set, a block of at least that size never serves a smaller
  request, and serves a larger one only if it exceeds it by less than 20 MiB.
- A block larger than the request is split when the rest is worth keeping: at least 512 bytes
  in the small pool; in the large pool, when the request is below `max_split_size` and the rest
  exceeds 1 MiB. A block that is not split is handed out whole (its slack counts as allocated).
- With no block to reuse, a new segment is reserved (cudaMalloc): 2 MiB (kSmallBuffer) for a small
  request, 20 MiB (kLargeBuffer) for one below 10 MiB (kMinLargeAlloc), else the request rounded up
  to 2 MiB (kRoundLarge).
- A freed block merges with its free neighbours in the same segment.
- When a reservation would exceed the capacity, the allocator first frees oversize cached blocks
  (only with `max_split_size` set), then every cached segment that is entirely free, and retries;
  if that fails too, the request is out of memory.
- With expandable segments, each pool is one mapping that grows by whole pages (20 MiB for the
  large pool, 2 MiB for the small) when no free block fits, extending a free block at its end
  where there is one; every split is kept, as the rest always stays usable; the free block that
  ends the mapping serves a request only when no other free block fits (`get_free_block` ranks it
  by the size it could grow to); on an out-of-memory retry the free pages at the end are unmapped.

`Allocator.malloc(size)` returns a handle, `free(handle)` gives it back; `reserved_bytes`,
`allocated_bytes` and their peaks are what `torch.cuda.memory_reserved()`, `memory_allocated()`
and the max variants report. The estimator feeds it generate()'s written stream
(estimator/stream.py) and a training step's traced one (estimator/train_trace.py).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # kSmallSize: the largest small-pool request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: a small-pool segment
LARGE_BUFFER = 20 << 20  # kLargeBuffer: the segment for 1-10 MiB requests, and the expandable page
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge
UNLIMITED = 1 << 62

# Where cudaMalloc puts a new segment, which decides the tie between equal-size free blocks: the
# CUDA driver reserves virtual addresses for new allocations top-down, each below the earlier ones,
# once the tail of the first reservation and the gaps near it are used (the allocator histories of
# 25 runs on the H200, validation/results_h200/streams/: after the first few segments, the
# addresses fall). Replayed with each segment below the earlier ones and no address known, 23 of
# the 25 reach their real reserved peak within 0.1% and 24 within 1% (a gpt-oss decode, -0.75%);
# in creation order the paged 8-bit AdamW step was 11.7% high, a 3B 4-bit decode 5.6% low and a
# 3B LoRA step 0.4% low. The one it misses (a 1B 4-bit decode, +4.5%) has two 64 MiB segments that
# went into a gap above the first reservation, in rising order.
SEGMENTS_TOP_DOWN = True


class OutOfMemory(Exception):
    """The request does not fit, even after the cached segments were freed."""


def round_size(size: int) -> int:
    return MIN_BLOCK if size < MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK


def allocation_size(size: int) -> int:
    """What one new segment for a (rounded) request reserves."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False, slots=True)
class _Block:
    segment: int
    offset: int
    size: int
    small: bool
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None


@dataclass
class Allocator:
    """One device's caching allocator, one stream. `capacity_bytes`: what cudaMalloc can reserve."""

    capacity_bytes: int
    max_split_size: int = UNLIMITED
    expandable_segments: bool = False
    reserved_bytes: int = 0
    allocated_bytes: int = 0
    peak_reserved_bytes: int = 0
    peak_allocated_bytes: int = 0
    retries: int = 0
    _free: dict[bool, list] = field(default_factory=lambda: {True: [], False: []})  # sorted (size, seg, off, block)
    _segments: dict[int, list[_Block]] = field(default_factory=dict)  # segment -> its blocks' head
    _live: dict[int, _Block] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)
    _mapping: dict[bool, int] = field(default_factory=dict)  # expandable: pool -> its segment id
    # Where each segment lies: equal-size free blocks are taken lowest address first
    # (CUDACachingAllocator.cpp's BlockComparatorSize: stream, size, then ptr). Without a known
    # address a segment lies below every earlier one (SEGMENTS_TOP_DOWN); a replay of a real
    # history sets `next_segment_address` to the address cudaMalloc gave the segment that request
    # created.
    _base: dict[int, int] = field(default_factory=dict)
    next_segment_address: int | None = None

    # ---- the pools ----------------------------------------------------------------------------
    def _insert(self, b: _Block) -> None:
        bisect.insort(self._free[b.small], (b.size, self._base.get(b.segment, b.segment), b.offset, id(b), b))

    def _remove(self, b: _Block) -> None:
        pool = self._free[b.small]
        pool.pop(bisect.bisect_left(pool, (b.size, self._base.get(b.segment, b.segment), b.offset, id(b))))

    def _best_fit(self, size: int, small: bool) -> _Block | None:
        """The smallest free block that serves `size`, taken out of its pool (None: there is none)."""
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size,))
        if i == len(pool):
            return None
        b = pool[i][4]
        if not self.expandable_segments:
            if size < self.max_split_size <= b.size:
                return None  # an oversize block never serves a smaller request
            if size >= self.max_split_size and b.size >= size + LARGE_BUFFER:
                return None
        elif b.next is None and i + 1 < len(pool):
            # get_free_block ranks a free block that ends the mapping by the size it could grow
            # to (`expandable_size`: its own and the unmapped space after it), so the next larger
            # free block is taken instead and the tail is kept for growth
            i += 1
            b = pool[i][4]
        del pool[i]
        return b

    def _should_split(self, b: _Block, size: int) -> bool:
        rest = b.size - size
        if b.small or self.expandable_segments:
            return rest >= MIN_BLOCK
        return size < self.max_split_size and rest > SMALL_SIZE

    # ---- malloc and free ----------------------------------------------------------------------
    def malloc(self, size: int) -> int:
        """Allocate `size` bytes; returns a handle for `free`. Raises OutOfMemory."""
        size = round_size(size)
        small = size <= SMALL_SIZE
        b = self._best_fit(size, small)
        if b is None:
            b = self._reserve(size, small)
        if self._should_split(b, size):
            rest = _Block(b.segment, b.offset + size, b.size - size, small, prev=b, next=b.next)
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            b.size = size
            self._insert(rest)
        b.free = False
        self.allocated_bytes += b.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        handle = next(self._ids)
        self._live[handle] = b
        return handle

    def free(self, handle: int) -> None:
        b = self._live.pop(handle)
        b.free = True
        self.allocated_bytes -= b.size
        for neighbour in (b.prev, b.next):
            if neighbour is not None and neighbour.free and neighbour is not b:
                self._remove(neighbour)
                if neighbour is b.prev:
                    neighbour.size += b.size
                    neighbour.next = b.next
                    if b.next is not None:
                        b.next.prev = neighbour
                    b = neighbour
                else:
                    b.size += neighbour.size
                    b.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = b
        self._insert(b)

    # ---- reserving ----------------------------------------------------------------------------
    def _reserve(self, size: int, small: bool) -> _Block:
        for attempt in range(2):
            block = self._grow(size, small) if self.expandable_segments else self._segment(size, small)
            if block is not None:
                return block
            if attempt == 0:
                self.retries += 1
                self._release_cached()
        raise OutOfMemory(f"tried to allocate {size:,} bytes with {self.reserved_bytes:,} of {self.capacity_bytes:,} reserved")

    def _segment(self, size: int, small: bool) -> _Block | None:
        amount = allocation_size(size)
        if self.reserved_bytes + amount > self.capacity_bytes:
            return None
        seg = next(self._ids)
        if self.next_segment_address is not None:
            self._base[seg] = self.next_segment_address
            self.next_segment_address = None
        elif SEGMENTS_TOP_DOWN:
            self._base[seg] = -seg
        b = _Block(seg, 0, amount, small)
        self._segments[seg] = [b]
        self._account(amount)
        return b

    def _grow(self, size: int, small: bool) -> _Block | None:
        """Expandable: extend the pool's mapping by whole pages, merging with a free tail block."""
        page = SMALL_BUFFER if small else LARGE_BUFFER
        seg = self._mapping.get(small)
        tail = None
        if seg is not None:
            tail = self._segments[seg][-1]
            while tail.next is not None:
                tail = tail.next
        have = tail.size if tail is not None and tail.free else 0
        pages = -(-(size - have) // page)
        amount = pages * page
        if self.reserved_bytes + amount > self.capacity_bytes:
            return None
        self._account(amount)
        if seg is None:
            seg = next(self._ids)
            self._mapping[small] = seg
            b = _Block(seg, 0, amount, small)
            self._segments[seg] = [b]
            return b
        if have:
            self._remove(tail)
            tail.size += amount
            return tail
        b = _Block(seg, tail.offset + tail.size, amount, small, prev=tail)
        tail.next = b
        return b

    def _account(self, amount: int) -> None:
        self.reserved_bytes += amount
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): what the out-of-memory retry releases (`release_cached_blocks`)."""
        self._release_cached()

    def _release_cached(self) -> None:
        """The out-of-memory retry: free every cached segment that is entirely free (expandable: unmap
        the free pages at the end of each mapping)."""
        for small in (True, False):
            for entry in list(self._free[small]):
                b = entry[4]
                if self.expandable_segments:
                    if b.next is None:  # the free tail of a mapping: unmap its whole pages
                        page = SMALL_BUFFER if small else LARGE_BUFFER
                        end = b.offset + b.size
                        start = -(-b.offset // page) * page
                        if end - start <= 0:
                            continue
                        self._remove(b)
                        self.reserved_bytes -= end - start
                        b.size = start - b.offset
                        if b.size:
                            self._insert(b)
                        elif b.prev is not None:
                            b.prev.next = None
                        else:
                            del self._segments[b.segment]
                            self._mapping.pop(small, None)
                elif b.prev is None and b.next is None:
                    self._remove(b)
                    self.reserved_bytes -= b.size
                    del self._segments[b.segment]

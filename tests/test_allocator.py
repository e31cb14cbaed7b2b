"""The caching allocator's rules, each on an allocation sequence worked out by hand (issue 12)."""

from __future__ import annotations

import pytest

from estimator.allocator import Allocator, OutOfMemory, allocation_size, round_size

MIB = 1 << 20
BIG = 1 << 40


def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert allocation_size(1 * MIB) == 2 * MIB  # small pool: 2 MiB segments
    assert allocation_size(1 * MIB + 512) == 20 * MIB  # 1-10 MiB: a 20 MiB segment to split
    assert allocation_size(10 * MIB) == 10 * MIB  # 10 MiB and up: rounded to 2 MiB
    assert allocation_size(11 * MIB + 512) == 12 * MIB


def test_small_requests_pack_into_one_2_mib_segment():
    a = Allocator(BIG)
    for _ in range(3):
        a.malloc(1000)
    assert a.reserved_bytes == 2 * MIB and a.allocated_bytes == 3 * 1024


def test_mid_sized_requests_split_a_20_mib_segment():
    a = Allocator(BIG)
    a.malloc(3 * MIB)
    a.malloc(3 * MIB)
    assert a.reserved_bytes == 20 * MIB and a.allocated_bytes == 6 * MIB


def test_a_rest_of_1_mib_or_less_is_not_split_off():
    a = Allocator(BIG)
    a.malloc(11 * MIB + 1)  # rounded to 11 MiB + 512; segment 12 MiB; the rest (1 MiB - 512) stays with it
    assert a.reserved_bytes == 12 * MIB and a.allocated_bytes == 12 * MIB


def test_a_freed_block_too_small_for_the_next_request_stays_reserved():
    a = Allocator(BIG)
    first = a.malloc(100 * MIB)
    a.malloc(100 * MIB)
    a.free(first)
    a.malloc(120 * MIB)
    assert a.reserved_bytes == 320 * MIB and a.allocated_bytes == 220 * MIB
    assert a.peak_reserved_bytes == 320 * MIB


def test_free_neighbours_merge_and_serve_a_larger_request():
    a = Allocator(BIG)
    x, y = a.malloc(3 * MIB), a.malloc(3 * MIB)  # one 20 MiB segment: 3 + 3 + 14 free
    a.free(x)
    a.free(y)  # merges back into one free 20 MiB block
    a.malloc(18 * MIB)
    assert a.reserved_bytes == 20 * MIB and a.allocated_bytes == 18 * MIB


def test_out_of_memory_retry_frees_cached_segments_first():
    a = Allocator(100 * MIB)
    a.free(a.malloc(60 * MIB))  # cached: 60 MiB reserved, nothing allocated
    a.malloc(70 * MIB)  # 130 > 100: the cached segment is freed and the request retried
    assert a.retries == 1 and a.reserved_bytes == 70 * MIB


def test_out_of_memory_when_nothing_cached_can_go():
    a = Allocator(100 * MIB)
    a.malloc(60 * MIB)
    with pytest.raises(OutOfMemory):
        a.malloc(50 * MIB)
    assert a.reserved_bytes == 60 * MIB


def test_max_split_size_keeps_oversize_blocks_from_small_requests():
    a = Allocator(BIG, max_split_size=100 * MIB)
    a.free(a.malloc(200 * MIB))
    a.malloc(50 * MIB)  # the cached 200 MiB block may not serve it
    assert a.reserved_bytes == 250 * MIB
    b = Allocator(BIG)  # unlimited (the default): the 200 MiB block is split instead
    b.free(b.malloc(200 * MIB))
    b.malloc(50 * MIB)
    assert b.reserved_bytes == 200 * MIB


def test_expandable_segments_grow_one_mapping_whose_free_blocks_merge():
    default, expandable = Allocator(BIG), Allocator(BIG, expandable_segments=True)
    for alloc in (default, expandable):
        x, y = alloc.malloc(100 * MIB), alloc.malloc(100 * MIB)
        alloc.free(x)
        alloc.free(y)
        alloc.malloc(150 * MIB)
    assert default.reserved_bytes == 350 * MIB  # two separate 100 MiB segments, neither large enough
    assert expandable.reserved_bytes == 200 * MIB  # one mapping of ten 20 MiB pages, its free space merged


def test_expandable_segments_keep_the_growable_tail_for_last():
    """get_free_block ranks the free block that ends the mapping by what it could grow to: a request
    that both it and a hole fit goes to the hole, and the tail still serves the next one."""
    a = Allocator(BIG, expandable_segments=True)
    hole = a.malloc(12 * MIB)  # [0, 12) of a 20 MiB page; the tail [12, 20) is free
    a.malloc(9 * MIB)  # the tail is too small: one more page; [12, 21) taken, [21, 40) free
    a.malloc(14 * MIB)  # [21, 35); the tail [35, 40) is 5 MiB
    a.free(hole)  # free: the 12 MiB hole and the 5 MiB tail
    small = a.malloc(4 * MIB)  # best fit by size is the tail; it goes to the hole instead
    assert a._live[small].offset == 0
    a.malloc(5 * MIB)  # and the tail serves this one without a new page
    assert a.reserved_bytes == 40 * MIB


def test_expandable_segments_map_whole_pages_and_unmap_them_on_a_retry():
    a = Allocator(60 * MIB, expandable_segments=True)
    a.malloc(21 * MIB)  # two 20 MiB pages; 19 MiB free at the tail
    assert a.reserved_bytes == 40 * MIB
    y = a.malloc(15 * MIB)  # served from the free tail: no new page
    assert a.reserved_bytes == 40 * MIB
    a.free(y)
    a.malloc(38 * MIB)  # the 19 MiB tail grows by one page
    assert (a.reserved_bytes, a.allocated_bytes, a.retries) == (60 * MIB, 59 * MIB, 0)
    b = Allocator(60 * MIB, expandable_segments=True)
    b.free(b.malloc(41 * MIB))  # three pages, all free again
    b.malloc(1000)  # a small-pool page would pass the capacity: the retry unmaps the large pool's pages
    assert (b.reserved_bytes, b.retries) == (2 * MIB, 1)



def test_equal_size_free_blocks_go_lowest_address_first():
    """CUDACachingAllocator.cpp's BlockComparatorSize orders free blocks by size, then address. Two
    512 MiB segments, the second at a lower address; both freed: the next 512 MiB request takes the
    second. Which one it takes decides what a later request finds: here a 100 MiB request splits
    the first segment's block only if the 512 MiB one went to the second."""
    a = Allocator(BIG)
    a.next_segment_address = 0x7F00_0000_0000
    first = a.malloc(512 * MIB)
    a.next_segment_address = 0x7E00_0000_0000  # cudaMalloc handed out a lower address
    second = a.malloc(512 * MIB)
    seg_first, seg_second = a._live[first].segment, a._live[second].segment
    a.free(first)
    a.free(second)
    again = a.malloc(512 * MIB)
    assert a._live[again].segment == seg_second
    rest = a.malloc(100 * MIB)
    assert a._live[rest].segment == seg_first and a.reserved_bytes == 1024 * MIB
    # without addresses, each new segment lies below the earlier ones (SEGMENTS_TOP_DOWN): the
    # newer one is taken first
    b = Allocator(BIG)
    h1, h2 = b.malloc(512 * MIB), b.malloc(512 * MIB)
    s2 = b._live[h2].segment
    b.free(h1)
    b.free(h2)
    assert b._live[b.malloc(512 * MIB)].segment == s2

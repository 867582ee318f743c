"""The block allocator and the paged cache's bookkeeping: no block is handed out twice, shared
blocks are counted, running out is a clear error that changes nothing, and everything is freed."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.kvcache.allocator import BlockAllocator, OutOfBlocksError
from lowbit.kvcache.cache import DenseKVCache, PagedKVCache
from lowbit.models.llama import LlamaConfig

CONFIG = LlamaConfig.tiny(n_layers=1, head_dim=16)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "share", "release"]), st.integers(0, 6)), max_size=80))
def test_allocator_never_hands_out_a_held_block(ops):
    allocator = BlockAllocator(12)
    holders: dict[int, int] = {}  # block -> expected reference count
    for op, n in ops:
        if op == "alloc":
            if n > allocator.num_free:
                with pytest.raises(OutOfBlocksError):
                    allocator.allocate(n)
                continue
            blocks = allocator.allocate(n)
            assert len(set(blocks)) == n and not set(blocks) & set(holders)
            holders.update({b: 1 for b in blocks})
        elif holders:
            block = sorted(holders)[n % len(holders)]
            if op == "share":
                allocator.share(block)
                holders[block] += 1
            else:
                allocator.release(block)
                holders[block] -= 1
                if not holders[block]:
                    del holders[block]
        allocator.check()
        assert allocator.num_used == len(holders)
        assert all(allocator.refcount(b) == c for b, c in holders.items())
    for block, count in holders.items():
        for _ in range(count):
            allocator.release(block)
    assert allocator.num_free == 12
    allocator.check()


def test_allocator_rejects_misuse():
    allocator = BlockAllocator(2)
    with pytest.raises(ValueError):
        allocator.release(0)  # free already
    with pytest.raises(ValueError):
        allocator.share(1)
    with pytest.raises(ValueError):
        allocator.allocate(-1)
    with pytest.raises(ValueError):
        BlockAllocator(0)


@pytest.fixture(scope="module")
def paged():
    return PagedKVCache(CONFIG, "f32", slots=4, max_len=64, num_pages=10, page_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["open", "grow", "fork", "close"]), st.integers(0, 40)),
                max_size=40))
def test_paged_cache_bookkeeping_over_random_requests(paged, ops):
    cache = paged
    for slot in np.flatnonzero(cache._open):
        cache.close(int(slot))
    for op, n in ops:
        open_slots = [int(s) for s in np.flatnonzero(cache._open)]
        if op == "open" and len(open_slots) < cache.slots:
            cache.open()
        elif op == "grow" and open_slots:
            slot = open_slots[n % len(open_slots)]
            target = min(cache.max_len, cache.length(slot) + n % 9 + 1)
            before = (cache.pages(slot), cache.allocator.num_free)
            if cache.can_reserve(slot, target):
                cache.reserve(slot, target)
                cache.advance(slot, target)
            else:
                with pytest.raises(OutOfBlocksError, match="free"):
                    cache.reserve(slot, target)
                assert (cache.pages(slot), cache.allocator.num_free) == before  # nothing changed
        elif op == "fork" and open_slots and len(open_slots) < cache.slots:
            src = open_slots[n % len(open_slots)]
            dst = cache.fork(src, length=n % (cache.length(src) + 1))
            assert cache.pages(dst) == cache.pages(src)[:len(cache.pages(dst))]
        elif op == "close" and open_slots:
            cache.close(open_slots[n % len(open_slots)])
        cache.allocator.check()
        holders: dict[int, int] = {}
        for slot in np.flatnonzero(cache._open):
            pages = cache.pages(int(slot))
            assert len(set(pages)) == len(pages)
            assert len(pages) == cache.pages_needed(cache.length(int(slot)))
            for page in pages:
                holders[page] = holders.get(page, 0) + 1
        assert all(cache.allocator.refcount(p) == c for p, c in holders.items())
        assert cache.allocator.num_used == len(holders)
    for slot in np.flatnonzero(cache._open):
        cache.close(int(slot))
    assert cache.allocator.num_free == cache.allocator.num_blocks


def test_copy_on_write_gives_the_writer_a_private_page(paged):
    cache = paged
    for slot in np.flatnonzero(cache._open):
        cache.close(int(slot))
    a = cache.open()
    cache.reserve(a, 6)
    cache.advance(a, 6)
    b = cache.fork(a)
    assert cache.pages(a) == cache.pages(b)
    shared_tail = cache.pages(a)[1]
    cache.reserve(b, 7)  # b writes position 6, inside the shared second page
    assert cache.pages(b)[0] == cache.pages(a)[0]  # the full first page stays shared
    assert cache.pages(b)[1] != shared_tail and cache.pages(a)[1] == shared_tail
    assert cache.allocator.refcount(cache.pages(a)[0]) == 2 and cache.allocator.refcount(shared_tail) == 1
    cache.close(a)
    cache.close(b)
    assert cache.allocator.num_free == cache.allocator.num_blocks


def test_memory_accounting_counts_real_tokens_once():
    cache = PagedKVCache(CONFIG, "int8", slots=3, max_len=64, num_pages=12, page_size=4)
    a = cache.open()
    cache.reserve(a, 10)
    cache.advance(a, 10)
    cache.fork(a)
    memory = cache.memory()
    assert memory.pages_allocated == 3 and memory.tokens_held == 10
    assert memory.utilization == pytest.approx(10 / 12)
    per_token = 2 * CONFIG.n_kv_heads * (CONFIG.head_dim + 2)  # int8 codes + f16 scale, K and V
    assert memory.bytes_per_token == per_token
    assert memory.bytes_allocated == 12 * per_token * CONFIG.n_layers
    dense = DenseKVCache(CONFIG, "int8", slots=3, max_len=64, page_size=4)
    slot = dense.open()
    dense.reserve(slot, 10)
    dense.advance(slot, 10)
    assert dense.memory().pages_allocated == 16 and dense.memory().utilization == pytest.approx(10 / 64)


def test_bounded_policy_holds_at_most_its_capacity():
    cache = PagedKVCache(CONFIG, "f32", "sinks:2,window:6", slots=2, max_len=64, num_pages=4, page_size=4)
    slot = cache.open()
    cache.reserve(slot, 50)
    cache.advance(slot, 50)
    assert len(cache.pages(slot)) == 2 and cache.memory().tokens_held == 8


def test_full_policy_refuses_a_sequence_longer_than_max_len(paged):
    for slot in np.flatnonzero(paged._open):
        paged.close(int(slot))
    slot = paged.open()
    with pytest.raises(ValueError, match="max_len"):
        paged.reserve(slot, 65)
    paged.close(slot)

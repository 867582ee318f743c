"""The KV cache a decode loop holds: device storage plus host-side block tables, lengths and a block
allocator. PagedKVCache shares one pool among sequences (prefix sharing, copy on write);
DenseKVCache gives every sequence slot its own contiguous max-length region.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lowbit.kvcache.allocator import BlockAllocator, OutOfBlocksError
from lowbit.kvcache.layout import KVLayout, parse_layout
from lowbit.kvcache.policy import FullPolicy, H2OPolicy, Policy, WindowPolicy, parse_policy
from lowbit.kvcache.store import CacheSpec, copy_pages, copy_slot, init_state, reset_slot, state_nbytes


@dataclasses.dataclass(frozen=True)
class CacheMemory:
    """Exact KV memory of a cache at one moment (all layers).

    bytes_per_token: per token per layer in pages (keys + values, codes + scales + zeros).
    pages_allocated / pages_total: pages held by sequences / in the pool; tokens_held: real tokens
    in those pages (a shared page counted once); utilization: tokens_held / (pages_allocated *
    page_size), the share of allocated page memory holding real tokens. residual_bytes: float
    residual buffers of the open sequences (KIVI). pool_bytes: every device array of the cache.
    """

    page_size: int
    pages_total: int
    pages_allocated: int
    tokens_held: int
    bytes_per_token: float
    n_layers: int
    residual_bytes: int
    pool_bytes: int

    @property
    def bytes_allocated(self) -> int:
        return round(self.pages_allocated * self.page_size * self.bytes_per_token * self.n_layers)

    @property
    def bytes_used(self) -> int:
        return round(self.tokens_held * self.bytes_per_token * self.n_layers)

    @property
    def utilization(self) -> float:
        slots = self.pages_allocated * self.page_size
        return self.tokens_held / slots if slots else 1.0


class PagedKVCache:
    """A paged KV cache for up to `slots` sequences at once, sharing a pool of `num_pages` pages of
    `page_size` tokens (16 by default; a multiple of KIVI's token group for per-channel layouts).

    Host side: each open sequence has a list of pages (its block table), a length and a slot row.
    `reserve` adds pages before tokens are written (and copies a shared page before a write lands
    in it); `fork` starts a sequence that shares all pages of another (reference counts); `close`
    releases them. Device side: `state` (see lowbit.kvcache.store.init_state) and the static `spec`.
    A full-policy sequence holds at most max_len tokens; a bounded policy holds its capacity.
    Both are capped by the model's context length (config.max_seq_len); a bounded policy's
    sequence may grow past it (its positions keep counting), a full-policy one may not.
    """

    def __init__(self, config, layout: str | KVLayout = "f32", policy: str | Policy | None = None, *,
                 slots: int = 8, max_len: int | None = None, num_pages: int | None = None,
                 page_size: int | None = None):
        for name, value in (("slots", slots), ("max_len", max_len), ("num_pages", num_pages),
                            ("page_size", page_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.config = config
        self.layout = parse_layout(layout)
        self.max_len = max_len or config.max_seq_len
        self.policy = parse_policy(policy).resolve(self.max_len)
        limit = config.max_seq_len
        if self.policy.capacity is not None and self.policy.capacity > limit:
            raise ValueError(f"KV policy {self.policy} keeps {self.policy.capacity} tokens, more than "
                             f"the model's context length max_seq_len={limit}")
        if self.policy.capacity is None and self.max_len > limit:
            raise ValueError(f"a full-policy cache of max_len={self.max_len} tokens (prompt + new "
                             f"tokens) exceeds the model's context length max_seq_len={limit}; a "
                             "bounded policy (window:N, sinks:S,window:N) may generate past it")
        self.page_size = page_size or self.layout.default_page_size()
        capacity = self.policy.capacity or self.max_len
        self.table_width = math.ceil(capacity / self.page_size)
        self.slots = slots
        pages = self._default_pages() if num_pages is None else num_pages
        self.spec = CacheSpec(config.n_layers, config.n_kv_heads, config.head_dim, self.page_size,
                              pages, slots, self.table_width, self.layout, self.policy)
        self.state = init_state(self.spec)
        self.allocator = BlockAllocator(pages)
        self._pages: list[list[int]] = [[] for _ in range(slots)]
        self._lengths = np.zeros(slots, np.int64)
        self._open = np.zeros(slots, bool)

    def _default_pages(self) -> int:
        return self.slots * self.table_width

    # ---- sequences -------------------------------------------------------------------------
    @property
    def num_open(self) -> int:
        return int(self._open.sum())

    def open(self) -> int:
        """A free sequence slot (length 0, no pages)."""
        free = np.flatnonzero(~self._open)
        if not free.size:
            raise ValueError(f"all {self.slots} sequence slots are open; close one first")
        slot = int(free[0])
        self._open[slot] = True
        self._lengths[slot] = 0
        if isinstance(self.policy, H2OPolicy):
            self.state = reset_slot(self.state, np.int32(slot))
        return slot

    def close(self, slot: int) -> None:
        """Release the sequence's pages (a shared page stays until its last holder closes)."""
        self._check_open(slot)
        for page in self._pages[slot]:
            self.allocator.release(page)
        self._pages[slot] = []
        self._lengths[slot] = 0
        self._open[slot] = False

    def length(self, slot: int) -> int:
        self._check_open(slot)
        return int(self._lengths[slot])

    def pages(self, slot: int) -> list[int]:
        self._check_open(slot)
        return list(self._pages[slot])

    def advance(self, slot: int, length: int) -> None:
        """Record that tokens up to `length` have been written (after reserve + a jitted write)."""
        self._check_open(slot)
        if length < self._lengths[slot] or self._held(length) > len(self._pages[slot]) * self.page_size:
            raise ValueError(f"length {length} of slot {slot} is not reserved (call reserve first)")
        self._lengths[slot] = length

    def truncate(self, slot: int, length: int) -> None:
        """Set the sequence back to its first `length` tokens without copying (speculative decoding
        rolls back rejected draft tokens): entries past it are never read and get overwritten, and
        pages past it return to the pool. Needs the full policy and a layout without a residual
        window (a bounded policy or a residual ring has already overwritten older tokens)."""
        self._check_open(slot)
        if not isinstance(self.policy, FullPolicy) or self.layout.has_ring:
            raise ValueError(f"a cache with policy {self.policy} and layout {self.layout.name!r} cannot roll "
                             "back: only the full policy without a residual window keeps every older token")
        current = int(self._lengths[slot])
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 <= length <= current:
            raise ValueError(f"length must be an integer in [0, {current}] (the length of slot {slot}), got {length!r}")
        self._lengths[slot] = length
        self._release_tail(slot)

    def _release_tail(self, slot: int) -> None:
        keep = self.pages_needed(int(self._lengths[slot]))
        for page in self._pages[slot][keep:]:
            self.allocator.release(page)
        del self._pages[slot][keep:]

    def _held(self, length: int) -> int:
        """Logical slots a sequence of `length` tokens occupies."""
        cap = self.policy.capacity
        return length if cap is None else min(length, cap)

    def pages_needed(self, length: int) -> int:
        return math.ceil(self._held(length) / self.page_size)

    def check_length(self, length: int) -> None:
        if isinstance(self.policy, FullPolicy) and length > self.max_len:
            raise ValueError(f"a sequence of {length} tokens exceeds max_len={self.max_len} of the cache")

    def _written_pages(self, slot: int, length: int) -> set[int]:
        """Indices into the slot's page list that writes up to `length` may touch."""
        current = int(self._lengths[slot])
        if isinstance(self.policy, H2OPolicy):
            return set(range(self.pages_needed(length)))
        if isinstance(self.policy, WindowPolicy):
            logical = {self.policy.slot(p) for p in range(current, length)}
            return {c // self.page_size for c in logical}
        back = max(self.layout.key.ring_length, self.layout.value.ring_length)
        first = max(0, current - back)
        return set(range(first // self.page_size, self.pages_needed(length)))

    def can_reserve(self, slot: int | None, length: int) -> bool:
        """Whether reserve(slot, length) would succeed (slot None: a new sequence)."""
        have = 0 if slot is None else len(self._pages[slot])
        shared = 0 if slot is None else self._shared_written(slot, length)
        return max(0, self.pages_needed(length) - have) + shared <= self.allocator.num_free

    def _shared_written(self, slot: int, length: int) -> int:
        pages = self._pages[slot]
        return sum(1 for i in self._written_pages(slot, length)
                   if i < len(pages) and self.allocator.refcount(pages[i]) > 1)

    def reserve(self, slot: int, length: int) -> None:
        """Make room for the sequence to reach `length` tokens: new pages as needed, and a private
        copy of every shared page the coming writes touch (copy on write). All or nothing: raises
        OutOfBlocksError (nothing changed) when the pool is short."""
        self._check_open(slot)
        self.check_length(length)
        pages = self._pages[slot]
        grow = max(0, self.pages_needed(length) - len(pages))
        shared = [i for i in sorted(self._written_pages(slot, length))
                  if i < len(pages) and self.allocator.refcount(pages[i]) > 1]
        if grow + len(shared) > self.allocator.num_free:
            raise OutOfBlocksError(
                f"slot {slot} needs {grow} new and {len(shared)} copied KV pages to reach {length} tokens, "
                f"but only {self.allocator.num_free} of {self.allocator.num_blocks} pages are free")
        if shared:
            fresh = self.allocator.allocate(len(shared))
            self._copy([pages[i] for i in shared], fresh)
            for i, page in zip(shared, fresh):
                self.allocator.release(pages[i])
                pages[i] = page
        pages.extend(self.allocator.allocate(grow))

    def fork(self, src: int, length: int | None = None) -> int:
        """A new sequence holding the first `length` tokens of `src` (default: all), sharing its
        pages by reference count; a shared page is copied before either sequence writes into it.
        A layout with a residual window or a bounded policy forks only whole sequences."""
        self._check_open(src)
        full = int(self._lengths[src])
        length = full if length is None else length
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 <= length <= full:
            raise ValueError(f"length must be an integer in [0, {full}] (the length of slot {src}), got {length!r}")
        if length != full and (self.layout.has_ring or not isinstance(self.policy, FullPolicy)):
            raise ValueError("a partial fork needs the full policy and a layout without a residual window")
        dst = self.open()
        self._share_into(src, dst, self.pages_needed(length))
        self._lengths[dst] = length
        self.state = copy_slot(self.state, np.int32(src), np.int32(dst))
        return dst

    def _share_into(self, src: int, dst: int, count: int) -> None:
        pages = self._pages[src][:count]
        for page in pages:
            self.allocator.share(page)
        self._pages[dst] = list(pages)

    def _copy(self, src: list[int], dst: list[int]) -> None:
        if not src:
            return
        size = 1 << (len(src) - 1).bit_length()
        pad = size - len(src)
        s = np.asarray(src + [0] * pad, np.int32)
        d = np.asarray(dst + [self.spec.num_pages] * pad, np.int32)
        self.state = copy_pages(self.state, s, d)

    # ---- arrays for the jitted steps -------------------------------------------------------
    def block_tables(self) -> np.ndarray:
        """int32 [slots, table_width]; entries past a sequence's pages are 0 (never read)."""
        tables = np.zeros((self.slots, self.table_width), np.int32)
        for slot, pages in enumerate(self._pages):
            tables[slot, :len(pages)] = pages
        return tables

    def lengths(self) -> np.ndarray:
        return self._lengths.astype(np.int32)

    # ---- memory ----------------------------------------------------------------------------
    def memory(self) -> CacheMemory:
        fill: dict[int, int] = {}
        for slot in np.flatnonzero(self._open):
            held = self._held(int(self._lengths[slot]))
            for i, page in enumerate(self._pages[slot]):
                fill[page] = max(fill.get(page, 0), min(self.page_size, held - i * self.page_size))
        c = self.config
        return CacheMemory(
            page_size=self.page_size, pages_total=self.spec.num_pages,
            pages_allocated=self._allocated_pages(), tokens_held=int(sum(max(0, f) for f in fill.values())),
            bytes_per_token=self.layout.bytes_per_token(c.n_kv_heads, c.head_dim, self.page_size),
            n_layers=c.n_layers,
            residual_bytes=self.num_open * c.n_layers * self.layout.residual_bytes(c.n_kv_heads, c.head_dim),
            pool_bytes=state_nbytes(self.state))

    def _allocated_pages(self) -> int:
        return self.allocator.num_used

    def _check_open(self, slot) -> None:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.slots:
            raise ValueError(f"slot must be an integer in [0, {self.slots}), got {slot!r}")
        if not self._open[slot]:
            raise ValueError(f"slot {slot} is not open")


class DenseKVCache(PagedKVCache):
    """Contiguous storage: slot s owns pages s*W .. s*W + W - 1 (W = table_width) from the start,
    i.e. a [slots, max_len] region per layer reserved whether used or not. No sharing: fork copies."""

    def __init__(self, config, layout: str | KVLayout = "f32", policy: str | Policy | None = None, *,
                 slots: int = 8, max_len: int | None = None, page_size: int | None = None):
        super().__init__(config, layout, policy, slots=slots, max_len=max_len, page_size=page_size)

    def open(self) -> int:
        slot = super().open()
        self._pages[slot] = list(range(slot * self.table_width, (slot + 1) * self.table_width))
        return slot

    def close(self, slot: int) -> None:
        self._check_open(slot)
        self._pages[slot] = []
        self._lengths[slot] = 0
        self._open[slot] = False

    def _release_tail(self, slot: int) -> None:
        """A contiguous slot keeps its whole region."""

    def can_reserve(self, slot: int | None, length: int) -> bool:
        return self.num_open < self.slots if slot is None else self._held(length) <= self.table_width * self.page_size

    def reserve(self, slot: int, length: int) -> None:
        self._check_open(slot)
        self.check_length(length)

    def _share_into(self, src: int, dst: int, count: int) -> None:
        self._copy(self._pages[src][:count], self._pages[dst][:count])

    def _allocated_pages(self) -> int:
        return self.num_open * self.table_width

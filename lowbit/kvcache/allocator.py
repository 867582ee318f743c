"""Block allocator for a paged KV pool: a free list plus reference counts, so that sequences can
share blocks (a common prompt prefix) and copy a shared block before writing into it.
"""

from __future__ import annotations

import numpy as np


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a request needs; nothing was allocated."""


class BlockAllocator:
    """Hands out block ids 0..num_blocks-1 from a free list (last freed, first reused).

    Invariant: a block is either free (reference count 0, on the free list exactly once) or held
    (count >= 1, not on the free list). `allocate` sets the count to 1, `share` adds one, `release`
    removes one and returns the block to the free list when the count reaches 0.
    """

    def __init__(self, num_blocks: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = int(num_blocks)
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._refs = np.zeros(self.num_blocks, np.int64)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        self._check_id(block)
        return int(self._refs[block])

    def allocate(self, count: int = 1) -> list[int]:
        """`count` fresh blocks (all or none); raises OutOfBlocksError when too few are free."""
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        if count > len(self._free):
            raise OutOfBlocksError(f"need {count} free KV blocks but only {len(self._free)} of "
                                   f"{self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(count)]
        self._refs[blocks] = 1
        return blocks

    def share(self, block: int) -> None:
        """One more holder of a held block (prefix sharing)."""
        self._check_id(block)
        if self._refs[block] < 1:
            raise ValueError(f"block {block} is free and cannot be shared")
        self._refs[block] += 1

    def release(self, block: int) -> None:
        """One holder fewer; the block is free again when nobody holds it."""
        self._check_id(block)
        if self._refs[block] < 1:
            raise ValueError(f"block {block} is already free (double release)")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def check(self) -> None:
        """Raise AssertionError if the free list and the counts disagree."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        held = set(np.flatnonzero(self._refs > 0).tolist())
        assert not free & held, f"blocks both free and held: {sorted(free & held)[:8]}"
        assert free | held == set(range(self.num_blocks)), "a block is neither free nor held"
        assert (self._refs >= 0).all()

    def _check_id(self, block) -> None:
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) \
                or not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be an id in [0, {self.num_blocks}), got {block!r}")

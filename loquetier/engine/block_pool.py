"""BlockPool (mechanism): KV block ids with reference counts, and the cache of full blocks by hash.

A block is in one of three states: used (ref_count > 0), cached-free (ref_count 0, still holding the
K/V of a full block that a later prompt may reuse, kept in LRU order) or free (no content worth
keeping). New blocks come from the free list first; a cached-free block is evicted, least recently
used first, only when the free list is empty. So cached blocks count as free capacity.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockPool:
    """Hands out block ids; with caching on, full blocks are found again by their hash."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.reset(enable_caching)

    def reset(self, enable_caching: bool) -> None:
        """Every block free and nothing cached (no block may be in use), caching on or off."""
        assert not any(self.ref_count), "blocks are still in use"
        self.enable_caching = enable_caching
        self.block_hash: list[bytes | None] = [None] * self.num_blocks
        self.cached: dict[bytes, int] = {}                 # hash -> block holding that content
        self.free: deque[int] = deque(range(self.num_blocks))   # no content worth keeping
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; oldest first

    @property
    def num_free(self) -> int:
        """Blocks a caller may allocate now (free plus cached-but-unused)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def allocate(self, n: int) -> list[int]:
        """n blocks with ref_count 1, evicting the least recently used cached ones only when needed."""
        assert n <= self.num_free, "caller must check num_free first"
        out = []
        for _ in range(n):
            if self.free:
                block = self.free.popleft()
            else:
                block, _ = self.evictable.popitem(last=False)
                del self.cached[self.block_hash[block]]
                self.block_hash[block] = None
            self.ref_count[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int], keep_cached: bool = True) -> None:
        """Drop one reference to each block. Unused cached blocks stay findable unless `keep_cached`
        is False (their content can never be hit again); pass a sequence's blocks in order: its
        last blocks become the first to be evicted, since a prefix is worth more than its tail."""
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} released twice"
            if self.ref_count[block]:
                continue
            if self.block_hash[block] is not None and not keep_cached:
                del self.cached[self.block_hash[block]]
                self.block_hash[block] = None
            if self.block_hash[block] is None:
                self.free.append(block)
            else:
                self.evictable[block] = None

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Blocks holding the longest run of `hashes` from the first one (not yet referenced)."""
        out = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` are cached but unused, i.e. counted in `num_free` now."""
        return sum(1 for b in blocks if self.ref_count[b] == 0)

    def touch(self, blocks: list[int]) -> None:
        """Take one reference to each of these cached blocks (a prefix hit)."""
        for block in blocks:
            if self.ref_count[block] == 0:
                del self.evictable[block]
            self.ref_count[block] += 1

    def cache(self, block: int, block_hash: bytes) -> None:
        """Make a used, fully computed block findable by `block_hash`. When another block already
        holds that content (two prompts computed it at once), this one stays a private copy."""
        if self.enable_caching and block_hash not in self.cached and self.block_hash[block] is None:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash

"""Automatic prefix caching: a prompt reuses the KV blocks of a prefix some request computed before.

A full block is keyed by a hash of its tokens, of the hash of the blocks before it (so of every
earlier token) and of the identity of the adapter weights that computed it. That identity is the
adapter's weights version (`AdapterManager.weights_version`): it is new for every adapter added,
including one unloaded and loaded again under the same name, and it changes at every optimizer
step of an adapter being trained, so K/V computed with other weights are never hit. Blocks are
hashed only once every token in them is known (with asynchronous scheduling the newest tokens are
placeholders for a while) and their K/V are computed. As vLLM does, at least the last prompt token
is always computed, since its logits are sampled.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Callable

from .block_pool import BlockPool
from .sequence import Sequence


@dataclass
class PrefixCacheStats:
    """Counted in tokens, at every admission of a request (a preempted one is looked up again)."""

    queries: int = 0   # tokens of the requests looked up
    hits: int = 0      # of those, tokens whose K/V came from the cache

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None

    def since(self, earlier: "PrefixCacheStats") -> "PrefixCacheStats":
        """What was counted after `earlier`, a copy of these stats taken then (`copy()`)."""
        return PrefixCacheStats(self.queries - earlier.queries, self.hits - earlier.hits)

    def copy(self) -> "PrefixCacheStats":
        return PrefixCacheStats(self.queries, self.hits)


def hash_block(parent: bytes, weights_version: int, token_ids: list[int]) -> bytes:
    """128-bit BLAKE2 of (previous block's hash, adapter weights version, this block's tokens):
    a collision would silently serve another prompt's K/V, so not Python's 64-bit `hash`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(weights_version.to_bytes(8, "little", signed=True))
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class PrefixCache:
    """Finds a waiting sequence's cached prefix, registers computed blocks, releases a sequence."""

    def __init__(self, pool: BlockPool, block_size: int, weights_version: Callable[[str | None], int | None]):
        self.pool = pool
        self.block_size = block_size
        self.weights_version = weights_version   # adapter name (None = base) -> version, None if unknown
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.pool.enable_caching

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """`seq.block_hashes` extended to its first `num_blocks` full blocks, stopping at a block
        that holds a placeholder (a token still on the device)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            tokens = seq.token_ids(i * bs, (i + 1) * bs)
            if min(tokens) < 0:
                break
            hashes.append(hash_block(hashes[-1] if hashes else b"", seq.weights_version, tokens))
        return hashes

    def match(self, seq: Sequence) -> list[int]:
        """Cached blocks (not yet referenced) for the leading tokens of a sequence about to be
        admitted, leaving at least its last token to compute."""
        if not self.enabled:
            return []
        version = self.weights_version(seq.adapter)
        if version != seq.weights_version:   # first look-up, or its adapter's weights changed since
            seq.weights_version, seq.block_hashes = version, []
        if version is None:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        return self.pool.lookup(self._hashes(seq, limit)[:limit])

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give the sequence the blocks `match` found: their tokens count as computed."""
        self.pool.touch(hits)
        seq.block_table = list(hits)
        seq.num_cached_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        if self.enabled:
            self.stats.queries += seq.num_tokens
            self.stats.hits += seq.num_computed_tokens

    def commit(self, seq: Sequence) -> None:
        """Make the sequence's fully computed blocks findable (cheap when there is nothing new)."""
        if seq.num_computed_tokens < (seq.num_cached_blocks + 1) * self.block_size or not self.enabled:
            return   # no block completed since the last call (most steps of a decoding sequence)
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if num_full <= seq.num_cached_blocks:
            return
        if seq.weights_version is None or self.weights_version(seq.adapter) != seq.weights_version:
            return   # the weights changed while it ran: its K/V mix versions and match no future prompt
        hashes = self._hashes(seq, num_full)
        done = min(num_full, len(hashes))
        for i in range(seq.num_cached_blocks, done):
            self.pool.cache(seq.block_table[i], hashes[i])
        seq.num_cached_blocks = done

    def release(self, seq: Sequence) -> None:
        """Register what the sequence computed, then drop its references to its blocks."""
        self.commit(seq)
        stale = self.enabled and self.weights_version(seq.adapter) != seq.weights_version
        self.pool.release(seq.block_table, keep_cached=not stale)
        seq.block_table = []
        seq.num_cached_blocks = 0

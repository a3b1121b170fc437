"""Scheduler (policy): which sequences run this step and how many tokens each, under a token budget.

Decode tokens of running sequences go first, then prefill chunks (a long prompt is cut so it
cannot stall decoding), and whatever budget is left is offered to training/evaluation. When the KV
pool runs dry, the newest running sequence is preempted and later recomputed, never dropped.
A sequence admitted from the queue starts after the longest prefix of it already cached
(prefix_cache.py); the blocks running sequences complete become findable at the next schedule.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..config import SchedulerConfig
from ..errors import LoquetierError
from ..lora.manager import AdapterManager
from .batch import ScheduledSeq
from .kv_cache import KVCache
from .prefix_cache import PrefixCache
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    leftover_budget: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)   # could not be admitted (adapter gone)

    @property
    def num_inference_tokens(self) -> int:
        return sum(s.length for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCache, adapters: AdapterManager, max_model_len: int):
        self.config = config
        self.kv = kv
        self.adapters = adapters
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.ensure_adapter = None   # set by the engine: makes a known adapter resident
        self.prefix_cache = PrefixCache(kv.allocator, kv.block_size, adapters.weights_version)
        self.last_output: SchedulerOutput | None = None   # the latest step's, e.g. to know who a failed step held

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn prefix caching on or off between workloads (A/B runs); forgets every cached block."""
        if self.has_work():
            raise LoquetierError("prefix caching can only be switched with no request running or waiting")
        self.kv.allocator.reset(enabled)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, as vLLM's `reset_prefix_cache` does (e.g. so that repeated
        benchmark runs of the same prompts each start cold). False, and nothing changed, while a
        request is running or waiting, since its blocks are in use."""
        if self.has_work():
            return False
        self.kv.allocator.reset(self.kv.allocator.enable_caching)
        return True

    def free(self, seq: Sequence) -> None:
        """Return a finished or aborted sequence's blocks (its full ones stay cached) and adapter pin."""
        self.prefix_cache.release(seq)
        if seq in self.running:
            self.running.remove(seq)
            if seq.adapter is not None:
                self.adapters.unpin(seq.adapter)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.prefix_cache.release(seq)   # its full blocks stay cached: recomputing it may hit them
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.running.remove(seq)
        if seq.adapter is not None:
            self.adapters.unpin(seq.adapter)
        self.waiting.appendleft(seq)

    def _reserve(self, seq: Sequence, upto_tokens: int) -> bool:
        """Make sure seq has blocks for its first `upto_tokens` tokens."""
        need = self.kv.blocks_needed(upto_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.kv.allocator.num_free:
            return False
        seq.block_table += self.kv.allocator.allocate(need)
        return True

    def schedule(self, budget: int | None = None) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens if budget is None else budget
        out = SchedulerOutput()
        # 1) running sequences, oldest first; decode (1 pending token) before prefill chunks
        running = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        preempted: set[int] = set()
        for seq in running:
            if seq.seq_id in preempted or seq.final_in_flight:
                continue  # preempted below to make room for an older one / ends with the token in flight
            self.prefix_cache.commit(seq)   # blocks the last step completed
            pending = seq.num_tokens - seq.num_computed_tokens
            n = min(pending, budget)
            if n <= 0:
                continue
            while not self._reserve(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                preempted.add(victim.seq_id)
                for i, sch in enumerate(out.scheduled):   # already given tokens this step: take them back
                    if sch.seq is victim:
                        budget += out.scheduled.pop(i).length
                        break
                if victim is seq:
                    break
            if seq.seq_id in preempted:
                continue
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        # 2) admit waiting sequences while budget, slots and blocks last
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            wanted = {s.adapter for s in self.running if s.adapter} | ({seq.adapter} if seq.adapter else set())
            if not self.adapters.fits(wanted):
                break
            if seq.adapter is not None and self.ensure_adapter is not None:
                try:
                    self.ensure_adapter(seq.adapter)  # re-read it if it was dropped from memory meanwhile
                except LoquetierError as e:          # e.g. its file vanished: fail this request only
                    self.waiting.popleft()
                    seq.error = str(e)
                    out.failed.append(seq)
                    continue
            hits = self.prefix_cache.match(seq)
            cached = len(hits) * self.kv.block_size
            n = min(seq.num_tokens - cached, budget)
            need = self.kv.blocks_needed(cached + n) - len(hits)
            pool = self.kv.allocator
            if need + pool.num_evictable(hits) > pool.num_free:   # hit blocks now free are taken too
                break
            self.waiting.popleft()
            self.prefix_cache.admit(seq, hits)   # before allocating: that may evict unreferenced hits
            seq.block_table += pool.allocate(need)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            if seq.adapter is not None:
                self.adapters.pin(seq.adapter)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        out.leftover_budget = budget
        self.last_output = out
        return out

"""Tensor parallelism: one engine over N processes (one GPU each), Megatron style.

Rank 0 runs the whole engine: scheduler, adapter registry, trainer, sampler. Every rank holds a
shard of the model: q/k/v and gate/up are split by output (column-parallel: attention heads and
the KV cache by head), o and down by input (row-parallel: their partial outputs are summed by one
all-reduce). The LM head is split by vocabulary; its logits are gathered for sampling and the
training loss is computed on the shards (vocab-parallel cross entropy).

LoRA, as vLLM does it: a column-parallel layer keeps A whole and splits B by output; a
row-parallel layer splits A by input and keeps B whole, and its shrink (rank-r, tiny) is summed
over ranks. In an inference forward the shrink rides in the base GEMM's output (the folded A
rows), so one all-reduce carries both. SMLM segments and slot tables are the same on every rank.

Each step, rank 0 sends the step's plan (`HostBatch`'s flat array and layout) to the workers over
a control channel; they run the same forward, and get the sampled tokens by a device broadcast
(asynchronous scheduling reads them on the device). Files: `group.py` (process groups,
collectives), `ops.py` (autograd collectives), `sharding.py` (what splits how), `plan.py` (step
plans as int64 arrays), `channel.py`, `runner.py` / `adapters.py` (the TP runner and adapter
manager), `worker.py` (the workers' loop), `launcher.py` (start-up and shutdown).
"""

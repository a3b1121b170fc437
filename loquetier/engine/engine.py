"""Engine: the step loop. Each `step()` schedules, runs one mixed batch, and advances every request."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..config import EngineConfig, resolve_dtype
from ..errors import AdapterError, AdapterInUseError, CapacityError, RequestError
from ..lora.adapter import AdapterWeights, load_peft_adapter
from ..lora.manager import AdapterManager
from ..models.loader import load_model
from ..models.sources import ModelSource, resolve_model_source
from ..sampling_params import SamplingParams
from .batch import DecodePadding, LossSegment, floor_token_bucket, plan_mixed_batch
from .cost_model import StepCostModel
from .detokenizer import IncrementalText
from .kv_cache import KVCache
from .runner import ModelRunner, StepResult
from .sampler import SampledTokens
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceStatus, TokenLogprob
from .stats import EngineStats
from .structured import GrammarCompiler
from .train_budget import make_policy

# decode rows of a mixed (training + decode) step are padded to one of these: coarse, since a
# padding row costs almost nothing beside the training tokens and each bucket is another graph
MIXED_DECODE_BUCKETS = (16, 64, 128, 256)


@dataclass
class RequestOutput:
    """What a caller sees of a request after a step (incremental while running, whole when finished)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    adapter: str | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class _InFlight:
    """A step's sampled tokens on their way to the host, and where each belongs."""

    seqs: list[Sequence]
    index: list[int]       # position of each row's placeholder in its seq.output_token_ids
    host: SampledTokens    # in pinned host buffers (SampledTokens.to_host)


def _drop_placeholders(seq: Sequence) -> None:
    while seq.output_token_ids and seq.output_token_ids[-1] < 0:
        seq.output_token_ids.pop()


class StepParticipant(Protocol):
    """Something that rides training/eval segments along with inference (the trainer)."""

    def next_segments(self, budget: int, num_inference_tokens: int) -> list[LossSegment]: ...
    def on_step(self, segments: list[LossSegment], sums: torch.Tensor, counts: torch.Tensor) -> None: ...
    def on_step_failed(self, segments: list[LossSegment], message: str) -> None: ...


class Engine:
    """Owns the model, KV cache, adapters, scheduler and runner; `step()` is the hot loop."""

    def __init__(self, config: EngineConfig, tokenizer=None, source: ModelSource | None = None, tp=None):
        """`tp`: this process's rank of a tensor-parallel engine (a worker's); with
        `config.tensor_parallel_size` > 1 and none given, this process is rank 0 and starts the workers."""
        self.config = config
        source = source or resolve_model_source(config.model, config.revision)
        if tp is None and config.tensor_parallel_size > 1:
            from ..parallel.launcher import launch
            tp = launch(config, source)
        self.tp = tp
        device = config.torch_device
        dtype = resolve_dtype(config.dtype, source.checkpoint_dtype, device)
        self.device, self.dtype = device, dtype
        torch.manual_seed(config.seed)
        self.args = source.args
        self.max_model_len = config.max_model_len or min(self.args.max_position_embeddings, 8192)
        self.model = load_model(source, dtype, device, self.max_model_len, config.lora.max_loras,
                                config.lora.max_lora_rank, config.lora_backend, tp=tp)
        self.model.set_attention_backend(config.attention_backend)
        self.model.set_lora_fold_shrink(config.lora.fold_shrink)
        # the model's args: this rank's heads when split (its KV cache holds only those)
        cache = config.cache if tp is None else tp.cache_config(config.cache, self.model.args, dtype, device)
        self.kv = KVCache(self.model.args, cache, dtype, device)
        self.model.kv_caches = self.kv.layers
        self.adapters = AdapterManager(self.model, config.lora) if tp is None else tp.adapter_manager(self.model, config.lora)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.adapters, self.max_model_len)
        self.scheduler.ensure_adapter = self.ensure_adapter
        self.runner = (ModelRunner(self.model, config.scheduler.max_num_seqs) if tp is None
                       else tp.runner(self.model, config.scheduler.max_num_seqs))
        if device.type == "cuda":
            try:
                self.runner.warm_up_lora_kernels()
                self.runner.warm_up_steps(self.kv.scratch_block, self.kv.block_size)
            except Exception as e:  # a warm-up problem must not stop the engine; kernels compile on first use
                logging.getLogger("loquetier").warning("kernel warm-up failed: %s", e)
        if config.train_cuda_graphs and device.type == "cuda":
            self.runner.enable_train_graphs(device)
        if config.cuda_graphs and device.type == "cuda":
            self.runner.enable_graphs(self.kv, self.max_model_len,
                                      min(config.max_graph_batch, config.scheduler.max_num_seqs),
                                      config.lora.max_loras)
        # decode rows beside training rows in a bucketed step (mixed_cuda_graphs)
        self.decode_padding = DecodePadding(MIXED_DECODE_BUCKETS, -(-self.max_model_len // self.kv.block_size),
                                            self.kv.scratch_block, config.lora.max_loras + 2)
        self.tokenizer = tokenizer
        self.eos_token_ids = set(self.args.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.grammars = GrammarCompiler(tokenizer, self.args.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        self._in_flight: _InFlight | None = None   # a launched step whose tokens the host has not read
        self.adapter_paths: dict[str, tuple[Path, str | None]] = {}  # re-loadable adapters
        self.participant: StepParticipant | None = None
        self._ids = itertools.count()
        self.cost_model = StepCostModel()
        self.train_policy = make_policy(config.scheduler, self.cost_model)
        self.stats = EngineStats(config.scheduler.slo_ttft, config.scheduler.slo_tpot)
        self.stats.prefix_cache = self.scheduler.prefix_cache.stats
        self.step_observers: list = [self.cost_model.observe, self.stats.on_step]  # callables(step info)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine is unusable afterwards)."""
        if self.tp is not None and self.tp.is_leader:
            self.tp.shutdown()

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str | Path, parent: str | None = None) -> None:
        """Read a PEFT adapter and register it; errors leave the engine untouched."""
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        weights = load_peft_adapter(path, self.args, self.config.lora.max_lora_rank)
        self.adapters.add(name, weights, parent, source=Path(path))
        self.adapter_paths[name] = (Path(path), parent)

    def add_adapter(self, name: str, weights: AdapterWeights, parent: str | None = None,
                    source: str | Path | None = None) -> None:
        """Register in-memory weights; with `source` (a PEFT dir holding the same weights) it can be
        dropped from memory when the registry is full and re-read when next requested."""
        self.adapters.add(name, weights, parent, source=None if source is None else Path(source))
        if source is not None:
            self.adapter_paths[name] = (Path(source), parent)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; refused (409) while unfinished requests still name it."""
        users = sum(1 for seq in self.requests.values() if seq.adapter == name and not seq.is_finished)
        if users:
            raise AdapterInUseError(f"adapter {name!r} has {users} unfinished request(s); unload it when they finish")
        if name not in self.adapters and name in self.adapter_paths:
            del self.adapter_paths[name]
            return
        self.adapters.remove(name)
        self.adapter_paths.pop(name, None)

    def has_adapter(self, name: str) -> bool:
        return name in self.adapters or name in self.adapter_paths

    def adapter_names(self) -> list[str]:
        return sorted(set(self.adapters.names()) | set(self.adapter_paths))

    def ensure_adapter(self, name: str) -> None:
        """Make a known adapter resident (re-reading it from disk if it was dropped)."""
        if name in self.adapters:
            return
        if name not in self.adapter_paths:
            self.adapters.get(name)  # raises AdapterNotFoundError with the list of names
        path, parent = self.adapter_paths[name]
        weights = load_peft_adapter(path, self.args, self.config.lora.max_lora_rank)
        self.adapters.add(name, weights, parent, source=path)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None,
                    request_id: str | None = None) -> str:
        if adapter is not None:
            self.ensure_adapter(adapter)  # raises AdapterNotFoundError
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        if any((not isinstance(t, int)) or t < 0 or t >= self.args.vocab_size for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.args.vocab_size})")
        if params.logit_bias is not None and max(params.logit_bias) >= self.args.vocab_size:
            raise RequestError(f"logit_bias: token id {max(params.logit_bias)} is outside the vocabulary "
                               f"[0, {self.args.vocab_size})", param="logit_bias")
        n = len(prompt_token_ids)
        if n + params.max_tokens > self.max_model_len:
            raise RequestError(f"this model's maximum context length is {self.max_model_len} tokens; the request "
                               f"asks for {n} prompt tokens + {params.max_tokens} max_tokens = {n + params.max_tokens}")
        if self.kv.blocks_needed(n + params.max_tokens) > self.kv.num_blocks:
            raise RequestError(f"prompt + max_tokens = {n + params.max_tokens} tokens does not fit the KV cache "
                               f"({self.kv.num_blocks * self.kv.block_size} tokens)")
        if len(self.scheduler.waiting) >= self.config.scheduler.max_waiting:
            raise CapacityError(f"{len(self.scheduler.waiting)} requests are waiting; try again later")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(list(prompt_token_ids), params, adapter, request_id)
        if params.structured_outputs is not None:
            seq.grammar = self.grammars.grammar(params.structured_outputs)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
            seq.finish_time = time.monotonic()
            _drop_placeholders(seq)   # a step in flight may still compute its row: it is dropped
            self.scheduler.free(seq)
            self.stats.on_finish(seq)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block; False (nothing changed) while any request is unfinished."""
        return not self.has_unfinished() and self.scheduler.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        live = self._in_flight is not None and any(not s.is_finished for s in self._in_flight.seqs)
        return self.scheduler.has_work() or live

    # ------------------------------------------------------------------ the step
    def step(self, loss_segments: list[LossSegment] | None = None, keep_logits: bool = False
             ) -> list[RequestOutput]:
        """One scheduling round and one forward over the mixed batch.

        Asynchronous scheduling (`EngineConfig.async_scheduling`; not for steps with penalties,
        grammars or `keep_logits`): the step is
        launched before the previous step's tokens are read on the host. Its inputs take those tokens
        on the device (placeholders, see `Sequence`), and the host's bookkeeping of the previous step
        (stop checks, outputs) overlaps this step's GPU work. So outputs come back one step later,
        and a request that stopped on a token runs one extra row, which is dropped."""
        t0 = time.perf_counter()
        sched: SchedulerOutput = self.scheduler.schedule()
        failed = [self._fail(seq) for seq in sched.failed]
        segments = list(loss_segments or [])
        if self.participant is not None:
            allowed = self._fit_to_graphs(self.train_policy.allowed_tokens(sched, self.scheduler), sched.scheduled)
            if allowed > 0 or not sched.scheduled:
                segments += self.participant.next_segments(allowed, sched.num_inference_tokens)
        if not sched.scheduled and not segments:
            return failed + self._drain()
        # training rows need no host read either: their backward runs inside the step and their
        # losses stay on the device, so mixed steps are launched asynchronously too
        asynchronous = (self.config.async_scheduling and not keep_logits
                        and not any(s.seq.params.needs_tokens_on_host for s in sched.scheduled))
        outputs = []
        if not asynchronous and self._in_flight is not None:
            # this step reads tokens on the host (penalties, grammars, logits): settle the last one first
            outputs = self._drain()
            sched.scheduled = [s for s in sched.scheduled if not s.seq.is_finished]
            if not sched.scheduled and not segments:
                return failed + outputs
        names = {s.seq.adapter for s in sched.scheduled} | {s.adapter for s in segments}
        names.discard(None)
        for name in names:
            self.ensure_adapter(name)
        slot_of: dict[str | None, int] = {None: -1, **self.adapters.activate(names)}
        if not keep_logits and self.runner.can_replay(sched.scheduled, bool(segments)):
            sample_seqs, result = self.runner.execute_decode_graph(sched.scheduled, slot_of, self.kv.block_size)
            scheduled = sched.scheduled
        else:
            graphs = self._graph_kind(segments, sched.scheduled, keep_logits)
            host = plan_mixed_batch(segments, sched.scheduled, slot_of, self.kv.block_size, self.adapters.dropout,
                                    bucketed=graphs == "bucketed", decode_padding=self.decode_padding,
                                    training_slots=self.adapters.training_slots() if graphs == "bucketed" else ())
            scheduled, segments = host.scheduled, host.loss_segments
            try:
                if graphs:
                    result, sample_seqs = self.runner.execute_bucketed(host)
                else:
                    batch = self.runner.prepare(host)
                    result, sample_seqs = self.runner.execute(batch, keep_logits), batch.sample_seqs
            except torch.OutOfMemoryError as e:
                if not (segments and self.participant is not None):
                    raise
                # the training jobs of this step fail; its inference rows run again next step
                self.participant.on_step_failed(segments, f"training step ran out of device memory: {e}")
                return failed + outputs
        self.last_result, self.last_sample_seqs = result, sample_seqs   # for tests and debugging
        for s in scheduled:
            s.seq.num_computed_tokens += s.length
        launched = self._launched(sample_seqs, result)
        if segments and self.participant is not None:
            self.participant.on_step(segments, result.loss_sums, result.loss_counts)
        outputs += self._drain()            # the previous step's tokens, while this one runs
        if asynchronous:
            self._in_flight = launched
        elif launched is not None:
            outputs += self._settle(launched)
        info = {"time": time.perf_counter() - t0,
                "num_decode_tokens": sum(1 for s in scheduled if s.length == 1),
                "num_prefill_tokens": sum(s.length for s in scheduled if s.length > 1),
                "num_train_tokens": sum(len(s.token_ids) for s in segments if s.train),
                "num_eval_tokens": sum(len(s.token_ids) for s in segments if not s.train)}
        for observer in self.step_observers:
            observer(info)
        return failed + outputs

    def _fit_to_graphs(self, allowed: int, scheduled: list) -> int:
        """With mixed graphs, the training tokens beside decode rows are cut to a token bucket, so that
        steps fall on few captured graphs; steps with prefill rows carry none, since they run eagerly,
        several times slower than a replay, and the decode rows in them would wait for it."""
        if not scheduled or not self._mixed_graphs():
            return allowed
        if any(s.length > 1 for s in scheduled) or self.decode_padding.bucket(len(scheduled)) is None:
            return 0
        return floor_token_bucket(allowed)

    def _mixed_graphs(self) -> bool:
        return self.config.mixed_cuda_graphs and self.dtype != torch.float32 and self.runner.train_graphs is not None

    def _graph_kind(self, segments: list[LossSegment], scheduled: list, keep_logits: bool) -> str | None:
        """How a step with training rows can replay a captured graph: "bucketed" (bf16/fp16: padded to
        bucket sizes, see batch.py), "exact" (fp32: its exact layout must repeat) or None (eager)."""
        if (self.runner.train_graphs is None or keep_logits or not segments
                or not all(s.train for s in segments)):
            return None
        if not scheduled:
            return "exact" if self.dtype == torch.float32 else "bucketed"
        mixed = (self._mixed_graphs() and all(s.length == 1 for s in scheduled)
                 and self.decode_padding.bucket(len(scheduled)) is not None)
        return "bucketed" if mixed else None

    def _launched(self, seqs: list[Sequence], result: StepResult) -> _InFlight | None:
        """Start the copy of the step's tokens to the host and give each sequence a placeholder."""
        if result.sampled is None:
            return None
        self.runner.publish(result.sampled)
        index = []
        for row, seq in enumerate(seqs):
            index.append(len(seq.output_token_ids))
            seq.output_token_ids.append(-1 - row)
            seq.final_in_flight = self._reaches_length(seq, len(seq.output_token_ids))
        return _InFlight(seqs, index, result.sampled.to_host())

    def _drain(self) -> list[RequestOutput]:
        """Settle the step still in flight, if any."""
        in_flight, self._in_flight = self._in_flight, None
        return [] if in_flight is None else self._settle(in_flight)

    def _settle(self, step: _InFlight) -> list[RequestOutput]:
        """Write a step's tokens into its sequences, check stops, free what finished."""
        tokens, logprobs = step.host.wait()
        outputs = []
        now = time.monotonic()
        for seq, index, token, lp in zip(step.seqs, step.index, tokens, logprobs):
            if seq.is_finished:   # aborted, or stopped by its previous token: this row is dropped
                continue
            seq.output_token_ids[index] = token
            if lp is not None:
                seq.output_logprobs.append(lp)
            if seq.first_token_time is None:
                seq.first_token_time = now
            self._check_stop(seq, index + 1)
            if seq.is_finished:
                del seq.output_token_ids[index + 1:]   # a placeholder of the step now running
                seq.finish_time = now
                self.scheduler.free(seq)
                self.requests.pop(seq.request_id, None)
                self.stats.on_finish(seq)
            outputs.append(self._output(seq, index + 1))
        return outputs

    def _reaches_length(self, seq: Sequence, num_output: int) -> bool:
        return num_output >= seq.params.max_tokens or len(seq.prompt_token_ids) + num_output >= self.max_model_len

    def _fail(self, seq: Sequence) -> RequestOutput:
        """End a request the scheduler could not admit; its output carries the reason."""
        seq.status, seq.finish_reason, seq.finish_time = SequenceStatus.FINISHED, "abort", time.monotonic()
        _drop_placeholders(seq)
        self.requests.pop(seq.request_id, None)
        self.stats.on_finish(seq)
        return self._output(seq)

    def _check_stop(self, seq: Sequence, num_output: int) -> None:
        """Stop conditions after the first `num_output` output tokens (later ones may be in flight)."""
        p = seq.params
        token = seq.output_token_ids[num_output - 1]
        reason = None
        if not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason = "stop"
        elif seq.grammar is not None and seq.grammar.accept(token):   # the grammar is complete
            reason = "stop"
            if seq.grammar.error:   # it rejected the token, which its mask should have made impossible
                reason, seq.error = "abort", f"structured output: {seq.grammar.error}"
        if p.stop and self.tokenizer is not None and reason is None:
            if seq.detok is None:
                seq.detok = IncrementalText(self.tokenizer)
            # only look where a new match can start: the tail that this token may have completed
            start = max(0, len(seq.detok.text) - max(len(s) for s in p.stop))
            text = seq.detok.update(seq.output_token_ids, num_output)
            hits = [i for s in p.stop if (i := text.find(s, start)) >= 0]
            if hits:
                seq.stop_text_len = min(hits)
                reason = "stop"
        if reason is None and self._reaches_length(seq, num_output):
            reason = "length"
        if reason is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason

    def detokenize(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        if seq.stop_text_len is not None:   # cut in the text the stop string was found in
            return seq.detok.text[:seq.stop_text_len]
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)

    def _output(self, seq: Sequence, num_output: int | None = None) -> RequestOutput:
        """What the caller sees; `num_output` leaves out tokens still in flight."""
        finished = seq.is_finished
        metrics = {"arrival_time": seq.arrival_time, "first_scheduled_time": seq.first_scheduled_time,
                   "first_token_time": seq.first_token_time, "finish_time": seq.finish_time,
                   "num_preemptions": seq.num_preemptions, "num_cached_tokens": seq.num_cached_tokens}
        return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.output_token_ids[:num_output],
                             self.detokenize(seq) if finished else "", finished, seq.finish_reason,
                             list(seq.output_logprobs) if seq.params.logprobs is not None else None,
                             seq.adapter, metrics, seq.error)

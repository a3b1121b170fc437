"""TrainingJob: one adapter's fine-tuning — data order, accumulation, AdamW, LR schedule, checkpoints.

A job never runs a forward itself: it hands micro-batches (as `LossSegment`s) to the trainer, which
packs them into the engine's mixed batch, and gets their summed losses back.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.batch import IGNORE_INDEX, LossSegment
from ..lora.adapter import AdapterWeights, new_adapter
from .checkpoint import load_checkpoint_state, optimizer_state_from, save_checkpoint
from .data import TokenizedExample
from .spec import TrainSpec


class JobStatus(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class JobEvent:
    time: float
    kind: str        # "metrics" | "checkpoint" | "eval" | "status"
    message: str
    data: dict = field(default_factory=dict)


def lr_lambda(spec: TrainSpec, total_steps: int):
    warmup = spec.warmup_steps or int(math.ceil(spec.warmup_ratio * total_steps))

    def factor(step: int) -> float:  # HF get_{linear,cosine,constant}_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        if spec.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.lr_schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor


def to_segment(ex: TokenizedExample, adapter: str, train: bool, owner, gen=None) -> LossSegment:
    """Shift labels: targets[t] = labels[t+1] (the loss of predicting token t+1 at position t)."""
    return LossSegment(list(ex.input_ids), list(ex.labels[1:]) + [IGNORE_INDEX], adapter, train, owner, gen)


class TrainingJob:
    """State of one fine-tuning run; resumable from any checkpoint with the same loss curve."""

    def __init__(self, job_id: str, spec: TrainSpec, train: list[TokenizedExample],
                 evals: list[TokenizedExample], engine, initial: AdapterWeights | None = None):
        self.id, self.spec, self.engine = job_id, spec, engine
        self.train_examples, self.eval_examples = train, evals
        self.adapter = f"{spec.name}@train"
        n_micro = math.ceil(len(train) / spec.micro_batch_size)
        self.steps_per_epoch = math.ceil(n_micro / spec.grad_accum)
        self.total_steps = spec.max_steps or self.steps_per_epoch * spec.epochs
        weights = initial or new_adapter(spec.lora, engine.args, engine.config.lora.max_lora_rank, spec.seed)
        engine.add_adapter(self.adapter, weights)
        params = engine.adapters.make_trainable(self.adapter)
        # a fixed parameter order (by layer, module; A then B) keeps optimizer state files portable
        self.param_keys = sorted(params)
        self.params = [p for k in self.param_keys for p in params[k]]
        # In a bf16/fp16 engine AdamW steps fp32 master copies (small updates would round away in
        # a 16-bit weight; PEFT keeps adapter weights in fp32 for the same reason) and the slot
        # table gets the rounded result after each step. In fp32 the slot table is stepped itself.
        self.masters = self.params
        if self.params and self.params[0].dtype != torch.float32:
            self._init_masters()
        # the fused kernel needs each grad laid out like its parameter; an fp32 engine steps the slot
        # table's views, which are strided when the rank is below max_lora_rank (grads come contiguous)
        fused = engine.device.type == "cuda" and all(m.is_contiguous() for m in self.masters)
        self.optimizer = torch.optim.AdamW(self.masters, lr=spec.learning_rate, betas=spec.betas, eps=spec.eps,
                                           weight_decay=spec.weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec, self.total_steps))
        self.dropout_gen = torch.Generator(device=engine.device).manual_seed(spec.seed)
        self.status = JobStatus.RUNNING
        self.step = 0                 # optimizer steps done
        self.epoch, self.pos = 0, 0   # data position: next example index in this epoch's order
        self.window: list[list[int]] = []   # micro-batches (example indices) of the current step
        self.window_tokens = 0
        self.micro_done = 0
        self.window_loss = 0.0
        self.in_flight = False
        self.trained_tokens = 0
        self.losses: list[tuple[int, float]] = []       # (step, train loss)
        self.eval_losses: list[tuple[int, float]] = []
        self.eval_queue: list[list[int]] = []
        self.eval_sum, self.eval_count = 0.0, 0.0
        self.events: list[JobEvent] = []
        self.checkpoints: list[tuple[int, str, Path]] = []   # (step, served name, path)
        self.error: str | None = None
        self.started = time.monotonic()
        self.listeners: list = []   # callables(job, event) e.g. the server's store

    # ------------------------------------------------------------------ data order
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.spec.seed + epoch)
        return torch.randperm(len(self.train_examples), generator=g).tolist()

    def _fill_window(self) -> None:
        spec = self.spec
        want = spec.micro_batch_size * spec.grad_accum
        order = self._order(self.epoch)
        if self.pos >= len(order):
            self.epoch, self.pos = self.epoch + 1, 0
            order = self._order(self.epoch)
        chosen = order[self.pos:self.pos + want]   # a window never crosses an epoch boundary
        self.pos += len(chosen)
        self.window = [chosen[i:i + spec.micro_batch_size] for i in range(0, len(chosen), spec.micro_batch_size)]
        self.window_tokens = sum(self.train_examples[i].num_loss_tokens - (self.train_examples[i].labels[0] != IGNORE_INDEX)
                                 for i in chosen)
        self.micro_done, self.window_loss = 0, 0.0

    # ------------------------------------------------------------------ trainer interface
    @property
    def active(self) -> bool:
        return self.status == JobStatus.RUNNING

    def peek_tokens(self) -> int:
        """Tokens of the next micro-batch this job would hand out."""
        if self.eval_queue:
            return sum(len(self.eval_examples[i].input_ids) for i in self.eval_queue[0])
        if not self.window:
            self._fill_window()
        return sum(len(self.train_examples[i].input_ids) for i in self.window[self.micro_done])

    def next_segments(self) -> list[LossSegment]:
        if self.eval_queue:
            idx = self.eval_queue.pop(0)
            return [to_segment(self.eval_examples[i], self.adapter, False, self) for i in idx]
        if not self.window:
            self._fill_window()
        self.in_flight = True
        return [to_segment(self.train_examples[i], self.adapter, True, self, self.dropout_gen)
                for i in self.window[self.micro_done]]

    def _init_masters(self) -> None:
        """fp32 masters (and their grads) as views of flat buffers, plus a flat staging buffer in
        the compute dtype: moving grads in and weights out is two multi-tensor copies and two
        casting copies per optimizer step, not one op per parameter (hundreds per adapter)."""
        sizes = [p.numel() for p in self.params]
        self._master_flat = torch.cat([p.detach().float().flatten() for p in self.params])
        self._master_grad_flat = torch.zeros_like(self._master_flat)
        self._stage_flat = torch.empty_like(self._master_flat, dtype=self.params[0].dtype)
        self.masters = [m.view_as(p) for m, p in zip(self._master_flat.split(sizes), self.params)]
        for m, g in zip(self.masters, self._master_grad_flat.split(sizes)):
            m.grad = g.view_as(m)
        self._stage = [t.view_as(p) for t, p in zip(self._stage_flat.split(sizes), self.params)]

    def train_loss(self, loss_sum: torch.Tensor, tokens: int) -> torch.Tensor:
        """This micro-batch's share of the step loss: token CE summed / tokens in the whole window."""
        self.trained_tokens += tokens
        return loss_sum / max(1, self.window_tokens)

    def add_grads(self, grads) -> None:
        """Accumulate gradients the engine computed for `self.params` (in that order), as a backward
        would into `.grad`. The engine's tensors are overwritten by its next step: copied here."""
        have = [p.grad is not None for p in self.params]
        if all(have):
            torch._foreach_add_([p.grad for p in self.params], list(grads))
        elif not any(have):
            for p, g in zip(self.params, torch._foreach_mul(list(grads), 1.0)):   # copies, one launch
                p.grad = g
        else:
            for p, g in zip(self.params, grads):
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    def after_backward(self, micro_loss: torch.Tensor) -> None:
        """Accumulate; at the window's end clip, step the optimizer and log. The loss is read back
        to the host once per optimizer step, not once per micro-batch."""
        self.in_flight = False
        self.window_loss = self.window_loss + micro_loss
        self.micro_done += 1
        if self.micro_done < len(self.window):
            return
        loss = float(self.window_loss)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            self.fail(f"loss became {loss} at step {self.step + 1}")
            return
        self.window_loss = loss
        spec = self.spec
        mixed = self.masters is not self.params
        if mixed:
            # same-dtype multi-tensor copy into the staging buffer, then one casting copy
            torch._foreach_copy_(self._stage, [p.grad for p in self.params])
            self._master_grad_flat.copy_(self._stage_flat)
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.masters, spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if mixed:
            with torch.no_grad():
                self._stage_flat.copy_(self._master_flat)
                torch._foreach_copy_(self.params, self._stage)
            for p in self.params:
                p.grad = None
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.window = []
        self.losses.append((self.step, self.window_loss))
        self._event("metrics", f"step {self.step}/{self.total_steps}: loss {self.window_loss:.4f}",
                    {"step": self.step, "train_loss": self.window_loss, "lr": self.scheduler.get_last_lr()[0],
                     "epoch": self.epoch})
        done = self.step >= self.total_steps
        if spec.eval_interval and self.eval_examples and (self.step % spec.eval_interval == 0 or done):
            self._queue_eval()
        if done or (spec.checkpoint_interval and self.step % spec.checkpoint_interval == 0):
            if not self.eval_queue:
                self.checkpoint()

    def eval_loss(self, loss_sum: float, count: float) -> None:
        self.eval_sum += loss_sum
        self.eval_count += count
        if not self.eval_queue:
            value = self.eval_sum / max(1.0, self.eval_count)
            self.eval_losses.append((self.step, value))
            self._event("eval", f"step {self.step}: eval loss {value:.4f}", {"step": self.step, "eval_loss": value})
            spec = self.spec
            if self.step >= self.total_steps or (spec.checkpoint_interval and self.step % spec.checkpoint_interval == 0):
                self.checkpoint()

    def _queue_eval(self) -> None:
        n = len(self.eval_examples)
        mbs = self.spec.micro_batch_size
        self.eval_queue = [list(range(i, min(n, i + mbs))) for i in range(0, n, mbs)]
        self.eval_sum, self.eval_count = 0.0, 0.0

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path:
        weights = self.engine.adapters.snapshot(self.adapter)
        state = {"job_id": self.id, "step": self.step, "epoch": self.epoch, "pos": self.pos,
                 "trained_tokens": self.trained_tokens, "losses": self.losses, "eval_losses": self.eval_losses,
                 "scheduler": self.scheduler.state_dict(), "spec": self.spec.to_dict(),
                 "tensors": {"rng.dropout": self.dropout_gen.get_state()}}
        opt = self.optimizer.state_dict()
        path = save_checkpoint(Path(self.spec.output_dir), self.step, weights, opt, state, self.engine.config.model)
        served = f"{self.spec.name}:step-{self.step}"
        if not self.engine.has_adapter(served):
            self.engine.add_adapter(served, weights, parent=self.spec.name, source=path)
        self.checkpoints.append((self.step, served, path))
        self._event("checkpoint", f"checkpoint at step {self.step} saved; served as {served}",
                    {"step": self.step, "name": served, "path": str(path)})
        if self.step >= self.total_steps:
            self.finish()
        return path

    def save_resume_point(self) -> Path | None:
        """Checkpoint the last finished optimizer step, so that a restart resumes there; a window
        still accumulating is dropped and its examples run again. None when nothing new to save."""
        if self.window:   # rewind the data position to the window's start; its gradients go
            self.pos -= sum(len(micro) for micro in self.window)
            self.window, self.micro_done, self.window_loss = [], 0, 0.0
            for p in self.params:
                p.grad = None
        if self.step == 0 or (self.checkpoints and self.checkpoints[-1][0] == self.step):
            return None
        return self.checkpoint()

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint written by `checkpoint` (weights were passed as `initial`)."""
        state, tensors = load_checkpoint_state(path)
        self.optimizer.load_state_dict(optimizer_state_from(state, tensors))
        self.scheduler.load_state_dict(state["scheduler"])
        self.dropout_gen.set_state(tensors["rng.dropout"])
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.trained_tokens = state["trained_tokens"]
        self.losses = [tuple(x) for x in state["losses"]]
        self.eval_losses = [tuple(x) for x in state["eval_losses"]]
        self.window, self.eval_queue = [], []
        self._event("status", f"resumed from {path.name}", {"step": self.step})

    # ------------------------------------------------------------------ lifecycle
    def finish(self) -> None:
        """Hand the trained adapter over to serving under `spec.name` and release training state."""
        mgr = self.engine.adapters
        weights = mgr.snapshot(self.adapter)
        self.release()
        if self.engine.has_adapter(self.spec.name):
            self.engine.unload_adapter(self.spec.name)
        last = self.checkpoints[-1][2] if self.checkpoints and self.checkpoints[-1][0] == self.step else None
        self.engine.add_adapter(self.spec.name, weights, source=last)
        self.status = JobStatus.SUCCEEDED
        self._event("status", f"job succeeded; serving {self.spec.name}", {"fine_tuned_model": self.spec.name})

    def release(self) -> None:
        """Free the training slot and optimizer memory."""
        mgr = self.engine.adapters
        self.engine.runner.drop_train_graphs()   # captured with this job's parameters
        if self.adapter in mgr:
            mgr.freeze(self.adapter)
            mgr.remove(self.adapter)
        self.optimizer.state.clear()
        self.params = self.masters = self._stage = []
        self._master_flat = self._master_grad_flat = self._stage_flat = None

    def cancel(self) -> None:
        if self.status in (JobStatus.RUNNING, JobStatus.PAUSED):
            self.release()
            self.status = JobStatus.CANCELLED
            self._event("status", "job cancelled")

    def fail(self, message: str) -> None:
        self.release()
        self.status, self.error = JobStatus.FAILED, message
        self._event("status", f"job failed: {message}")

    def _event(self, kind: str, message: str, data: dict | None = None) -> None:
        ev = JobEvent(time.time(), kind, message, data or {})
        self.events.append(ev)
        for listener in self.listeners:
            listener(self, ev)

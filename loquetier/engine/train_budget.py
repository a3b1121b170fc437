"""Policies that decide how many training/eval tokens a step may carry beside inference.

`SloAwarePolicy` keeps predicted TTFT/TPOT within the operator's SLOs using the online cost
model and gives training everything when no inference is pending (work-conserving).
`FixedRatioPolicy` is the paper's: one training step after every N inference steps.
"""

from __future__ import annotations

import time

from ..config import SchedulerConfig
from .cost_model import StepCostModel
from .scheduler import Scheduler, SchedulerOutput


class FixedRatioPolicy:
    def __init__(self, infer_steps_per_train_step: int):
        self.n = infer_steps_per_train_step
        self.inference_steps = 0

    def allowed_tokens(self, sched: SchedulerOutput, scheduler: Scheduler) -> int:
        if not sched.scheduled and not scheduler.waiting:
            return sched.leftover_budget
        if self.inference_steps >= self.n:
            self.inference_steps = 0
            return sched.leftover_budget
        self.inference_steps += 1
        return 0


class SloAwarePolicy:
    """`margin`: the share of the time left before a request's TTFT deadline that a step may take;
    `tpot_margin`: the share of the TPOT SLO that decoding requests are steered to on average
    (the headroom absorbs the cost model's errors and the steps no policy shortens, like prefills)."""

    def __init__(self, config: SchedulerConfig, cost: StepCostModel, margin: float = 0.9,
                 tpot_margin: float = 0.95):
        self.config, self.cost, self.margin, self.tpot_margin = config, cost, margin, tpot_margin

    def allowed_tokens(self, sched: SchedulerOutput, scheduler: Scheduler) -> int:
        budget = sched.leftover_budget
        if not sched.scheduled and not scheduler.waiting:
            return budget   # idle: training takes the whole step
        decode = sum(1 for s in sched.scheduled if s.length == 1)
        prefill = sched.num_inference_tokens - decode
        t_inf = self.cost.predict(decode, prefill)
        # the longest this step may take: TPOT credit (its margin is in the steered target) and
        # a share of the time left before the oldest pending request's TTFT deadline
        limit = float("inf")
        now = time.monotonic()
        if decode and self.config.slo_tpot:
            limit = self._tpot_limit(sched, now)
        if self.config.slo_ttft:
            # requests not yet at their first token: the step must leave room to reach it in time
            pending = [s.seq for s in sched.scheduled if s.seq.first_token_time is None] + list(scheduler.waiting)
            if pending:
                oldest = min(now - s.arrival_time for s in pending)
                left = self.config.slo_ttft - oldest
                queued = sum(s.num_tokens - s.num_computed_tokens for s in pending)
                steps = max(1, -(-queued // max(1, self.config.max_num_batched_tokens)))
                limit = min(limit, self.margin * max(0.0, left) / steps)
        if limit == float("inf"):
            return budget
        # fill the step: as many training tokens as the tightest SLO leaves, after the fixed cost
        # of a step that trains at all
        spare = limit - t_inf - self.cost.train_step_cost
        if spare <= 0:
            return 0
        return max(0, min(budget, int(spare / self.cost.train_cost_per_token)))

    def _tpot_limit(self, sched: SchedulerOutput, now: float) -> float:
        """Longest step every decoding request can take and keep its mean TPOT within
        `tpot_margin` × the SLO.

        TPOT is a mean over a request's output, so the time its earlier steps left unused is
        credit: after this step a request with n outputs has n intervals, allowed n * SLO in all.
        A request that just got its first token has one SLO of room; one that decoded quickly
        for a while can absorb a larger training step. This is what lets training run beside
        steady decoding instead of only in idle gaps."""
        tpot = self.config.slo_tpot * self.tpot_margin
        rooms = (tpot * len(s.seq.output_token_ids) - (now - s.seq.first_token_time)
                 for s in sched.scheduled if s.length == 1 and s.seq.first_token_time is not None)
        return min(rooms, default=tpot)


def make_policy(config: SchedulerConfig, cost: StepCostModel):
    if config.train_policy == "fixed":
        return FixedRatioPolicy(config.infer_steps_per_train_step)
    return SloAwarePolicy(config, cost)

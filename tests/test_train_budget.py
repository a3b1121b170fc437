"""Training-token budget policies and the online step-cost model."""

import time

import pytest

from loquetier.config import SchedulerConfig
from loquetier.engine.batch import ScheduledSeq
from loquetier.engine.cost_model import StepCostModel
from loquetier.engine.scheduler import SchedulerOutput
from loquetier.engine.sequence import Sequence
from loquetier.engine.train_budget import FixedRatioPolicy, SloAwarePolicy
from loquetier.sampling_params import SamplingParams


class FakeScheduler:
    def __init__(self, waiting=()):
        self.waiting = list(waiting)


def decoding_seq():
    s = Sequence([1, 2, 3], SamplingParams())
    s.output_token_ids = [4]
    s.num_computed_tokens = 3
    s.first_token_time = time.monotonic()
    return s


def test_cost_model_recovers_linear_costs():
    cm = StepCostModel()
    true = (0.004, 1e-4, 3e-5, 2e-4, 5e-5, 0.015)
    for i in range(64):
        d, p, t, e = (i * 7) % 50, (i * 131) % 700, (i * 53) % 900 * (i % 3 > 0), (i * 17) % 200
        cm.observe({"time": true[0] + true[1] * d + true[2] * p + true[3] * t + true[4] * e + true[5] * (t > 0),
                    "num_decode_tokens": d, "num_prefill_tokens": p, "num_train_tokens": t, "num_eval_tokens": e})
    cm.fit()
    assert cm.predict(32, 256, 512, 0) == pytest.approx(true[0] + 32e-4 + 256 * 3e-5 + 512 * 2e-4 + 0.015, rel=0.05)
    assert cm.predict(32, 256) == pytest.approx(true[0] + 32e-4 + 256 * 3e-5, rel=0.05)
    assert cm.train_cost_per_token == pytest.approx(2e-4, rel=0.05)
    assert cm.train_step_cost == pytest.approx(0.015, rel=0.1)


def test_cost_model_window_equals_a_fit_of_its_last_samples():
    """The running sums over the sliding window (samples entering and leaving, and the periodic
    rebuild) give the ridge fit computed from scratch over the samples still in the window."""
    import numpy as np
    window = 32
    cm = StepCostModel(window=window)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3 * window + 5):
        d, p, t, e = (int(v) for v in rng.integers(0, [64, 700, 900, 200]))
        t *= i % 3 > 0
        y = 0.003 + 1e-4 * d + 2e-5 * p + 1.5e-4 * t + 3e-5 * e + 0.01 * (t > 0) + float(rng.normal(0, 1e-3))
        cm.observe({"time": y, "num_decode_tokens": d, "num_prefill_tokens": p, "num_train_tokens": t,
                    "num_eval_tokens": e})
        rows.append(([1.0, d, p, t, e, float(t > 0)], y))
    cm.fit()
    X = np.array([r[0] for r in rows[-window:]])
    y = np.array([r[1] for r in rows[-window:]])
    scale = np.maximum(np.abs(X).mean(0), 1e-9)
    lam = 1e-3 * window
    ref = np.linalg.solve(X.T @ X + lam * np.diag(scale ** 2), X.T @ y + lam * scale ** 2 * cm.prior).clip(min=0)
    np.testing.assert_allclose(cm.coef, ref, rtol=1e-9, atol=1e-12)
    assert len(cm.samples) == window


def test_slo_policy_is_work_conserving_and_respects_tpot():
    cm = StepCostModel(prior=(0.01, 1e-4, 1e-4, 1e-4, 1e-4, 0.0))
    policy = SloAwarePolicy(SchedulerConfig(slo_tpot=0.05, slo_ttft=2.0, max_num_batched_tokens=2048), cm,
                            margin=1.0, tpot_margin=1.0)
    # idle: everything left goes to training
    assert policy.allowed_tokens(SchedulerOutput([], 2048), FakeScheduler()) == 2048
    # 100 decodes: predicted 0.01 + 0.01 = 0.02 s, so 0.03 s of a 0.05 s TPOT SLO is left for training
    seqs = [decoding_seq() for _ in range(100)]
    out = SchedulerOutput([ScheduledSeq(s, 3, 1) for s in seqs], 1948)
    # (less the few ms since the requests got their first token: TPOT credit is measured from it)
    assert policy.allowed_tokens(out, FakeScheduler()) == pytest.approx(300, abs=40)
    # a fixed cost for steps that train comes off the room first: 0.01 s less is 100 tokens fewer
    cm.coef[5] = 0.01
    assert policy.allowed_tokens(out, FakeScheduler()) == pytest.approx(200, abs=40)
    cm.coef[5] = 0.0
    # steering requests to 80% of the TPOT SLO leaves 0.04 - 0.02 s: 200 tokens
    policy.tpot_margin = 0.8
    assert policy.allowed_tokens(out, FakeScheduler()) == pytest.approx(200, abs=40)
    policy.tpot_margin = 1.0
    # a waiting request already past its TTFT SLO: no training at all
    late = Sequence([1] * 10, SamplingParams())
    late.arrival_time -= 5.0
    assert policy.allowed_tokens(out, FakeScheduler([late])) == 0


def test_slo_policy_spends_tpot_credit_of_requests_that_decoded_quickly():
    cm = StepCostModel(prior=(0.01, 1e-4, 1e-4, 1e-4, 1e-4, 0.0))
    policy = SloAwarePolicy(SchedulerConfig(slo_tpot=0.05, slo_ttft=None, max_num_batched_tokens=4096), cm,
                            margin=1.0, tpot_margin=1.0)
    ahead = decoding_seq()
    ahead.output_token_ids = list(range(20))          # 20 tokens in 0.2 s: 0.8 s of credit left
    ahead.first_token_time = time.monotonic() - 0.2
    out = SchedulerOutput([ScheduledSeq(ahead, 22, 1)], 4000)
    assert policy.allowed_tokens(out, FakeScheduler()) == 4000   # ~7,900 tokens fit; the budget caps it
    # the same request joined by one that is behind its SLO: no training in this step
    behind = decoding_seq()
    behind.output_token_ids = list(range(20))
    behind.first_token_time = time.monotonic() - 1.5
    out = SchedulerOutput([ScheduledSeq(ahead, 22, 1), ScheduledSeq(behind, 22, 1)], 4000)
    assert policy.allowed_tokens(out, FakeScheduler()) == 0


def test_fixed_policy_trains_every_nth_inference_step():
    policy = FixedRatioPolicy(infer_steps_per_train_step=3)
    busy = SchedulerOutput([ScheduledSeq(decoding_seq(), 3, 1)], 100)
    got = [policy.allowed_tokens(busy, FakeScheduler()) for _ in range(8)]
    assert got == [0, 0, 0, 100, 0, 0, 0, 100]
    assert policy.allowed_tokens(SchedulerOutput([], 2048), FakeScheduler()) == 2048

"""Step-time cost model fitted online: t = base + Σ per-token cost × tokens of each segment kind
+ a fixed cost for steps that train (their forward and backward run eagerly, or from a training
graph, instead of the decode graph)."""

from __future__ import annotations

from collections import deque

import torch

KINDS = ("num_decode_tokens", "num_prefill_tokens", "num_train_tokens", "num_eval_tokens")


class StepCostModel:
    """Least squares over the last `window` measured steps (ridge-regularised towards a prior)."""

    def __init__(self, window: int = 256, prior: tuple[float, ...] = (2e-3, 2e-5, 1e-5, 6e-5, 2e-5, 2e-2)):
        self.samples: deque[tuple[list[float], float]] = deque(maxlen=window)
        self.prior = torch.tensor(prior, dtype=torch.float64)
        self.coef = self.prior.clone()
        self._since_fit = 0

    def observe(self, info: dict) -> None:
        self.samples.append((_features(*(info[k] for k in KINDS)), float(info["time"])))
        self._since_fit += 1
        if self._since_fit >= 8:
            self.fit()

    def fit(self) -> None:
        self._since_fit = 0
        if len(self.samples) < 4:
            return
        X = torch.tensor([s[0] for s in self.samples], dtype=torch.float64)
        y = torch.tensor([s[1] for s in self.samples], dtype=torch.float64)
        # ridge towards the prior, scaled per feature so unseen kinds keep their prior cost
        scale = X.abs().mean(0).clamp_min(1e-9)
        lam = 1e-3 * len(self.samples)
        A = X.T @ X + lam * torch.diag(scale ** 2)
        b = X.T @ y + lam * (scale ** 2) * self.prior
        coef = torch.linalg.solve(A, b)
        self.coef = coef.clamp_min(0.0)

    def predict(self, decode: int = 0, prefill: int = 0, train: int = 0, evals: int = 0) -> float:
        return float(torch.tensor(_features(decode, prefill, train, evals), dtype=torch.float64) @ self.coef)

    @property
    def train_cost_per_token(self) -> float:
        return float(self.coef[3]) or float(self.prior[3])

    @property
    def train_step_cost(self) -> float:
        """The fixed cost a step pays for carrying any training tokens."""
        return float(self.coef[5])


def _features(decode, prefill, train, evals) -> list[float]:
    return [1.0, float(decode), float(prefill), float(train), float(evals), float(train > 0)]

"""Step-time cost model fitted online: t = base + Σ per-token cost × tokens of each segment kind
+ a fixed cost for steps that train (their forward and backward run eagerly, or from a training
graph, instead of the decode graph)."""

from __future__ import annotations

from collections import deque

import numpy as np

KINDS = ("num_decode_tokens", "num_prefill_tokens", "num_train_tokens", "num_eval_tokens")
FIT_EVERY = 8   # steps between refits


class StepCostModel:
    """Least squares over the last `window` measured steps (ridge-regularised towards a prior).

    It runs on the engine thread after every step, so it keeps the normal equations' sums (XᵀX,
    Xᵀy, column sums) up to date as samples enter and leave the window: a refit solves a 6 × 6
    system instead of rebuilding a window × 6 matrix from Python lists (about 0.2 ms of host time
    a refit on an idle CPU, more on a busy one). The sums are rebuilt from the window once per
    window of samples, so rounding cannot drift."""

    def __init__(self, window: int = 256, prior: tuple[float, ...] = (2e-3, 2e-5, 1e-5, 6e-5, 2e-5, 2e-2)):
        self.window = window
        self.samples: deque[tuple[np.ndarray, float]] = deque()
        self.prior = np.asarray(prior, dtype=np.float64)
        self.coef = self.prior.copy()
        k = len(prior)
        self._xtx, self._xty, self._xsum = np.zeros((k, k)), np.zeros(k), np.zeros(k)
        self._since_fit = self._since_rebuild = 0

    def observe(self, info: dict) -> None:
        x = np.array(_features(*(info[k] for k in KINDS)))
        self._add(x, float(info["time"]), 1.0)
        if len(self.samples) > self.window:
            self._add(*self.samples.popleft(), -1.0)
        self._since_rebuild += 1
        if self._since_rebuild >= self.window:
            self._rebuild()
        self._since_fit += 1
        if self._since_fit >= FIT_EVERY:
            self.fit()

    def _add(self, x: np.ndarray, y: float, sign: float) -> None:
        if sign > 0:
            self.samples.append((x, y))
        self._xtx += sign * np.outer(x, x)
        self._xty += sign * y * x
        self._xsum += sign * x

    def _rebuild(self) -> None:
        self._since_rebuild = 0
        X = np.stack([x for x, _ in self.samples])
        y = np.array([t for _, t in self.samples])
        self._xtx, self._xty, self._xsum = X.T @ X, X.T @ y, X.sum(0)

    def fit(self) -> None:
        self._since_fit = 0
        n = len(self.samples)
        if n < 4:
            return
        # ridge towards the prior, scaled per feature so unseen kinds keep their prior cost
        # (features are non-negative, so the column sums are the sums of their magnitudes)
        scale = np.maximum(self._xsum / n, 1e-9)
        lam = 1e-3 * n
        A = self._xtx + lam * np.diag(scale ** 2)
        b = self._xty + lam * (scale ** 2) * self.prior
        self.coef = np.linalg.solve(A, b).clip(min=0.0)

    def predict(self, decode: int = 0, prefill: int = 0, train: int = 0, evals: int = 0) -> float:
        return float(np.dot(self.coef, _features(decode, prefill, train, evals)))

    @property
    def train_cost_per_token(self) -> float:
        return float(self.coef[3]) or float(self.prior[3])

    @property
    def train_step_cost(self) -> float:
        """The fixed cost a step pays for carrying any training tokens."""
        return float(self.coef[5])


def _features(decode, prefill, train, evals) -> list[float]:
    return [1.0, float(decode), float(prefill), float(train), float(evals), float(train > 0)]

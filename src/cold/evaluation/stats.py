"""Bootstrap confidence intervals of accuracy, and of accuracy differences on the same problems.

Percentile bootstrap over problems, seeded (numpy `default_rng(seed)`), so a summary is
reproducible. The paired version resamples problems once for both decoders and takes the mean of
the per-problem difference: it uses the fact that both decoders answered the same questions, and
gives a much narrower interval than comparing two independent intervals. Two decoders with the
same per-problem results give exactly 0 (every resample's difference is 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 10_000
LEVEL = 0.95
_CHUNK = 1_000  # resamples drawn at once: [chunk, n] indices


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (fractions, not percent)."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_mean(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Interval:
    """Mean of `values` (e.g. 0/1 correctness) with a percentile bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError("values must be one-dimensional")
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError("n_boot must be >= 1 and level in (0, 1)")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, _CHUNK):
        m = min(_CHUNK, n_boot - start)
        means[start : start + m] = x[rng.integers(0, x.size, size=(m, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(x.mean()), float(low), float(high))


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Interval:
    """Mean of a - b over the same problems (a[i] and b[i] belong to problem i), bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, n_boot, seed, level)


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(problems only a got right, problems only b got right): all a paired comparison can see."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return int((a & ~b).sum()), int((~a & b).sum())

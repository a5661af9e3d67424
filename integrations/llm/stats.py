"""Uncertainty for small-scale comparisons: mean and spread over seeds, paired bootstrap intervals of a
difference between two configs, the verdict that an interval allows, and the 3x rate ladder that learning-rate
sweeps extend along.

Scores are per example (0-100, ``metrics.*_score(...)["per_example"]``), one row per seed, the same test
examples in every row and for every config. The bootstrap resamples *test examples* (one draw of example
indices shared by every seed and by both configs: paired by example and seed) and recomputes the mean
over seeds and examples of ``a - b``.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

MARGIN = 0.10  # "comparable to LoRA": at least LoRA's mean score minus 10 % of it


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linear between neighbours (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean difference a - b, lower, upper): a percentile interval at ``level`` from ``n_boot`` resamples of
    the test examples. ``a[s][i]`` and ``b[s][i]`` are example ``i``'s scores under seed ``s``."""
    if len(a) != len(b) or not a or any(len(x) != len(y) or not x for x, y in zip(a, b)):
        raise ValueError("paired_bootstrap needs the same seeds and the same test examples for both configs")
    n = len(a[0])
    if any(len(x) != n for x in a):
        raise ValueError("every seed must score the same test examples")
    # per-example difference averaged over seeds: resampling examples then only needs these n numbers
    diff = [statistics.fmean(x[i] - y[i] for x, y in zip(a, b)) for i in range(n)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(diff[rng.randrange(n)] for _ in range(n)) for _ in range(n_boot))
    tail = (1 - level) / 2
    return statistics.fmean(diff), percentile(means, tail), percentile(means, 1 - tail)


def verdict(lo: float, hi: float, margin: float = 0.0) -> str:
    """What an interval of ``a - b`` says of the claim "a is at least as good as b, within ``margin``":
    ``supported`` when the whole interval lies above ``-margin``, ``refuted`` when it lies below it,
    otherwise ``undecided at this scale``."""
    if lo > -margin:
        return "supported"
    if hi < -margin:
        return "refuted"
    return "undecided at this scale"


def next_rate(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the grid 1e-3, 3e-3, 1e-2, 3e-2, ... (steps of about 3x)."""
    half = round(2 * math.log10(lr)) + (1 if up else -1)  # 3e-3 -> -5, 1e-2 -> -4
    return float(f"{(3 if half % 2 else 1) * 10.0 ** (half // 2):.0e}")

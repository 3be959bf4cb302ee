"""`trisect bench …` commands: each measures contenders side by side in one run and prints ratios."""
from __future__ import annotations


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]

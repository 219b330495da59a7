"""Small statistics helpers: success rates with Wilson score intervals."""

from __future__ import annotations

import math
import statistics
from typing import Any

from propmaps_jax.errors import PropmapsError


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise PropmapsError(f"invalid counts {successes}/{n}: need 0 <= successes <= n")


def normal_quantile(confidence: float) -> float:
    """z such that a standard normal lies in [-z, z] with probability `confidence`."""
    if not 0.0 < confidence < 1.0:
        raise PropmapsError(f"confidence must lie in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(
    successes: int, n: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Wilson score interval (low, high) for a binomial proportion successes / n.

    With n = 0 nothing is known and the interval is the whole (0, 1).
    """
    successes, n = int(successes), int(n)
    _check_counts(successes, n)
    z = normal_quantile(confidence)
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    # Clamp rounding noise: the exact interval contains 0 (1) when p is 0 (1).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def proportion(successes: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """{successes, n, rate, ci_low, ci_high, confidence} (rate None if n = 0)."""
    low, high = wilson_interval(successes, n, confidence)
    return {
        "successes": int(successes),
        "n": int(n),
        "rate": (int(successes) / int(n)) if n else None,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
    }


def format_proportion(prop: dict[str, Any], digits: int = 1) -> str:
    """'32.8% (1638/5000; 95% CI 31.5-34.1%)' for a `proportion` dict."""
    if not prop["n"]:
        return f"n/a (0/0; no {prop['confidence']:.0%} CI)"
    return (
        f"{prop['rate']:.{digits}%} ({prop['successes']}/{prop['n']}; "
        f"{prop['confidence']:.0%} CI {100 * prop['ci_low']:.{digits}f}–"
        f"{100 * prop['ci_high']:.{digits}f}%)"
    )

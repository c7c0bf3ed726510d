"""Statistics of the reproduction: ROC AUC (Mann-Whitney), separation ratios, lead times.

All in numpy, no scikit-learn. Non-finite values are handled explicitly: ``+inf`` (an
eigenvector condition number at an exceptional point) ranks above every finite value, ``NaN``
(an estimate that failed) is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "auc",
    "average_ranks",
    "median_ratio",
    "lead_times",
    "chance_rate",
    "finite_or_none",
]


def finite_or_none(x) -> float | None:
    """``float(x)`` if finite, else ``None`` (JSON-safe)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties sharing their average rank (like scipy's rankdata)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values (inf == inf counts as a tie)
    new = np.ones(len(xs), dtype=bool)
    new[1:] = xs[1:] != xs[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(xs))
    avg = 0.5 * (starts + ends - 1) + 1.0  # average of 1-based ranks start+1 .. end
    ranks = np.empty(len(xs), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _quantize(x: np.ndarray, bits: int = 30) -> np.ndarray:
    """Round to ``bits`` mantissa bits (~9 digits) so values equal up to rounding tie: rho of
    the sharp modes is sqrt(beta) up to the last few bits in most estimates."""
    m, e = np.frexp(x)
    return np.ldexp(np.round(m * 2.0**bits) / 2.0**bits, e)


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC AUC of a score that should be larger on ``positive``: P(score+ > score-) + P(=)/2.

    Computed as the Mann-Whitney U statistic over ``n+ n-`` pairs, ``U / (n+ n-)``, with
    average ranks for ties (values equal to ~9 digits count as ties). 0.5 = no separation,
    1 = perfect, < 0.5 = inverted. NaN values are dropped; returns NaN when either class is
    empty. Cost: one sort of ``n+ + n-`` values.
    """
    p = _quantize(np.asarray(positive, dtype=np.float64))
    n = _quantize(np.asarray(negative, dtype=np.float64))
    p, n = p[~np.isnan(p)], n[~np.isnan(n)]
    if len(p) == 0 or len(n) == 0:
        return float("nan")
    r = average_ranks(np.concatenate([p, n]))
    u = r[: len(p)].sum() - len(p) * (len(p) + 1) / 2.0
    return float(u / (len(p) * len(n)))


def median_ratio(unstable: Sequence[float], stable: Sequence[float]) -> float:
    """``median(unstable) / median(stable)`` over the non-NaN values (inf allowed)."""
    u = np.asarray(unstable, dtype=np.float64)
    s = np.asarray(stable, dtype=np.float64)
    u, s = u[~np.isnan(u)], s[~np.isnan(s)]
    if len(u) == 0 or len(s) == 0:
        return float("nan")
    mu, ms = float(np.median(u)), float(np.median(s))
    if ms == 0:
        return float("nan")
    with np.errstate(invalid="ignore", over="ignore"):
        return mu / ms


def _above(values, threshold: float) -> np.ndarray:
    """``values > threshold`` beyond rounding (relative 1e-9): rho of the sharp modes sits at
    sqrt(beta) to the last bit most of the time, and so does its 90th percentile. NaN is
    never above."""
    v = np.asarray(values, dtype=np.float64)
    return v > threshold + 1e-9 * abs(threshold)


def lead_times(
    steps: np.ndarray,
    values: np.ndarray,
    events: Sequence[int],
    threshold: float,
    starts: Sequence[int] | None = None,
    lookback: int = 100,
) -> list[int | None]:
    """How long before each event the metric first went above its warning threshold.

    For an event (spike onset or divergence) at step ``e`` the warning window holds the
    estimates with ``max(start, e - lookback) <= step < e`` (``start``: the end of the previous
    spike, 0 for the first). The event was warned of if any of them is above ``threshold``;
    the lead time is ``e`` minus the step of the first such estimate (``1 .. lookback``). The
    metric need not stay above until ``e``: kappa(V) peaks at the exceptional point and falls
    again as the pair turns real, before the loss moves. :func:`chance_rate` gives the rate
    of such windows with an alarm when nothing happens.

    Args:
        steps: estimate steps of one run, increasing.
        values: the metric at those steps (NaN counts as below threshold).
        events: event steps.
        threshold: the warning threshold (above it beyond rounding warns).
        starts: per event, the first step that may carry its warning (default 0).
        lookback: the window length in steps.

    Returns:
        One lead time (steps) or ``None`` (missed / no estimate in the window) per event.
    """
    steps = np.asarray(steps)
    above = _above(values, threshold)
    out: list[int | None] = []
    for i, e in enumerate(events):
        lo = max(0 if starts is None else starts[i], e - lookback)
        idx = np.flatnonzero((steps >= lo) & (steps < e) & above)
        out.append(int(e - steps[idx[0]]) if len(idx) else None)
    return out


def chance_rate(
    steps: np.ndarray,
    values: np.ndarray,
    stable: np.ndarray,
    threshold: float,
    lookback: int = 100,
) -> tuple[int, int]:
    """False-alarm baseline of :func:`lead_times`: windows of stable estimates with an alarm.

    A pseudo-event is placed just after every estimate ``t`` whose window
    ``(t + 1 - lookback) <= step <= t`` holds only stable-phase estimates; it counts as
    "warned" if any of them is above ``threshold``.

    Returns:
        ``(n_windows, n_with_alarm)`` for one run.
    """
    steps = np.asarray(steps)
    above = _above(values, threshold)
    stable = np.asarray(stable, dtype=bool)
    n = hit = 0
    for t in steps:
        w = (steps >= t + 1 - lookback) & (steps <= t)
        if not stable[w].all() or steps[0] > t + 1 - lookback:
            continue  # the window reaches an unstable estimate or before the first estimate
        n += 1
        hit += bool(above[w].any())
    return n, hit

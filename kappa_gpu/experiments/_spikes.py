"""The automatic definition of loss spikes, divergence and stable/unstable phases.

Applied identically to every run (both problems, both optimizers, full and mini-batch), always
to the **full-batch training loss** ``L_t`` measured at the parameters before step ``t + 1``
(``t = 0`` is the initialization), never to the noisy mini-batch loss.

Definition (the numbers are the defaults of :class:`SpikeRule`):

* **running reference** ``r_t = min(L_{t-W} .. L_{t-1})`` over the previous ``W = 50`` steps.
* **spike onset** at ``t`` when not already in a spike and
  ``L_t > F r_t`` with ``F = 2`` *and* ``L_t - r_t > a L_0`` with ``a = 1e-3`` (the absolute
  floor ignores relative wiggles of a loss that has already fallen by > 1000x).
* **spike end**: the first later step with ``L_t <= F b``, where ``b`` is ``r_t`` at the onset
  (the loss is back within the factor that triggered it); a spike still open when the run ends
  ends there. A new onset less than ``G = 10`` steps after the end of the previous spike (the
  loss oscillating about ``F b`` on its way down) extends that spike instead of starting one.
* **divergence**: ``L_t`` non-finite or ``L_t > D L_0`` with ``D = 100``; training stops there.
* **phases**, per step: ``spike`` (onset <= t < end), ``pre`` (the ``H = 30`` steps before an
  onset or before divergence, not in a spike), ``diverged`` (from divergence on), ``stable``
  (everything else). **unstable = spike + pre + diverged**; ``pre`` alone is what an early
  warning has to flag.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["SpikeRule", "Spike", "SpikeAnalysis", "detect_spikes", "PHASES"]

#: Phase codes, in the order of the integer labels of :attr:`SpikeAnalysis.phase`.
PHASES = ("stable", "pre", "spike", "diverged")


@dataclass(frozen=True)
class SpikeRule:
    """The parameters of the spike definition (see the module docstring).

    Attributes:
        window: W, steps of the running-minimum reference.
        factor: F, how far above the reference the loss must rise.
        abs_floor: a, the rise must also exceed ``a * L_0``.
        diverge_factor: D, divergence when ``L_t > D * L_0`` (or non-finite).
        lookahead: H, steps before an onset labelled ``pre``.
        merge_gap: G, an onset within this many steps of the previous spike's end extends it.
    """

    window: int = 50
    factor: float = 2.0
    abs_floor: float = 1e-3
    diverge_factor: float = 100.0
    lookahead: int = 30
    merge_gap: int = 10

    def to_dict(self) -> dict[str, float]:
        """The fields as a dict."""
        return asdict(self)


@dataclass
class Spike:
    """One loss spike: ``onset`` <= t < ``end``, peak loss ``peak`` at ``peak_step``,
    reference (pre-spike running minimum) ``baseline``."""

    onset: int
    end: int
    peak_step: int
    peak: float
    baseline: float

    @property
    def height(self) -> float:
        """Peak over baseline (>= F by construction)."""
        return self.peak / self.baseline if self.baseline > 0 else math.inf


@dataclass
class SpikeAnalysis:
    """Spikes, divergence and per-step phases of one loss curve.

    Attributes:
        spikes: the detected spikes, in order.
        diverged_at: the step of divergence, or ``None``.
        phase: per step ``t = 0 .. len(loss) - 1``, an index into :data:`PHASES`.
        rule: the rule used.
    """

    spikes: list[Spike]
    diverged_at: int | None
    phase: np.ndarray
    rule: SpikeRule = field(default_factory=SpikeRule)

    def phase_name(self, t: int) -> str:
        """The phase of step ``t`` by name."""
        return PHASES[int(self.phase[t])]

    def unstable(self, t: int) -> bool:
        """Whether step ``t`` is in an unstable phase (pre, spike or diverged)."""
        return int(self.phase[t]) != 0

    def to_dict(self) -> dict:
        """JSON-safe summary (the per-step phases are not included)."""
        return {
            "n_spikes": len(self.spikes),
            "spikes": [
                {**asdict(s), "height": s.height if math.isfinite(s.height) else "inf"}
                for s in self.spikes
            ],
            "diverged_at": self.diverged_at,
            "rule": self.rule.to_dict(),
        }


def detect_spikes(loss, rule: SpikeRule | None = None) -> SpikeAnalysis:
    """Apply the spike definition (module docstring) to one full-batch loss curve.

    Args:
        loss: the full-batch training loss per step, ``loss[0]`` at initialization; may end
            with a non-finite value (divergence).
        rule: the thresholds (default :class:`SpikeRule()`).

    Returns:
        A :class:`SpikeAnalysis`. Cost: O(len(loss) * W).
    """
    rule = rule or SpikeRule()
    L = np.asarray(loss, dtype=np.float64)
    T = len(L)
    phase = np.zeros(T, dtype=np.int8)
    if T == 0:
        return SpikeAnalysis([], None, phase, rule)
    L0 = L[0] if np.isfinite(L[0]) and L[0] > 0 else 1.0
    bad = ~np.isfinite(L) | (L > rule.diverge_factor * L0)
    diverged_at = int(np.argmax(bad)) if bad.any() else None
    T_ok = diverged_at if diverged_at is not None else T
    spikes: list[Spike] = []
    t = 1
    while t < T_ok:
        ref = float(L[max(0, t - rule.window) : t].min())
        if L[t] > rule.factor * ref and L[t] - ref > rule.abs_floor * L0:
            end = t + 1
            while end < T_ok and L[end] > rule.factor * ref:
                end += 1
            if spikes and t - spikes[-1].end < rule.merge_gap:
                prev = spikes.pop()
                t, ref = prev.onset, prev.baseline
            seg = L[t:end]
            k = int(np.argmax(seg))
            spikes.append(Spike(t, end, t + k, float(seg[k]), ref))
            t = end
        else:
            t += 1
    H = rule.lookahead
    for s in spikes:
        phase[max(0, s.onset - H) : s.onset] = 1
    if diverged_at is not None:
        phase[max(0, diverged_at - H) : diverged_at] = 1
        phase[diverged_at:] = 3
    for s in spikes:  # spikes override a "pre" window of a later spike
        phase[s.onset : s.end] = 2
    return SpikeAnalysis(spikes, diverged_at, phase, rule)

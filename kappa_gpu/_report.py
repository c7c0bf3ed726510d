"""The result of :func:`kappa_gpu.estimate`: numbers, certificates and cost, JSON-safe."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["KappaReport"]


def _jsonable(v: Any) -> Any:
    """Convert numpy/torch values to JSON-safe Python: complex -> [re, im], inf/nan -> str."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (complex, np.complexfloating)):
        return [_jsonable(float(v.real)), _jsonable(float(v.imag))]
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    return v


@dataclass
class KappaReport:
    """Non-normality of the linearized optimizer update J at the current point.

    Every vector quantity is per computed eigenvalue of J (``eigenvalues``), except the
    ``*_mode`` fields, which are per curvature mode s (one mode gives the two eigenvalues of its
    2x2 block; ``mode_of`` maps eigenvalues to modes).

    Attributes:
        eigenvalues: complex eigenvalues z of J for the computed modes.
        kappa_V: sigma_max / sigma_min of the unit-norm right eigenvectors in the optimizer's
            native coordinates (theta, then the buffers as torch stores them); conjugate pairs
            both included. ``inf`` when the set is numerically singular (an exceptional point).
        condition_numbers: eigenvalue condition numbers 1 / |y^H x| (unit x, y); independent of
            how the columns are scaled.
        spectral_radius: max |z| over the computed modes (not over the whole spectrum).
        curvatures: the curvature s of each mode (eigenvalue of D^1/2 Ht D^1/2; for the arnoldi
            path inferred from z through the 2x2 block's characteristic polynomial).
        ep_ratio: per mode, s / s_ep - 1 for the nearest exceptional point s_ep of its 2x2 block
            (0 at the EP; s_ep = (sqrt(c) +- sqrt(beta))^2 / a when a = a2 and b = beta, the
            roots of the block's discriminant in general, e.g. nesterov);
            ``ep_which`` says which one ("lower"/"upper"). Modes of negative curvature get
            about -1 (far from both EPs, which lie at s > 0).
        discriminant: per mode, the 2x2 discriminant (zero at an EP, negative between the EPs).
        stability_margin: per mode, 1 - max |z| of its block (negative means unstable).
        at_ep: per mode, whether it sits at an exceptional point (to rounding).
        transient_growth: max_t ||T^t||_2 of the projected operator T = Q^T J Q on the computed
            invariant subspace; ``growth_argmax`` the t where it is reached, ``growth_curve``
            ||T^t|| for t = 0..horizon, ``growth_bounded`` False when rho >= 1 (then
            ``transient_growth`` is ``inf`` and the curve shows the first steps only).
        normalized_growth: max_t ||(T / rho)^t||, the amplification beyond what the spectral
            radius alone predicts; finite also when rho >= 1 (1 for a normal T). Taken over
            t = 0..1000 (``horizon`` when given).
        kappa_bound_curve: kappa_V rho^t for the same t.
        kreiss_lower: a lower bound of the Kreiss constant of T.
        residuals: true residuals ||J x - z x|| (unit x, native coordinates) from the
            operator's own HVPs (structured: the Lanczos certificate's, reused).
        converged: per eigenvalue, whether it meets ``tol`` on J: the true residual
            ``||J x - z x|| <= tol * max(|z|, eps**(2/3))`` (arnoldi: also the Krylov-Schur
            Ritz estimate, and a matched left eigenvector).
        tol: the relative tolerance on J the modes were computed to (both methods alike).
        n_hvp: Hessian-vector products spent (certificates included); seconds: wall time.
        method, variant, modes, target: what was computed and how it was targeted.
        coordinates: the coordinates kappa_V refers to.
        message: a human-readable status; says what to do when something did not converge.
        hessenberg: the arnoldi path's final Krylov decomposition (for
            :func:`~kappa_gpu.pseudospectra`); with ``modes="both"`` the sharp side's only.
    """

    eigenvalues: np.ndarray
    kappa_V: float
    condition_numbers: np.ndarray
    spectral_radius: float
    curvatures: np.ndarray
    mode_of: np.ndarray
    ep_ratio: np.ndarray
    ep_which: list[str]
    discriminant: np.ndarray
    stability_margin: np.ndarray
    at_ep: np.ndarray
    transient_growth: float
    normalized_growth: float
    growth_argmax: int
    growth_curve: np.ndarray
    growth_bounded: bool
    kappa_bound_curve: np.ndarray
    kreiss_lower: float
    residuals: np.ndarray
    converged: np.ndarray
    n_hvp: int
    seconds: float
    method: str
    variant: str | None
    optimizer: str
    modes: str
    target: str
    n_params: int
    state_dim: int
    tol: float
    coordinates: str = "native: (theta, optimizer buffers as torch stores them), unit columns"
    message: str = ""
    hessenberg: np.ndarray | None = field(default=None, repr=False)
    #: Vectors to warm-start the next estimate with (pass as ``warm_start=``); not serialized.
    warm_vectors: torch.Tensor | None = field(default=None, repr=False)
    #: A fingerprint of the point (state, loss, hyper-parameters) the report was computed at: a
    #: later estimate at the same point refines ``warm_vectors`` instead of searching; not
    #: serialized.
    point: tuple | None = field(default=None, repr=False)
    #: ``(modes, k)`` of the call that made the report: ``warm_vectors`` span those modes only,
    #: so a later call at the same point trusts them only for the same request; not serialized.
    request: tuple | None = field(default=None, repr=False)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    @property
    def nearest_ep_ratio(self) -> float:
        """The signed EP ratio of the mode closest to an exceptional point (nan if no modes)."""
        if len(self.ep_ratio) == 0:
            return float("nan")
        return float(self.ep_ratio[np.argmin(np.abs(self.ep_ratio))])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (complex as [re, im], non-finite floats as strings)."""
        skip = {"hessenberg", "warm_vectors", "point", "request"}
        out = {k: _jsonable(v) for k, v in self.__dict__.items() if k not in skip}
        out["all_converged"] = self.all_converged
        out["nearest_ep_ratio"] = _jsonable(self.nearest_ep_ratio)
        return out

    def __repr__(self) -> str:
        """One line (the dataclass repr printed every array: ~8k characters at k = 4);
        :meth:`summary` for a few lines, :meth:`to_dict` for everything."""
        conv = int(np.sum(self.converged))
        return (
            f"KappaReport(method={self.method!r}, optimizer={self.optimizer!r}, "
            f"modes={self.modes!r}, k={len(self.curvatures)}, kappa_V={self.kappa_V:.4g}, "
            f"rho_computed={self.spectral_radius:.6g}, "
            f"nearest_ep_ratio={self.nearest_ep_ratio:+.3g}, "
            f"transient_growth={self.transient_growth:.4g}, "
            f"converged={conv}/{len(self.converged)}, n_hvp={self.n_hvp}, "
            f"seconds={self.seconds:.3g})"
        )

    def summary(self) -> str:
        """A few lines for a terminal."""
        conv = "all converged" if self.all_converged else "NOT all converged"
        return (
            f"kappa_gpu {self.method} estimate ({self.optimizer}"
            f"{'/' + self.variant if self.variant else ''}, {self.modes} modes, "
            f"{len(self.eigenvalues)} eigenvalues, {conv})\n"
            f"  rho (computed modes) = {self.spectral_radius:.6g}   kappa_V = {self.kappa_V:.4g}"
            f"   max cond(z) = {np.max(self.condition_numbers, initial=0):.4g}\n"
            f"  nearest EP ratio = {self.nearest_ep_ratio:+.3g}   transient growth = "
            f"{self.transient_growth:.4g} at t = {self.growth_argmax}   Kreiss >= "
            f"{self.kreiss_lower:.4g}\n"
            f"  cost: {self.n_hvp} HVPs, {self.seconds:.2f} s.  {self.message}"
        )

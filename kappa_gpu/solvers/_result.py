"""The result object of the eigen-solvers and the error raised by ``strict=True``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["EigResult", "ConvergenceError"]


@dataclass
class EigResult:
    """Eigenpairs of a :class:`~kappa_gpu.LinearOperator` with their certificates and cost.

    Attributes:
        eigenvalues: ``(k',)`` complex128 tensor on the CPU, most wanted first (the order of
            ``which``). ``k' = k``, or ``k + 1`` for :func:`~kappa_gpu.solvers.eigs` when the
            ``k``-th wanted eigenvalue is one half of a complex-conjugate pair: pairs are never
            split, so that ``kappa_V`` sees both columns. For ``eigsh`` the imaginary parts are
            exactly zero (use ``.real``).
        eigenvectors: ``(n, k')`` right eigenvectors on the operator's device, one unit 2-norm
            column per eigenvalue, the largest-magnitude entry made real and positive. Complex
            (complex64 for a float32 operator, complex128 for float64) for ``eigs``, where the two
            columns of a conjugate pair are exact conjugates; real for ``eigsh``.
        left_eigenvectors: ``(n, k')`` left eigenvectors (``y^H A = z y^H``, unit 2-norm), column
            ``i`` belonging to ``eigenvalues[i]``; ``None`` unless ``left=True``.
        residuals: ``(k',)`` float64, the TRUE residual norms ``||A x_i - z_i x_i||`` recomputed
            with real matvecs after the iteration (counted in ``n_matvec_certify``, not in
            ``n_matvec``).
        ritz_estimates: ``(k',)`` float64, the Ritz estimates ``||b^T s_i||`` the convergence
            test used (they are not residuals of the returned vectors; ``residuals`` are).
        converged: ``(k',)`` bool: ``ritz_estimates <= tol * max(|z|, eps**(2/3))`` (ARPACK's
            test; estimates below the rounding floor ``eps ||H||`` also pass); for ``left=True``
            also requires that the left eigenvector was matched and converged.
        n_matvec: applications of ``A`` during the iteration (a ``matmat`` of ``s`` columns
            counts ``s``); directly comparable with ARPACK's count.
        n_restarts: Krylov-Schur / thick restarts done.
        seconds: wall time of the whole call (including certification and ``left``).
        status: what happened, and when not converged, what to raise.
        hessenberg: ``(m + s, m)`` float64 numpy array ``H`` of the final Krylov decomposition
            ``A V_m = V_{m+s} H`` (``s`` = block size, ``V`` orthonormal): ``H[:m]`` is the
            Rayleigh quotient ``V_m^T A V_m`` and the last ``s`` rows the residual coupling. It
            is Hessenberg only before the first restart; the rectangular pseudospectral bound of
            Wright & Trefethen (2001) holds for any such decomposition.
        which: the ``which`` used.
        sigma: the target shift, or ``None``.
        tol: the relative tolerance used.
        n_rmatvec: applications of the adjoint ``A^T`` (only ``left=True``).
        n_matvec_certify: applications of ``A`` (and ``A^T``) spent on ``residuals`` and
            ``left_residuals``.
        left_residuals: ``||A^H y_i - conj(z_i) y_i||`` when ``left=True``.
        images: ``(n, k')`` the products ``A x_i`` computed for ``residuals`` (``eigsh`` only,
            ``None`` otherwise): a caller that derives further certificates from the same
            vectors (as :func:`kappa_gpu.estimate` does for the optimizer's ``J``) spends no
            more operator applications. Costs ``n k'`` entries of memory on the device. Its
            layout is what the operator returned for the Ritz vectors passed as an ``(n, k')``
            view of their rows (kappa_gpu's Hessian operators: such a view, not contiguous).
        residual_misses: pairs flagged converged whose true residual still exceeds ``tol``
            beyond the products' rounding (non-symmetric or noisy products, a defective
            eigenvalue; ``status`` says which): ``strict=True`` raises for them too.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    left_eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    ritz_estimates: torch.Tensor
    converged: torch.Tensor
    n_matvec: int
    n_restarts: int
    seconds: float
    status: str
    hessenberg: np.ndarray
    which: str
    sigma: float | None
    tol: float
    n_rmatvec: int = 0
    n_matvec_certify: int = 0
    left_residuals: torch.Tensor | None = field(default=None)
    images: torch.Tensor | None = field(default=None, repr=False)
    residual_misses: int = 0

    @property
    def converged_all(self) -> bool:
        """Whether every returned eigenpair passed the convergence test."""
        return bool(self.converged.all())

    @property
    def k(self) -> int:
        """The number of eigenpairs returned."""
        return int(self.eigenvalues.shape[0])

    def __repr__(self) -> str:
        z = ", ".join(f"{complex(v):.6g}" for v in self.eigenvalues[:8].tolist())
        more = ", ..." if self.k > 8 else ""
        return (
            f"EigResult(k={self.k}, which={self.which!r}, eigenvalues=[{z}{more}], "
            f"converged={int(self.converged.sum())}/{self.k}, n_matvec={self.n_matvec}, "
            f"n_restarts={self.n_restarts}, seconds={self.seconds:.3g}, status={self.status!r})"
        )


class ConvergenceError(RuntimeError):
    """Raised by ``strict=True`` when not all wanted eigenpairs converged.

    Attributes:
        result: the partial :class:`EigResult` (unconverged pairs flagged in ``converged``).
    """

    def __init__(self, message: str, result: EigResult):
        super().__init__(message)
        self.result = result

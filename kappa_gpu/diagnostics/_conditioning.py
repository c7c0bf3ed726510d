"""Eigenvector and eigenvalue condition numbers of a computed set of eigenpairs.

``kappa_V`` is the quantity of DESIGN.md section 1: ``||J^t|| <= kappa(V) rho(J)^t``. For a
partial eigen-decomposition (``k`` computed modes, ``k << n``) it is the condition number of the
``n x k`` matrix of unit-norm right eigenvectors, ``sigma_max / sigma_min``: ``1`` for orthogonal
eigenvectors, ``~2 / angle`` for two nearly parallel ones, ``inf`` at an exceptional point.
It depends on the coordinates of the vectors (report it in the optimizer's native coordinates).

Both functions accept torch tensors on any device (or numpy arrays), real or complex. The ``O(n
k^2)`` work (a thin QR) runs on the tensor's device in float64/complex128: ``kappa_V`` up to
~1e8 matters (eigenvectors at angle 1e-8 near an exceptional point), and float32 resolves only
``sigma_min / sigma_max > ~1e-7``. The ``k x k`` singular values are computed in float64 on the
host. Cost: one upcast copy of ``X`` and a QR of it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["kappa_V", "eigenvalue_condition_numbers"]


def _as_2d_tensor(X, name: str) -> torch.Tensor:
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(X).__name__}")
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ValueError(
            f"{name} must have shape (n, k) (one vector per column), got {tuple(X.shape)}"
        )
    if X.is_complex():
        return X.to(torch.complex128)
    if not X.is_floating_point():
        X = X.to(torch.float64)
    return X.to(torch.float64)


def _unit_columns(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``X`` with unit-norm columns, and a mask of the zero (or non-finite) columns.

    A column whose norm leaves the range where its squares are exact (below
    ``sqrt(tiny / eps)`` or overflowing; 1e-146 and 1e154 in float64) is scaled by its largest
    entry first: unnormalized eigenvectors of 1e-200 or 1e200 are still eigenvectors.
    """
    nrm = torch.linalg.vector_norm(X, dim=0)
    fi = torch.finfo(nrm.dtype)
    odd = (nrm < math.sqrt(fi.tiny / fi.eps)) | torch.isinf(nrm)
    if bool(odd.any()):
        big = X[:, odd].abs().amax(dim=0)
        ok = torch.isfinite(big) & (big > 0)  # zero and non-finite columns stay bad
        cols = torch.nonzero(odd).flatten()[ok]
        if cols.numel():
            X = X.clone()
            Xs = X[:, cols] / big[ok].to(X.dtype)
            X[:, cols] = Xs
            nrm = nrm.clone()
            nrm[cols] = torch.linalg.vector_norm(Xs, dim=0)
    bad = ~(torch.isfinite(nrm) & (nrm > 0))
    safe = torch.where(bad, torch.ones_like(nrm), nrm)
    return X / safe.to(X.dtype), bad


def kappa_V(X) -> float:
    """Condition number ``sigma_max / sigma_min`` of ``X`` after scaling its columns to unit norm.

    Args:
        X: ``(n, k)`` eigenvectors, one per column (real or complex; conjugate pairs both
            included, as :func:`kappa_gpu.solvers.eigs` returns them), on any device.

    Returns:
        A float ``>= 1``: ``inf`` (not NaN) for a zero column, a (numerically, ``sigma_min <=
        max(n, k) eps sigma_max``) rank-deficient set, or ``k > n``;
        ``1.0`` for an empty set; NaN only if ``X`` contains NaN.

    Example:
        >>> import torch
        >>> from kappa_gpu.diagnostics._conditioning import kappa_V
        >>> kappa_V(torch.eye(3, dtype=torch.float64))
        1.0
    """
    X = _as_2d_tensor(X, "kappa_V: X")
    n, k = X.shape
    if k == 0:
        return 1.0
    if bool(torch.isnan(X).any()):
        return math.nan
    if k > n:  # more vectors than dimensions (also n = 0)
        return math.inf
    Xu, bad = _unit_columns(X)
    if bool(bad.any()) or k > n:
        return math.inf
    # Thin QR on the device, then the k x k singular values on the host in float64.
    R = torch.linalg.qr(Xu, mode="r")[1]
    sv = np.linalg.svd(R.cpu().numpy(), compute_uv=False)
    # Numerically rank-deficient (sigma_min at the rounding level of the QR): inf, not 1e16.
    if sv[-1] <= max(n, k) * np.finfo(np.float64).eps * sv[0]:
        return math.inf
    return float(sv[0] / sv[-1])


def eigenvalue_condition_numbers(X, Y) -> torch.Tensor:
    """Condition numbers ``1 / |y_i^H x_i|`` of the eigenvalues, with unit-norm ``x_i``, ``y_i``.

    ``x_i`` right and ``y_i`` left eigenvectors of the same eigenvalue (``A x = z x``,
    ``y^H A = z y^H``), column ``i`` of ``X`` and ``Y``. An eigenvalue moves by about
    ``cond_i * ||E||`` under a perturbation ``E`` (Wilkinson); ``1`` for a normal matrix,
    ``inf`` at a Jordan block.

    Args:
        X, Y: ``(n, k)`` tensors (or arrays), real or complex, same shape.

    Returns:
        ``(k,)`` float64 tensor on the CPU; ``inf`` where ``y_i^H x_i = 0`` or a column is zero.
    """
    X = _as_2d_tensor(X, "eigenvalue_condition_numbers: X")
    Y = _as_2d_tensor(Y, "eigenvalue_condition_numbers: Y")
    if X.shape != Y.shape:
        raise ValueError(
            f"X and Y must have the same shape (right and left eigenvector of eigenvalue i in "
            f"column i), got {tuple(X.shape)} and {tuple(Y.shape)}"
        )
    Y = Y.to(X.device)
    dt = torch.complex128 if (X.is_complex() or Y.is_complex()) else torch.float64
    Xu, bx = _unit_columns(X.to(dt))
    Yu, by = _unit_columns(Y.to(dt))
    d = (Yu.conj() * Xu).sum(dim=0).abs().to("cpu", torch.float64)
    bad = (bx | by).cpu() | (d == 0)
    out = torch.where(bad, torch.full_like(d, math.inf), 1.0 / torch.where(bad, 1.0, d))
    out[torch.isnan(d)] = math.nan
    return out

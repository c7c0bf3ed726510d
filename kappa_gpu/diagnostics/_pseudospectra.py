"""epsilon-pseudospectra of the Arnoldi Hessenberg matrix (Wright & Trefethen 2001).

The eps-pseudospectrum of ``A`` is ``{z : sigma_min(zI - A) < eps}``. For an Arnoldi
factorization ``A V_m = V_{m+1} H~`` with the ``(m+1) x m`` rectangular Hessenberg matrix ``H~``,

    sigma_min(z I~ - H~) = min_c ||(zI - A) V_m c|| / ||c|| >= sigma_min(zI - A),

(``I~ = [I_m; 0]``), so every level set of the rectangular function lies *inside* the true
eps-pseudospectrum of ``A``: the plot never shows non-normality that is not there (the same
holds for a block decomposition ``A V_m = V_{m+s} H~``, ``(m+s) x m``). It is also
``>= sigma_min(zI - H_m)`` of the square part, i.e. the rectangular matrix is the tighter
approximation (Wright & Trefethen, SIAM J. Sci. Comput. 23(2), 2001, Theorem 2.1).

Done in float64/complex128 numpy: the resolvent norms of interest reach 1e8 and more next to
exceptional points, and ``sigma_min`` near an eigenvalue is a difference of O(1) numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kappa_gpu.diagnostics._transient import _sigma_min_shifted

__all__ = ["Pseudospectra", "plot_pseudospectra", "pseudospectra"]


@dataclass
class Pseudospectra:
    """``sigma_min(z I~ - H)`` on a grid of the complex plane.

    Attributes:
        x: real parts: 1-D ``(nx,)`` for a rectilinear grid, else the 2-D ``z.real``.
        y: imaginary parts: 1-D ``(ny,)`` or the 2-D ``z.imag``.
        z: the grid points, complex ``(ny, nx)``.
        sigma_min: ``sigma_min(z I~ - H)`` at every point, float64 ``(ny, nx)``; the
            eps-pseudospectrum is ``{sigma_min < eps}``.
        eigenvalues: eigenvalues of the square part ``H[:m, :m]`` (the Ritz values).
        rectangular: whether the ``(m+s) x m`` matrix was used (an inner bound of the
            pseudospectra of ``A``) rather than the square one.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    sigma_min: np.ndarray
    eigenvalues: np.ndarray
    rectangular: bool


def _hessenberg_of(obj) -> np.ndarray:
    H = getattr(obj, "hessenberg", obj)
    if H is None:
        raise ValueError(
            "the result has hessenberg=None: it comes from a path that keeps no Krylov "
            "decomposition of J (estimate's structured path); use estimate(..., "
            "method='arnoldi') or kappa_gpu.solvers.eigs on the operator"
        )
    if isinstance(H, torch.Tensor):
        H = H.detach().cpu().numpy()
    H = np.asarray(H)
    if H.ndim != 2 or H.shape[1] == 0 or H.shape[0] < H.shape[1]:
        raise ValueError(
            "expected a square (m, m) or rectangular (m+s, m) Hessenberg matrix (s >= 1: the "
            f"block size of the Krylov run), got shape {tuple(H.shape)}"
        )
    if not np.all(np.isfinite(H)):
        raise ValueError("the Hessenberg matrix has non-finite entries (NaN or inf)")
    return H.astype(np.complex128 if np.iscomplexobj(H) else np.float64, copy=False)


def _auto_grid(ev: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A square box around the eigenvalues with a 25 % margin (at least 0.01 max(1, |z|))."""
    re, im = ev.real, ev.imag
    cx, cy = 0.5 * (re.max() + re.min()), 0.5 * (im.max() + im.min())
    half = 0.5 * max(re.max() - re.min(), im.max() - im.min())
    half = 1.25 * half + 0.25 * max(half, 1e-2 * max(1.0, float(np.abs(ev).max())))
    return np.linspace(cx - half, cx + half, n), np.linspace(cy - half, cy + half, n)


def pseudospectra(result_or_hessenberg, grid=100, *, rectangular: bool = True) -> Pseudospectra:
    """``sigma_min(z I~ - H~)`` of an Arnoldi Hessenberg matrix on a grid of the complex plane.

    Args:
        result_or_hessenberg: a numpy array / torch tensor, square ``(m, m)`` (e.g. the
            Krylov-Schur Rayleigh quotient, or any small matrix) or rectangular ``(m+1, m)``
            (the Arnoldi ``H~``; ``(m+s, m)`` from a block run of block size ``s``), or any
            object with a ``.hessenberg`` attribute holding one (the solver's result).
        grid: an int ``n`` (an ``n x n`` grid on a square box around the eigenvalues of the
            square part, with margin), a tuple ``(xs, ys)`` of 1-D arrays (real and imaginary
            parts), or a complex array of points (2-D ``(ny, nx)``; 1-D is taken as one row).
        rectangular: for an ``(m+s) x m`` input, use it whole (default: the Wright-Trefethen
            inner bound of the pseudospectra of ``A``); ``False`` drops the last row and uses the
            square ``H_m``. Ignored for square input.

    Returns:
        :class:`Pseudospectra`.

    Cost: one ``(m+1) x m`` (or ``m x m``) SVD per grid point, batched through LAPACK: about
    0.03 ms per point for ``m = 20``, 0.15 ms for ``m = 50`` and 1.3 ms for ``m = 100`` (so
    13 s for a 100 x 100 grid at ``m = 100``; use a coarser grid there). The square case is
    first reduced to complex Schur form ``H = U R U^H`` (``zI - R`` has the same singular
    values), and the rectangular one to ``[R; h U]`` likewise (Wright & Trefethen's set-up).
    LAPACK's dense SVD does not exploit the triangle, so today this saves nothing per point;
    it is where an inverse-Lanczos ``sigma_min`` on ``R`` (``O(m^2)`` per iteration) would go
    for ``m`` in the hundreds.
    """
    import scipy.linalg

    H = _hessenberg_of(result_or_hessenberg)
    m = H.shape[1]
    is_rect = H.shape[0] > m
    Hs = H[:m, :m]
    R, U = scipy.linalg.schur(Hs.astype(np.complex128), output="complex")
    # numpy's eigvals of the (real) square part keeps conjugate pairs exactly conjugate
    eigenvalues = np.linalg.eigvals(Hs)
    if is_rect and rectangular:
        # Same reduction on the rectangular matrix: [U^H 0; 0 I] (z I~ - H~) U
        # = [zI - R; -B U] (B: the s residual rows), unitary on both sides, so the same
        # singular values. A block run's (m+s) x m matrix is such a decomposition as well.
        M = np.vstack([R, H[m:, :].astype(np.complex128) @ U])
    else:
        M = R
        is_rect = False

    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        if grid < 2:
            raise ValueError(f"grid as an int must be >= 2 points per axis, got {grid}")
        xs, ys = _auto_grid(eigenvalues, int(grid))
        Z = xs[None, :] + 1j * ys[:, None]
        x, y = xs, ys
    elif isinstance(grid, tuple) and len(grid) == 2:
        xs = np.asarray(grid[0], dtype=np.float64).reshape(-1)
        ys = np.asarray(grid[1], dtype=np.float64).reshape(-1)
        if xs.size == 0 or ys.size == 0:
            raise ValueError("grid=(xs, ys) needs non-empty 1-D arrays")
        Z = xs[None, :] + 1j * ys[:, None]
        x, y = xs, ys
    else:
        Z = np.asarray(grid)
        if Z.ndim == 1:
            Z = Z[None, :]
        if Z.ndim != 2 or not np.issubdtype(Z.dtype, np.number):
            raise ValueError(
                "grid must be an int, a tuple (xs, ys) of 1-D arrays, or a complex 2-D array of "
                f"points; got {type(grid).__name__} with shape {np.shape(grid)}"
            )
        Z = Z.astype(np.complex128)
        x, y = Z.real.copy(), Z.imag.copy()

    smin = _sigma_min_shifted(M, Z.reshape(-1)).reshape(Z.shape)
    return Pseudospectra(
        x=x, y=y, z=Z, sigma_min=smin, eigenvalues=eigenvalues, rectangular=bool(is_rect)
    )


def plot_pseudospectra(ps: Pseudospectra, levels=None, ax=None, *, unit_circle: bool = True):
    """Plot ``log10 sigma_min`` contours (eps-pseudospectra), the eigenvalues and ``|z| = 1``.

    Args:
        ps: from :func:`pseudospectra`.
        levels: ``log10 eps`` values of the contour lines; default: the integers between the
            minimum and the maximum of ``log10 sigma_min`` on the grid (at most 10 of them).
        ax: a matplotlib ``Axes``; default a new figure's.
        unit_circle: draw ``|z| = 1`` (the stability boundary of the optimizer's iteration).

    Returns:
        The ``Axes``. Needs matplotlib (``pip install kappa-gpu[plot]``); it is imported only
        here. Cost: one contour pass over the grid.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # optional dependency
        raise ImportError(
            "plot_pseudospectra needs matplotlib: pip install kappa-gpu[plot]"
        ) from err

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 5))
    with np.errstate(divide="ignore"):
        L = np.log10(np.maximum(ps.sigma_min, np.finfo(np.float64).tiny))
    if levels is None:
        lo, hi = np.floor(L.min()), np.ceil(L.max())
        levels = np.arange(lo, hi + 1.0)
        if levels.size > 10:
            levels = np.unique(np.round(np.linspace(lo, hi, 10)))
    X, Y = ps.z.real, ps.z.imag
    cs = ax.contour(X, Y, L, levels=np.sort(np.asarray(levels, dtype=np.float64)), cmap="viridis")
    ax.clabel(cs, fmt=lambda v: f"{v:g}", fontsize=7)
    ev = ps.eigenvalues
    ax.plot(ev.real, ev.imag, "k.", markersize=6, label="eigenvalues")
    if unit_circle:
        th = np.linspace(0, 2 * np.pi, 400)
        ax.plot(np.cos(th), np.sin(th), "--", color="0.5", linewidth=0.8, label="|z| = 1")
    ax.set_xlim(X.min(), X.max())
    ax.set_ylim(Y.min(), Y.max())
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("Re z")
    ax.set_ylabel("Im z")
    kind = "rectangular Arnoldi (inner bound)" if ps.rectangular else "square"
    ax.set_title(f"log10 eps-pseudospectra, {kind}")
    ax.legend(loc="best", fontsize=7)
    return ax

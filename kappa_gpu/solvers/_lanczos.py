"""Thick-restart Lanczos for self-adjoint operators (Wu & Simon 2000), on any device.

The Lanczos recurrence builds ``A V_m = V_{m+s} H`` with a symmetric Rayleigh quotient
(tridiagonal, plus an "arrow" row/column coupling the kept Ritz vectors to the first new vector
after a restart). At a restart the Ritz vectors of the ``p`` kept Ritz values are kept
explicitly (thick restart: ``V_m Y_p``, Rayleigh quotient ``diag(theta_p)``, coupling ``B Y_p``),
with ARPACK's ``dsaup2`` kept count ``p = k + min(nconv, (ncv - k) // 2)``. It is Krylov-Schur
specialized to the symmetric case, with the eigen-decomposition of the small symmetric matrix
(``scipy.linalg.eigh`` in float64 on the host) in place of a Schur reordering.

Reorthogonalization:

- ``"full"`` (default): classical Gram-Schmidt against the whole basis with DGKS refinement, as
  ARPACK's ``dsaitr``; two ``(n x j)`` matrix-vector products per step on the device, negligible
  next to a Hessian-vector product. The symmetric part of ``H`` is used (its antisymmetric part
  is ``O(eps ||A||)`` rounding).
- ``"selective"``: the local recurrence (previous two vectors, or the whole kept part on the first
  step after a restart) plus Parlett-Scott selective orthogonalization against the Ritz vectors
  that have converged to ``sqrt(eps)`` (the only directions in which orthogonality is lost). Keeps
  semi-orthogonality, hence eigenvalues accurate to ``O(eps ||A||)``. ``block_size = 1`` only.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np
import torch

from kappa_gpu._autocast import without_autocast
from kappa_gpu._linop import LinearOperator
from kappa_gpu.solvers._basis import KrylovBasis
from kappa_gpu.solvers._common import (
    KEPT_FIRST_NOTE,
    as_operator,
    certified_score,
    check_int,
    continuation,
    continuation_message,
    conv_floor,
    default_maxiter,
    expand_cycle,
    noisy_note,
    not_converged_message,
    resolve_tol,
    ritz_vectors,
    start_block,
    tol_at_rounding_note,
    true_residuals,
)
from kappa_gpu.solvers._dense import sym_ritz
from kappa_gpu.solvers._result import ConvergenceError, EigResult
from kappa_gpu.solvers._which import EIGSH_WHICH, kept_count, order_real

__all__ = ["eigsh"]

_REORTH = ("full", "selective")


@without_autocast
def eigsh(
    A: LinearOperator,
    k: int = 6,
    *,
    which: str = "LA",
    v0: torch.Tensor | np.ndarray | None = None,
    ncv: int | None = None,
    maxiter: int | None = None,
    tol: float | None = None,
    reorth: str = "full",
    block_size: int = 1,
    generator: torch.Generator | None = None,
    strict: bool = False,
    trust_v0: bool = False,
) -> EigResult:
    """``k`` eigenpairs of a self-adjoint operator by thick-restart Lanczos.

    The counterpart of ``scipy.sparse.linalg.eigsh`` (without shift-invert) on torch tensors
    on any device. The operator is assumed symmetric (``A^T = A``); this is not checked (it would
    cost matvecs): only its symmetric part is seen.

    Args:
        A: square self-adjoint :class:`~kappa_gpu.LinearOperator` (float32/float64).
        k: number of wanted eigenvalues, ``0 < k < n`` (``k <= n - block_size`` for blocks).
        which: ``"LA"``/``"SA"`` (largest/smallest algebraic), ``"LM"``/``"SM"`` (largest/smallest
            magnitude; "SM" is interior and slow without inversion), ``"BE"`` (both ends: the
            ``ceil(k/2)`` largest and ``floor(k/2)`` smallest, as ARPACK).
        v0: start vector ``(n,)`` or warm-start block ``(n, p)`` (e.g. the eigenvectors of the
            previous training step), orthonormalized and folded into ``block_size`` columns with
            equal weight. Default: random (from ``generator``).
        ncv: basis size; default ``min(max(2k + block_size, 20, k + 2 block_size), n)`` (SciPy's
            ``min(max(2k + 1, 20), n)`` for ``block_size = 1``); ``k + block_size <= ncv <= n``.
        maxiter: maximum number of restarts; default ``min(max(100, 10 n), 10000)``.
        tol: relative tolerance on the Ritz estimate ``|b^T y_i| <= tol * max(|theta_i|,
            eps**(2/3))`` (ARPACK's test, here after every step; or below the rounding floor
            ``eps max|theta|``); default ``1e-8`` (float64) / ``1e-4`` (float32); ``0`` means
            machine epsilon. The returned pairs are certified by their true residuals; when
            one misses ``tol`` by at most 4x (the products' rounding on top of a Ritz estimate
            just below ``tol``) the run continues with a tightened test for at most two more
            restarts and certifies again (``k`` more matvecs); a larger miss (noisy or
            non-symmetric products) is said in ``status``.
        reorth: ``"full"`` or ``"selective"`` (see the module docstring).
        block_size: ``s > 1``: block Lanczos, ``s`` columns per ``A.matmat`` (one batched HVP).
            With ``s = 1`` copies of a repeated eigenvalue can be missed (the next
            distinct value returned in their place, converged), as :func:`eigs`' docs
            explain; for multiplicities up to ``m`` use ``block_size >= m``.
        generator: ``torch.Generator`` for random start/breakdown vectors.
        strict: raise :class:`ConvergenceError` if not all converged, or if a converged pair's
            true residual misses ``tol`` (``residual_misses``).
        trust_v0: with a ``v0``, the first cycle runs to ``ncv`` vectors before its
            convergence test (as ARPACK), since the eigenvectors of another operator (the
            previous training step's) can still be eigenvectors here while a new wanted
            eigenvalue appeared elsewhere: tested after every step, they passed at ``k + 1``
            matvecs. ``True`` tests from the first step: for a ``v0`` that already spans the
            wanted eigenvectors (Ritz vectors of a run on this operator, to refine; or of a
            nearby one where no new wanted eigenvalue can have appeared), it saves up to
            ``ncv - k - 1`` matvecs (5 instead of 20 for ``k = 3`` after a 1e-3 change).

    Returns:
        :class:`EigResult` with real eigenvectors and complex128 eigenvalues (zero imaginary
        part), sorted by ``which`` (``"BE"``: algebraically decreasing).

    Cost:
        ``n_matvec`` operator applications (plus ``k`` for the certificates, ``2 k`` after a
        continuation), ``O(n ncv)`` device flops per step, memory ``n (ncv + s)`` entries on
        the device.
    """
    t0 = time.perf_counter()
    A = as_operator(A, "eigsh")
    n = A.shape[0]
    s = check_int("block_size", block_size, 1, ">= 1")
    k = check_int("k", k, 1, f"with 0 < k < n (n = {n})")
    if not k <= n - s or (s == 1 and not k < n):
        lim = "0 < k < n" if s == 1 else "0 < k <= n - block_size"
        raise ValueError(
            f"`k` must satisfy {lim} (n = {n}), got k = {k}; for k >= n use a dense solver "
            "(torch.linalg.eigh on A.to_dense())"
        )
    if which not in EIGSH_WHICH:
        hint = " (use eigs for 'LR'/'SR'/'LI')" if which in ("LR", "SR", "LI") else ""
        raise ValueError(
            f"`which` must be one of {', '.join(repr(w) for w in EIGSH_WHICH)} for eigsh, got "
            f"{which!r}{hint}"
        )
    if reorth not in _REORTH:
        raise ValueError(f"`reorth` must be 'full' or 'selective', got {reorth!r}")
    if reorth == "selective" and s > 1:
        raise ValueError("reorth='selective' supports block_size=1 only; use reorth='full'")
    if ncv is None:
        ncv = min(max(2 * k + s, 20, k + 2 * s), n)
    ncv = check_int("ncv", ncv, 1, f"with k < ncv <= n (k = {k}, n = {n})")
    if not (k + s <= ncv <= n):
        lo = "k < ncv" if s == 1 else "k + block_size <= ncv"
        raise ValueError(
            f"`ncv` must satisfy {lo} <= n (k = {k}, n = {n}), got ncv = {ncv}; the default "
            "min(max(2k + 1, 20), n) is a good choice"
        )
    maxiter = default_maxiter(n) if maxiter is None else check_int("maxiter", maxiter, 1, ">= 1")
    tol = resolve_tol(tol, A.dtype)
    X0, _ = start_block(v0, A, s, generator, "eigsh")
    result = _trlan(A, k, which, X0, ncv, maxiter, tol, s, reorth, generator,
                    first_cycle=v0 is None or trust_v0)
    result.seconds = time.perf_counter() - t0
    if strict and (not result.converged_all or result.residual_misses):
        raise ConvergenceError(result.status, result)
    return result


def _trlan(
    A: LinearOperator,
    k: int,
    which: str,
    X0: torch.Tensor,
    ncv: int,
    maxiter: int,
    tol: float,
    s: int,
    reorth: str,
    generator: torch.Generator | None,
    first_cycle: bool = True,
) -> EigResult:
    basis = KrylovBasis(A, ncv, s, generator, "eigsh", reorth=reorth, symmetric=True)
    basis.start(X0)
    floor = conv_floor(A.dtype)
    noise = float(torch.finfo(A.dtype).eps)

    tight = 1.0  # < 1 after a certificate missed: the Ritz-estimate test runs tighter

    def allowed(z: np.ndarray, theta: np.ndarray, scale: float = 1.0) -> np.ndarray:
        # ARPACK's relative test, or the rounding floor of the decomposition
        return np.maximum(scale * tol * np.maximum(np.abs(z), floor),
                          noise * np.abs(theta).max())

    def certifiable(z: np.ndarray, theta: np.ndarray) -> np.ndarray:
        # What a true residual can show: the test's allowance, or the rounding of a product
        # (about sqrt(n) eps ||A||; a Ritz estimate sees only the decomposition's eps ||A||)
        return np.maximum(allowed(z, theta), np.sqrt(A.shape[0]) * noise * np.abs(theta).max())

    def analyze(m: int):
        H = basis.H
        theta, Y = sym_ritz(H[:m, :m])
        order = order_real(theta, which)
        wanted = order[:k]
        est = np.linalg.norm(H[m : m + s, :m] @ Y[:, wanted], axis=0)
        conv = est <= allowed(theta[wanted], theta, tight)
        return theta, Y, order, wanted, est, conv

    limit = maxiter  # lowered by a tightened continuation
    lost = 0.0  # selective: the basis' loss of orthogonality, when it stopped the run
    certified = None  # (X, res, n_cert, images) of the run's last certificate
    first = None  # the outcome at the first certificate, when the run continued past it
    n_cert_all = 0
    while True:
        m, (theta, Y, order, wanted, est, conv) = expand_cycle(
            basis, ncv, s, k, analyze, after_restart=reorth != "selective",
            first_cycle=first_cycle,
        )
        nconv = int(conv.sum())
        if nconv >= k and reorth != "selective" and tight == 1.0:
            # Certify now, while the run can still go on: a pair whose Ritz estimate passed
            # just below tol can miss it by its true residual (the float32 product's own
            # rounding adds to it; about 1.03 tol was seen), most often when the run stopped
            # mid-cycle. Such a run continues once with a test tight enough to leave room for
            # that rounding (k more certificate matvecs), then certifies again; the better of
            # the two certified outcomes is returned.
            perm = _output_order(theta, wanted, which)
            certified = _certify(A, basis, m, Y, wanted[perm], theta)
            n_cert_all += certified[2]
            z_w, res_w = theta[wanted[perm]], certified[1]
            go_on = continuation(res_w, allowed(z_w, theta), basis.n_restarts, limit, maxiter)
            if go_on is not None:
                tight, limit = go_on
                conv = est <= allowed(theta[wanted], theta, tight)
                nconv = int(conv.sum())
                if nconv < k:
                    first = _Outcome(z_w, est[perm], np.ones(k, dtype=bool), certified[0],
                                     res_w, certified[3], _sym_hessenberg(basis.H, m, s),
                                     theta)
                    certified = None
                    if m < ncv:
                        continue  # expand_cycle resumes from m
        if nconv >= k or basis.n_restarts >= limit:
            break
        if reorth == "selective":
            # Semi-orthogonality is what selective reorthogonalization promises; over many
            # restarts (a tol beyond what its vectors reach) it has been seen to decay to O(1),
            # and the Ritz values with it (467 for the top of diag(1..300)). Stop before that.
            Vm = basis.V[: m + 1]
            G = (Vm @ Vm.T).to(torch.float64)
            lost = float((G - torch.eye(m + 1, dtype=torch.float64, device=G.device)).abs().max())
            if lost > noise ** 0.25:
                break
        p = kept_count(k, nconv, m, cap=m - s if s == 1 else max(k, m - 2 * s), symmetric=True)
        if s > 1:  # a block cycle is a low-degree filter: keep half the basis (as SLEPc)
            p = max(p, min(m // 2, m - 2 * s))
        keep = order[:p]
        basis.restart(m, Y[:, keep], np.diag(theta[keep]), np.abs(theta[keep]))
    perm = _output_order(theta, wanted, which)
    wanted = wanted[perm]
    if certified is None:
        certified = _certify(A, basis, m, Y, wanted, theta)
        n_cert_all += certified[2]
    n_cert = n_cert_all
    # ARPACK's test at the user's tol (the run may have ended under a tightened one)
    out = _Outcome(theta[wanted], est[perm], est[perm] <= allowed(theta[wanted], theta),
                   certified[0], certified[1], certified[3], _sym_hessenberg(basis.H, m, s),
                   theta)
    kept_first = first is not None and _score(first, allowed) > _score(out, allowed)
    if kept_first:
        out = first
    z, est, conv, X, res, images, Hs, theta = out
    X = X.contiguous()
    n_over = n_noisy = 0
    if reorth == "selective":
        # Semi-orthogonality (sqrt(eps)) keeps the Ritz values accurate, not the Ritz estimates
        # of the vectors: in float32 they can pass the test while the true residual is several
        # times tol. Certify by the true residuals instead (they are computed anyway).
        over = conv & (res > allowed(z, theta))
        n_over = int(over.sum())
        conv = conv & ~over
    else:
        # A miss that the tightened continuation did not cure, above the products' rounding:
        # the operator's own (not symmetric, or noisy). Said, not hidden; the flags stay
        # ARPACK's test.
        n_noisy = int((conv & (res > certifiable(z, theta))).sum())
    nconv = int(conv.sum())
    if nconv >= k:
        status = (
            f"eigsh: converged: {k} eigenpairs to tol={tol:.1e} in {basis.n_matvec} matvecs, "
            f"{basis.n_restarts} restarts"
        )
    elif lost > noise ** 0.25:
        status = (
            f"eigsh: not converged: {nconv} of {k} wanted eigenpairs reached tol={tol:.1e} "
            f"({basis.n_matvec} matvecs): stopped after {basis.n_restarts} restarts, as "
            f"reorth='selective' lost the basis' orthogonality (max |V^T V - I| = {lost:.1e}), "
            "which makes further Ritz values meaningless; use reorth='full' (or a looser tol)"
        )
    elif limit < maxiter and basis.n_restarts >= limit:
        status = continuation_message("eigsh", nconv, k, basis.n_matvec, tol)
    else:
        status = not_converged_message(
            "eigsh", nconv, k, basis.n_restarts, basis.n_matvec, maxiter, ncv, tol
        )
    if kept_first:
        status += KEPT_FIRST_NOTE
    if basis.n_breakdowns:
        status += f"; {basis.n_breakdowns} invariant subspace(s) found (random restart)"
    Hm = basis.H[:m, :m]
    asym = float(np.linalg.norm(Hm - Hm.T)) / max(float(np.linalg.norm(Hm)), 1e-300)
    # where a certificate missed, a smaller asymmetry is named too (above the rounding of
    # symmetric products: 100 sqrt(eps), 1.5e-6 in float64; a review case had 1e-3)
    hint = _ASYM_HINT if not n_noisy else min(_ASYM_HINT, 100 * math.sqrt(noise))
    if reorth != "selective" and asym > hint:
        # A symmetric operator's projections agree to rounding; eigsh sees only the symmetric
        # part, so a non-symmetric operator converges slowly or not at all, to wrong values.
        status += (
            f"; the operator does not look symmetric (||H - H^T|| / ||H|| = {asym:.2g} for its "
            "projection on the Krylov basis): eigsh sees only its symmetric part; use eigs"
        )
    if n_over:
        status += (
            f"; {n_over} pair(s) passed the Ritz-estimate test but their true residuals exceed "
            "tol: reorth='selective' keeps the basis only semi-orthogonal (about sqrt(eps)), "
            "which limits the Ritz vectors' accuracy; use reorth='full' or a looser tol"
        )
    if n_noisy and tol <= 100 * noise:
        status += tol_at_rounding_note(n_noisy, tol, A.dtype, A.shape[0])
    elif n_noisy:
        status += noisy_note(n_noisy, "are not symmetric or carry errors of that size")
    return EigResult(
        eigenvalues=torch.as_tensor(z.astype(np.complex128)),
        eigenvectors=X,
        left_eigenvectors=None,
        residuals=torch.as_tensor(res, dtype=torch.float64),
        ritz_estimates=torch.as_tensor(est, dtype=torch.float64),
        converged=torch.as_tensor(conv, dtype=torch.bool),
        n_matvec=basis.n_matvec,
        n_restarts=basis.n_restarts,
        seconds=0.0,
        status=status,
        hessenberg=Hs,
        which=which,
        sigma=None,
        tol=tol,
        n_matvec_certify=n_cert,
        images=images[0] if images else None,
        residual_misses=n_noisy,
    )


#: ``||H - H^T|| / ||H||`` above which eigsh says the operator does not look symmetric: a
#: symmetric one stays below ~1e-3 even with bfloat16 products under float32 vectors (3.7e-4
#: seen), a non-symmetric one is O(1)
_ASYM_HINT = 1e-2


class _Outcome(NamedTuple):
    """What eigsh returns, in output order (``theta``: all Ritz values, for the noise floor of
    the convergence and certificate tests)."""

    z: np.ndarray
    est: np.ndarray
    conv: np.ndarray
    X: torch.Tensor
    res: np.ndarray
    images: list
    hessenberg: np.ndarray
    theta: np.ndarray


def _score(o: _Outcome, allowed) -> tuple[int, float]:
    """:func:`certified_score` of an outcome at the user's tol."""
    return certified_score(o.conv, o.res, allowed(o.z, o.theta))


def _sym_hessenberg(H: np.ndarray, m: int, s: int) -> np.ndarray:
    """The ``(m + s) x m`` decomposition matrix with its square part symmetrized (a copy)."""
    Hs = H[: m + s, :m].copy()
    Hs[:m] = 0.5 * (Hs[:m] + Hs[:m].T)
    return Hs


def _output_order(theta: np.ndarray, wanted: np.ndarray, which: str) -> np.ndarray:
    """The output order of the wanted values: as ``which`` orders them, ``"BE"`` algebraically
    decreasing."""
    if which == "BE":
        return np.argsort(-theta[wanted], kind="stable")
    return np.arange(len(wanted))


def _certify(A: LinearOperator, basis, m: int, Y: np.ndarray, wanted: np.ndarray,
             theta: np.ndarray) -> tuple[torch.Tensor, np.ndarray, int, list]:
    """Ritz vectors of the wanted values and their true residuals: ``(X, res, matvecs, [A X])``.

    Operators that take strided blocks (the Hessian operators: a row-wise HVP engine) get the
    Ritz vectors as an ``(n, k)`` view of their rows, with no transposing copies in and out; the
    result gets a contiguous copy later. Other operators get the contiguous block.
    """
    X = ritz_vectors(basis.columns(m), Y[:, wanted], complex_out=False,
                     contiguous=not A._strided_ok)
    images: list = []
    res, n_cert = true_residuals(A, X, theta[wanted].astype(np.complex128), None, images)
    return X, res, n_cert, images

"""Krylov-Schur eigen-solver for general real operators (Stewart 2001), on any device.

Algorithm (real arithmetic throughout, complex numbers only in the returned eigenvectors):

1. Expand a Krylov decomposition ``A V_m = V_{m+s} H`` to ``m = ncv`` columns: (block) Arnoldi
   with classical Gram-Schmidt and DGKS reorthogonalization; a breakdown (invariant subspace)
   continues with a fresh random vector orthogonal to the basis.
2. Real Schur form ``S = Z T Z^T`` of the Rayleigh quotient ``S = H[:m]`` in float64 on the host;
   Ritz values from its 1x1/2x2 blocks; Ritz estimates ``||B Z y_i||`` (``B`` = residual rows).
3. Convergence: a wanted pair is converged when its Ritz estimate is
   ``<= tol * max(|z_i|, eps**(2/3))`` (ARPACK's ``dnconv`` test, relative to ``|z_i|``), or at
   the rounding floor ``eps ||H||_F`` of the decomposition itself (reached only for ``tol`` near
   machine epsilon; below it an estimate is noise, and ARPACK's deflation zeroes it). The test
   runs after every step (ARPACK's only at the end of a cycle), so a restarted run stops as soon
   as its last wanted value converges; a run from a given ``v0`` tests its first cycle at its
   end only, unless ``trust_v0`` says the start already spans the wanted vectors.
4. Restart: reorder ``T`` (LAPACK ``dtrsen``) so that the ``p`` kept Ritz values come first,
   ``p = nev + min(nconv, (ncv - nev) // 2)`` as ARPACK (never splitting a 2x2 block), and keep
   ``V_m Z[:, :p]``. In exact arithmetic this is implicitly restarted Arnoldi with exact shifts,
   so the matvec counts match ARPACK's; the Schur form makes the purge of unwanted Ritz values
   stable and lets conjugate pairs stay together.

Converged pairs are *retained*, not hard-locked: they stay in the kept leading block, where
restarts only rotate them within that block (ARPACK's ``nev + nconv`` adjustment). Their coupling
to the new vectors is set to zero only once it is at the rounding level (``<= eps |z|``, ARPACK's
``dnapps`` deflation rule), never at ``tol``: zeroing a coupling of size ``tol |z|`` would perturb
an eigenvalue of condition number ``kappa`` by ``kappa tol |z|``, and the operators of interest
have ``kappa`` up to 10^6; retention keeps refining them at no matvec cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

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
    check_sigma,
    continuation,
    continuation_message,
    conv_floor,
    default_maxiter,
    expand_cycle,
    noisy_note,
    not_converged_message,
    residual_miss_note,
    resolve_tol,
    ritz_vectors,
    start_block,
    tol_at_rounding_note,
    true_residuals,
)
from kappa_gpu.solvers._dense import SchurRitz, reorder_schur, schur_ritz
from kappa_gpu.solvers._result import ConvergenceError, EigResult
from kappa_gpu.solvers._which import EIGS_WHICH, kept_count, order_complex

__all__ = ["eigs"]


@dataclass
class _Run:
    """What one Krylov-Schur run leaves behind (host-side, plus the basis on the device)."""

    theta: np.ndarray  # (k',) complex128, wanted Ritz values, most wanted first
    coeffs: np.ndarray  # (m, k') complex128 unit Ritz vectors of H[:m] (eigenvectors S s = z s)
    partner: np.ndarray  # (k',) index of the conjugate partner in the output, -1 if real
    estimates: np.ndarray  # (k',) Ritz estimates
    converged: np.ndarray  # (k',) bool
    basis: KrylovBasis
    m: int
    hessenberg: np.ndarray
    nconv: int
    X: torch.Tensor | None  # (n, k') complex Ritz vectors
    residuals: np.ndarray | None  # (k',) their true residuals
    n_certify: int  # matvecs the certificates took
    allowed: np.ndarray  # (k',) what a true residual may be (the user's tol, or rounding)
    kept_first: bool = False  # the first certificate's pairs (a continuation did not improve)
    stopped_by_continuation: bool = False  # ended by the continuation's restart limit


def _ks_run(
    A: LinearOperator,
    k: int,
    which: str,
    sigma: float | None,
    X0: torch.Tensor,
    ncv: int,
    maxiter: int,
    tol: float,
    s: int,
    generator: torch.Generator | None,
    name: str,
    certified_run: bool = True,
    first_cycle: bool = True,
) -> _Run:
    """One Krylov-Schur run; with ``certified_run`` it also certifies its Ritz vectors by their
    true residuals (``X``, ``residuals``, ``n_certify``; ``None``/``0`` without)."""
    basis = KrylovBasis(A, ncv, s, generator, name)
    basis.start(X0)
    floor = conv_floor(A.dtype)
    noise = float(torch.finfo(A.dtype).eps)

    tight = 1.0  # < 1 after a certificate missed: the Ritz-estimate test runs tighter

    def allowed(z: np.ndarray, Hm: np.ndarray, scale: float = 1.0) -> np.ndarray:
        return np.maximum(scale * tol * np.maximum(np.abs(z), floor), noise * np.linalg.norm(Hm))

    def certifiable(z: np.ndarray, Hm: np.ndarray) -> np.ndarray:
        # what a true residual can show: the allowance, or a product's rounding (eigsh's)
        return np.maximum(allowed(z, Hm), np.sqrt(A.shape[0]) * noise * np.linalg.norm(Hm))

    def analyze(m: int):
        H = basis.H
        sr = schur_ritz(H[:m, :m])
        order = order_complex(sr.theta, which, sigma)
        wanted = sr.closure(order[:k])  # k, or k + 1 when a pair straddles the k-th position
        S = sr.eigvecs(wanted)
        est = np.linalg.norm(H[m : m + s, :m] @ S, axis=0)
        conv = est <= allowed(sr.theta[wanted], H[:m, :m], tight)
        return sr, order, wanted, S, est, conv

    def quick(m: int) -> bool:  # necessary for analyze(m)'s test; cheaper (no Schur form)
        Hm = basis.H[:m, :m]
        z, Q = np.linalg.eig(Hm)
        top = order_complex(z, which, sigma)[:k]
        e = np.linalg.norm(basis.H[m : m + s, :m] @ Q[:, top], axis=0)
        return bool(np.all(e <= allowed(z[top], Hm, tight)))

    def certify(m: int, sr, wanted, S):
        X = ritz_vectors(basis.columns(m), S, complex_out=True)
        res, n = true_residuals(A, X, sr.theta[wanted], _partners(sr, wanted))
        return X, res, n

    def outcome(m: int, sr, wanted, S, est, conv, certified) -> _Run:
        H = basis.H
        return _Run(
            theta=sr.theta[wanted], coeffs=S, partner=_partners(sr, wanted), estimates=est,
            converged=conv,
            basis=basis, m=m, hessenberg=H[: m + s, :m].copy(), nconv=int(conv.sum()),
            X=certified[0], residuals=certified[1], n_certify=0,
            allowed=certifiable(sr.theta[wanted], H[:m, :m]),
        )

    limit = maxiter  # lowered by a tightened continuation
    certified = None
    first: _Run | None = None  # the outcome at the first certificate, if the run went on
    n_cert = 0
    while True:
        m, (sr, order, wanted, S, est, conv) = expand_cycle(
            basis, ncv, s, k, analyze, quick,
            # the left run is certified by the caller, against the right eigenvalues, and
            # without a continuation: it keeps the end-of-cycle test (more refined vectors)
            after_restart=certified_run, first_cycle=first_cycle,
        )
        nev, nconv = len(wanted), int(conv.sum())
        if nconv >= nev and tight == 1.0 and certified_run:
            # Certify while the run can still go on (as eigsh): a pair whose Ritz estimate
            # passed just below tol can miss it by its true residual; such a run continues
            # once with a test that leaves room for the products' rounding, and the better
            # of the two certified outcomes is returned.
            certified = certify(m, sr, wanted, S)
            n_cert += certified[2]
            z_w, res_w = sr.theta[wanted], certified[1]
            go_on = continuation(res_w, allowed(z_w, basis.H[:m, :m]), basis.n_restarts, limit,
                                 maxiter)
            if go_on is not None:
                first = outcome(m, sr, wanted, S, est, conv, certified)
                tight, limit = go_on
                conv = est <= allowed(z_w, basis.H[:m, :m], tight)
                nconv = int(conv.sum())
                if nconv < nev:
                    certified = None
                    if m < ncv:
                        continue  # expand_cycle resumes from m
                else:
                    first = None  # converged under the tightened test as it is
        if nconv >= nev or basis.n_restarts >= limit:
            break
        # Kept count as ARPACK (dnaup2); cap leaves room for one block, closure may add one.
        p = kept_count(nev, nconv, m, cap=m - 2 if s == 1 else max(nev, m - 2 * s), symmetric=False)
        if s > 1:  # a block cycle is a low-degree filter: keep half the basis (as SLEPc)
            p = max(p, min(m // 2, m - 2 * s))
        keep = sr.closure(order[: max(p, 1)])
        if len(keep) > m - s:  # closure crossed the cap of a block run: drop the pair instead
            keep = sr.closure(order[: max(p - 1, 1)])
        T, Z, p = reorder_schur(sr, keep)
        kept = SchurRitz(T[:p, :p], np.eye(p))
        basis.restart(m, Z[:, :p], T[:p, :p], np.abs(kept.theta), kept.partner)
    if certified is None:
        certified = certify(m, sr, wanted, S) if certified_run else (None, None, 0)
        n_cert += certified[2]
    if tight != 1.0:  # the flags at the user's tol
        conv = est <= allowed(sr.theta[wanted], basis.H[:m, :m])
    run = outcome(m, sr, wanted, S, est, conv, certified)
    run.kept_first = first is not None and _score(first) > _score(run)
    if run.kept_first:
        first.kept_first = True
        run = first
    run.n_certify = n_cert
    run.stopped_by_continuation = limit < maxiter and basis.n_restarts >= limit
    return run


def _score(run: _Run) -> tuple[int, float]:
    """:func:`certified_score` of a run against what its true residuals may be."""
    return certified_score(run.converged, run.residuals, run.allowed)


def _partners(sr: SchurRitz, wanted: np.ndarray) -> np.ndarray:
    """For each wanted value (output order: most wanted first, conjugate partners adjacent),
    the position of its conjugate partner among them, -1 for a real value."""
    pos = list(wanted)
    return np.array([pos.index(sr.partner[q]) if sr.partner[q] >= 0 else -1 for q in pos])


def _condition_in_projection(hessenberg: np.ndarray, z: np.ndarray) -> float:
    """The largest eigenvalue condition number ``1 / |y^H x|`` (unit ``x``, ``y``) in the final
    projection ``H_m`` among the eigenvalues nearest to ``z``: about ``1 / sqrt(eps)`` and more
    for a defective one."""
    import scipy.linalg

    from kappa_gpu.diagnostics._conditioning import eigenvalue_condition_numbers

    m = hessenberg.shape[1]
    w, vl, vr = scipy.linalg.eig(hessenberg[:m, :m], left=True, right=True)
    c = eigenvalue_condition_numbers(vr, vl).numpy()
    idx = [int(np.argmin(np.abs(w - zi))) for zi in np.atleast_1d(z)]
    return float(np.max(c[idx])) if idx else 1.0


def _has_adjoint(A: LinearOperator) -> bool:
    """Whether ``A`` defines ``rmatvec`` (checked at the door, before any matvec is spent)."""
    if type(A)._rmatvec is LinearOperator._rmatvec:
        return False
    return getattr(A, "_rmv", True) is not None  # aslinearoperator(callable) without rmatvec


def _match_left(z: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each right eigenvalue ``z_i`` the index of the adjoint eigenvalue ``w_j ~ conj(z_i)``."""
    from scipy.optimize import linear_sum_assignment

    cost = np.abs(np.conj(z)[:, None] - w[None, :])
    rows, cols = linear_sum_assignment(cost)
    # Unassigned rows (fewer adjoint values than right ones): nearest, flagged by an inf distance.
    idx = np.argmin(cost, axis=1)
    dist = np.full(len(z), np.inf)
    idx[rows] = cols
    dist[rows] = cost[rows, cols]
    return idx, dist


@without_autocast
def eigs(
    A: LinearOperator,
    k: int = 6,
    *,
    which: str = "LM",
    sigma: float | None = None,
    v0: torch.Tensor | np.ndarray | None = None,
    ncv: int | None = None,
    maxiter: int | None = None,
    tol: float | None = None,
    left: bool = False,
    block_size: int = 1,
    generator: torch.Generator | None = None,
    strict: bool = False,
    trust_v0: bool = False,
) -> EigResult:
    """``k`` eigenpairs of a real square operator by the Krylov-Schur method.

    The SciPy-shaped counterpart of ``scipy.sparse.linalg.eigs`` (without shift-invert), on
    torch tensors on any device: the basis, orthogonalization and matvecs stay on ``A.device``;
    only ``ncv x ncv`` matrices go to the host in float64.

    Args:
        A: square :class:`~kappa_gpu.LinearOperator` (float32/float64; a tensor is wrapped).
        k: number of wanted eigenvalues, ``0 < k < n - block_size``. A conjugate pair is never
            split: if the ``k``-th wanted value is one half of a pair, ``k + 1`` are returned.
        which: ``"LM"`` (largest ``|z - sigma|``), ``"SM"`` (smallest ``|z - sigma|``; interior,
            slow without inversion), ``"LR"``/``"SR"`` (largest/smallest real part), ``"LI"``
            (largest ``|Im z|``, ARPACK's meaning; finds the complex pairs), or a callable
            ``key(z: complex ndarray) -> real ndarray`` (larger = more wanted; SLEPc's
            user-defined target), e.g. the curvature a Ritz value stands for.
        sigma: real target shift for ``"LM"``/``"SM"``: the ordering is by ``|z - sigma|``. No
            inversion is done (the Krylov space does not depend on ``sigma``).
        v0: start vector ``(n,)`` or warm-start block ``(n, p)`` (e.g. the eigenvectors of an
            earlier call; complex columns contribute their real and imaginary parts). The block
            is orthonormalized and folded into ``block_size`` start columns with equal weight.
            Default: random (from ``generator``).
        ncv: basis size; default ``min(max(2k + block_size, 20, k + 1 + 2 block_size), n)``, which
            is CuPy's/SciPy's ``min(max(2k + 1, 20), n)`` for ``block_size = 1``. Must satisfy
            ``k + block_size < ncv <= n``.
        maxiter: maximum number of restarts; default ``min(max(100, 10 n), 10000)`` (ARPACK's
            ``10 n``, capped).
        tol: relative tolerance: converged when the Ritz estimate is
            ``<= tol * max(|z|, eps**(2/3))`` (ARPACK's test, here after every step; or below
            the rounding floor ``eps ||H||_F``). Default ``1e-8`` (float64) / ``1e-4``
            (float32); ``0`` means machine epsilon (as SciPy). The returned pairs are
            certified by their true residuals; when one misses ``tol`` by at most 4x the run
            continues with a tightened test for at most two more restarts and certifies again;
            a larger miss (noisy products) is said in ``status``.
        left: also compute left eigenvectors ``y^H A = z y^H``, by a second Krylov-Schur run on
            the adjoint (``A.rmatvec``), matched to the right eigenvalues (``z`` with the adjoint's
            ``conj(z)``). Costs about as many adjoint applications as the right run.
        block_size: ``s > 1`` runs block Krylov-Schur: ``s`` columns per ``A.matmat`` call.
            Repeated eigenvalues: a single start vector meets each eigenspace along one
            direction, so further copies of a repeated eigenvalue enter the basis only
            through rounding and can be missed: the next distinct value is returned in
            their place, flagged converged (ARPACK can miss them too; its end-of-cycle
            test leaves rounding more steps to bring them in). With multiplicities up to
            ``m``, use ``block_size >= m``.
        generator: ``torch.Generator`` for the random start and breakdown vectors.
        strict: raise :class:`ConvergenceError` (carrying ``.result``) instead of returning a
            partially converged result, or one whose converged pair's true residual misses
            ``tol`` (``residual_misses``).
        trust_v0: with a ``v0``, the first cycle runs to ``ncv`` vectors before its
            convergence test (as ARPACK), since the eigenvectors of another operator (the
            previous training step's) can still be eigenvectors here while a new wanted
            eigenvalue appeared elsewhere: tested after every step, they passed at ``k + 1``
            matvecs. ``True`` tests from the first step: for a ``v0`` that already spans the
            wanted eigenvectors (Ritz vectors of a run on this operator, to refine; or of a
            nearby one where no new wanted eigenvalue can have appeared), it saves up to
            ``ncv - k - 1`` matvecs (5 instead of 20 for ``k = 3`` after a 1e-3 change).

    Returns:
        :class:`EigResult` (``n_matvec`` excludes the certification matvecs, which are counted in
        ``n_matvec_certify``).

    Cost:
        ``n_matvec`` operator applications, ``O(n ncv)`` device flops per matvec for the
        Gram-Schmidt, ``O(n ncv p)`` per restart, ``O(ncv^3)`` host flops per restart; memory
        ``n (ncv + s)`` entries on the device.

    Example:
        >>> import torch, kappa_gpu as kg
        >>> from kappa_gpu.solvers import eigs
        >>> A = kg.aslinearoperator(torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64)))
        >>> r = eigs(A, k=3, generator=torch.Generator().manual_seed(0))
        >>> r.eigenvalues.real.round(decimals=6)
        tensor([50., 49., 48.], dtype=torch.float64)
        >>> r.converged_all, r.residuals.max() < 1e-6
        (True, tensor(True))
    """
    t0 = time.perf_counter()
    A = as_operator(A, "eigs")
    n = A.shape[0]
    s = check_int("block_size", block_size, 1, ">= 1")
    k = check_int("k", k, 1, f"with 0 < k < n - {s} (n = {n})")
    if not k < n - s:
        bs = "" if s == 1 else f", block_size = {s}"
        lim = "n - 1" if s == 1 else "n - block_size"
        raise ValueError(
            f"`k` must satisfy 0 < k < {lim} (n = {n}{bs}), got k = {k}; for k >= n - 1 use a "
            "dense solver (torch.linalg.eig on A.to_dense())"
        )
    if not callable(which) and which not in EIGS_WHICH:
        hint = " (use eigsh for symmetric operators)" if which in ("LA", "SA", "BE") else ""
        raise ValueError(
            f"`which` must be one of {', '.join(repr(w) for w in EIGS_WHICH)} for eigs, got "
            f"{which!r}{hint}"
        )
    sigma = check_sigma(sigma)
    if ncv is None:
        ncv = min(max(2 * k + s, 20, k + 1 + 2 * s), n)
    ncv = check_int("ncv", ncv, 1, f"with k + {s} < ncv <= n (k = {k}, n = {n})")
    if not (k + s < ncv <= n):
        raise ValueError(
            f"`ncv` must satisfy k + {'block_size' if s > 1 else '1'} < ncv <= n (k = {k}, "
            f"n = {n}), got ncv = {ncv}; the default min(max(2k + 1, 20), n) is a good choice"
        )
    maxiter = default_maxiter(n) if maxiter is None else check_int("maxiter", maxiter, 1, ">= 1")
    tol = resolve_tol(tol, A.dtype)
    if left and not _has_adjoint(A):
        raise NotImplementedError(
            "eigs(left=True) needs the adjoint of the operator (rmatvec); build the operator "
            "with one (aslinearoperator(..., rmatvec=...)) or call with left=False"
        )
    X0, _ = start_block(v0, A, s, generator, "eigs")

    first_cycle = v0 is None or trust_v0
    run = _ks_run(A, k, which, sigma, X0, ncv, maxiter, tol, s, generator, "eigs",
                  first_cycle=first_cycle)
    X, res, n_cert = run.X, run.residuals, run.n_certify
    # A miss above the products' rounding that survived the run's tightened continuation is
    # the operator's own (noisy products): said in the status; the flags stay ARPACK's test.
    over = run.converged & (res > run.allowed)
    converged = run.converged.copy()
    nwant = len(run.theta)
    if int(converged.sum()) >= nwant:
        status = (
            f"eigs: converged: {nwant} eigenpairs to tol={tol:.1e} in {run.basis.n_matvec} "
            f"matvecs, {run.basis.n_restarts} restarts"
        )
    elif run.stopped_by_continuation:
        status = continuation_message("eigs", int(converged.sum()), nwant, run.basis.n_matvec,
                                      tol)
    else:
        status = not_converged_message(
            "eigs", int(converged.sum()), nwant, run.basis.n_restarts, run.basis.n_matvec,
            maxiter, ncv, tol,
        )
    if run.kept_first:
        status += KEPT_FIRST_NOTE
    if run.basis.n_breakdowns:
        status += f"; {run.basis.n_breakdowns} invariant subspace(s) found (random restart)"
    if over.any():
        cond = _condition_in_projection(run.hessenberg, run.theta[over])
        eps_a = float(torch.finfo(A.dtype).eps)
        if tol <= 100 * eps_a:
            status += tol_at_rounding_note(int(over.sum()), tol, A.dtype, A.shape[0])
        elif cond >= 0.1 / math.sqrt(eps_a):
            # Not noise: a (nearly) defective eigenvalue, whose computed eigenvectors are
            # parallel to about sqrt(eps) and whose residuals stall near sqrt(eps) |z|.
            status += residual_miss_note(
                int(over.sum()),
                f"their eigenvalues are (nearly) defective (condition number {cond:.1e} in the "
                "Krylov projection: an exceptional point or a Jordan block, eigenvectors "
                "parallel to rounding), where no eigenvector has a small residual; not a matter "
                "of ncv or maxiter",
            )
        else:
            status += noisy_note(int(over.sum()), "carry errors of that size")

    Y, left_res, n_rmv = None, None, 0
    if left:
        try:
            At = A.T
            v0_left = None if v0 is None else v0
            X0l, _ = start_block(v0_left, At, s, generator, "eigs(left=True)")
            runl = _ks_run(
                At, nwant, which, sigma, X0l, ncv, maxiter, tol, s, generator, "eigs(left=True)",
                certified_run=False,  # certified below, against the right run's eigenvalues
                first_cycle=first_cycle,
            )
        except NotImplementedError as e:
            raise NotImplementedError(
                f"eigs(left=True) needs the adjoint of the operator (rmatvec): {e}"
            ) from e
        n_rmv = runl.basis.n_matvec
        idx, dist = _match_left(run.theta, runl.theta)
        # The adjoint eigenvector for conj(z_i) is the left eigenvector for z_i: A^T y = conj(z) y.
        Yall = ritz_vectors(runl.basis.columns(runl.m), runl.coeffs[:, idx], complex_out=True)
        Y = Yall
        scale = np.maximum(np.abs(run.theta), conv_floor(A.dtype))
        ok = (dist <= np.sqrt(max(tol, float(torch.finfo(A.dtype).eps))) * scale) & (
            runl.converged[idx]
        )
        left_res, n_c2 = true_residuals(At, Y, np.conj(run.theta), run.partner)
        n_cert += n_c2
        if not ok.all():
            bad = ", ".join(f"{complex(z):.6g}" for z in run.theta[~ok])
            # The adjoint's rounding floor: eps ||A|| (||A|| >= ||H||) above tol |z| is not
            # cured by more steps (e.g. a badly scaled operator whose left eigenvectors are
            # dominated by its huge entries).
            norm_h = float(np.linalg.norm(runl.hessenberg, 2)) if runl.hessenberg is not None \
                and runl.hessenberg.size else 0.0
            eps_a = float(torch.finfo(A.dtype).eps)
            floor = eps_a * norm_h
            need = tol * float(np.min(scale[~ok]))
            # only a floor when the adjoint run itself converged: else more steps may cure it
            adjoint_done = runl.nconv >= len(runl.theta)
            far = dist[~ok]
            if not adjoint_done:
                fix = "raise ncv or maxiter"
            elif floor > need:
                fix = (f"the adjoint's products carry rounding eps ||A|| >= {floor:.1e} (||A|| "
                       f">= {norm_h:.1e}, from its Krylov projection), above tol |z| = "
                       f"{need:.1e}: not a matter of ncv or maxiter; loosen tol or rescale the "
                       "operator")
            else:
                # Converged, yet its eigenvalues miss these by more than sqrt(tol) |z|: either
                # ill-conditioned eigenvalues (each run exact for its own rounding) or another
                # choice within a cluster.
                fix = (f"the adjoint run converged, but its nearest eigenvalues are up to "
                       f"{float(np.max(far)):.1e} from these: ill-conditioned eigenvalues (then "
                       "loosen tol or use float64) or another pick within a cluster (then "
                       "raise ncv)")
            status += (
                f"; left eigenvectors not found/converged for {bad} (the adjoint run converged "
                f"to {runl.nconv} of {len(runl.theta)}); {fix}"
            )
        converged &= ok

    result = EigResult(
        eigenvalues=torch.as_tensor(run.theta, dtype=torch.complex128),
        eigenvectors=X,
        left_eigenvectors=Y,
        residuals=torch.as_tensor(res, dtype=torch.float64),
        ritz_estimates=torch.as_tensor(run.estimates, dtype=torch.float64),
        converged=torch.as_tensor(converged, dtype=torch.bool),
        n_matvec=run.basis.n_matvec,
        n_restarts=run.basis.n_restarts,
        seconds=time.perf_counter() - t0,
        status=status,
        hessenberg=run.hessenberg,
        which=which if isinstance(which, str) else getattr(which, "__name__", "callable"),
        sigma=sigma,
        tol=tol,
        n_rmatvec=n_rmv,
        n_matvec_certify=n_cert,
        left_residuals=None if left_res is None else torch.as_tensor(left_res),
        residual_misses=int(over.sum()),
    )
    if strict and (not result.converged_all or result.residual_misses):
        raise ConvergenceError(status, result)
    return result

"""Transient growth of a small dense operator: ``||T^t||``, the ``kappa(V) rho^t`` bound, Kreiss.

``T`` is the projection ``Q^H J Q`` of the optimizer Jacobian onto a computed (approximately)
invariant subspace, ``k x k`` with ``k`` up to a few hundred. Everything here is dense float64 /
complex128 numpy: ``T`` is small, and near exceptional points its eigenvectors are nearly
parallel (``kappa(V)`` of 1e6 and more), where float32 would have no correct digit left in
``V^-1`` and the powers ``T^t`` would be dominated by rounding.

References: Trefethen & Embree, "Spectra and Pseudospectra" (2005), chapters 14-16 (transient
growth, the Kreiss matrix theorem ``K(T) <= sup_t ||T^t|| <= e k K(T)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kappa_gpu.diagnostics._conditioning import kappa_V

__all__ = [
    "KreissBound",
    "TransientGrowth",
    "kreiss_lower_bound",
    "orthonormal_basis",
    "projected_operator",
    "transient_growth",
]

#: Default horizon cap: at most this many powers are evaluated.
HORIZON_CAP = 10_000
#: Powers are formed and their norms taken (one batched SVD) this many at a time.
_POWER_BATCH = 64
#: The default horizon ends where the bound ``kappa_V rho^t`` (or the curve) falls below this.
DECAY_TOL = 1e-3
#: Default horizon when ``rho >= 1`` (the powers grow without bound).
UNSTABLE_HORIZON = 1_000
#: Stop evaluating powers once ``||T^t||`` exceeds this (avoids overflow when ``rho > 1``).
_OVERFLOW = 1e150
#: Batched SVDs process this many ``k x k`` matrices at a time (bounds the memory).
_SVD_BATCH_BYTES = 64 * 2**20


def _to_numpy_matrix(T, name: str = "T") -> np.ndarray:
    from kappa_gpu._linop import LinearOperator

    if isinstance(T, LinearOperator):
        raise TypeError(
            f"{name} must be a small dense matrix, got a {T.shape[0]}x{T.shape[1]} "
            "LinearOperator: pass T.to_dense() for a small operator, or use kg.estimate(...) "
            "for a model's update (its report carries the transient growth on the computed "
            "modes)"
        )
    if isinstance(T, torch.Tensor):
        T = T.detach().cpu().numpy()
    A = np.asarray(T)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    return A.astype(np.complex128 if np.iscomplexobj(A) else np.float64, copy=False)


def _sigma_min_shifted(M: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """``sigma_min(z I~ - M)`` for every ``z`` in ``zs``; ``M`` is ``(p, q)`` with ``p >= q``.

    ``I~`` is the ``p x q`` identity (``[I_q; 0]`` for the rectangular Arnoldi matrix). The
    shifted matrices are built and passed to LAPACK's batched SVD in chunks of about 64 MiB.
    Cost: one ``p x q`` SVD per point, ``O(p q^2)`` (0.03 ms at 20 x 20, 1.3 ms at 100 x 100).
    """
    zs = np.asarray(zs, dtype=np.complex128).reshape(-1)
    p, q = M.shape
    diag = np.arange(q)
    out = np.empty(zs.size, dtype=np.float64)
    per = max(1, _SVD_BATCH_BYTES // max(1, 16 * p * q))
    neg = -M.astype(np.complex128)
    for i in range(0, zs.size, per):
        zc = zs[i : i + per]
        mats = np.broadcast_to(neg, (zc.size, p, q)).copy()
        mats[:, diag, diag] += zc[:, None]
        out[i : i + per] = np.linalg.svd(mats, compute_uv=False)[..., -1]
    return out


# --------------------------------------------------------------------------------------------
# transient growth


@dataclass
class TransientGrowth:
    """The curve ``||T^t||_2`` and its summary.

    Attributes:
        curve: ``||T^t||_2`` for ``t = 0, 1, ..., len(curve) - 1`` (float64; ``curve[0] = 1``).
            Shorter than ``horizon + 1`` when evaluation stopped early (decay or overflow).
        t: ``arange(len(curve))``, for plotting.
        max_growth: ``max(curve)``; the supremum over all ``t >= 0`` when ``certified``.
        argmax_t: the ``t`` attaining it.
        bound: ``kappa_v * rho^t`` for the same ``t`` (``inf`` where ``kappa_v`` is infinite):
            an upper bound of ``curve`` when ``kappa_v`` is the condition number of an
            eigenvector matrix of ``T``.
        kappa_v: the eigenvector condition number used in ``bound``.
        rho: the spectral radius of ``T``.
        horizon: the last ``t`` requested.
        bounded: ``rho < 1``: the powers decay and ``sup_t ||T^t||`` is finite. ``False`` means
            the growth is unbounded (``rho > 1``) or not decaying (``rho = 1``).
        certified: some ``||T^t|| < 1`` (``t >= 1``) was reached, which proves
            ``max_growth == sup_{t >= 0} ||T^t||``: any later power is ``T^(q t + r)`` with
            ``0 <= r < t`` and norm at most ``||T^t||^q ||T^r|| < max_{r < t} ||T^r||``.
    """

    curve: np.ndarray
    t: np.ndarray
    max_growth: float
    argmax_t: int
    bound: np.ndarray
    kappa_v: float
    rho: float
    horizon: int
    bounded: bool
    certified: bool


def _default_horizon(kappa_v: float, rho: float, cap: int, k: int) -> int:
    if rho >= 1.0:
        return min(cap, UNSTABLE_HORIZON)
    if rho == 0.0:  # nilpotent: T^k = 0
        return min(cap, k)
    if not math.isfinite(kappa_v):
        return cap
    if kappa_v <= DECAY_TOL:
        return 1
    t = math.ceil(math.log(DECAY_TOL / kappa_v) / math.log(rho))
    return int(min(cap, max(1, t)))


def _eigen_condition(A: np.ndarray) -> tuple[float, float]:
    """``(kappa(V), rho)`` from numpy's eigendecomposition (unit-norm columns of V); kappa is
    ``inf`` for a numerically defective ``A`` (the rank test of :func:`kappa_V`: a Jordan block's
    computed eigenvectors are parallel to rounding, and ``sigma_max / sigma_min`` of them is a
    meaningless 1e16 to 1e63)."""
    z, V = np.linalg.eig(A)
    rho = float(np.max(np.abs(z))) if z.size else 0.0
    return kappa_V(V), rho


def transient_growth(
    T,
    horizon: int | None = None,
    *,
    kappa_v: float | None = None,
    rho: float | None = None,
    cap: int = HORIZON_CAP,
) -> TransientGrowth:
    """The transient-growth curve ``||T^t||_2`` for ``t = 0 .. horizon``, and ``kappa_V rho^t``.

    Args:
        T: a square ``k x k`` matrix (numpy or torch; any device), e.g. from
            :func:`projected_operator`.
        horizon: last power to evaluate. Default: the first ``t`` with
            ``kappa_v * rho^t < 1e-3`` (:data:`DECAY_TOL`), at most ``cap``; evaluation also stops
            early once the curve itself is below ``1e-3`` (all later powers are then below
            ``1e-3 * max_growth``). For ``rho >= 1`` the default is
            ``min(cap, 1000)`` and ``bounded=False``; evaluation stops once ``||T^t|| > 1e150``.
            An explicit ``horizon`` is evaluated in full (up to overflow) and may exceed ``cap``.
        kappa_v: the eigenvector condition number for the bound (e.g. ``kappa_V`` of the Ritz
            vectors in native coordinates, which equals that of ``T``'s eigenvectors when ``T``
            is the projection onto their span with an orthonormal ``Q``). Default: from
            ``numpy.linalg.eig(T)`` with unit-norm eigenvectors (``inf`` if ``T`` is
            numerically defective).
        rho: the spectral radius; default from ``numpy.linalg.eigvals(T)``.
        cap: upper limit of the default horizon (:data:`HORIZON_CAP` = 10 000).

    Returns:
        :class:`TransientGrowth`.

    Cost: one ``k x k`` eigendecomposition, then per step ``t`` one matmul and one SVD
    (``O(k^3)``, batched 64 steps at a time). Measured on two CPU cores, per 1000 steps:
    about 0.02 s for ``k = 16``, 0.1 s for ``k = 40``, 0.6 s for ``k = 100``; the default
    horizon is at most 10 000 steps and usually ends much earlier (decay to ``1e-3``).
    Rounding: the computed ``T^t`` carries an absolute error of about ``t eps ||T||^t``,
    which for strongly non-normal ``T`` with
    ``||T|| > 1`` can exceed ``||T^t||`` itself at large ``t`` (Higham, "Accuracy and
    Stability", ch. 18); the maximum, usually reached early, is not affected.
    """
    A = _to_numpy_matrix(T)
    k = A.shape[0]
    if k == 0:
        raise ValueError("T is empty (0 x 0)")
    if kappa_v is None or rho is None:
        kv, r = _eigen_condition(A)
        kappa_v = kv if kappa_v is None else float(kappa_v)
        rho = r if rho is None else float(rho)
    kappa_v, rho = float(kappa_v), float(rho)
    if not (rho >= 0.0 and kappa_v > 0.0):  # NaN fails both
        raise ValueError(
            f"transient_growth: rho must be a number >= 0 and kappa_v one > 0 (or inf), got "
            f"rho={rho}, kappa_v={kappa_v}"
        )
    if horizon is None:
        horizon_ = _default_horizon(kappa_v, rho, cap, k)
        early_stop = rho < 1.0
    else:
        if int(horizon) < 0:
            raise ValueError(f"horizon must be >= 0, got {horizon}")
        horizon_ = int(horizon)
        early_stop = False

    # T^t by incremental multiplication, _POWER_BATCH powers at a time, then one batched SVD
    # for their norms (LAPACK loops in C; a per-step np.linalg.norm(., 2) is Python-bound).
    norms = [1.0]
    certified = False
    Pw = np.eye(k, dtype=A.dtype)
    t_cur = 0
    stop = False
    while t_cur < horizon_ and not stop:
        nb = min(_POWER_BATCH, horizon_ - t_cur)
        stack = np.empty((nb, k, k), dtype=A.dtype)
        filled = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for j in range(nb):
                Pw = Pw @ A
                big = np.max(np.abs(Pw))
                if np.isfinite(big):
                    stack[j] = Pw
                    filled = j + 1
                if not big <= _OVERFLOW:  # past the overflow guard, inf or nan: last batch
                    stop = True
                    break
        nb = filled
        stack = stack[:nb]
        sv = np.linalg.svd(stack, compute_uv=False)[:, 0] if nb else np.empty(0)
        for j in range(nb):
            nrm = float(sv[j])
            norms.append(nrm)
            if nrm < 1.0:
                certified = True
            if not math.isfinite(nrm) or nrm > _OVERFLOW:
                stop = True
                break
            if early_stop and nrm < DECAY_TOL:
                stop = True
                break
        t_cur += nb

    n_arr = np.asarray(norms, dtype=np.float64)
    t_arr = np.arange(n_arr.size, dtype=np.int64)
    i = int(np.argmax(n_arr))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        geo_decay = np.where(t_arr == 0, 1.0, rho ** t_arr.astype(np.float64))
        bound = kappa_v * geo_decay if math.isfinite(kappa_v) else np.full(t_arr.shape, math.inf)
    return TransientGrowth(
        curve=n_arr,
        t=t_arr,
        max_growth=float(n_arr[i]),
        argmax_t=int(t_arr[i]),
        bound=bound,
        kappa_v=kappa_v,
        rho=rho,
        horizon=horizon_,
        bounded=rho < 1.0,
        certified=certified,
    )


# --------------------------------------------------------------------------------------------
# Kreiss constant


@dataclass
class KreissBound:
    """A lower bound of the Kreiss constant ``K(T) = sup_{|z|>1} (|z| - 1) ||(zI - T)^-1||``.

    Attributes:
        value: the largest ``(|z| - 1) / sigma_min(zI - T)`` found (``<= K(T)``); ``inf`` when
            ``rho(T) > 1`` (beyond rounding), where ``K(T)`` is infinite. At ``rho = 1`` the
            samples still bound ``K`` from below (1 for the identity; a Jordan block on the unit
            circle makes ``K`` infinite, which sampling approaches but never reaches).
        z: the ``z`` attaining it.
        growth_lower: ``value``: by the Kreiss matrix theorem ``K(T) <= sup_t ||T^t||``, so this
            is a rigorous lower bound of the maximal transient growth.
        growth_upper_estimate: ``e k value``: the theorem's upper bound ``e k K(T)`` evaluated
            at the lower bound of ``K`` -- an estimate, not a guarantee.
        n_evaluations: number of ``z`` evaluated (each one SVD of a ``k x k`` matrix).
    """

    value: float
    z: complex
    growth_lower: float
    growth_upper_estimate: float
    n_evaluations: int


def kreiss_lower_bound(
    T,
    n_radii: int = 30,
    n_angles: int = 64,
    *,
    refine: bool = True,
) -> KreissBound:
    """Lower bound of the Kreiss constant by sampling ``z`` outside the unit disk.

    ``z = r e^{i theta}`` on ``n_radii`` circles with ``r - 1`` log-spaced in
    ``[1e-4 (1 - rho), 1e2]`` (dense where the resolvent peaks for ``rho`` close to 1) and
    ``n_angles`` angles, plus the rays through the 16 outermost eigenvalues;
    ``sigma_min(zI - T)`` by
    SVD. With ``refine``, the best sample is then polished by a Nelder-Mead search in
    ``(log(r - 1), theta)``. Every evaluated point gives a valid lower bound, so the result is
    ``<= K(T)`` whatever the sampling.

    Args:
        T: square ``k x k`` matrix (numpy or torch).
        n_radii, n_angles: sampling density.
        refine: polish the best sample (about 200 more SVDs).

    Returns:
        :class:`KreissBound`.

    Cost: ``n_radii * (n_angles + min(k, 16)) + 200`` batched SVDs of ``k x k`` matrices
    (about 2600 with the defaults): 0.1 s for ``k = 20``, 0.5 s for ``k = 50``, about 3 s for
    ``k = 100`` on two CPU cores.
    """
    A = _to_numpy_matrix(T)
    k = A.shape[0]
    if k == 0:
        raise ValueError("T is empty (0 x 0)")
    if n_radii < 1 or n_angles < 1:
        raise ValueError(f"n_radii and n_angles must be >= 1, got {n_radii}, {n_angles}")
    ev = np.linalg.eigvals(A)
    rho = float(np.max(np.abs(ev)))
    # An eigenvalue outside the unit circle: K is infinite. On it (to rounding: the identity's
    # computed rho can be 1 + 2e-16) the samples below are still valid lower bounds (it was
    # reported as inf: wrong for the identity, whose K is 1).
    if rho > 1.0 + 64 * float(np.finfo(np.float64).eps):
        j = int(np.argmax(np.abs(ev)))
        return KreissBound(math.inf, complex(ev[j]), math.inf, math.inf, 0)

    def ratio(zs: np.ndarray) -> np.ndarray:
        zs = np.asarray(zs, dtype=np.complex128).reshape(-1)
        smin = _sigma_min_shifted(A, zs)
        # smin = 0 at |z| > 1 >= rho is rounding (z within eps of an eigenvalue on the unit
        # circle): no information, not an infinite bound
        out = np.zeros(zs.shape)
        np.divide(np.abs(zs) - 1.0, smin, out=out, where=smin > 0)
        return out

    # r - 1 >= 1e-10: closer, z rounds onto an eigenvalue on the unit circle
    gap = max(1.0 - rho, 1e-6)
    radii = 1.0 + np.geomspace(1e-4 * gap, 1e2, n_radii)
    thetas = np.linspace(0.0, 2 * np.pi, n_angles, endpoint=False)
    # rays through the (at most 16) outermost eigenvalues: the resolvent peaks outside them
    ev_angles = np.unique(np.angle(ev[np.argsort(-np.abs(ev))[:16]]))
    all_thetas = np.concatenate([thetas, ev_angles])
    Z = (radii[:, None] * np.exp(1j * all_thetas[None, :])).reshape(-1)
    vals = ratio(Z)
    n_eval = Z.size
    i = int(np.argmax(vals))
    best, best_z = float(vals[i]), complex(Z[i])

    if refine and math.isfinite(best):
        from scipy.optimize import minimize

        def neg(p: np.ndarray) -> float:
            z = (1.0 + math.exp(p[0])) * np.exp(1j * p[1])
            return -float(ratio(np.array([z]))[0])

        p0 = np.array([math.log(abs(best_z) - 1.0), float(np.angle(best_z))])
        res = minimize(
            neg,
            p0,
            method="Nelder-Mead",
            options={"maxfev": 200, "xatol": 1e-6, "fatol": 1e-12 * best},
        )
        n_eval += int(res.nfev)
        if -res.fun > best:
            best = float(-res.fun)
            best_z = complex((1.0 + math.exp(res.x[0])) * np.exp(1j * res.x[1]))
    return KreissBound(
        value=best,
        z=best_z,
        growth_lower=best,
        growth_upper_estimate=math.e * k * best,
        n_evaluations=n_eval,
    )


# --------------------------------------------------------------------------------------------
# projection onto a computed subspace


def _chunk_rows(k: int, itemsize: int = 16) -> int:
    """Rows per chunk so that one chunk of ``k`` columns takes about 256 MiB."""
    return max(1, (256 * 2**20) // max(1, k * itemsize))


def projected_operator(JQ, Q) -> np.ndarray:
    """``T = Q^H (J Q)`` for an orthonormal ``Q``, accumulated in float64 on the device.

    Args:
        JQ: ``J @ Q``, shape ``(N, k)`` (torch tensor on any device, or numpy), computed by the
            caller with ``k`` matvecs.
        Q: the orthonormal basis, shape ``(N, k)``, same device (e.g. from
            :func:`orthonormal_basis`).

    Returns:
        ``T`` as a ``(k, k)`` float64 numpy array (complex128 if either input is complex). If
        ``span(Q)`` is invariant under ``J``, the eigenvalues of ``T`` are eigenvalues of ``J``
        and ``||T^t|| = ||J^t Q||``.

    Cost: ``O(N k^2)`` flops; rows are processed in chunks of about 256 MiB, each cast to
    float64 (complex128) before the product, so float32 inputs of length 10^9 neither lose
    digits in the length-``N`` inner products nor allocate float64 copies of the whole inputs.
    """
    if isinstance(JQ, np.ndarray):
        JQ = torch.from_numpy(JQ)
    if isinstance(Q, np.ndarray):
        Q = torch.from_numpy(Q)
    if not isinstance(JQ, torch.Tensor) or not isinstance(Q, torch.Tensor):
        raise TypeError("JQ and Q must be torch tensors or numpy arrays")
    if JQ.ndim == 1:
        JQ = JQ[:, None]
    if Q.ndim == 1:
        Q = Q[:, None]
    if JQ.shape != Q.shape or JQ.ndim != 2:
        raise ValueError(
            f"JQ and Q must both be (N, k) with the same shape, got {tuple(JQ.shape)} and "
            f"{tuple(Q.shape)}"
        )
    if JQ.device != Q.device:
        raise ValueError(f"JQ is on {JQ.device} but Q is on {Q.device}; move one of them")
    cplx = JQ.is_complex() or Q.is_complex()
    wdt = torch.complex128 if cplx else torch.float64
    N, k = Q.shape
    T = torch.zeros(k, k, dtype=wdt, device=Q.device)
    step = _chunk_rows(k)
    for i in range(0, N, step):
        q = Q[i : i + step].to(wdt)
        T += q.mH @ JQ[i : i + step].to(wdt)
    return T.cpu().numpy()


def orthonormal_basis(X, rtol: float | None = None):
    """A real orthonormal basis of the span of real and imaginary parts of the columns of ``X``.

    For eigenvectors of a real ``J`` that come in complex-conjugate pairs, ``span{Re x, Im x}``
    is the real invariant subspace of the pair (the same for either member and any phase), so
    ``T = Q^T J Q`` is real. Columns that are real up to a phase, or repeated, add no dimension:
    the rank is decided by the singular values of ``[Re X, Im X]``, truncated below
    ``rtol * sigma_max``.

    Args:
        X: ``(N, k)`` (or ``(N,)``) real or complex, torch tensor (any device) or numpy array.
        rtol: rank tolerance; default ``max(2k, 16) * eps`` of the input's real precision:
            the rounding level of the input's entries (the QR runs in float64). Not
            ``N eps``: at ``N = 2e5`` in float32 that is 2.3%, which cuts the imaginary parts
            of well-separated but ill-conditioned eigenvectors.

    Returns:
        ``Q``: ``(N, r)`` real with orthonormal columns, ``r <= 2k``, same library and device as
        ``X``, in the input's real precision (float64 for float64/complex128 inputs).

    Cost: Householder QR of the ``N x 2k`` matrix in float64 on ``X``'s device
    (``O(N k^2)`` flops, ``16 N k`` bytes), then an SVD of the ``2k x 2k`` factor.

    Note:
        Near an exceptional point the two eigenvectors of a pair are nearly parallel and their
        span is determined only to about ``eps / |x_1 - x_2|``. For the structured (2x2 block)
        modes, pass the exact block basis ``[(u, 0), (0, D^-1 u)]`` instead of the eigenvectors.
    """
    as_numpy = isinstance(X, np.ndarray)
    Xt = torch.from_numpy(X) if as_numpy else X
    if not isinstance(Xt, torch.Tensor):
        raise TypeError("X must be a torch tensor or a numpy array")
    if Xt.ndim == 1:
        Xt = Xt[:, None]
    if Xt.ndim != 2:
        raise ValueError(f"X must be (N, k), got shape {tuple(Xt.shape)}")
    real_dtype = Xt.real.dtype if Xt.is_complex() else Xt.dtype
    if Xt.is_complex():
        Y = torch.cat([Xt.real, Xt.imag], dim=1)
    else:
        Y = Xt
    Y = Y.to(torch.float64)
    N, p = Y.shape
    if p == 0 or N == 0:
        out = torch.zeros(N, 0, dtype=real_dtype, device=Xt.device)
        return out.cpu().numpy() if as_numpy else out
    if rtol is None:
        rtol = max(p, 16) * float(torch.finfo(real_dtype).eps)
    Q0, R = torch.linalg.qr(Y, mode="reduced")
    U, s, _ = np.linalg.svd(R.cpu().numpy())
    r = int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0
    Ur = torch.from_numpy(np.ascontiguousarray(U[:, :r])).to(Q0.device)
    Q = (Q0 @ Ur).to(real_dtype)
    return Q.cpu().numpy() if as_numpy else Q

"""Shared pieces of the eigen-solvers: input validation, defaults, start blocks, certificates."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from kappa_gpu._linop import LinearOperator, aslinearoperator
from kappa_gpu.solvers._basis import random_block

__all__ = [
    "DEFAULT_TOL",
    "as_operator",
    "check_int",
    "check_sigma",
    "default_maxiter",
    "resolve_tol",
    "conv_floor",
    "start_block",
    "ritz_vectors",
    "true_residuals",
    "not_converged_message",
]

#: Default relative tolerance on the Ritz estimate, per operator dtype: about sqrt(eps), i.e.
#: eigenvalues of well-conditioned pairs to ~1e-8 (float64) / ~1e-4 (float32) relative. SLEPc's
#: default is 1e-8; ARPACK's (``tol=0``) machine epsilon, also accepted here.
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
#: A run whose certificates miss tol by at most this factor continues with a test tightened
#: to leave room for the products' rounding, for at most _RETRY_RESTARTS more restarts; a larger
#: miss is the operator's own (noisy or non-symmetric products) and is reported instead.
_RETRY_MISS = 4.0
_RETRY_RESTARTS = 2


def as_operator(A, name: str) -> LinearOperator:
    """Wrap tensors/arrays, check squareness and dtype."""
    if not isinstance(A, LinearOperator):
        A = aslinearoperator(A)
    m, n = A.shape
    if m != n:
        raise ValueError(f"{name} needs a square operator, got shape {A.shape}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{name} supports float32 and float64 operators, got {A.dtype}; wrap the operator "
            "so that it computes in float32 or float64"
        )
    return A


def check_int(name: str, value, lo: int, what: str) -> int:
    """``value`` as an int ``>= lo``, or a ValueError/TypeError stating the constraint."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer {what}, got {value!r}")
    value = int(value)
    if value < lo:
        raise ValueError(f"`{name}` must be an integer {what}, got {value}")
    return value


def default_maxiter(n: int) -> int:
    """Maximum number of restarts: ARPACK's ``10 n``, at least 100, at most 10 000.

    The cap keeps a stagnating run on a 10^6-dimensional operator from spending ~10^7 restarts
    (ARPACK's default there); pass ``maxiter`` explicitly to go further.
    """
    return int(min(max(100, 10 * n), 10_000))


def resolve_tol(tol, dtype: torch.dtype) -> float:
    """``None`` -> :data:`DEFAULT_TOL`; ``0`` -> machine epsilon of ``dtype`` (ARPACK/SciPy)."""
    if tol is None:
        return DEFAULT_TOL[dtype]
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise TypeError(f"`tol` must be a non-negative number, got {tol!r}") from None
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"`tol` must be a finite number >= 0 (0 means machine eps), got {tol}")
    return tol if tol > 0 else float(torch.finfo(dtype).eps)


def conv_floor(dtype: torch.dtype) -> float:
    """ARPACK's floor in the relative test ``||r|| <= tol * max(|z|, eps**(2/3))``."""
    return float(torch.finfo(dtype).eps) ** (2.0 / 3.0)


def check_sigma(sigma) -> float | None:
    if sigma is None:
        return None
    if isinstance(sigma, complex) or (isinstance(sigma, np.generic) and np.iscomplexobj(sigma)):
        if complex(sigma).imag != 0:
            raise ValueError(
                f"`sigma` must be real for a real operator (conjugate pairs are kept together), "
                f"got {sigma!r}"
            )
        sigma = complex(sigma).real
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        raise TypeError(f"`sigma` must be a real number or None, got {sigma!r}") from None
    if not math.isfinite(sigma):
        raise ValueError(f"`sigma` must be finite, got {sigma}")
    return sigma


def _all_finite(X: torch.Tensor) -> bool:
    """Whether every entry of ``X`` is finite. A finite sum proves it without the n-entry mask
    of ``torch.isfinite`` (a NaN or inf entry makes the sum NaN or inf); only a sum that
    overflows or meets a non-finite entry costs the full check."""
    if math.isfinite(float(X.sum())):
        return True
    return bool(torch.isfinite(X).all())


def _orthonormal_columns(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span of ``X`` (rank-revealing: QR, then SVD of ``R``).

    Columns below ``sqrt(eps)`` relative to the largest singular value are dropped; returns an
    ``(n, 0)`` tensor for a zero block.
    """
    eps = float(torch.finfo(X.dtype).eps)
    Q, R = torch.linalg.qr(X)
    # The p x p factor on the host in float64: a rank decision on a tiny matrix.
    Rh = R.to("cpu", torch.float64).numpy()
    U, sv, _ = np.linalg.svd(Rh)
    if sv.size == 0 or sv[0] == 0.0:
        return X[:, :0]
    keep = sv > math.sqrt(eps) * sv[0]
    if keep.all():
        # Full rank: Householder's Q is orthonormal to working precision and spans X; the
        # rotation by U and the second pass below would only cost two passes over n x p.
        return Q
    Ud = torch.as_tensor(U[:, keep], dtype=X.dtype, device=X.device)
    Q = Q @ Ud
    # One more pass: QR of a nearly rank-deficient block loses orthogonality.
    Q, _ = torch.linalg.qr(Q)
    return Q


def start_block(
    v0, A: LinearOperator, s: int, generator: torch.Generator | None, name: str
) -> tuple[torch.Tensor, int]:
    """The orthonormal ``(n, s)`` start block from ``v0`` (or random), and the rank of ``v0``.

    A block ``v0`` of ``p`` columns (complex columns contribute their real and imaginary parts) is
    orthonormalized; then its directions are folded into ``s`` columns (column ``i`` is the sum
    of directions ``i, i + s, i + 2s, ...``), so that every direction of the warm start is present
    in the first Krylov block with equal weight; missing columns are random.
    """
    n = A.shape[0]
    if v0 is None:
        X = random_block(n, s, A.dtype, A.device, generator)
        return _orthonormal_columns(X), 0
    if isinstance(v0, np.ndarray):
        v0 = torch.from_numpy(v0)
    if not isinstance(v0, torch.Tensor):
        raise TypeError(f"{name}: `v0` must be a torch tensor or numpy array, got {type(v0)}")
    shape = tuple(v0.shape)
    if v0.ndim not in (1, 2) or shape[0] != n or (v0.ndim == 2 and shape[1] == 0):
        raise ValueError(
            f"{name}: `v0` must have shape ({n},) or ({n}, p) with p >= 1 for an operator of "
            f"shape {A.shape}, got {shape}"
        )
    X = v0.reshape(n, -1)
    if X.is_complex():
        X = torch.cat([X.real, X.imag], dim=1)
    X = X.to(device=A.device, dtype=A.dtype)
    if not _all_finite(X):
        raise ValueError(f"{name}: `v0` contains NaN or inf")
    Q = _orthonormal_columns(X)
    r = Q.shape[1]
    if r == 0:
        raise ValueError(
            f"{name}: `v0` is zero; pass a nonzero start vector/block, or None for a random one"
        )
    if r < s:
        R = random_block(n, s - r, A.dtype, A.device, generator)
        Q = _orthonormal_columns(torch.cat([Q, R], dim=1))
    elif r > s:
        pad = (-r) % s
        if pad:
            Q = torch.cat([Q, torch.zeros(n, pad, dtype=Q.dtype, device=Q.device)], dim=1)
        Q = Q.reshape(n, -1, s).sum(dim=1)
        Q = _orthonormal_columns(Q)
    return Q, r


def ritz_vectors(
    V: torch.Tensor, C: np.ndarray, complex_out: bool, contiguous: bool = True
) -> torch.Tensor:
    """``V @ C`` on the device, columns scaled to unit norm, largest entry real and positive.

    ``C`` is a small complex128 (or float64) host matrix of coefficients; for a real ``V`` the
    real and imaginary parts are applied separately (two real GEMMs, no complex copy of ``V``).
    A real result's largest-magnitude entry is made positive (ties: the largest entry).

    Computed in row layout, ``(C^T V^T)`` with ``V^T`` the basis' contiguous rows: on a CPU the
    row-layout product and its per-vector reductions are 2-3x faster than the column layout
    (n = 1e6, m = 24, k = 8: 36 vs 72 ms for the product, 26 ms for a column-wise argmax). The
    result is returned as a contiguous ``(n, k)`` tensor (one transposing copy), as users and
    their operators may ``view`` it; with ``contiguous=False`` a real result is the ``(n, k)``
    transposed view of its rows (for the solver's own certificate products, whose operators
    take the rows as they are: the copy is then made once, for the result).
    """
    dt = V.dtype
    Vr = V.T  # (m, n): the basis rows
    if complex_out:
        Cr = torch.as_tensor(np.ascontiguousarray(C.real.T), dtype=dt, device=V.device)
        Ci = torch.as_tensor(np.ascontiguousarray(C.imag.T), dtype=dt, device=V.device)
        Xr, Xi = Cr @ Vr, Ci @ Vr
        # Norms and magnitudes from the real parts: reductions of a complex tensor take a slow
        # path on the CPU (6x slower at n ~ 2e5, measured in bench/bench_arpack.py).
        mag = Xr * Xr + Xi * Xi
        nrm = torch.sqrt(mag.sum(dim=1))
        X = torch.complex(Xr, Xi)
    else:
        # Real: scaled in place, the sign from the row extremes (no n-sized temporaries: each
        # costs a fresh allocation's page faults on a CPU, about 10 ms per 32 MB).
        X = torch.as_tensor(np.ascontiguousarray(C.real.T), dtype=dt, device=V.device) @ Vr
        nrm = torch.linalg.vector_norm(X, dim=1)
        if X.shape[1]:
            sign = torch.where(X.amax(dim=1) >= -X.amin(dim=1), 1.0, -1.0).to(dt)
        else:
            sign = torch.ones_like(nrm)
        X.mul_((sign / torch.where(nrm > 0, nrm, torch.ones_like(nrm)))[:, None])
        return X.T.contiguous() if contiguous else X.T
    X = X / torch.where(nrm > 0, nrm, torch.ones_like(nrm))[:, None]
    if X.shape[0]:
        idx = torch.argmax(mag, dim=1)
        top = X[torch.arange(X.shape[0], device=X.device), idx]
        phase = top / torch.where(top.abs() > 0, top.abs(), torch.ones_like(top.abs()))
        X = X / torch.where(phase.abs() > 0, phase, torch.ones_like(phase))[:, None]
    return X.T.contiguous()


def true_residuals(
    A: LinearOperator,
    X: torch.Tensor,
    z: np.ndarray,
    partner: np.ndarray | None,
    images: list | None = None,
) -> tuple[np.ndarray, int]:
    """``||A x_i - z_i x_i||`` with real operator applications, and how many were used.

    A real ``x`` costs one application; a conjugate pair costs two (real and imaginary part of
    one member; the partner's residual is the conjugate, same norm). For a real ``X``, the
    products ``A X`` are appended to ``images`` when a list is given (callers that need more
    certificates of the same vectors then spend no further matvecs).
    """
    k = X.shape[1]
    if k == 0:
        return np.zeros(0), 0
    if not X.is_complex():
        AX = A.matmat(X)
        if images is not None:
            images.append(AX)
        R = X * torch.as_tensor(-z.real, dtype=X.dtype, device=X.device)
        R = R.add_(AX) if not AX.is_complex() else R + AX  # one n x k temporary
        return _finite(torch.linalg.vector_norm(R, dim=0).to("cpu", torch.float64).numpy()), k
    # A partner's residual is the conjugate one only when its column is the conjugate (left
    # vectors matched to the right run's values need not be: each is then done on its own).
    pair = [partner is not None and partner[i] >= 0
            and bool(torch.equal(X[:, partner[i]], X[:, i].conj())) for i in range(k)]
    reps = [i for i in range(k) if not pair[i] or partner[i] > i]
    cols, where = [], []
    for i in reps:
        if z[i].imag == 0 and not bool(X[:, i].imag.any()):
            cols.append(X[:, i].real)
            where.append((i, len(cols) - 1, None))
        else:
            cols.append(X[:, i].real)
            cols.append(X[:, i].imag)
            where.append((i, len(cols) - 2, len(cols) - 1))
    M = torch.stack(cols, dim=1)
    AM = A.matmat(M)
    res = np.zeros(k)
    zt = torch.as_tensor(z, dtype=torch.complex128)
    for i, a, b in where:
        Ax = AM[:, a] if b is None else torch.complex(AM[:, a], AM[:, b])
        zi = zt[i].to(X.dtype) if X.is_complex() else zt[i]
        r = Ax.to(X.dtype) - zi * X[:, i]
        res[i] = float(torch.linalg.vector_norm(r))
        if pair[i]:
            res[partner[i]] = res[i]
    return _finite(res), M.shape[1]


def _finite(res: np.ndarray) -> np.ndarray:
    """The true residuals, or FloatingPointError when one is NaN/inf (a NaN passes every
    ``res <= allowed`` test as False but no ``res > allowed`` one: it must not reach the
    flags)."""
    if not np.all(np.isfinite(res)):
        raise FloatingPointError(
            "the operator returned NaN or inf in the certificate products (the true residuals "
            "of the Ritz vectors, after the iteration's own products were finite); the "
            "operator is not finite at these vectors (check the model/HVP for overflow or NaN "
            "parameters, or a product that is not deterministic)"
        )
    return res


def not_converged_message(
    name: str, nconv: int, nwant: int, restarts: int, nmv: int, maxiter: int, ncv: int, tol: float
) -> str:
    return (
        f"{name}: not converged: {nconv} of {nwant} wanted eigenpairs reached tol={tol:.1e} after "
        f"{restarts} restarts ({nmv} matvecs); raise maxiter (now {maxiter}) or ncv (now {ncv}), "
        f"or loosen tol; the unconverged pairs are returned with converged=False"
    )


def continuation(
    res: np.ndarray, lim: np.ndarray, n_restarts: int, limit: int, maxiter: int
) -> tuple[float, int] | None:
    """``(tight, limit)`` when a run's first certificate misses ``lim`` by at most
    ``_RETRY_MISS`` and restarts remain: the scale of its tightened Ritz-estimate test and the
    restart count it may reach; ``None`` when it met ``lim`` or missed by more."""
    worst = float(np.max(res / lim))
    if np.any(res > lim) and worst <= _RETRY_MISS and n_restarts < limit:
        return 0.5 / worst, min(maxiter, n_restarts + _RETRY_RESTARTS)
    return None


def certified_score(conv: np.ndarray, res: np.ndarray, lim: np.ndarray) -> tuple[int, float]:
    """Pairs both flagged and within ``lim`` by their true residuals, then the smaller worst
    miss: the larger score is the better of a run's two certified outcomes."""
    return int(np.sum(conv & (res <= lim))), -float(np.max(res / lim, initial=0.0))


def continuation_message(name: str, nconv: int, nwant: int, nmv: int, tol: float) -> str:
    """Status of a run its tightened continuation ended without convergence."""
    return (
        f"{name}: not converged: {nconv} of {nwant} wanted eigenpairs reached tol={tol:.1e} "
        f"({nmv} matvecs): their true residuals missed tol at the first certificate, and a "
        f"tightened continuation of {_RETRY_RESTARTS} restarts did not cure it (the products' "
        "rounding is near tol); loosen tol or use float64"
    )


#: appended to the status when the first certificate's pairs are returned
KEPT_FIRST_NOTE = (
    "; the first certificate's pairs are returned (a tightened continuation did not improve on "
    "them)"
)


def residual_miss_note(n: int, why: str) -> str:
    """Status note: ``n`` pairs passed the Ritz test but their true residuals exceed tol by
    more than the products' rounding; ``why``: the explanation."""
    return (
        f"; {n} pair(s) passed the Ritz-estimate test but their true residuals (.residuals) "
        f"exceed tol: {why}"
    )


def tol_at_rounding_note(n: int, tol: float, dtype: torch.dtype, size: int) -> str:
    """:func:`residual_miss_note` when ``tol`` itself is at the products' rounding level."""
    eps = float(torch.finfo(dtype).eps)
    return residual_miss_note(
        n, f"tol={tol:.1e} is at the rounding level of {str(dtype).replace('torch.', '')} "
        f"products (eps = {eps:.1e}; a true residual carries about sqrt(n) eps ||A||, n = "
        f"{size}), so it cannot be met; use tol >= {math.sqrt(size) * eps:.0e} or so"
    )


def noisy_note(n: int, cause: str) -> str:
    """:func:`residual_miss_note` for noisy products; ``cause``: what the operator's products
    do."""
    return residual_miss_note(
        n, f"the operator's products {cause} (a non-deterministic product, float32 rounding "
        "of a long sum); loosen tol or use float64"
    )


def expand_cycle(basis, ncv: int, s: int, k: int, analyze, quick=None, after_restart=True,
                 first_cycle=True):
    """Expand ``basis`` to a full restart cycle and return ``(m, analyze(m))``.

    Convergence is tested after every step, and the expansion stops as soon as every wanted
    value has converged: a warm start often needs far fewer than ``ncv`` vectors, and after a
    restart the last unconverged values often reach ``tol`` a few steps into the cycle (testing
    only at the end of a cycle, as ARPACK does, spent 10-16 % more matvecs on the heavy-ball
    operator of ``bench/bench_arpack.py``). Whatever stops the expansion, the returned pairs are
    certified afterwards by their true residuals. ``quick(m)``, when given, is a cheaper
    necessary test run first after a restart (``eigs``: LAPACK's ``eig`` of ``H`` instead of the
    Schur form and its back substitution, 0.3 instead of about 1 ms a step in situ at
    ``ncv = 20``); ``after_restart=False`` keeps the test at the end of later cycles only
    (``eigsh``'s selective reorthogonalization, whose Ritz estimates are not reliable residuals,
    and ``eigs``' left run, which is certified by its caller without a continuation). Never
    after a breakdown, where the space is blind to part of the spectrum. ``first_cycle=False``
    tests the first cycle at its end only: a warm start from another operator's eigenvectors
    passes the test at ``m = k + 1`` when they are still eigenvectors (e.g. of a matrix that
    gained a new top eigenvalue elsewhere), before the space has seen the rest of the spectrum.
    ``analyze(m)`` returns a tuple whose element 5 is the converged flags of the wanted values.
    """
    state: dict = {}

    def early(m: int) -> bool:
        if m <= k or basis.n_breakdowns or not (first_cycle or basis.n_restarts):
            return False
        if basis.n_restarts and (not after_restart or (quick is not None and not quick(m))):
            return False
        state["a"] = analyze(m)
        return bool(state["a"][5].all())

    m_full = basis.p + s * ((ncv - basis.p) // s)
    m = basis.expand(m_full, stop=early)
    return m, (state["a"] if m < m_full else analyze(m))

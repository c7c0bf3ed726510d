"""Test problems with KNOWN spectra for the eigen-solver tests, and counting operators.

Imported by the other ``test_solvers*.py`` files (pytest puts ``tests/`` on ``sys.path``); the
tests at the bottom check that the factories build what they claim.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse.linalg as ssl
import torch

import kappa_gpu as kg

#: Top of the default known spectrum: real values and complex pairs (both members used).
TOP = (3.0, 2.6 + 1.0j, 2.3, 1.6 + 1.5j, 2.0)


def _expand(top) -> list[complex]:
    z: list[complex] = []
    for t in top:
        t = complex(t)
        z += [complex(t.real, abs(t.imag)), complex(t.real, -abs(t.imag))] if t.imag else [t]
    return z


def known_spectrum(
    n: int, cond: float, seed: int, top=TOP, radius: float = 0.5, ill: str = "all"
) -> tuple[np.ndarray, np.ndarray]:
    """``A = V B V^-1`` with known eigenvalues ``z`` and ``cond(V) = cond`` (real arithmetic).

    ``B`` is block diagonal: ``z`` for a real eigenvalue, ``[[a, b], [-b, a]]`` for ``a +- bi`` (the
    columns ``v, w`` of ``V`` then span the pair's invariant subspace, eigenvectors ``v +- i w``).
    The eigenvalues below ``top`` are random in the disc of ``radius``.

    ``ill="all"``: ``V = U diag(s) W^T`` with log-spaced ``s`` (every eigenvector mixes the
    ill-conditioned directions; eigenvalue condition numbers up to ``cond``). ``ill="bulk"``: the
    columns of the top eigenvalues are well conditioned, only the bulk columns carry the
    ill-conditioning (``cond(V)`` is still ``~cond``).
    """
    A, z = _known_spectrum(n, cond, seed, top, radius, ill)
    return A.copy(), z.copy()


@functools.lru_cache(maxsize=32)
def _known_spectrum(n, cond, seed, top, radius, ill):
    rng = np.random.default_rng(seed)
    z = _expand(top)
    while len(z) < n:
        r, ph = radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        if len(z) + 2 <= n and rng.uniform() < 0.5:
            w = r * np.exp(1j * ph)
            z += [w, np.conj(w)]
        else:
            z.append(complex(r * np.cos(ph), 0.0))
    z = np.array(z[:n])
    B = np.zeros((n, n))
    i = 0
    while i < n:
        if z[i].imag != 0:
            a, b = z[i].real, z[i].imag
            B[i : i + 2, i : i + 2] = [[a, b], [-b, a]]
            i += 2
        else:
            B[i, i] = z[i].real
            i += 1
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    W, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.logspace(0, -np.log10(cond), n)
    V = (U * s) @ W.T
    if ill == "bulk":
        t = len(_expand(top))
        V[:, :t] = rng.standard_normal((n, t)) / np.sqrt(n)
    A = V @ B @ np.linalg.inv(V)
    return A, z


def nearly_defective(n: int, angle: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dominant eigenvalues 2.0 and 1.8 whose eigenvectors are at ``angle``; bulk in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((n, n))
    V /= np.linalg.norm(V, axis=0)
    u = V[:, 0]
    w = V[:, 1] - u * (u @ V[:, 1])
    w /= np.linalg.norm(w)
    V[:, 1] = np.cos(angle) * u + np.sin(angle) * w
    z = np.concatenate([[2.0, 1.8], 0.5 * rng.uniform(-1, 1, n - 2)])
    return V @ np.diag(z) @ np.linalg.inv(V), z, V


def heavy_ball_jacobian(s: np.ndarray, eta: float = 0.05, mu: float = 0.9, seed: int = 0):
    """DESIGN.md section 2 heavy-ball ``J`` for a Hessian with eigenvalues ``s`` (dense, 2n)."""
    n = len(s)
    Q = _orthogonal(n, seed)
    H = (Q * s) @ Q.T
    eye = np.eye(n)
    return np.block([[eye - eta * H, -eta * mu * eye], [H, mu * eye]]), H


def hb_spectrum(n: int = 150, seed: int = 1) -> np.ndarray:
    """Sharp curvatures, a bulk around 0 and two negative ones (z near 1 and 0.9 cluster)."""
    rng = np.random.default_rng(seed)
    bulk = 0.3 * rng.standard_normal(n - 6)
    return np.concatenate([[70.0, 60.0, 50.0, 45.0], bulk, [-1.0, -0.8]])


@functools.lru_cache(maxsize=16)
def _orthogonal(n: int, seed: int) -> np.ndarray:
    """A random orthogonal matrix (cached: the QR is most of the cost of a test problem)."""
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    Q.flags.writeable = False
    return Q


def symmetric_spectrum(s: np.ndarray, seed: int) -> np.ndarray:
    """``Q diag(s) Q^T`` with a random orthogonal ``Q``."""
    Q = _orthogonal(len(s), seed)
    return (Q * s) @ Q.T


def powerlaw(n: int, scale: float = 100.0, power: float = 0.5) -> np.ndarray:
    """A Hessian-like spectrum: ``scale * i**-power``, the last 5 negative."""
    s = scale * np.arange(1, n + 1, dtype=np.float64) ** -power
    s[-5:] = -s[-5:]
    return s


def norm2(M: np.ndarray, iters: int = 60) -> float:
    """``||M||_2`` by power iteration on ``M^T M`` (cheap next to a dense SVD)."""
    x = np.random.default_rng(0).standard_normal(M.shape[1])
    for _ in range(iters):
        x = M.T @ (M @ x)
        x /= np.linalg.norm(x)
    return float(np.linalg.norm(M @ x))


def perturbed(M: np.ndarray, rel: float, seed: int, symmetric: bool) -> np.ndarray:
    """``M + E`` with a random ``E``, ``||E||_2 = rel ||M||_2`` (symmetric if asked)."""
    E = np.random.default_rng(seed).standard_normal(M.shape)
    if symmetric:
        E = E + E.T
    return M + E * (rel * norm2(M) / norm2(E))


class CountingOperator(kg.LinearOperator):
    """Dense operator counting its applications (``matmat`` of ``s`` columns counts ``s``)."""

    def __init__(self, M: np.ndarray | torch.Tensor, device="cpu", dtype=torch.float64):
        M = torch.as_tensor(M).to(device=device, dtype=dtype)
        super().__init__(tuple(M.shape), dtype, device)
        self.M = M
        self.count = 0
        self.rcount = 0
        self.matmat_calls = 0

    def _matvec(self, x):
        self.count += 1
        return self.M @ x

    def _matmat(self, X):
        self.count += X.shape[1]
        self.matmat_calls += 1
        return self.M @ X

    def _rmatvec(self, y):
        self.rcount += 1
        return self.M.mT @ y

    def _rmatmat(self, Y):
        self.rcount += Y.shape[1]
        return self.M.mT @ Y


def arpack_count(M, k, which, tol, ncv, v0, shift=0.0, symmetric=False, maxiter=None):
    """ARPACK (SciPy) on ``M - shift I`` with a counting matvec: (eigenvalues + shift, count)."""
    cnt = [0]

    def mv(x):
        cnt[0] += 1
        return M @ x - shift * x

    op = ssl.LinearOperator(M.shape, matvec=mv, dtype=np.float64)
    fn = ssl.eigsh if symmetric else ssl.eigs
    w = fn(op, k=k, which=which, tol=tol, ncv=ncv, v0=v0, maxiter=maxiter,
           return_eigenvectors=False)
    return np.asarray(w) + shift, cnt[0]


def wanted(z: np.ndarray, which: str, k: int, sigma: float = 0.0) -> np.ndarray:
    """The ``k`` wanted values of ``z`` (plus a straddling conjugate) in ``which`` order."""
    key = {
        "LM": -np.abs(z - sigma),
        "LR": -z.real,
        "SR": z.real,
        "LI": -np.abs(z.imag),
        "LA": -z.real,
        "SA": z.real,
    }[which]
    o = np.lexsort((-z.imag, -z.real, key))
    out = list(z[o[:k]])
    last = out[-1]
    if last.imag > 0 and not any(np.isclose(v, np.conj(last)) for v in out):
        out.append(np.conj(last))
    return np.array(out)


def match_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest relative distance from each computed value to the nearest wanted one."""
    return max(float(np.min(np.abs(want - g)) / abs(g)) for g in got)


# -- the factories themselves --------------------------------------------------------------------
@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_known_spectrum_has_the_claimed_eigenvalues(cond):
    A, z = known_spectrum(60, cond, seed=0)
    ev = np.linalg.eigvals(A)
    # Dense LAPACK on the top values (the bulk of a cond 1e6 matrix is itself inaccurate).
    top = np.array(_expand(TOP))
    assert match_error(top, ev) < 1e-6


def test_nearly_defective_pair_has_the_claimed_angle():
    A, z, V = nearly_defective(200, 1e-4, seed=0)
    c = abs(V[:, 0] @ V[:, 1])
    assert np.isclose(np.arccos(min(c, 1.0)), 1e-4, rtol=1e-6)
    # Forming V diag(z) V^-1 costs ~cond(z_i) eps ||A||: the pair (cond ~7e4) is known to ~1e-9.
    assert match_error(np.array([2.0, 1.8]), np.linalg.eigvals(A)) < 1e-8

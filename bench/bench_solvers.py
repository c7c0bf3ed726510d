"""kappa_gpu's Krylov-Schur ``eigs`` / thick-restart ``eigsh`` against ARPACK (SciPy).

The claim measured: the same eigenpairs for at most ~1.1x ARPACK's matvecs (same ``k``, ``tol``,
``ncv``, start vector). The selling point is the matvec count (one matvec is one HVP on a real
model); wall times here, on small dense CPU operators, mostly time the host-side bookkeeping.

Two ways to run it:

    pytest bench/bench_solvers.py [--benchmark-disable]   # pytest-benchmark timings
    python bench/bench_solvers.py [--n 300]               # the matvec table vs ARPACK

Both check that the eigenvalues agree with ARPACK's before recording anything.

ARPACK's ``dgetv0`` applies the operator once to ``v0`` (its Krylov space is ``K(A, A v0)``, and
SciPy counts that matvec). The table shows kappa_gpu started from ``A v0`` plus that one matvec
("same space"), and kappa_gpu started from ``v0`` itself ("same v0").
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import scipy.sparse.linalg as ssl
import torch

import kappa_gpu as kg
from kappa_gpu.solvers import eigs, eigsh

N = 300


def known_nonsymmetric(n: int, cond: float, seed: int) -> np.ndarray:
    """``V B V^-1``: eigenvalues 3, 2.6+-1i, 2.3, 1.6+-1.5i, 2.0, then a disc of radius 0.5."""
    rng = np.random.default_rng(seed)
    B = np.zeros((n, n))
    top = [(3.0, 0.0), (2.6, 1.0), (2.3, 0.0), (1.6, 1.5), (2.0, 0.0)]
    i = 0
    for a, b in top:
        if b:
            B[i : i + 2, i : i + 2] = [[a, b], [-b, a]]
            i += 2
        else:
            B[i, i] = a
            i += 1
    B[np.arange(i, n), np.arange(i, n)] = 0.5 * rng.uniform(-1, 1, n - i)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    W, _ = np.linalg.qr(rng.standard_normal((n, n)))
    V = (U * np.logspace(0, -np.log10(cond), n)) @ W.T
    return V @ B @ np.linalg.inv(V)


def powerlaw_symmetric(n: int, seed: int) -> np.ndarray:
    s = 100.0 * np.arange(1, n + 1) ** -0.5
    s[-5:] = -s[-5:]
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (Q * s) @ Q.T


def heavy_ball(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = np.concatenate([[70.0, 60.0, 50.0, 45.0], 0.3 * rng.standard_normal(n - 6), [-1.0, -0.8]])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    H = (Q * s) @ Q.T
    eye = np.eye(n)
    return np.block([[eye - 0.05 * H, -0.045 * eye], [H, 0.9 * eye]])


def arpack(M, k, which, tol, ncv, v0, shift=0.0, symmetric=False):
    """SciPy ARPACK on ``M - shift I`` with a counting matvec -> (eigenvalues, matvecs)."""
    count = [0]

    def mv(x):
        count[0] += 1
        return M @ x - shift * x

    op = ssl.LinearOperator(M.shape, matvec=mv, dtype=np.float64)
    fn = ssl.eigsh if symmetric else ssl.eigs
    w = fn(op, k=k, which=which, tol=tol, ncv=ncv, v0=v0, return_eigenvectors=False, maxiter=10**5)
    return np.asarray(w, dtype=complex) + shift, count[0]


def ours(M, k, which, tol, ncv, v0, sigma=None, symmetric=False):
    A = kg.aslinearoperator(torch.from_numpy(M))
    v = torch.from_numpy(np.ascontiguousarray(v0))
    if symmetric:
        return eigsh(A, k=k, which=which, tol=tol, ncv=ncv, v0=v, maxiter=10**5)
    return eigs(A, k=k, which=which, sigma=sigma, tol=tol, ncv=ncv, v0=v, maxiter=10**5)


def _agree(got: np.ndarray, ref: np.ndarray, rtol: float = 1e-7) -> bool:
    # SciPy returns one member of a pair that straddles k; kappa_gpu returns both.
    ref = np.concatenate([ref, np.conj(ref)])
    return all(np.min(np.abs(ref - g)) <= rtol * abs(g) for g in got)


def problems(n: int):
    """(name, matrix, which, k, sigma, symmetric)."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((n, n)) / np.sqrt(n)
    return [
        ("V diag V^-1, cond 1e2", known_nonsymmetric(n, 1e2, 1), "LM", 6, None, False),
        ("V diag V^-1, cond 1e4", known_nonsymmetric(n, 1e4, 1), "LR", 4, None, False),
        ("V diag V^-1, cond 1e4", known_nonsymmetric(n, 1e4, 1), "LI", 4, None, False),
        ("V diag V^-1, cond 1e6", known_nonsymmetric(n, 1e6, 2), "LM", 5, None, False),
        ("heavy-ball J", heavy_ball(n // 2, 1), "LM", 4, 1.0, False),
        ("heavy-ball J", heavy_ball(n // 2, 1), "LI", 4, None, False),
        ("Gaussian (no gap)", G, "LR", 6, None, False),
        ("power-law Hessian", powerlaw_symmetric(n, 0), "LA", 8, None, True),
        ("power-law Hessian", powerlaw_symmetric(n, 0), "SA", 3, None, True),
    ]


def table(n: int = N, tols=(1e-10, 0.0)) -> list[tuple]:
    rows = []
    for name, M, which, k, sigma, sym in problems(n):
        for tol in tols:
            ncv = min(max(2 * k + 1, 20), M.shape[0])
            v0 = np.random.default_rng(7).standard_normal(M.shape[0])
            shift = sigma or 0.0
            w, n_ar = arpack(M, k, which, tol, ncv, v0, shift=shift, symmetric=sym)
            r_same = ours(M, k, which, tol, ncv, M @ v0 - shift * v0, sigma, sym)
            r_v0 = ours(M, k, which, tol, ncv, v0, sigma, sym)
            ok = all(_agree(r.eigenvalues.numpy()[:k], w) for r in (r_same, r_v0))
            rows.append((name, which + ("" if sigma is None else f" sigma={sigma:g}"), k, tol,
                         n_ar, r_same.n_matvec + 1, r_v0.n_matvec, ok))
    return rows


# -- pytest-benchmark --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nonsym():
    M = known_nonsymmetric(N, 1e4, 1)
    v0 = np.random.default_rng(7).standard_normal(N)
    w, n_ar = arpack(M, 4, "LR", 1e-10, 20, v0)
    r = ours(M, 4, "LR", 1e-10, 20, M @ v0)
    assert _agree(r.eigenvalues.numpy()[:4], w), "kappa_gpu and ARPACK disagree: not timing"
    return M, v0, n_ar, r.n_matvec + 1


@pytest.fixture(scope="module")
def sym():
    M = powerlaw_symmetric(N, 0)
    v0 = np.random.default_rng(7).standard_normal(N)
    w, n_ar = arpack(M, 8, "LA", 1e-10, 20, v0, symmetric=True)
    r = ours(M, 8, "LA", 1e-10, 20, M @ v0, symmetric=True)
    assert _agree(r.eigenvalues.numpy()[:8], w), "kappa_gpu and ARPACK disagree: not timing"
    return M, v0, n_ar, r.n_matvec + 1


def test_eigs_kappa_gpu(benchmark, nonsym):
    M, v0, n_ar, n_ours = nonsym
    benchmark.extra_info.update(n_matvec=n_ours, n_matvec_arpack=n_ar)
    r = benchmark(ours, M, 4, "LR", 1e-10, 20, M @ v0)
    assert r.converged_all and n_ours <= 1.1 * n_ar


def test_eigs_arpack(benchmark, nonsym):
    M, v0, n_ar, _ = nonsym
    benchmark.extra_info.update(n_matvec=n_ar)
    benchmark(arpack, M, 4, "LR", 1e-10, 20, v0)


def test_eigsh_kappa_gpu(benchmark, sym):
    M, v0, n_ar, n_ours = sym
    benchmark.extra_info.update(n_matvec=n_ours, n_matvec_arpack=n_ar)
    r = benchmark(ours, M, 8, "LA", 1e-10, 20, M @ v0, symmetric=True)
    assert r.converged_all and n_ours <= 1.1 * n_ar


def test_eigsh_arpack(benchmark, sym):
    M, v0, n_ar, _ = sym
    benchmark.extra_info.update(n_matvec=n_ar)
    benchmark(arpack, M, 8, "LA", 1e-10, 20, v0, symmetric=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=N)
    args = ap.parse_args()
    rows = table(args.n)
    print(f"{'problem':24} {'which':12} {'k':>2} {'tol':>6} {'ARPACK':>7} {'same space':>10} "
          f"{'same v0':>8} {'ratio':>6}  agree")
    for name, which, k, tol, n_ar, n_same, n_v0, ok in rows:
        print(f"{name:24} {which:12} {k:>2} {tol:>6.0e} {n_ar:>7} {n_same:>10} {n_v0:>8} "
              f"{n_same / n_ar:>6.2f}  {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()

"""Matvec counts against ARPACK, and warm starts.

ARPACK (through SciPy) runs on the same operator with the same ``k``, ``tol``, ``ncv`` and start
vector ``v0``, its matvecs counted by a wrapper in the same test; both use the same convergence
test (Ritz estimate ``<= tol * max(|z|, eps**(2/3))``). ARPACK's ``dgetv0`` first applies the
operator to ``v0`` ("force the starting vector into the range of OP"; SciPy counts that matvec),
so its Krylov space is ``K(A, A v0)``: our solver gets that same start vector, ``A v0``, and is
charged the one matvec that made it. Then both build the same Krylov spaces in exact arithmetic.
A shifted target ``which="LM", sigma=s`` is compared with ARPACK on ``A - s I`` (the same Krylov
space; SciPy's own ``sigma`` would invert).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as ssl
import torch
from test_solvers_problems import (
    CountingOperator,
    arpack_count,
    hb_spectrum,
    heavy_ball_jacobian,
    known_spectrum,
    match_error,
    perturbed,
    powerlaw,
    symmetric_spectrum,
)

import kappa_gpu as kg
from kappa_gpu.solvers import eigs, eigsh

#: (name, builder, which, k, sigma, symmetric)
CASES = {
    "cond1e2-LM": (lambda: known_spectrum(200, 1e2, 1)[0], "LM", 6, None, False),
    "cond1e4-LR": (lambda: known_spectrum(200, 1e4, 1)[0], "LR", 4, None, False),
    "cond1e4-LI": (lambda: known_spectrum(200, 1e4, 1)[0], "LI", 4, None, False),
    "cond1e6-LM": (lambda: known_spectrum(200, 1e6, 2, ill="bulk")[0], "LM", 5, None, False),
    "J-sigma1": (lambda: heavy_ball_jacobian(hb_spectrum())[0], "LM", 4, 1.0, False),
    "sym-LA": (lambda: symmetric_spectrum(powerlaw(400), 0), "LA", 8, None, True),
    "sym-SA": (lambda: symmetric_spectrum(powerlaw(400), 0), "SA", 3, None, True),
}


@pytest.mark.parametrize("tol", [1e-10, 0.0])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matvecs_at_most_1p1_arpack(case, tol):
    build, which, k, sigma, sym = CASES[case]
    M = build()
    n = M.shape[0]
    ncv = min(max(2 * k + 1, 20), n)
    v0 = np.random.default_rng(7).standard_normal(n)
    w, n_arpack = arpack_count(M, k, which, tol, ncv, v0, shift=sigma or 0.0, symmetric=sym)
    op = CountingOperator(M)
    solver = eigsh if sym else eigs
    kw = {} if sym else {"sigma": sigma}
    Av0 = torch.from_numpy(M @ v0 - (sigma or 0.0) * v0)  # ARPACK's effective start vector
    r = solver(op, k=k, which=which, tol=tol, ncv=ncv, v0=Av0, **kw)
    assert r.converged_all, r.status
    assert op.count == r.n_matvec + r.n_matvec_certify
    # Same eigenvalues as ARPACK (which returns one member of a pair that straddles k)...
    w = np.asarray(w, dtype=complex)
    assert match_error(r.eigenvalues.numpy(), np.concatenate([w, np.conj(w)])) <= 1e-8
    # ... for at most 10% more matvecs.
    assert r.n_matvec + 1 <= 1.1 * n_arpack, (r.n_matvec + 1, n_arpack)


# -- warm starts ------------------------------------------------------------------------------
def _cold_mean(solver, A, seeds=(1, 2, 3), **kw) -> float:
    return float(np.mean([solver(A, generator=torch.Generator().manual_seed(s), **kw).n_matvec
                          for s in seeds]))


@pytest.mark.parametrize("k,tol,bound", [(3, 1e-4, 0.5), (4, 1e-6, 0.65)])
def test_eigsh_warm_start_after_perturbation(k, tol, bound):
    # Hessian-like spectrum; the operator moves by 1e-3 (relative, 2-norm) between the calls,
    # as the Hessian does between two monitored training steps. A start from another
    # operator's eigenvectors tests its first cycle at its end (ARPACK's rule; see the test
    # below for why): ncv = 20 matvecs, against 18.3 / 24.3 cold (cold runs stop mid-cycle).
    # trust_v0=True tests from the first step, which is for this very operator's vectors;
    # here it shows what the early test saves when nothing new appeared: 6 and 15 matvecs.
    S = symmetric_spectrum(powerlaw(600), 0)
    S2 = perturbed(S, 1e-3, seed=1, symmetric=True)
    first = eigsh(S, k=k, tol=tol, generator=torch.Generator().manual_seed(0))
    cold = _cold_mean(eigsh, S2, k=k, tol=tol)
    ref = np.linalg.eigvalsh(S2)[::-1][:k]
    warm = eigsh(S2, k=k, tol=tol, v0=first.eigenvectors)
    trusted = eigsh(S2, k=k, tol=tol, v0=first.eigenvectors, trust_v0=True)
    for r in (warm, trusted):
        assert r.converged_all
        assert np.allclose(r.eigenvalues.real.numpy(), ref, rtol=10 * tol)
    assert warm.n_matvec == 20  # one full first cycle, then converged
    assert trusted.n_matvec <= bound * cold, (trusted.n_matvec, cold)


@pytest.mark.parametrize("solver, which", [(eigsh, "LA"), (eigs, "LM")])
@pytest.mark.parametrize("k, block", [(1, 1), (3, 1), (3, 3)])
def test_a_warm_start_finds_a_new_top_eigenvalue_its_vectors_do_not_hold(solver, which, k, block):
    """The previous eigenvectors are still eigenvectors (residual below tol) while an interior
    eigenvalue moved to the top: tested after every step, the warm run stopped at k + 1
    matvecs with the old values flagged converged (review case). The first cycle now runs to
    ncv before its test; ARPACK finds the new top from the same start too."""
    rng = np.random.default_rng(0)
    n = 200
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A1 = (Q * np.linspace(1.0, 60.0, n)) @ Q.T
    A1 = 0.5 * (A1 + A1.T)
    A2 = A1 + 60.0 * np.outer(Q[:, 50], Q[:, 50])  # 15.8 -> 75.8: the new top
    A2 = 0.5 * (A2 + A2.T)
    gen = torch.Generator().manual_seed(0)
    first = solver(torch.as_tensor(A1), k=k, which=which, generator=gen)
    again = solver(torch.as_tensor(A2), k=k, which=which, v0=first.eigenvectors,
                   block_size=block)
    ref = np.linalg.eigvalsh(A2)[::-1][:k]
    assert again.converged_all
    assert np.allclose(np.sort(again.eigenvalues.real.numpy())[::-1], ref, rtol=1e-7)
    ar = ssl.eigsh(A2, k=k, which="LA", v0=first.eigenvectors[:, 0].numpy())[0]
    assert np.allclose(np.sort(ar)[::-1], ref, rtol=1e-7)


@pytest.mark.parametrize("which,sigma", [("LM", 1.0), ("LI", None)])
def test_eigs_warm_start_after_perturbation(which, sigma):
    s = hb_spectrum(200)
    J, H = heavy_ball_jacobian(s)
    H2 = perturbed(H, 1e-3, seed=2, symmetric=True)
    J2, _ = heavy_ball_jacobian(s)
    n = H.shape[0]
    J2[:n, :n] = np.eye(n) - 0.05 * H2
    J2[n:, :n] = H2
    kw = dict(k=6, which=which, sigma=sigma, tol=1e-4)
    first = eigs(J, generator=torch.Generator().manual_seed(0), **kw)
    cold = _cold_mean(eigs, J2, **kw)
    # complex block: Re and Im parts are used; trust_v0: no new wanted value can appear here
    warm = eigs(J2, v0=first.eigenvectors, trust_v0=True, **kw)
    assert warm.converged_all
    assert match_error(warm.eigenvalues.numpy(), np.linalg.eigvals(J2)) <= 1e-4
    assert warm.n_matvec <= 0.7 * cold, (warm.n_matvec, cold)


def test_warm_start_from_exact_eigenvectors_is_almost_free():
    S = symmetric_spectrum(powerlaw(600), 3)
    first = eigsh(S, k=4, tol=1e-10, generator=torch.Generator().manual_seed(0))
    again = eigsh(S, k=4, tol=1e-10, v0=first.eigenvectors, trust_v0=True)
    assert again.converged_all
    assert again.n_matvec <= 0.5 * first.n_matvec


# -- warm starts at the scale they are for ----------------------------------------------------
# The warm start cannot cost fewer matvecs than the number of directions it brings in (k), and
# from a start vector a distance delta from the new invariant subspace a Krylov method still has
# to shrink delta to tol: warm/cold is about (k + log(delta/tol)/r) / (log(sqrt(n)/tol)/r) for a
# convergence rate r. On the small dense problems above (n = 600, cold = 15-40 matvecs) that is
# 0.3-0.7; on operators of the size and spectrum it is meant for (a Hessian-like power law,
# n = 10^5, a random cold start) it is below 0.4. Operators: diagonal power-law Hessian
# (permuted) plus a rank-40 symmetric perturbation of relative 2-norm 1e-3, applied implicitly.
# These savings need trust_v0=True (the test from the first step); by default a start from
# another operator's vectors runs its first cycle to ncv (a new wanted eigenvalue, test above).
class _DiagPlusLowRank(kg.LinearOperator):
    def __init__(self, d: np.ndarray, U: np.ndarray | None = None, C: np.ndarray | None = None):
        n = len(d)
        super().__init__((n, n), torch.float64, "cpu")
        self.d = torch.from_numpy(d)
        self.U = None if U is None else torch.from_numpy(U)
        self.C = None if C is None else torch.from_numpy(C)

    def _matmat(self, X):
        Y = self.d[:, None] * X
        if self.U is not None:
            Y = Y + self.U @ (self.C @ (self.U.T @ X))
        return Y

    def _matvec(self, x):
        return self._matmat(x[:, None])[:, 0]

    def dense_top(self, k: int) -> np.ndarray:
        """Oracle: the k largest eigenvalues, by ARPACK at tol 1e-13."""
        op = ssl.LinearOperator(self.shape, matvec=lambda x: self._matvec(torch.from_numpy(
            np.ascontiguousarray(x).reshape(-1))).numpy(), dtype=np.float64)
        return np.sort(ssl.eigsh(op, k=k, which="LA", tol=1e-13, return_eigenvectors=False))[::-1]


class _HeavyBall(kg.LinearOperator):
    """DESIGN.md section 2 heavy-ball J on the state (theta, v) for a Hessian operator ``Hs``."""

    def __init__(self, Hs: _DiagPlusLowRank, eta: float = 0.05, mu: float = 0.9):
        n = Hs.shape[0]
        super().__init__((2 * n, 2 * n), torch.float64, "cpu")
        self.Hs, self.eta, self.mu, self.m = Hs, eta, mu, n

    def _matvec(self, x):
        t, v = x[: self.m], x[self.m :]
        v2 = self.mu * v + self.Hs._matvec(t)
        return torch.cat([t - self.eta * v2, v2])


def _hessian_pair(n: int, scale: float) -> tuple[_DiagPlusLowRank, _DiagPlusLowRank]:
    rng = np.random.default_rng(3)
    d = rng.permutation(powerlaw(n, scale=scale))
    U, _ = np.linalg.qr(rng.standard_normal((n, 40)))
    C = rng.standard_normal((40, 40))
    C = C + C.T
    C *= 1e-3 * scale / np.abs(np.linalg.eigvalsh(C)).max()  # ||E||_2 = 1e-3 ||H||_2
    return _DiagPlusLowRank(d), _DiagPlusLowRank(d, U, C)


@pytest.mark.parametrize("k,bound", [(3, 0.4), (6, 0.45)])
def test_eigsh_warm_start_at_scale(k, bound):
    # Measured: k = 3: 5 vs 16.7 matvecs; k = 6: 11 vs 26.3. Since the convergence test runs
    # after every step, the cold runs stop mid-cycle (k = 6: 30.7 before) and so does the first
    # run whose vectors start the warm one: less refined beyond tol, they cost the warm run 3
    # more matvecs (8 before); first + warm: 37 instead of 39.
    H1, H2 = _hessian_pair(100_000, 100.0)
    first = eigsh(H1, k=k, tol=1e-4, generator=torch.Generator().manual_seed(0))
    cold = _cold_mean(eigsh, H2, k=k, tol=1e-4)
    warm = eigsh(H2, k=k, tol=1e-4, v0=first.eigenvectors, trust_v0=True)
    assert warm.converged_all, warm.status
    ref = H2.dense_top(k)
    assert np.allclose(warm.eigenvalues.real.numpy(), ref, rtol=1e-4)
    assert warm.n_matvec <= bound * cold, (warm.n_matvec, cold)


@pytest.mark.parametrize("which,sigma", [("LM", 1.0), ("LI", None)])
def test_eigs_warm_start_at_scale_under_40_percent(which, sigma):
    H1, H2 = _hessian_pair(100_000, 60.0)
    kw = dict(k=6, which=which, sigma=sigma, tol=1e-4)
    first = eigs(_HeavyBall(H1), generator=torch.Generator().manual_seed(0), **kw)
    cold = _cold_mean(eigs, _HeavyBall(H2), **kw)
    warm = eigs(_HeavyBall(H2), v0=first.eigenvectors, trust_v0=True, **kw)
    assert warm.converged_all, warm.status
    # Oracle: z^2 - (1 + mu - eta lam) z + mu = 0 for the top curvatures lam of the new Hessian
    # (the wanted modes of both targets come from the sharpest curvatures here).
    lam = H2.dense_top(12)
    b = 1 + 0.9 - 0.05 * lam
    disc = np.sqrt((b * b - 4 * 0.9).astype(complex))
    z = np.concatenate([(b + disc) / 2, (b - disc) / 2])
    assert match_error(warm.eigenvalues.numpy(), z) <= 1e-4
    assert warm.n_matvec <= 0.4 * cold, (warm.n_matvec, cold)

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


@pytest.mark.parametrize("k,tol,bound", [(3, 1e-4, 0.5), (4, 1e-6, 0.5)])
def test_eigsh_warm_start_after_perturbation(k, tol, bound):
    # Hessian-like spectrum; the operator moves by 1e-3 (relative, 2-norm) between the calls,
    # as the Hessian does between two monitored training steps.
    S = symmetric_spectrum(powerlaw(600), 0)
    S2 = perturbed(S, 1e-3, seed=1, symmetric=True)
    first = eigsh(S, k=k, tol=tol, generator=torch.Generator().manual_seed(0))
    cold = _cold_mean(eigsh, S2, k=k, tol=tol)
    warm = eigsh(S2, k=k, tol=tol, v0=first.eigenvectors)
    assert warm.converged_all
    ref = np.linalg.eigvalsh(S2)[::-1][:k]
    assert np.allclose(warm.eigenvalues.real.numpy(), ref, rtol=10 * tol)
    assert warm.n_matvec <= bound * cold, (warm.n_matvec, cold)


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
    warm = eigs(J2, v0=first.eigenvectors, **kw)  # complex block: Re and Im parts are used
    assert warm.converged_all
    assert match_error(warm.eigenvalues.numpy(), np.linalg.eigvals(J2)) <= 1e-4
    assert warm.n_matvec <= 0.7 * cold, (warm.n_matvec, cold)


def test_warm_start_from_exact_eigenvectors_is_almost_free():
    S = symmetric_spectrum(powerlaw(600), 3)
    first = eigsh(S, k=4, tol=1e-10, generator=torch.Generator().manual_seed(0))
    again = eigsh(S, k=4, tol=1e-10, v0=first.eigenvectors)
    assert again.converged_all
    assert again.n_matvec <= 0.5 * first.n_matvec

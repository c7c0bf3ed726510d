"""Krylov-Schur ``eigs`` against dense oracles on operators with KNOWN spectra.

Eigenvectors are checked by residual ``||A x - z x||`` (never entry by entry), eigenvalues
against the known spectrum and ``numpy.linalg.eig``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from conftest import TOL, cuda_only
from test_solvers_problems import (
    CountingOperator,
    hb_spectrum,
    heavy_ball_jacobian,
    known_spectrum,
    match_error,
    nearly_defective,
    wanted,
)

import kappa_gpu as kg
from kappa_gpu.diagnostics._conditioning import eigenvalue_condition_numbers, kappa_V
from kappa_gpu.solvers import ConvergenceError, EigResult, eigs


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _check_result(r: EigResult, M: np.ndarray, rtol_res: float):
    """Unit columns, conjugate pairs conjugate, reported residuals = recomputed residuals."""
    X = r.eigenvectors.cpu().to(torch.complex128).numpy()
    z = r.eigenvalues.numpy()
    assert np.allclose(np.linalg.norm(X, axis=0), 1.0, atol=1e-12)
    R = np.linalg.norm(M @ X - X * z, axis=0)
    assert np.allclose(r.residuals.numpy(), R, rtol=1e-6, atol=1e-13 * np.linalg.norm(M, 2))
    assert (R <= rtol_res * np.linalg.norm(M, 2)).all()
    for i, zi in enumerate(z):
        if zi.imag > 0:  # its conjugate follows, with the conjugate vector
            assert z[i + 1] == np.conj(zi)
            assert np.allclose(X[:, i + 1], np.conj(X[:, i]), atol=1e-14)


@pytest.mark.parametrize("cond", [1e2, 1e4])
@pytest.mark.parametrize("which,k", [("LM", 6), ("LR", 4), ("LI", 4), ("SR", 3)])
def test_eigs_known_spectrum(cond, which, k):
    A, z = known_spectrum(200, cond, seed=1)
    if which == "SR":  # the mirror image: a distinct leftmost group
        A, z = -A, -z
    r = eigs(CountingOperator(A), k=k, which=which, tol=1e-12, generator=_gen())
    assert r.converged_all, r.status
    want = wanted(z, which, k)
    got = r.eigenvalues.numpy()
    assert len(got) == len(want)
    assert match_error(got, want) <= 1e-8
    assert match_error(want, got) <= 1e-8
    # ... and the same as dense LAPACK.
    assert match_error(got, np.linalg.eigvals(A)) <= 1e-8
    _check_result(r, A, rtol_res=1e-10)
    assert r.eigenvalues.dtype == torch.complex128
    assert r.eigenvectors.dtype == torch.complex128


@pytest.mark.parametrize("ill", ["bulk", "all"])
def test_eigs_cond_1e6(ill):
    A, z = known_spectrum(200, 1e6, seed=2, ill=ill)
    r = eigs(A, k=5, tol=1e-12, generator=_gen())
    assert r.converged_all, r.status
    got, want = r.eigenvalues.numpy(), wanted(z, "LM", 5)
    dense = np.linalg.eigvals(A)
    err, dense_err = match_error(got, want), match_error(want, dense)
    if ill == "bulk":  # top eigenvalues well conditioned: 1e-8 holds
        assert err <= 1e-8
    else:  # every eigenvalue has condition ~1e6: as accurate as dense LAPACK (~2e-8 here)
        assert err <= 3 * max(dense_err, 1e-12)
    _check_result(r, A, rtol_res=1e-10)


def test_eigs_nearly_defective_pair_kappa_V():
    A, z, V = nearly_defective(200, 1e-4, seed=0)
    ev, Xd = np.linalg.eig(A)
    o = np.argsort(-np.abs(ev))[:2]
    kv_dense = kappa_V(Xd[:, o])
    assert 1.9e4 < kv_dense < 2.1e4
    r = eigs(A, k=2, tol=1e-12, generator=_gen())
    assert r.converged_all
    assert match_error(r.eigenvalues.numpy(), np.array([2.0, 1.8])) <= 1e-8
    assert abs(kappa_V(r.eigenvectors) - kv_dense) <= 1e-4 * kv_dense
    # Already at the default tolerance kappa_V is right to ~1e-5.
    r8 = eigs(A, k=2, generator=_gen())
    assert abs(kappa_V(r8.eigenvectors) - kv_dense) <= 1e-4 * kv_dense


def test_eigs_sigma_inside_cluster():
    # J of heavy ball: bulk piles up at z ~ 1 and z ~ 0.9; sigma = 1 targets the modes farthest
    # from the cluster (the sharp ones), as the generic path of the estimator does.
    J, _ = heavy_ball_jacobian(hb_spectrum())
    ev = np.linalg.eigvals(J)
    for k in (2, 4):
        r = eigs(J, k=k, which="LM", sigma=1.0, tol=1e-12, generator=_gen())
        assert r.converged_all
        got = r.eigenvalues.numpy()
        assert match_error(got, wanted(ev, "LM", k, sigma=1.0)) <= 1e-8
        d = np.abs(got - 1.0)
        assert (np.diff(d) <= 1e-12).all()  # sorted by |z - sigma|, most wanted first
        assert d.min() >= np.sort(np.abs(ev - 1.0))[::-1][len(got) - 1] - 1e-10
        _check_result(r, J, rtol_res=1e-10)
        assert r.sigma == 1.0


def test_eigs_left_eigenvectors_and_condition_numbers():
    A, z = known_spectrum(150, 1e3, seed=3)
    op = CountingOperator(A)
    r = eigs(op, k=5, tol=1e-12, left=True, generator=_gen())
    assert r.converged_all, r.status
    X = r.eigenvectors.numpy()
    Y = r.left_eigenvectors.numpy()
    zz = r.eigenvalues.numpy()
    assert np.allclose(np.linalg.norm(Y, axis=0), 1.0)
    # y^H A = z y^H
    L = np.linalg.norm(Y.conj().T @ A - zz[:, None] * Y.conj().T, axis=1)
    assert (L <= 1e-10 * np.linalg.norm(A, 2)).all()
    assert np.allclose(r.left_residuals.numpy(), L, rtol=1e-6, atol=1e-12 * np.linalg.norm(A, 2))
    assert r.n_rmatvec > 0 and op.rcount >= r.n_rmatvec
    # Eigenvalue condition numbers as dense LAPACK's.
    w, vl, vr = sla.eig(A, left=True, right=True)
    idx = [int(np.argmin(np.abs(w - t))) for t in zz]
    c_dense = eigenvalue_condition_numbers(vr[:, idx], vl[:, idx]).numpy()
    c = eigenvalue_condition_numbers(r.eigenvectors, r.left_eigenvectors).numpy()
    assert np.allclose(c, c_dense, rtol=1e-6)
    assert (c > 1.0).all()
    assert np.allclose(X.conj().T @ X, (X.conj().T @ X).conj().T)


def test_eigs_float32(device):
    A, z = known_spectrum(200, 1e2, seed=4)
    op = CountingOperator(A, device=device, dtype=torch.float32)
    r = eigs(op, k=4, generator=_gen())  # default float32 tol = 1e-4
    assert r.tol == 1e-4
    assert r.converged_all, r.status
    assert r.eigenvectors.dtype == torch.complex64
    assert r.eigenvectors.device.type == torch.device(device).type
    assert match_error(r.eigenvalues.numpy(), wanted(z, "LM", 4)) <= TOL[torch.float32]
    X = r.eigenvectors.cpu().to(torch.complex128).numpy()
    R = np.linalg.norm(A @ X - X * r.eigenvalues.numpy(), axis=0)
    assert (R <= 1e-3 * np.linalg.norm(A, 2)).all()
    assert np.allclose(r.residuals.numpy(), R, rtol=1e-2, atol=1e-5 * np.linalg.norm(A, 2))


def test_eigs_device(device):
    A, z = known_spectrum(120, 1e2, seed=5)
    op = CountingOperator(A, device=device)
    v0 = torch.ones(120, dtype=torch.float64, device=device)
    r = eigs(op, k=3, v0=v0, tol=1e-10)
    assert r.eigenvectors.device.type == torch.device(device).type
    assert r.eigenvalues.device.type == "cpu" and r.residuals.device.type == "cpu"
    assert r.converged_all
    assert match_error(r.eigenvalues.numpy(), wanted(z, "LM", 3)) <= 1e-8


@cuda_only
def test_eigs_cuda_matches_cpu():
    A, _ = known_spectrum(150, 1e3, seed=6)
    v0 = torch.linspace(-1, 1, 150, dtype=torch.float64)
    rc = eigs(CountingOperator(A), k=4, v0=v0, tol=1e-12, left=True)
    rg = eigs(CountingOperator(A, device="cuda"), k=4, v0=v0.cuda(), tol=1e-12, left=True)
    assert torch.allclose(rc.eigenvalues, rg.eigenvalues, rtol=1e-10)
    assert rg.eigenvectors.is_cuda and rg.left_eigenvectors.is_cuda
    assert abs(rc.n_matvec - rg.n_matvec) <= 2
    assert np.isclose(kappa_V(rc.eigenvectors), kappa_V(rg.eigenvectors), rtol=1e-6)


@pytest.mark.parametrize("block_size", [2, 3])
def test_eigs_block(block_size):
    A, z = known_spectrum(200, 1e2, seed=7)
    op = CountingOperator(A)
    r = eigs(op, k=4, block_size=block_size, tol=1e-11, generator=_gen())
    assert r.converged_all, r.status
    assert match_error(r.eigenvalues.numpy(), wanted(z, "LM", 4)) <= 1e-8
    _check_result(r, A, rtol_res=1e-10)
    # All iteration work went through batched applications.
    assert op.matmat_calls * block_size >= r.n_matvec
    assert r.hessenberg.shape[0] == r.hessenberg.shape[1] + block_size


def test_eigs_invariant_subspace_breakdown():
    # v0 in a 3-dimensional invariant subspace that does NOT hold the largest eigenvalues:
    # Arnoldi breaks down after 3 steps and must go on with a random vector.
    n = 60
    d = np.concatenate([[0.5, 0.4, 0.3], np.linspace(1.0, 3.0, n - 3)])
    A = np.diag(d)
    v0 = torch.zeros(n, dtype=torch.float64)
    v0[:3] = 1.0
    r = eigs(A, k=3, v0=v0, tol=1e-12, generator=_gen())
    assert r.converged_all
    assert np.allclose(np.sort(r.eigenvalues.real.numpy()), [d[-3], d[-2], d[-1]])
    assert "invariant subspace" in r.status


def test_eigs_whole_space():
    A, z = known_spectrum(12, 10.0, seed=8)
    r = eigs(A, k=4, ncv=12, generator=_gen(), tol=1e-12)  # ncv = n: an exact factorization
    assert r.converged_all
    assert match_error(r.eigenvalues.numpy(), wanted(z, "LM", 4)) <= 1e-10


def test_eigs_pairs_never_split():
    A, z = known_spectrum(100, 10.0, seed=9, top=(3.0, 2.0 + 1.0j))
    r = eigs(A, k=2, tol=1e-10, generator=_gen())  # the 2nd wanted is half a pair
    assert r.k == 3
    z3 = r.eigenvalues.numpy()
    assert z3[1] == np.conj(z3[2])
    assert np.isfinite(kappa_V(r.eigenvectors))


def test_eigs_hessenberg_is_the_rayleigh_quotient():
    A, z = known_spectrum(100, 10.0, seed=10)
    r = eigs(A, k=3, tol=1e-12, generator=_gen())
    H = r.hessenberg
    m = H.shape[1]
    assert H.shape == (m + 1, m) and H.dtype == np.float64
    ritz = np.linalg.eigvals(H[:m])
    assert match_error(r.eigenvalues.numpy(), ritz) <= 1e-12


def test_eigs_not_converged_keeps_partial_and_says_what_to_raise():
    A, _ = known_spectrum(300, 1e2, seed=11, top=(), radius=1.0)  # no gap at all
    r = eigs(A, k=6, ncv=14, maxiter=2, tol=1e-14, generator=_gen())
    assert not r.converged_all
    assert r.n_restarts == 2
    for word in ("maxiter", "ncv", "tol"):
        assert word in r.status
    assert r.eigenvectors.shape[1] == r.k and torch.isfinite(r.residuals).all()
    with pytest.raises(ConvergenceError) as info:
        eigs(A, k=6, ncv=14, maxiter=2, tol=1e-14, generator=_gen(), strict=True)
    assert isinstance(info.value.result, EigResult)
    assert not info.value.result.converged_all


def test_eigs_counts_and_repr():
    A, _ = known_spectrum(100, 10.0, seed=12)
    op = CountingOperator(A)
    r = eigs(op, k=3, tol=1e-10, generator=_gen())
    assert op.count == r.n_matvec + r.n_matvec_certify
    assert r.n_matvec_certify == r.k  # one per real eigenvalue, two per pair shared by 2
    assert "converged" in repr(r) and r.seconds > 0


def test_eigs_smallest_distance_to_sigma():
    # "SM": interior target, no inversion; fine on a small operator with ncv = n / 2.
    A, z = known_spectrum(60, 10.0, seed=13)
    r = eigs(A, k=2, which="SM", sigma=2.25, ncv=30, tol=1e-10, generator=_gen())
    assert r.converged_all
    d = np.sort(np.abs(z - 2.25))
    assert np.allclose(np.sort(np.abs(r.eigenvalues.numpy() - 2.25))[:2], d[:2], rtol=1e-8)


# -- the Krylov basis: CGS2 in place, its refinement and breakdown paths, the panelled restart --
def _ks_basis(A, k, ncv, dtype, seed=0, which="LM", sigma=None, tol=None):
    """One Krylov-Schur run (restarts included) and the basis it leaves: ``(run, basis)``."""
    from kappa_gpu.solvers._common import resolve_tol, start_block
    from kappa_gpu.solvers._krylov_schur import _ks_run

    gen = _gen(seed)
    X0, _ = start_block(None, A, 1, gen, "eigs")
    run = _ks_run(A, k, which, sigma, X0, ncv, 10_000, resolve_tol(tol, dtype), 1, gen, "eigs")
    return run, run.basis


def _orthogonality(basis, rows: int) -> float:
    V = basis.V[:rows].to(torch.float64)
    return float((V @ V.T - torch.eye(rows, dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cgs2_basis_orthonormal_and_arnoldi_relation_after_restarts(dtype):
    # Non-normal (cond(V) = 1e4; 1e2 in float32, whose rounding of A alone moves eigenvalues by
    # cond eps), restarts: the basis stays orthonormal at working precision, A V_m = V_{m+1} H
    # holds to rounding, the Ritz values are numpy's eigenvalues of the same (rounded) matrix.
    import kappa_gpu as kg

    A, z = known_spectrum(300, 1e4 if dtype == torch.float64 else 1e2, seed=21)
    op = kg.aslinearoperator(torch.as_tensor(A, dtype=dtype))
    eps = float(torch.finfo(dtype).eps)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    run, basis = _ks_basis(op, 6, 16, dtype, tol=tol)
    assert basis.n_restarts >= 1 and run.nconv == len(run.theta)
    m = run.m
    assert _orthogonality(basis, m + 1) <= 50 * eps
    V = basis.V[: m + 1].to(torch.float64).numpy().T  # n x (m + 1)
    H = basis.H[: m + 1, :m]
    Ad = op.to_dense().to(torch.float64).numpy()  # A as the solver sees it
    rel = np.linalg.norm(Ad @ V[:, :m] - V @ H) / np.linalg.norm(Ad, 2)
    assert rel <= 100 * eps
    agree = 1e-9 if dtype == torch.float64 else 1e-4
    assert match_error(run.theta, wanted(np.linalg.eigvals(Ad), "LM", 6)) <= agree
    r = eigs(op, k=6, ncv=16, tol=tol, generator=_gen())
    assert r.converged_all
    assert match_error(r.eigenvalues.numpy(), wanted(z, "LM", 6)) <= agree


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("delta", ["exact", 0.0, 1e-17, 1e-14, 1e-9, 1e-3, 10.0])
def test_orthogonalize_refinement_and_breakdown_paths(dtype, delta, monkeypatch):
    # w = V_k a + delta ||V_k a|| u (u orthogonal to V_k): from a vector in the span, exactly
    # ("exact": V_k = unit vectors, the passes cancel to 0: a breakdown, a random unit vector
    # comes back) or to rounding (refinement passes; rounding noise is kept as a new direction
    # with beta ~ eps ||w||, as ARPACK's DGKS does), through near-breakdowns to a plain vector.
    # Whatever the path: the result is unit and orthogonal to V_k at working precision, and
    # w = V_k^T h + beta v.
    import kappa_gpu as kg
    from kappa_gpu.solvers._basis import KrylovBasis

    n, k = 400, 12
    eps = float(torch.finfo(dtype).eps)
    g = torch.Generator().manual_seed(3)
    if delta == "exact":
        Q = torch.eye(n, k + 1, dtype=torch.float64)
    else:
        Q, _ = torch.linalg.qr(torch.randn(n, k + 1, dtype=torch.float64, generator=g))
    op = kg.aslinearoperator(lambda x: x, shape=(n, n), dtype=dtype)
    b = KrylovBasis(op, k + 4, 1, torch.Generator().manual_seed(4), "test")
    b.V[:k] = Q[:, :k].T.to(dtype)
    a = torch.randn(k, dtype=torch.float64, generator=g)
    d = 0.0 if delta == "exact" else delta
    w64 = Q[:, :k] @ a + d * float(a.norm()) * Q[:, k]
    w = w64.to(dtype)
    passes = []  # one product V_k x per Gram-Schmidt pass
    mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: passes.append(1) or mv(*a))
    h, beta, v = b._orthogonalize(w.clone(), 0, k, 0)
    monkeypatch.undo()
    Vk = b.V[:k].to(torch.float64)
    v64 = v.to(torch.float64)
    assert abs(float(v64.norm()) - 1.0) <= 10 * eps
    assert float((Vk @ v64).abs().max()) <= 10 * eps
    resid = w.to(torch.float64) - Vk.T @ torch.as_tensor(h) - beta * v64
    assert float(resid.norm()) <= 20 * eps * float(w64.norm())
    if delta == "exact":
        assert beta == 0.0 and b.n_breakdowns == 1 and len(passes) == 3
        assert v.data_ptr() != b.V[k].data_ptr()  # a fresh random vector
    elif d * float(a.norm()) <= eps * float(w64.norm()):  # below rounding: noise, or breakdown
        assert beta <= 10 * eps * float(w64.norm())
    else:
        assert beta > 0 and b.n_breakdowns == 0
        assert beta == pytest.approx(d * float(a.norm()), rel=max(1e-6, 100 * eps / d))
        assert v.data_ptr() == b.V[k].data_ptr()  # in place in its row
    if d == 1e-3:
        assert len(passes) == 2  # the first pass cancelled 1 - 1e-6 of the norm: refined once
    if d == 10.0:
        assert len(passes) == 1  # it cancelled 1%: no refinement


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("s,m,p", [(1, 20, 12), (1, 20, 20), (2, 10, 9), (1, 12, 1)])
def test_restart_panels_equal_the_dense_product(dtype, s, m, p):
    # n spans several 2^14-column panels (and a ragged last one): the in-place panelled
    # V[:p] = Z^T V[:m] equals the one-shot product; the residual rows move to p .. p + s - 1.
    import kappa_gpu as kg
    from kappa_gpu.solvers._basis import KrylovBasis

    n = 3 * (1 << 14) + 77
    op = kg.aslinearoperator(lambda x: x, shape=(n, n), dtype=dtype)
    b = KrylovBasis(op, m, s, None, "test")
    g = torch.Generator().manual_seed(5)
    b.V.copy_(torch.randn(m + s, n, dtype=dtype, generator=g))
    b.H[:] = np.random.default_rng(5).standard_normal(b.H.shape)
    V0 = b.V.clone().to(torch.float64)
    Z, _ = np.linalg.qr(np.random.default_rng(6).standard_normal((m, m)))
    Z1 = Z[:, :p]
    b.restart(m, Z1, np.eye(p))
    want = torch.as_tensor(Z1.T) @ V0[:m]
    eps = float(torch.finfo(dtype).eps)
    err = float((b.V[:p].to(torch.float64) - want).abs().max())
    assert err <= 50 * eps * float(want.abs().max())
    if p != m:
        assert torch.equal(b.V[p : p + s].to(torch.float64), V0[m : m + s])
    assert b.p == p and b.n_restarts == 1


def test_eigs_float32_large_n_basis_stays_orthonormal():
    # A matrix-free heavy-ball J with a diagonal Hessian (n = 2 x 20,000: restarts run over
    # three panels): its eigenvalues in closed form (roots of the 2x2 blocks, and numpy's eig
    # of them); float32 Krylov-Schur finds the largest |z| and keeps the basis orthonormal.
    import kappa_gpu as kg

    n2, eta, mu = 20_000, 0.05, 0.9
    rng = np.random.default_rng(8)
    s = np.concatenate([[-2.0, -1.5, -1.2, -1.0], rng.uniform(0.0, 8.0, n2 - 4)])
    st = torch.as_tensor(s, dtype=torch.float32)

    def mv(x):
        th, bu = x[:n2], x[n2:]
        hx = st * th
        return torch.cat([th - eta * hx - eta * mu * bu, hx + mu * bu])

    op = kg.aslinearoperator(mv, shape=(2 * n2, 2 * n2), dtype=torch.float32)
    blocks = [np.array([[1 - eta * si, -eta * mu], [si, mu]]) for si in s[:4]]
    top = np.concatenate([np.linalg.eigvals(B) for B in blocks])
    top = top[np.argsort(-np.abs(top))][:4]
    run, basis = _ks_basis(op, 4, 20, torch.float32, tol=1e-5)
    assert run.nconv == len(run.theta) and basis.n_restarts >= 1
    assert _orthogonality(basis, run.m + 1) <= 40 * float(torch.finfo(torch.float32).eps)
    assert match_error(run.theta, top) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orthogonalize_eager_refinement_agrees_with_waiting(dtype):
    # After a step that needed the refinement the next one refines without waiting for its
    # test; on a sequence mixing steps that need it and steps that do not, the results equal
    # those of always waiting (up to rounding: an unneeded refinement moves nothing).
    import kappa_gpu as kg
    from kappa_gpu.solvers._basis import KrylovBasis

    n, k = 300, 8
    eps = float(torch.finfo(dtype).eps)
    g = torch.Generator().manual_seed(11)
    Q, _ = torch.linalg.qr(torch.randn(n, k + 1, dtype=torch.float64, generator=g))
    op = kg.aslinearoperator(lambda x: x, shape=(n, n), dtype=dtype)
    bases = [KrylovBasis(op, k + 2, 1, None, "test") for _ in range(2)]
    for b in bases:
        b.V[:k] = Q[:, :k].T.to(dtype)
    eager_calls = 0
    for d in [1e-3, 1e-2, 10.0, 1e-4, 1e-4, 3.0, 1e-3]:
        a = torch.randn(k, dtype=torch.float64, generator=g)
        w = (Q[:, :k] @ a + d * float(a.norm()) * Q[:, k]).to(dtype)
        eager_calls += bases[1]._refine_next
        bases[0]._refine_next = False  # always wait for the test
        out = [b._orthogonalize(w.clone(), 0, k, 0) for b in bases]
        (h0, b0, v0), (h1, b1, v1) = out
        assert np.allclose(h0, h1, rtol=0, atol=10 * eps * float(a.norm()))
        assert b1 == pytest.approx(b0, rel=100 * eps / d)
        assert float((v0 - v1).abs().max()) <= 100 * eps / d
        assert float((bases[1].V[:k] @ v1).abs().max()) <= 10 * eps
    assert eager_calls >= 3  # the eager path was taken


def test_block_warm_start_with_nearly_parallel_residuals_keeps_the_basis_orthonormal():
    """Block Lanczos/Arnoldi from nearly invariant vectors whose residuals are nearly parallel:
    the in-block projection cancels most of each column, and without one more pass against the
    whole basis the float64 basis lost orthogonality to ~1e-7 and the Ritz estimates fell 10-100x
    below the true residuals (a converged flag that the residuals contradict)."""
    from kappa_gpu.solvers import eigsh as _eigsh

    rng = np.random.default_rng(5)
    n = 193
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = np.concatenate([[10.0, 9.5, 9.0, 8.7], rng.uniform(-1.0, 5.0, n - 4)])
    M = (Q * d) @ Q.T
    A = kg.aslinearoperator(torch.from_numpy(M))
    # Ritz vectors of a loose single-vector run: their residuals are all parallel to the next
    # Lanczos vector (rank one, up to rounding).
    X0 = _eigsh(A, k=4, tol=1e-5, generator=torch.Generator().manual_seed(0)).eigenvectors
    for solver, kw in ((_eigsh, {}), (eigs, {"which": "LR"})):
        r = solver(A, k=4, tol=5e-9, v0=X0, block_size=4, ncv=20, **kw)
        assert r.converged_all, r.status
        res, est = r.residuals.numpy(), r.ritz_estimates.numpy()
        # The estimates the convergence test used describe the returned vectors.
        assert np.all(res <= 5e-9 * np.abs(r.eigenvalues.numpy()) + 1e-13), (res, est)
        assert np.allclose(np.sort(r.eigenvalues.real.numpy())[::-1], d[:4], rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_first_step_symmetric_same_decomposition_fewer_sweeps(dtype, monkeypatch):
    # Thick-restart Lanczos on a symmetric matrix with a clustered top (a Hessian's shape): the
    # local-first step gives an orthonormal basis and the Lanczos relation A V_m = V_{m+1} H at
    # working precision, the same Ritz values as the plain full Gram-Schmidt, and its DGKS
    # second pass fires on a few steps instead of nearly all (two sweeps per step, not four).
    import kappa_gpu as kg
    from kappa_gpu.solvers import _basis
    from kappa_gpu.solvers._lanczos import eigsh

    n, k = 400, 6
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([1.0 - 0.01 * np.arange(10), 0.2 * rng.random(n - 10)])
    A = (Q * lam) @ Q.T
    op = kg.aslinearoperator(torch.as_tensor((A + A.T) / 2, dtype=dtype))
    eps = float(torch.finfo(dtype).eps)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    refines = {}
    real = _basis.KrylovBasis._orthogonalize

    def counting(self, w, lo, col, j):
        out = real(self, w, lo, col, j)
        key = "symmetric" if self.symmetric else "plain"
        refines[key] = refines.get(key, 0) + int(self._refine_next)
        return out

    monkeypatch.setattr(_basis.KrylovBasis, "_orthogonalize", counting)
    r = eigsh(op, k=k, ncv=16, tol=tol, generator=_gen())
    real_init = _basis.KrylovBasis.__init__

    def plain_init(self, *a, **kw):
        kw["symmetric"] = False
        real_init(self, *a, **kw)

    monkeypatch.setattr(_basis.KrylovBasis, "__init__", plain_init)
    r_plain = eigsh(op, k=k, ncv=16, tol=tol, generator=_gen())
    assert r.converged_all and r_plain.converged_all
    top = np.sort(lam)[::-1][:k]
    assert match_error(r.eigenvalues.numpy(), top) <= (1e-12 if dtype == torch.float64 else 1e-5)
    assert match_error(r.eigenvalues.numpy(), r_plain.eigenvalues.numpy()) <= 100 * eps
    assert r.n_matvec <= r_plain.n_matvec + 2
    assert float(r.residuals.max()) <= 10 * tol
    assert refines["symmetric"] <= refines["plain"] / 3, refines
    print(f"DGKS second passes: local-first {refines['symmetric']}, plain {refines['plain']}")

    # the decomposition itself, after restarts: orthonormal, and the Lanczos relation
    monkeypatch.setattr(_basis.KrylovBasis, "__init__", real_init)
    b = _basis.KrylovBasis(op, 16, 1, _gen(), "test", symmetric=True)
    x0 = torch.as_tensor(rng.standard_normal(n), dtype=dtype)
    b.start((x0 / x0.norm())[:, None])
    m = b.expand(16)
    assert _orthogonality(b, m + 1) <= 50 * eps
    V = b.V[: m + 1].to(torch.float64).numpy().T
    rel = np.linalg.norm(A @ V[:, :m] - V @ b.H[: m + 1, :m]) / np.linalg.norm(A, 2)
    assert rel <= 100 * eps


# -- stopping and certification -----------------------------------------------------------------
def _powerlaw_symmetric(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q / np.arange(1, n + 1) ** 0.5) @ Q.T


@pytest.mark.parametrize("solver_name", ["eigsh", "eigs"])
def test_a_restarted_run_stops_mid_cycle(solver_name):
    """The convergence test runs after every step, also after a restart: a restarted run ends
    as soon as its last wanted value converges, before its cycle is full (ARPACK tests at full
    cycles only). Oracle: dense eigenvalues and the true residuals."""
    from kappa_gpu.solvers import eigsh

    rng = np.random.default_rng(1)
    S = _powerlaw_symmetric(1500)
    M = S if solver_name == "eigsh" else S + 0.3 * rng.standard_normal(S.shape) / np.sqrt(1500)
    A = kg.aslinearoperator(torch.from_numpy(M))
    solver = eigsh if solver_name == "eigsh" else eigs
    ncv, tol, k = 16, 1e-8, 6
    stopped_early = 0
    for seed in range(3):
        r = solver(A, k=k, tol=tol, ncv=ncv, generator=torch.Generator().manual_seed(seed))
        assert r.converged_all and r.n_restarts >= 1, r.status
        stopped_early += r.hessenberg.shape[1] < ncv
        ref = np.linalg.eigvals(M)
        ref = ref[np.argsort(-np.abs(ref) if solver_name == "eigs" else -ref.real)][:k]
        assert match_error(r.eigenvalues.numpy(), ref) <= 1e-7
        rel = (r.residuals / r.eigenvalues.abs()).numpy()
        assert np.all(rel <= tol), rel
    assert stopped_early == 3  # measured: all three stop 1-3 steps before a full cycle


def _noisy(S: torch.Tensor, delta: float) -> kg.LinearOperator:
    """``S x`` plus a reproducible relative error of size ``delta`` per product."""
    g = torch.Generator().manual_seed(5)
    n = S.shape[0]

    def mv(x):
        y = S @ x
        noise = torch.randn(y.shape, generator=g, dtype=y.dtype)
        return y + delta * noise * y.norm(dim=0) / np.sqrt(n)

    return kg.aslinearoperator(mv, shape=(n, n), dtype=torch.float64)


@pytest.mark.parametrize("solver_name", ["eigsh", "eigs"])
def test_a_certificate_that_barely_misses_continues_the_run(solver_name):
    """Products with an error of 0.6 tol: the Ritz estimates pass, one true residual misses tol
    (by up to ~1.3x); the run continues with a tightened test and certifies again (2 k
    certificate products), and then every true residual meets tol."""
    from kappa_gpu.solvers import eigsh

    S = torch.from_numpy(_powerlaw_symmetric(400))
    solver = eigsh if solver_name == "eigsh" else eigs
    tol, k = 1e-8, 4
    r = solver(_noisy(S, 0.6 * tol), k=k, tol=tol, generator=torch.Generator().manual_seed(0))
    assert r.n_matvec_certify == 2 * k, r.n_matvec_certify  # it did continue
    assert r.converged_all and "exceed tol" not in r.status, r.status
    rel = (r.residuals / r.eigenvalues.abs()).numpy()
    assert np.all(rel <= tol), rel
    ref = np.linalg.eigvalsh(S.numpy())[::-1][:k]
    assert match_error(r.eigenvalues.numpy(), ref) <= 1e-7


@pytest.mark.parametrize("solver_name", ["eigsh", "eigs"])
def test_a_noisy_operator_is_reported_not_iterated_forever(solver_name):
    """Products with an error of 100 tol: no continuation can cure that; the run ends at its
    normal cost, with one set of certificates, and the status says what the residuals show."""
    from kappa_gpu.solvers import eigsh

    S = torch.from_numpy(_powerlaw_symmetric(400))
    solver = eigsh if solver_name == "eigsh" else eigs
    tol, k = 1e-8, 4
    r = solver(_noisy(S, 100 * tol), k=k, tol=tol, generator=torch.Generator().manual_seed(0))
    assert r.n_matvec < 60 and r.n_matvec_certify == k, (r.n_matvec, r.n_matvec_certify)
    assert "true residuals (.residuals) exceed tol" in r.status, r.status
    rel = (r.residuals / r.eigenvalues.abs()).numpy()
    assert np.all(rel > tol)  # what the status says


def test_a_defective_eigenvalue_is_named_not_blamed_on_noise():
    """A 2x2 Jordan block at the top of an orthogonally rotated diagonal: no eigenvector of it
    has a residual below about sqrt(eps) |z|, so tol=1e-10 is missed by the true residuals. The
    status says the eigenvalue is defective, not that the products are noisy (they are exact
    float64 here)."""
    rng = np.random.default_rng(0)
    D = np.diag(np.linspace(0.1, 1.0, 60))
    D[-1, -1] = D[-2, -2] = 2.0
    D[-2, -1] = 1.0
    Q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    r = eigs(torch.from_numpy(Q @ D @ Q.T), k=2, tol=1e-10,
             generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(r.eigenvalues.numpy(), 2.0, atol=1e-7)
    assert np.all(r.residuals.numpy() > 1e-10 * 2)  # what the status explains
    assert "defective" in r.status and "noisy" not in r.status, r.status
    assert "carry errors" not in r.status, r.status


def test_a_continuation_that_does_not_help_returns_the_first_certificate():
    """float32, tol 1e-5, "BE": the first certificate misses tol by 1.002x on one pair (Ritz
    estimate 0.997 tol: rounding); the tightened continuation ends with that pair's estimate
    just above tol. The better outcome, the first one, is returned (flags as they were), and
    the status says so instead of "raise maxiter". Oracle: float64 residuals."""
    from kappa_gpu.solvers import eigsh

    rng = np.random.default_rng(0)
    n = 1500
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.concatenate([rng.uniform(-1, 1, n - 6), [1.5, 1.55, 1.6, 1.7, 1.8, 2.0]])
    S = (Q * ev) @ Q.T
    S = 0.5 * (S + S.T)
    tol = 1e-5
    r = eigsh(torch.tensor(S, dtype=torch.float32), k=4, which="BE", tol=tol,
              generator=torch.Generator().manual_seed(2))
    assert r.n_matvec_certify == 8  # it certified twice
    assert r.converged_all and "first certificate's pairs are returned" in r.status, r.status
    assert "raise maxiter" not in r.status
    X, z = r.eigenvectors.double().numpy(), r.eigenvalues.real.numpy()
    true = np.linalg.norm(S @ X - X * z, axis=0) / (tol * np.abs(z))
    assert np.all(true <= 1.01), true  # rounding-level misses at most
    ref = np.sort(np.linalg.eigvalsh(S))
    np.testing.assert_allclose(np.sort(z), np.sort(np.r_[ref[-2:], ref[:2]]), rtol=1e-5)


def test_left_eigenvectors_below_the_adjoints_rounding_floor_are_said_so():
    """A badly scaled operator (an off-diagonal block of 1e12): the right run, started in the
    first block's invariant subspace, converges; the adjoint's left eigenvectors are dominated
    by the huge block and their residuals cannot reach tol |z| (eps ||A|| ~ 1e-3). The status
    names the rounding floor instead of advising more ncv or maxiter."""
    rng = np.random.default_rng(0)
    n = 60
    A = np.zeros((2 * n, 2 * n))
    A[:n, :n] = np.diag(np.linspace(2, 3, n))
    A[n:, n:] = np.diag(np.linspace(0, 1, n))
    A[:n, n:] = 1e12 * rng.standard_normal((n, n))
    v0 = np.zeros(2 * n)
    v0[:n] = rng.standard_normal(n)
    r = eigs(torch.from_numpy(A), k=2, which="LM", tol=1e-10, left=True, v0=torch.from_numpy(v0))
    assert np.allclose(np.sort(r.eigenvalues.real.numpy()), [3 - 1 / 59, 3], atol=1e-9)
    assert not bool(r.converged.any())
    assert "rounding eps ||A||" in r.status and "not a matter of ncv or maxiter" in r.status
    assert "raise ncv or maxiter" not in r.status


def test_the_rounding_floor_is_not_claimed_when_the_adjoint_run_ran_out_of_restarts():
    """A well-conditioned float32 matrix at tol 1e-7 with maxiter too small: eps ||H|| is near
    tol |z| but the cure is more restarts (maxiter=50 converges); the status must say so, not
    'not a matter of ncv or maxiter' (a review case, where it said both)."""
    A = torch.randn(200, 200, generator=torch.Generator().manual_seed(0)) / np.sqrt(200)
    for maxiter in (2, 3, 5):
        r = eigs(A, k=6, which="LR", tol=1e-7, ncv=16, left=True, maxiter=maxiter,
                 generator=torch.Generator().manual_seed(0))
        assert "not a matter of ncv or maxiter" not in r.status
        assert "raise ncv or maxiter" in r.status

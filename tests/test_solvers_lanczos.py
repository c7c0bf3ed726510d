"""Thick-restart Lanczos ``eigsh`` against ``numpy.linalg.eigh``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TOL, cuda_only
from test_solvers_problems import CountingOperator, powerlaw, symmetric_spectrum

import kappa_gpu as kg
from kappa_gpu.solvers import ConvergenceError, eigsh


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _sym(n=300, seed=0):
    rng = np.random.default_rng(seed)
    top, bottom = [9.0, 8.0, 7.5, 7.0, 6.6], [-8.3, -7.2, -6.8]
    s = np.concatenate([top, rng.uniform(-3.0, 3.0, n - 8), bottom])
    return symmetric_spectrum(s, seed), np.sort(s)


def _want(ev, which, k):
    if which == "LA":
        return ev[::-1][:k]
    if which == "SA":
        return ev[:k]
    if which == "LM":
        return ev[np.lexsort((-ev, -np.abs(ev)))][:k]
    if which == "BE":
        return np.sort(np.concatenate([ev[::-1][: (k + 1) // 2], ev[: k // 2]]))[::-1]
    raise ValueError(which)


@pytest.mark.parametrize("reorth", ["full", "selective"])
@pytest.mark.parametrize("which,k", [("LA", 5), ("SA", 3), ("LM", 6), ("BE", 5), ("LA", 1)])
def test_eigsh_vs_eigh(which, k, reorth):
    S, s = _sym()
    ev = np.linalg.eigvalsh(S)
    op = CountingOperator(S)
    # Selective mode is certified by its true residuals, which a semi-orthogonal basis keeps
    # near sqrt(eps) ||A|| x its loss of orthogonality: ~1e-10 relative here, so tol 1e-9.
    tol = 1e-12 if reorth == "full" else 1e-9
    r = eigsh(op, k=k, which=which, tol=tol, reorth=reorth, generator=_gen())
    assert r.converged_all, r.status
    z = r.eigenvalues.numpy()
    assert r.eigenvalues.dtype == torch.complex128 and (z.imag == 0).all()
    assert np.allclose(z.real, _want(ev, which, k), rtol=1e-10, atol=0)
    assert np.abs(z.real - _want(s, which, k)).max() <= 1e-8 * np.abs(s).max()
    X = r.eigenvectors.numpy()
    assert not r.eigenvectors.is_complex()
    assert np.allclose(np.linalg.norm(X, axis=0), 1.0)
    R = np.linalg.norm(S @ X - X * z.real, axis=0)
    assert np.allclose(r.residuals.numpy(), R, rtol=1e-6, atol=1e-14 * 9)
    assert (R <= 1e-9 * 9).all()
    assert np.abs(X.T @ X - np.eye(k)).max() <= 1e-8
    assert op.count == r.n_matvec + r.n_matvec_certify


def test_eigsh_clustered_top(device):
    # A semicircle: the top of the spectrum is clustered, several restarts are needed.
    rng = np.random.default_rng(3)
    G = rng.standard_normal((400, 400))
    S = (G + G.T) / np.sqrt(800)
    ev = np.linalg.eigvalsh(S)
    r = eigsh(CountingOperator(S, device=device), k=4, tol=1e-10, generator=_gen())
    assert r.converged_all and r.n_restarts > 0
    assert np.allclose(r.eigenvalues.real.numpy(), ev[::-1][:4], rtol=1e-12, atol=1e-12)
    assert r.eigenvectors.device.type == torch.device(device).type


@pytest.mark.parametrize("block_size", [2, 4])
def test_eigsh_block(block_size):
    S, _ = _sym(seed=1)
    ev = np.linalg.eigvalsh(S)
    op = CountingOperator(S)
    r = eigsh(op, k=4, block_size=block_size, tol=1e-11, generator=_gen())
    assert r.converged_all, r.status
    assert np.allclose(r.eigenvalues.real.numpy(), ev[::-1][:4], rtol=1e-10)
    assert op.matmat_calls * block_size >= r.n_matvec


def test_eigsh_float32(device):
    S, _ = _sym(seed=2)
    ev = np.linalg.eigvalsh(S)
    r = eigsh(CountingOperator(S, device=device, dtype=torch.float32), k=4, which="SA",
              generator=_gen())
    assert r.tol == 1e-4 and r.converged_all
    assert r.eigenvectors.dtype == torch.float32
    assert np.allclose(r.eigenvalues.real.numpy(), ev[:4], rtol=TOL[torch.float32])
    X = r.eigenvectors.cpu().double().numpy()
    R = np.linalg.norm(S @ X - X * r.eigenvalues.real.numpy(), axis=0)
    assert (R <= 1e-3 * np.abs(ev).max()).all()


def test_eigsh_hessian_like_spectrum_selective_equals_full():
    s = powerlaw(500)
    S = symmetric_spectrum(s, 4)
    r1 = eigsh(S, k=8, tol=1e-10, generator=_gen())
    r2 = eigsh(S, k=8, tol=1e-10, generator=_gen(), reorth="selective")
    assert np.allclose(r1.eigenvalues.real.numpy(), np.sort(s)[::-1][:8], rtol=1e-10)
    assert np.allclose(r2.eigenvalues.real.numpy(), r1.eigenvalues.real.numpy(), rtol=1e-10)
    assert abs(r1.n_matvec - r2.n_matvec) <= 2


def test_eigsh_not_converged_and_strict():
    rng = np.random.default_rng(5)
    G = rng.standard_normal((300, 300))
    S = (G + G.T) / 2
    r = eigsh(S, k=5, ncv=8, maxiter=1, tol=1e-14, generator=_gen())
    assert not r.converged_all and "maxiter" in r.status and "ncv" in r.status
    with pytest.raises(ConvergenceError) as info:
        eigsh(S, k=5, ncv=8, maxiter=1, tol=1e-14, generator=_gen(), strict=True)
    assert info.value.result.k == 5


def test_eigsh_hessenberg_symmetric():
    S, _ = _sym(seed=6)
    r = eigsh(S, k=3, tol=1e-12, generator=_gen())
    H = r.hessenberg
    m = H.shape[1]
    assert H.shape == (m + 1, m)
    assert np.allclose(H[:m], H[:m].T)
    assert np.allclose(np.sort(np.linalg.eigvalsh(H[:m]))[::-1][:3], r.eigenvalues.real.numpy())


@cuda_only
def test_eigsh_cuda_matches_cpu():
    S, _ = _sym(seed=7)
    v0 = torch.linspace(-1, 1, S.shape[0], dtype=torch.float64)
    rc = eigsh(CountingOperator(S), k=5, v0=v0, tol=1e-12)
    rg = eigsh(CountingOperator(S, device="cuda"), k=5, v0=v0.cuda(), tol=1e-12)
    assert torch.allclose(rc.eigenvalues, rg.eigenvalues, rtol=1e-12)
    assert rg.eigenvectors.is_cuda and abs(rc.n_matvec - rg.n_matvec) <= 2


def test_eigsh_smallest_magnitude():
    s = np.concatenate([[0.01, -0.02, 0.03], np.linspace(1.0, 5.0, 57)])
    S = symmetric_spectrum(s, 8)
    r = eigsh(S, k=3, which="SM", ncv=40, tol=1e-10, generator=_gen())
    assert r.converged_all
    assert np.allclose(np.sort(r.eigenvalues.real.numpy()), [-0.02, 0.01, 0.03], atol=1e-10)
    assert np.abs(r.eigenvalues.real.numpy()).tolist() == sorted(np.abs(r.eigenvalues.real.numpy()))


def test_eigsh_returns_the_certificate_products():
    """``EigResult.images`` is ``A X`` from the certification (no extra matvec to reuse it)."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(80, 80, generator=g, dtype=torch.float64)
    M = M + M.T
    r = eigsh(kg.aslinearoperator(M), k=4, generator=g)
    assert r.images is not None and r.images.shape == r.eigenvectors.shape
    assert torch.allclose(r.images, M @ r.eigenvectors, rtol=0, atol=1e-12)
    R = r.images - r.eigenvectors * r.eigenvalues.real
    assert torch.allclose(torch.linalg.vector_norm(R, dim=0), r.residuals, rtol=1e-10, atol=1e-14)


def test_selective_reorth_certifies_by_true_residuals():
    """reorth='selective' in float32: Ritz estimates can pass while the vectors' true residuals
    are several times tol (semi-orthogonal basis). Such pairs must come back unconverged, with a
    status naming the fix; reorth='full' converges them (oracle: the true residuals)."""
    import torch.nn as nn
    import torch.nn.functional as F

    from kappa_gpu._estimate import _sym_operator
    from kappa_gpu.operators import update_operator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 96), nn.GELU(),
                          nn.Linear(96, 10))
    x = torch.randn(512, 256)
    y = (x @ torch.randn(256, 10)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    S, _ = _sym_operator(update_operator(model, opt, F.cross_entropy, (x[:64], y[:64])).structure())
    tol = 2.5e-5
    runs = {r: eigsh(S, k=8, tol=tol, ncv=24, reorth=r, generator=torch.Generator().manual_seed(0))
            for r in ("full", "selective")}
    for r in runs.values():
        rel = (r.residuals / r.eigenvalues.real.abs()).numpy()
        # Every pair flagged converged really is, by its true residual.
        assert np.all(rel[r.converged.numpy()] <= tol * (1 + 1e-6)), rel
    assert runs["full"].converged_all, runs["full"].status
    sel = runs["selective"]
    assert not sel.converged_all and "reorth='full'" in sel.status, sel.status


def test_a_non_symmetric_operator_is_named_in_the_status():
    """eigsh sees only the symmetric part; a non-symmetric operator used to spend its restarts
    without a hint. Its Krylov projection is far from symmetric, and the status says so (and
    a symmetric one, in float32 too, does not trigger it)."""
    rng = np.random.default_rng(0)
    A = torch.from_numpy(rng.standard_normal((100, 100)))
    r = eigsh(A, k=3, maxiter=5, generator=torch.Generator().manual_seed(0))
    assert "does not look symmetric" in r.status and "use eigs" in r.status, r.status
    for S in (A + A.T, (A + A.T).float()):
        r = eigsh(S, k=3, generator=torch.Generator().manual_seed(0))
        assert r.converged_all and "symmetric" not in r.status, r.status
    # selective reorthogonalization's H is not a symmetric projection: no hint from it
    D = torch.diag(torch.arange(1.0, 301.0, dtype=torch.float64))
    r = eigsh(D, k=4, reorth="selective", generator=torch.Generator().manual_seed(0))
    assert "symmetric" not in r.status, r.status


def test_selective_stops_when_the_basis_loses_orthogonality():
    """reorth='selective' at the float64 default tol 1e-8 on diag(1..300): its basis lost
    orthogonality restart after restart (max |V^T V - I| 1e-15 -> 1e-3 -> O(1)) and returned
    'eigenvalues' of 467 and more for a matrix whose largest is 300. The run now stops when the
    loss passes eps^(1/4) and says why; what it returns is still the spectrum's top."""
    D = torch.diag(torch.arange(1.0, 301.0, dtype=torch.float64))
    r = eigsh(D, k=4, reorth="selective", generator=torch.Generator().manual_seed(0))
    assert "lost the basis' orthogonality" in r.status and "reorth='full'" in r.status, r.status
    z = r.eigenvalues.real.numpy()
    assert np.all(z <= 300 + 1e-6), z
    np.testing.assert_allclose(np.sort(z)[::-1], [300, 299, 298, 297], rtol=1e-6)
    rel = (r.residuals / r.eigenvalues.abs()).numpy()
    assert np.all(rel[r.converged.numpy()] <= 1e-8)  # the flagged ones are certified
    full = eigsh(D, k=4, generator=torch.Generator().manual_seed(0))
    assert full.converged_all and "orthogonality" not in full.status

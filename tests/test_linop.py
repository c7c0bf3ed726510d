import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

import kappa_gpu as kg


def test_dense_operator_products(device):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(7, 5, generator=g, dtype=torch.float64).to(device)
    A = kg.aslinearoperator(M)
    x = torch.randn(5, dtype=torch.float64, device=device)
    y = torch.randn(7, dtype=torch.float64, device=device)
    X = torch.randn(5, 3, dtype=torch.float64, device=device)
    torch.testing.assert_close(A.matvec(x), M @ x)
    torch.testing.assert_close(A.rmatvec(y), M.T @ y)
    torch.testing.assert_close(A.matmat(X), M @ X)
    torch.testing.assert_close(A.T.matvec(y), M.T @ y)
    torch.testing.assert_close(A.to_dense(), M)
    assert A.shape == (7, 5) and A.dtype == torch.float64 and A.device.type == device


def test_callable_operator_default_matmat_and_dense():
    M = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
    A = kg.aslinearoperator(lambda v: M @ v, shape=(4, 3), rmatvec=lambda w: M.T @ w)
    X = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(A.matmat(X), M)
    torch.testing.assert_close(A.to_dense(batch=2), M)
    torch.testing.assert_close(A.rmatmat(torch.eye(4, dtype=torch.float64)), M.T)


def test_to_scipy_matches_and_runs_arpack():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((30, 30))
    A = kg.aslinearoperator(torch.from_numpy(M)).to_scipy()
    v = rng.standard_normal(30)
    np.testing.assert_allclose(A @ v, M @ v)
    np.testing.assert_allclose(A.rmatvec(v), M.T @ v)
    np.testing.assert_allclose(A @ v[:, None], (M @ v)[:, None])
    z = spla.eigs(A, k=3, which="LM", return_eigenvectors=False)
    ref = np.linalg.eigvals(M)
    top = ref[np.argsort(-abs(ref))[:3]]
    np.testing.assert_allclose(sorted(abs(z)), sorted(abs(top)), rtol=1e-8)


def test_bad_inputs_have_clear_messages():
    A = kg.aslinearoperator(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        A.matvec(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        A.matvec(np.zeros(3))
    C = kg.aslinearoperator(lambda v: v, shape=(3, 3))
    with pytest.raises(ValueError, match="max_entries"):
        C.to_dense(max_entries=5)
    with pytest.raises(ValueError, match="shape="):
        kg.aslinearoperator(lambda v: v)
    with pytest.raises(ValueError, match="2-D"):
        kg.aslinearoperator(torch.zeros(3))
    B = kg.aslinearoperator(lambda v: v, shape=(3, 3))
    with pytest.raises(NotImplementedError, match="adjoint"):
        B.rmatvec(torch.zeros(3, dtype=torch.float64))


def test_scipy_operators_and_sparse_matrices_are_accepted():
    """A scipy LinearOperator (it is callable: it used to hit 'callable needs shape=') or a
    sparse matrix wraps as a host operator; eigs agrees with ARPACK, the adjoint with A^T."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    from kappa_gpu.solvers import eigs

    rng = np.random.default_rng(0)
    M = sp.random(200, 200, density=0.05, random_state=1, format="csr") + sp.diags(
        np.linspace(1.0, 3.0, 200))
    for obj in (spla.aslinearoperator(M), M):
        A = kg.aslinearoperator(obj)
        assert A.shape == (200, 200) and A.dtype == torch.float64
        x = torch.from_numpy(rng.standard_normal(200))
        np.testing.assert_allclose(A.matvec(x).numpy(), M @ x.numpy(), rtol=1e-13)
        np.testing.assert_allclose(A.rmatvec(x).numpy(), M.T @ x.numpy(), rtol=1e-13)
        X = torch.from_numpy(rng.standard_normal((200, 3)))
        np.testing.assert_allclose(A.matmat(X).numpy(), M @ X.numpy(), rtol=1e-13)
        r = eigs(obj, k=4, generator=torch.Generator().manual_seed(0))
        ref = spla.eigs(M, k=4, which="LM", return_eigenvectors=False)
        assert r.converged_all
        np.testing.assert_allclose(np.sort_complex(r.eigenvalues.numpy()), np.sort_complex(ref),
                                   rtol=1e-8)
    # built from a matvec alone: no adjoint, so eigs(left=True) refuses it before any matvec
    calls = []
    bare = spla.LinearOperator((200, 200), matvec=lambda v: calls.append(1) or M @ v,
                               dtype=np.float64)
    with pytest.raises(NotImplementedError, match="needs the adjoint"):
        eigs(bare, k=3, left=True)
    assert calls == []
    f32 = spla.aslinearoperator(M.astype(np.float32))
    assert kg.aslinearoperator(f32).dtype == torch.float32
    with pytest.raises(TypeError, match="real float32/float64"):
        kg.aslinearoperator(spla.aslinearoperator(M.astype(np.complex128)))

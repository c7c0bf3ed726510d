"""kappa_V and eigenvalue condition numbers against closed forms and dense LAPACK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from conftest import cuda_only

from kappa_gpu.diagnostics import eigenvalue_condition_numbers as cond_from_package
from kappa_gpu.diagnostics._conditioning import eigenvalue_condition_numbers, kappa_V


@pytest.mark.parametrize("angle", [1e-1, 1e-4, 1e-7])
def test_kappa_V_two_vectors_at_an_angle(angle):
    # Unit u, v at angle a: singular values sqrt(1 +- cos a) -> kappa = cot(a / 2).
    X = np.array([[1.0, np.cos(angle)], [0.0, np.sin(angle)], [0.0, 0.0]])
    assert np.isclose(kappa_V(X), 1.0 / np.tan(angle / 2), rtol=1e-8)


def test_kappa_V_scale_invariant_and_orthogonal_is_one(device):
    Q, _ = torch.linalg.qr(torch.randn(50, 6, dtype=torch.float64))
    Q = Q.to(device)
    assert np.isclose(kappa_V(Q), 1.0)
    assert np.isclose(kappa_V(Q * torch.tensor([1e-3, 1, 1e5, 2, 3, 4], device=device,
                                               dtype=torch.float64)), 1.0)


def test_kappa_V_complex_and_float32():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 4)) + 1j * rng.standard_normal((40, 4))
    Xn = X / np.linalg.norm(X, axis=0)
    s = np.linalg.svd(Xn, compute_uv=False)
    assert np.isclose(kappa_V(torch.from_numpy(X)), s[0] / s[-1], rtol=1e-12)
    X32 = torch.from_numpy(X).to(torch.complex64)
    assert np.isclose(kappa_V(X32), s[0] / s[-1], rtol=1e-5)
    assert np.isclose(kappa_V(torch.from_numpy(X.real).float()), kappa_V(X.real), rtol=1e-5)


@pytest.mark.parametrize(
    "X",
    [
        np.zeros((5, 2)),
        np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),  # a zero column
        np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]),  # parallel columns
        np.ones((2, 3)),  # more vectors than dimensions
        np.array([[1.0, 1.0j], [1.0j, -1.0]]),  # complex parallel: x2 = i x1
    ],
)
def test_kappa_V_singular_is_inf_not_nan(X):
    assert kappa_V(X) == math.inf


def test_kappa_V_edge_cases():
    assert kappa_V(np.zeros((4, 0))) == 1.0
    assert kappa_V(np.ones(4)) == 1.0  # one vector
    assert math.isnan(kappa_V(np.array([[np.nan], [1.0]])))
    with pytest.raises(ValueError, match=r"shape \(n, k\)"):
        kappa_V(np.zeros((2, 2, 2)))
    with pytest.raises(TypeError):
        kappa_V([[1.0]])


def test_eigenvalue_condition_numbers_match_dense():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((30, 30))
    w, vl, vr = sla.eig(A, left=True, right=True)
    c = eigenvalue_condition_numbers(vr, vl)
    # Wilkinson's condition number ||x|| ||y|| / |y^H x|, computed independently:
    ref = np.linalg.norm(vr, axis=0) * np.linalg.norm(vl, axis=0) / np.abs(
        np.sum(vl.conj() * vr, axis=0))
    assert c.dtype == torch.float64 and c.device.type == "cpu"
    assert np.allclose(c.numpy(), ref, rtol=1e-10)
    # Scaling the vectors changes nothing.
    c2 = eigenvalue_condition_numbers(vr * 3.0, vl * (1 - 2j))
    assert np.allclose(c2.numpy(), ref, rtol=1e-10)
    assert cond_from_package is eigenvalue_condition_numbers


def test_eigenvalue_condition_numbers_normal_matrix_and_zeros():
    Q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((10, 10)))
    assert np.allclose(eigenvalue_condition_numbers(Q, Q).numpy(), 1.0)
    X = np.eye(3)
    Y = np.array([[0.0, 0, 0], [1.0, 1, 0], [0.0, 0, 1]])  # y1 orthogonal to x1
    Y[:, 1] = 0.0  # a zero column
    c = eigenvalue_condition_numbers(X, Y).numpy()
    assert c[0] == math.inf and c[1] == math.inf and c[2] == 1.0
    with pytest.raises(ValueError, match="same shape"):
        eigenvalue_condition_numbers(np.eye(3), np.eye(3)[:, :2])


@cuda_only
def test_conditioning_on_cuda():
    X = torch.randn(1000, 5, dtype=torch.float64)
    assert np.isclose(kappa_V(X.cuda()), kappa_V(X), rtol=1e-10)
    c = eigenvalue_condition_numbers(X.cuda(), (X + 0.1).cuda())
    assert c.device.type == "cpu"
    assert torch.allclose(c, eigenvalue_condition_numbers(X, X + 0.1))


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e160, 1e200])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_column_scale_does_not_matter(scale, dtype):
    """Unnormalized eigenvectors of 1e-200 or 1e200 are still eigenvectors: their squares
    under- or overflowed (inf, or a condition number of 0.99998 < 1). Oracle: the same set with
    the column at scale 1 (kappa_V = 1 + sqrt(2) for [[s, 1], [0, 1]])."""
    X = torch.tensor([[scale, 1.0], [0.0, 1.0]], dtype=torch.float64).to(dtype)
    if dtype.is_complex:
        X[:, 0] *= 1j
    assert kappa_V(X) == pytest.approx(1 + math.sqrt(2), rel=1e-12)
    c = eigenvalue_condition_numbers(X, X)
    np.testing.assert_allclose(c.numpy(), [1.0, 1.0], rtol=1e-12)
    Z = X.clone()
    Z[:, 0] = 0
    assert kappa_V(Z) == math.inf  # a zero column stays what it is

"""Transient growth, Kreiss bounds and subspace projection against closed forms and theorems."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from kappa_gpu.diagnostics._blocks import block_eigen, sgd_momentum_coefficients
from kappa_gpu.diagnostics._transient import (
    kreiss_lower_bound,
    orthonormal_basis,
    projected_operator,
    transient_growth,
)


def _jordan_norm(lam: float, alpha: float, t: np.ndarray) -> np.ndarray:
    """||[[lam, alpha], [0, lam]]^t||_2 = (|b| + sqrt(b^2 + 4 a^2)) / 2.

    With a = lam^t and b = t alpha lam^(t-1): T^t = [[a, b], [0, a]].
    """
    a = lam**t
    b = np.where(t > 0, t * alpha * lam ** np.maximum(t - 1, 0), 0.0)
    return 0.5 * (np.abs(b) + np.sqrt(b * b + 4 * a * a))


@pytest.mark.parametrize("lam, alpha", [(0.9, 5.0), (0.95, 1.0), (-0.8, 3.0), (0.5, 100.0)])
def test_non_normal_2x2_matches_closed_form(lam, alpha):
    T = np.array([[lam, alpha], [0.0, lam]])
    g = transient_growth(T, horizon=300)
    assert g.t[0] == 0 and g.t[-1] == 300 and np.all(np.diff(g.t) == 1)
    ref = _jordan_norm(lam, alpha, g.t.astype(np.float64))
    np.testing.assert_allclose(g.curve, ref, rtol=1e-12)
    i = int(np.argmax(ref))
    assert g.argmax_t == g.t[i] and g.max_growth == pytest.approx(ref[i], rel=1e-12)
    assert g.bounded and g.certified and g.rho == pytest.approx(abs(lam))


def test_defective_T_has_infinite_kappa_v():
    """A Jordan block's computed eigenvectors are parallel to rounding: kappa_v is inf (as
    kappa_V says), not sigma_max / sigma_min of them (9e15 for the 2x2, 2e63 for the 5x5); the
    curve is still the exact one."""
    for T in (np.array([[1.0, 1.0], [0.0, 1.0]]), 0.9 * np.eye(5) + np.eye(5, k=1)):
        g = transient_growth(T, horizon=50)
        assert g.kappa_v == math.inf
        ref = [np.linalg.norm(np.linalg.matrix_power(T, t), 2) for t in range(51)]
        np.testing.assert_allclose(g.curve, ref, rtol=1e-12)
    g = transient_growth(np.diag([0.5, 0.8]), horizon=3)
    assert g.kappa_v == pytest.approx(1.0)


def test_default_horizon_and_certificate():
    T = np.array([[0.9, 5.0], [0.0, 0.9]])
    g = transient_growth(T)  # numerically defective: kappa_v huge -> cap, early stop on decay
    ref = _jordan_norm(0.9, 5.0, np.arange(200.0))
    assert g.certified and g.max_growth == pytest.approx(ref.max(), rel=1e-12)
    assert g.argmax_t == int(np.argmax(ref)) == 9
    assert g.curve[-1] < 1e-3 and g.curve[-2] >= 1e-3  # stopped as the curve reached 1e-3
    # kappa_v given: horizon = first t with kappa rho^t < 1e-3
    D = np.diag([0.5, 0.8])
    g = transient_growth(D, kappa_v=10.0)
    assert g.horizon == math.ceil(math.log(1e-4) / math.log(0.8))
    # long horizons: every t, curve[t] = ||T^t||
    g = transient_growth(np.diag([0.9999, 0.5]), horizon=5000)
    assert g.curve.shape == (5001,) and np.array_equal(g.t, np.arange(5001))
    np.testing.assert_allclose(g.curve, 0.9999 ** g.t.astype(float), rtol=1e-10)
    # default horizon capped at 10 000 when the decay is slow
    g = transient_growth(np.diag([0.99999, 0.5]))
    assert g.horizon == 10_000 and g.curve.size == 10_001 and g.certified


def test_normal_matrix_growth_is_rho_t():
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    z = np.array([0.95, -0.9, 0.5, 0.3, 0.1, -0.2, 0.7, 0.6])
    A = Q @ np.diag(z) @ Q.T
    g = transient_growth(A, horizon=200)
    np.testing.assert_allclose(g.curve, 0.95 ** g.t.astype(float), rtol=1e-10)
    assert g.max_growth == 1.0 and g.argmax_t == 0
    assert g.kappa_v == pytest.approx(1.0, abs=1e-10)
    # the complex-normal case: a rotation scaled by 0.9
    c, s = math.cos(0.3), math.sin(0.3)
    g = transient_growth(0.9 * np.array([[c, -s], [s, c]]), horizon=50)
    np.testing.assert_allclose(g.curve, 0.9 ** g.t.astype(float), rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_kappa_rho_t_bounds_the_curve(seed):
    rng = np.random.default_rng(seed)
    k = 10
    V = rng.standard_normal((k, k)) + 0.5 * np.eye(k)
    z = rng.uniform(-0.97, 0.97, k)
    A = V @ np.diag(z) @ np.linalg.inv(V)
    zz, VV = np.linalg.eig(A)
    kappa = np.linalg.cond(VV)
    g = transient_growth(A, kappa_v=kappa, horizon=400)
    assert np.all(g.curve <= g.bound * (1 + 1e-9))
    assert g.max_growth > 1.0  # non-normal: there is transient growth
    # the default (from numpy.eig of T) is the same bound
    g2 = transient_growth(A, horizon=400)
    assert g2.kappa_v == pytest.approx(kappa, rel=1e-6)


def test_unstable_is_unbounded_and_capped():
    T = np.array([[1.05, 1.0], [0.0, 0.5]])
    g = transient_growth(T)
    assert not g.bounded and not g.certified
    assert g.horizon == 1000 and np.all(np.isfinite(g.curve))
    g = transient_growth(np.array([[3.0]]))
    assert not g.bounded and g.curve[-1] > 1e150 and g.t[-1] < 400  # stopped before overflow
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = transient_growth(np.array([[1e30, 1.0], [0.0, 0.5]]))  # would overflow in 11 steps
    assert np.all(np.isfinite(g.curve)) and g.curve[-1] >= 1e150 and g.t[-1] <= 6
    # rho = 0 (nilpotent): T^2 = 0
    g = transient_growth(np.array([[0.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(g.curve[:3], [1.0, 4.0, 0.0])
    with pytest.raises(ValueError, match="square"):
        transient_growth(np.ones((2, 3)))


# -- Kreiss ------------------------------------------------------------------------------


def _random_nonnormal(rng: np.random.Generator, k: int, rho: float, skew: float) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    R = np.triu(skew * rng.standard_normal((k, k)), 1) + np.diag(rng.uniform(-rho, rho, k))
    return Q @ R @ Q.T


@pytest.mark.parametrize("seed", range(4))
def test_kreiss_matrix_theorem_on_random_non_normal(seed):
    rng = np.random.default_rng(seed)
    k = 6
    T = _random_nonnormal(rng, k, rho=0.95, skew=1.0)
    g = transient_growth(T)
    kb = kreiss_lower_bound(T)
    assert g.certified
    # the theorem: K(T) <= sup_t ||T^t|| <= e k K(T); K_lower <= K(T)
    assert 1.0 <= kb.value <= g.max_growth * (1 + 1e-12)
    assert g.max_growth <= math.e * k * kb.value
    assert kb.growth_upper_estimate == pytest.approx(math.e * k * kb.value)
    assert abs(kb.z) > 1


def test_kreiss_of_jordan_2x2_and_normal():
    T = np.array([[0.9, 5.0], [0.0, 0.9]])
    kb = kreiss_lower_bound(T)
    # brute force on a fine grid on the positive real axis (where the sup sits by symmetry)
    r = 1 + np.geomspace(1e-4, 10, 20001)
    smin = np.array([np.linalg.svd(x * np.eye(2) - T, compute_uv=False)[-1] for x in r[::20]])
    brute = np.max((r[::20] - 1) / smin)
    assert brute * (1 - 1e-3) <= kb.value <= max(brute, kb.value)
    assert kb.value <= transient_growth(T).max_growth
    # a normal matrix with rho < 1 has K = 1 (approached as |z| -> inf)
    kb = kreiss_lower_bound(np.diag([0.5, -0.3]))
    assert 0.98 < kb.value <= 1.0 + 1e-12
    # rho > 1: K infinite. On the unit circle the samples still bound K: 1 for a normal
    # matrix (was reported inf: wrong, a review case), huge for a Jordan block at 1
    assert math.isinf(kreiss_lower_bound(np.diag([1.01, 0.2])).value)
    assert kreiss_lower_bound(np.diag([1.0, 0.2])).value == pytest.approx(1.0, abs=1e-9)
    assert kreiss_lower_bound(np.eye(3)).value == pytest.approx(1.0, abs=1e-9)
    assert kreiss_lower_bound(np.array([[1.0, 1.0], [0.0, 1.0]])).value > 1e6


# -- projection onto a computed subspace ------------------------------------------------------


def test_projected_operator_on_heavy_ball_modes(device):
    """T = Q^T J Q on the span of a few 2x2-block modes has exactly those eigenvalues."""
    rng = np.random.default_rng(5)
    n, mu, eta = 40, 0.9, 1.0
    A = rng.standard_normal((n, n))
    H = A @ A.T / n
    s, W = np.linalg.eigh(eta * H)
    J = np.block([[np.eye(n) - eta * H, -eta * mu * np.eye(n)], [H, mu * np.eye(n)]])
    top = slice(n - 3, n)
    z, P = block_eigen(s[top], *sgd_momentum_coefficients(mu))
    # the exact block basis [(u, 0), (0, D^-1 u)] of the three sharpest modes
    u = W[:, top]
    B = np.vstack([np.hstack([u, np.zeros_like(u)]), np.hstack([np.zeros_like(u), u / eta])])
    Q = orthonormal_basis(torch.from_numpy(B).to(device))
    assert Q.shape == (2 * n, 6) and Q.device.type == device
    JQ = torch.from_numpy(J).to(device) @ Q
    T = projected_operator(JQ, Q)
    assert isinstance(T, np.ndarray) and T.dtype == np.float64 and T.shape == (6, 6)
    ev = np.sort_complex(np.linalg.eigvals(T))
    np.testing.assert_allclose(ev, np.sort_complex(z.reshape(-1)), atol=1e-12)
    # float32 tensors: accumulated in float64 all the same
    T32 = projected_operator(JQ.float(), Q.float())
    np.testing.assert_allclose(T32, T, atol=1e-5)
    # growth on the subspace equals ||J^t Q|| (invariant subspace)
    g = transient_growth(T, horizon=30)
    Jt = np.eye(2 * n)
    Qn = Q.cpu().numpy()
    for t in range(31):
        assert g.curve[t] == pytest.approx(np.linalg.norm(Jt @ Qn, 2), rel=1e-9)
        Jt = J @ Jt


def test_orthonormal_basis_from_conjugate_eigenvectors():
    rng = np.random.default_rng(2)
    n = 30
    M = rng.standard_normal((n, n))
    z, X = np.linalg.eig(M)
    pair = np.flatnonzero(z.imag > 1e-8)[0]
    cols = np.stack([X[:, pair], np.conj(X[:, pair]), np.exp(0.7j) * X[:, pair]], axis=1)
    Q = orthonormal_basis(cols)
    assert isinstance(Q, np.ndarray) and Q.dtype == np.float64 and Q.shape == (n, 2)
    np.testing.assert_allclose(Q.T @ Q, np.eye(2), atol=1e-14)
    # the real invariant subspace of the pair
    T = projected_operator(M @ Q, Q)
    np.testing.assert_allclose(
        np.sort_complex(np.linalg.eigvals(T)),
        np.sort_complex([z[pair], np.conj(z[pair])]),
        atol=1e-12,
    )
    # a real eigenvector with an arbitrary phase adds one dimension, not two
    real = np.flatnonzero(np.abs(z.imag) == 0)[0]
    Q = orthonormal_basis(np.exp(0.3j) * X[:, [real]])
    assert Q.shape == (n, 1)
    # float32 torch input stays float32
    Qt = orthonormal_basis(torch.randn(20, 3))
    assert Qt.dtype == torch.float32 and Qt.shape == (20, 3)
    with pytest.raises(ValueError, match="same shape"):
        projected_operator(torch.zeros(5, 2), torch.zeros(5, 3))


def test_an_operator_is_refused_with_what_to_pass():
    import kappa_gpu as kg

    op = kg.aslinearoperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"small dense matrix, got a 3x3 LinearOperator.*to_dense"):
        transient_growth(op)
    assert transient_growth(op.to_dense()).max_growth == pytest.approx(1.0)


def test_orthonormal_basis_rank_is_the_inputs_rounding_level_not_n_eps():
    """Two float32 columns at N = 2e5 whose second direction is 1e-3 of the first: rank 2 (the
    old default N eps = 2.4% called them parallel); a copy perturbed at rounding: rank 1."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200_000, 2, generator=g).unbind(1)
    a = a / a.norm()
    b = b - (a @ b) * a
    X = torch.stack([a, a + 1e-3 * b / b.norm()], 1)
    assert orthonormal_basis(X).shape[1] == 2
    Y = torch.stack([a, (a.double() * (1 + 1e-9)).float()], 1)
    assert orthonormal_basis(Y).shape[1] == 1


def test_bad_inputs_are_clear_errors_or_documented_values():
    """Review cases: kappa_V of 2 vectors in 0 dimensions raised an IndexError from amax
    (documented: inf for k > n); transient_growth with rho=NaN said 'cannot convert float NaN
    to integer'."""
    from kappa_gpu import kappa_V

    assert math.isinf(kappa_V(np.zeros((0, 2))))
    with pytest.raises(ValueError, match="rho must be a number"):
        transient_growth(0.5 * np.eye(2), rho=float("nan"))
    with pytest.raises(ValueError, match="kappa_v one > 0"):
        transient_growth(0.5 * np.eye(2), kappa_v=float("nan"), rho=0.5)

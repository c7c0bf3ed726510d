"""Closed-form 2x2 blocks against numpy.linalg.eig of the blocks and of the dense full J."""

from __future__ import annotations

import warnings
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from kappa_gpu.diagnostics._blocks import (
    BlockCoefficients,
    adam_frozen_coefficients,
    block_eigen,
    block_matrices,
    discriminant,
    ep_ratio,
    exceptional_points,
    native_eigenvectors,
    order1_eigen,
    order1_stability_margin,
    sgd_momentum_coefficients,
    stability_margin,
)

EPS = np.finfo(np.float64).eps

HEAVY = sgd_momentum_coefficients(0.9)


def _match_error(z: np.ndarray, ref: np.ndarray) -> float:
    """Max distance from each computed eigenvalue to the reference set and vice versa."""
    d = np.abs(z[:, None] - ref[None, :])
    return max(d.min(axis=1).max(), d.min(axis=0).max())


def _strict():
    """Turn numpy floating-point warnings and Python warnings into errors."""
    warnings.simplefilter("error")
    return np.errstate(all="raise")


# -- the blocks themselves ----------------------------------------------------------------


@pytest.mark.parametrize(
    "coeffs",
    [
        sgd_momentum_coefficients(0.9),
        sgd_momentum_coefficients(0.9, dampening=0.1),
        sgd_momentum_coefficients(0.7, dampening=0.2, nesterov=True),
        adam_frozen_coefficients(0.9),
        adam_frozen_coefficients(0.8, lr=1e-3, weight_decay=0.1, decoupled=True),
        BlockCoefficients(a=0.7, a2=1.3, b=0.5, beta=0.95, c=0.99),  # generic, a != a2
    ],
)
def test_block_eigen_matches_numpy_eig_of_blocks(coeffs):
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.uniform(-1, 6, 200), [0.0, 1e-12, -1e-12, 1e3, -1e3]])
    z, P = block_eigen(s, *coeffs)
    M = block_matrices(s, *coeffs)
    assert z.shape == (s.size, 2) and P.shape == (s.size, 2, 2) and M.shape == (s.size, 2, 2)
    ref = np.linalg.eigvals(M)
    for i in range(s.size):
        scale = np.linalg.norm(M[i], 2)
        assert _match_error(z[i], ref[i]) <= 1e-7 * scale  # numpy is inaccurate only near EPs
        np.testing.assert_allclose(np.linalg.norm(P[i], axis=0), 1.0, rtol=1e-14)
        res = np.linalg.norm(M[i] @ P[i] - P[i] * z[i], axis=0)
        assert res.max() <= 20 * EPS * scale, (s[i], res)
    # the characteristic polynomial of the docstring
    a, a2, b, beta, c = coeffs
    for j in range(2):
        p = z[:, j] ** 2 - (c + beta - a * s) * z[:, j] + (c - a * s) * beta + a2 * b * s
        assert np.all(np.abs(p) <= 1e-12 * (1 + np.abs(z[:, j]) ** 2 + np.abs(a * s)))


def test_ordering_and_conjugate_pairs():
    s = np.linspace(-1, 5, 301)
    z, P = block_eigen(s, *HEAVY)
    disc = discriminant(s, *HEAVY)
    cplx = disc < 0
    assert np.all(z[cplx, 0].imag > 0)
    np.testing.assert_array_equal(z[cplx, 1], np.conj(z[cplx, 0]))
    np.testing.assert_array_equal(P[cplx, :, 1], np.conj(P[cplx, :, 0]))
    assert np.all(z[~cplx].imag == 0)
    assert np.all(z[~cplx, 0].real >= z[~cplx, 1].real)  # "+" branch first
    # between the EPs |z| = sqrt(c beta): rho is flat there
    np.testing.assert_allclose(np.abs(z[cplx]), np.sqrt(0.9), rtol=1e-14)


def test_broadcasting_over_coefficients():
    s = np.array([0.1, 1.0, 2.0])
    mus = np.array([0.5, 0.9, 0.99])
    z, P = block_eigen(s, 1.0, 1.0, mus, mus, 1.0)
    for i in range(3):
        zi, _ = block_eigen(s[i], *sgd_momentum_coefficients(float(mus[i])))
        np.testing.assert_array_equal(z[i], zi[0])
    z2, _ = block_eigen(0.5, *HEAVY)
    assert z2.shape == (1, 2)
    with pytest.raises(ValueError, match="broadcast"):
        block_eigen(np.ones(3), 1.0, 1.0, np.ones(2), 0.9, 1.0)
    with pytest.raises(TypeError, match="real"):
        block_eigen(np.array([1j]), *HEAVY)


# -- the full J, dense, against the native eigenvectors ----------------------------------


def _dense_J(kind: str, Ht: np.ndarray, d: np.ndarray, hyper: dict) -> np.ndarray:
    n = Ht.shape[0]
    I, D = np.eye(n), np.diag(d)
    if kind == "heavy_ball":
        mu, dm = hyper["mu"], hyper["dampening"]
        return np.block([[I - (1 - dm) * D @ Ht, -mu * D], [(1 - dm) * Ht, mu * I]])
    if kind == "nesterov":
        mu, dm = hyper["mu"], hyper["dampening"]
        return np.block([[I - (1 + mu * (1 - dm)) * D @ Ht, -mu * mu * D], [(1 - dm) * Ht, mu * I]])
    b1, c = hyper["b1"], hyper["c"]
    return np.block([[c * I - (1 - b1) * D @ Ht, -b1 * D], [(1 - b1) * Ht, b1 * I]])


CASES = {
    # D = eta I (SGD), or a per-parameter lr (D diagonal): both decouple into 2x2 blocks.
    "heavy_ball": (dict(mu=0.9, dampening=0.0), sgd_momentum_coefficients(0.9)),
    "heavy_ball_damped": (dict(mu=0.8, dampening=0.3), sgd_momentum_coefficients(0.8, 0.3)),
    "nesterov": (dict(mu=0.9, dampening=0.1), sgd_momentum_coefficients(0.9, 0.1, True)),
    "adam_frozen": (dict(b1=0.9, c=1.0), adam_frozen_coefficients(0.9)),
    "adamw_frozen": (
        dict(b1=0.85, c=1 - 1e-2 * 0.5),
        adam_frozen_coefficients(0.85, lr=1e-2, weight_decay=0.5, decoupled=True),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("spd", [True, False], ids=["spd", "indefinite"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_eigenvectors_are_eigenvectors_of_dense_J(name, spd, dtype, device):
    hyper, coeffs = CASES[name]
    kind = name.replace("_damped", "").replace("adamw", "adam")
    rng = np.random.default_rng(7)
    n = 12
    A = rng.standard_normal((n, n))
    Ht = A @ A.T / n if spd else (A + A.T) / 2
    if name.startswith("heavy"):
        d = np.full(n, 0.3)  # D = eta I
    elif name == "nesterov":
        d = rng.uniform(0.05, 0.4, n)  # per-parameter learning rates (param groups)
    else:
        d = rng.uniform(0.1, 1.5, n)  # Adam's eta / (bc1 denom)
    J = _dense_J(kind, Ht, d, hyper)

    sq = np.sqrt(d)
    s, W = np.linalg.eigh(sq[:, None] * Ht * sq[None, :])
    u = sq[:, None] * W
    z, P = block_eigen(s, *coeffs)
    ut = torch.from_numpy(u).to(device=device, dtype=dtype)
    X = native_eigenvectors(P, ut, ut / torch.from_numpy(d).to(device=device, dtype=dtype)[:, None])
    assert X.shape == (2 * n, 2 * n) and X.device.type == device
    assert X.dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
    Xn = X.cpu().numpy().astype(np.complex128)
    zf = z.reshape(-1)  # mode-major, matching the columns of X

    rel = np.linalg.norm(J @ Xn - Xn * zf, axis=0) / (
        np.linalg.norm(J, 2) * np.linalg.norm(Xn, axis=0)
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel.max() <= tol, rel.max()
    # the 2n closed-form eigenvalues are the spectrum of J
    ref = np.linalg.eigvals(J)
    assert _match_error(zf, ref) <= 1e-8 * np.linalg.norm(J, 2)

    Xu = native_eigenvectors(P, ut, ut / torch.from_numpy(d).to(ut)[:, None], normalize=True)
    np.testing.assert_allclose(torch.linalg.vector_norm(Xu, dim=0).cpu().numpy(), 1.0, rtol=1e-5)


def test_native_eigenvectors_shapes():
    u = torch.randn(5, 3, dtype=torch.float64)
    v = 2 * u
    P = np.ones((3, 2))
    X = native_eigenvectors(P, u, v)
    assert X.shape == (10, 3) and X.dtype == torch.float64
    torch.testing.assert_close(X, torch.cat([u, v]))
    x = native_eigenvectors(np.array([1.0, 0.5j]), u[:, 0], v[:, 0])
    assert x.shape == (10,) and x.is_complex()
    torch.testing.assert_close(x, torch.cat([u[:, 0], 0.5j * v[:, 0]]).to(torch.complex128))
    assert native_eigenvectors(np.ones((2, 2)), u[:, 0], v[:, 0]).shape == (10, 2)
    with pytest.raises(ValueError, match="modes"):
        native_eigenvectors(np.ones((4, 2)), u, v)
    with pytest.raises(ValueError, match="same shape"):
        native_eigenvectors(P, u, v[:, :2])


# -- exceptional points, discriminant, stability edges -------------------------------------


def test_heavy_ball_ep_values_and_stability_edge():
    s_lo, s_hi = exceptional_points(*HEAVY)
    np.testing.assert_allclose(s_lo, (1 - np.sqrt(0.9)) ** 2, rtol=1e-14)
    np.testing.assert_allclose(s_hi, (1 + np.sqrt(0.9)) ** 2, rtol=1e-15)
    assert 0.00263 < s_lo < 0.00264 and 3.797 < s_hi < 3.798
    sm = stability_margin(np.array([3.79, 3.8, 3.81]), *HEAVY)
    np.testing.assert_allclose(sm.s_minus_one, 3.8, rtol=1e-15)
    assert sm.s_plus_one == 0.0 and np.isnan(sm.s_unit_circle)
    assert sm.margin[0] > 0 and abs(sm.margin[1]) < 1e-15 and sm.margin[2] < 0
    # the upper EP sits just below the edge: kappa(V) warns before rho(J) does
    assert s_hi < sm.s_minus_one


def test_general_ep_and_edges_match_brute_force():
    co = BlockCoefficients(a=1.3, a2=0.6, b=0.7, beta=0.85, c=0.98)
    s_lo, s_hi = exceptional_points(*co)
    for s_ep in (s_lo, s_hi):
        M = block_matrices(s_ep, *co)[0]
        assert abs(np.trace(M) ** 2 - 4 * np.linalg.det(M)) < 1e-13
    sm = stability_margin(0.0, *co)
    for s_edge, root in ((sm.s_minus_one, -1.0), (sm.s_plus_one, 1.0)):
        z, _ = block_eigen(s_edge, *co)
        assert np.min(np.abs(z - root)) < 1e-13
    # nesterov: the known edge eta lambda < 2 (1 + mu) / (1 + 2 mu)
    mu = 0.9
    sm = stability_margin(0.0, *sgd_momentum_coefficients(mu, nesterov=True))
    np.testing.assert_allclose(sm.s_minus_one, 2 * (1 + mu) / (1 + 2 * mu), rtol=1e-15)
    # Adam: lambda_max(P^-1 H) = (2 + 2 b1) / ((1 - b1) eta) <=> s = (2 + 2 b1) / (1 - b1)
    sm = stability_margin(0.0, *adam_frozen_coefficients(0.9))
    np.testing.assert_allclose(sm.s_minus_one, (2 + 2 * 0.9) / (1 - 0.9), rtol=1e-14)


def test_no_real_ep_gives_nan_and_a_real_spectrum():
    # delta = 16 a2 b (a (c - beta) + a2 b) < 0: disc(s) > 0 for all s
    co = BlockCoefficients(a=1.0, a2=1.0, b=-0.05, beta=0.2, c=1.0)
    s_lo, s_hi = exceptional_points(*co)
    assert np.isnan(s_lo) and np.isnan(s_hi)
    s = np.linspace(-10, 10, 101)
    assert np.all(discriminant(s, *co) > 0)
    assert np.all(np.isnan(ep_ratio(s, *co).ratio)) and np.all(ep_ratio(s, *co).which == 0)


@pytest.mark.parametrize(
    "coeffs", [HEAVY, sgd_momentum_coefficients(0.9, nesterov=True), adam_frozen_coefficients(0.99)]
)
def test_discriminant_changes_sign_at_the_eps(coeffs):
    s_lo, s_hi = exceptional_points(*coeffs)
    h = 1e-7
    d = discriminant(
        np.array([s_lo * (1 - h), s_lo * (1 + h), s_hi * (1 - h), s_hi * (1 + h)]), *coeffs
    )
    assert d[0] > 0 and d[1] < 0 and d[2] < 0 and d[3] > 0
    assert np.all(discriminant(np.array([s_lo, s_hi]), *coeffs) == 0.0)


def test_at_the_ep_exactly_finite_no_nan_no_warning():
    s_lo, s_hi = exceptional_points(*HEAVY)
    s = np.array([s_lo, s_hi])
    with warnings.catch_warnings(), _strict():
        z, P = block_eigen(s, *HEAVY)
        r = ep_ratio(s, *HEAVY)
        sm = stability_margin(s, *HEAVY)
    assert np.all(np.isfinite(z)) and np.all(np.isfinite(P))
    np.testing.assert_array_equal(z[:, 0], z[:, 1])  # the double eigenvalue
    np.testing.assert_allclose(z[:, 0].real, [np.sqrt(0.9), -np.sqrt(0.9)], rtol=1e-15)
    np.testing.assert_array_equal(P[:, :, 0], P[:, :, 1])  # the single eigenvector, twice
    M = block_matrices(s, *HEAVY)
    for i in range(2):
        assert np.linalg.norm(M[i] @ P[i, :, 0] - z[i, 0] * P[i, :, 0]) < 1e-15
        # defective: M - zI is a nonzero nilpotent
        N = M[i] - z[i, 0].real * np.eye(2)
        assert np.linalg.norm(N) > 0.1 and np.linalg.norm(N @ N) < 1e-15
    np.testing.assert_array_equal(r.ratio, [0.0, 0.0])
    np.testing.assert_array_equal(r.which, [-1, 1])
    assert np.all(np.isfinite(sm.margin))
    # scalar-identity block (b = 0, a2 s = 0, c - a s = beta): e1, e2, no NaN
    with warnings.catch_warnings(), _strict():
        z, P = block_eigen(0.0, 1.0, 1.0, 0.0, 1.0, 1.0)
    np.testing.assert_array_equal(P[0], np.eye(2))


def test_eigenvalues_next_to_the_ep_are_backward_stable():
    """Closed form vs a 50-digit evaluation at the same float s, next to the upper EP.

    Next to an EP, z depends on sqrt(s - s_ep): a one-ulp change of s moves z by about
    eps s |disc'(s)| / (4 sqrt|disc|), which is 1e-11 at s = s_hi (1 + 1e-9). The closed form
    must be that accurate (it is backward stable in s), and exact away from the EPs.
    """
    getcontext().prec = 50
    a, a2, b, beta, c = HEAVY
    s_lo, s_hi = exceptional_points(*HEAVY)
    for s in (s_hi * (1 + 1e-9), s_hi * (1 - 1e-9), s_hi * (1 + 1e-12), s_lo * (1 + 1e-9), 3.0):
        S, B, C = Decimal(float(s)), Decimal(beta), Decimal(c)
        tr = C + B - Decimal(a) * S
        det = (C - Decimal(a) * S) * B + Decimal(a2) * Decimal(b) * S
        disc = tr * tr - 4 * det
        root = abs(disc).sqrt()
        if disc >= 0:
            exact = np.array([complex((tr + root) / 2), complex((tr - root) / 2)])
        else:
            re, im = float(tr / 2), float(root / 2)
            exact = np.array([complex(re, im), complex(re, -im)])
        z, _ = block_eigen(s, *HEAVY)
        slope = abs(2 * a * a * s - 2 * (a * (c - beta) + 2 * a2 * b))  # |d disc / ds|
        tol = 4 * EPS + 4 * EPS * s * slope / (4 * np.sqrt(abs(float(disc))))
        assert np.max(np.abs(z[0] - exact)) <= tol, (s, z[0], exact, tol)
        d_rel = abs(discriminant(s, *HEAVY)[0] - float(disc)) / abs(float(disc))
        assert d_rel <= 4 * EPS * (1 + s * slope / abs(float(disc))), d_rel


def test_ep_ratio_sign_and_nearest():
    s_lo, s_hi = exceptional_points(*HEAVY)
    r = ep_ratio(np.array([0.99 * s_hi, 1.01 * s_hi, 1.5 * s_lo, 0.5, -0.3]), *HEAVY)
    np.testing.assert_allclose(r.ratio[:3], [-0.01, 0.01, 0.5], rtol=1e-12)
    np.testing.assert_array_equal(r.which, [1, 1, -1, 1, 1])
    np.testing.assert_allclose(r.s_ep[:2], s_hi)
    # a != a2 generalisation: s / s_ep - 1
    co = BlockCoefficients(a=1.3, a2=0.6, b=0.7, beta=0.85, c=0.98)
    lo, hi = exceptional_points(*co)
    np.testing.assert_allclose(ep_ratio(0.9 * hi, *co).ratio, -0.1, rtol=1e-12)


def test_order1_sgd():
    s = np.array([-0.5, 0.0, 1.0, 2.0, 2.5])
    np.testing.assert_array_equal(order1_eigen(s), 1 - s)
    sm = order1_stability_margin(s)
    np.testing.assert_allclose(sm.margin, [-0.5, 0.0, 1.0, 0.0, -0.5])
    assert sm.s_minus_one == 2.0 and sm.s_plus_one == 0.0 and np.isnan(sm.s_unit_circle)
    # against the dense J = I - eta Ht
    rng = np.random.default_rng(3)
    A = rng.standard_normal((8, 8))
    Ht, eta = (A + A.T) / 2, 0.2
    s = np.linalg.eigvalsh(eta * Ht)
    assert _match_error(order1_eigen(s), np.linalg.eigvals(np.eye(8) - eta * Ht)) < 1e-13
    with pytest.raises(ValueError, match="order1"):
        sgd_momentum_coefficients(0.0)

"""Pseudospectra: exact on normal matrices, Wright-Trefethen inclusion for Arnoldi H~, plots."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kappa_gpu.diagnostics._pseudospectra import Pseudospectra, plot_pseudospectra, pseudospectra

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _arnoldi(A: np.ndarray, v0: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """m steps of Arnoldi (modified Gram-Schmidt, one reorthogonalization): V (n, m+1), H~."""
    n = A.shape[0]
    V = np.zeros((n, m + 1))
    H = np.zeros((m + 1, m))
    V[:, 0] = v0 / np.linalg.norm(v0)
    for j in range(m):
        w = A @ V[:, j]
        for _ in range(2):
            for i in range(j + 1):
                h = V[:, i] @ w
                H[i, j] += h
                w -= h * V[:, i]
        H[j + 1, j] = np.linalg.norm(w)
        V[:, j + 1] = w / H[j + 1, j]
    return V, H


def test_normal_matrix_sigma_min_is_distance_to_spectrum():
    rng = np.random.default_rng(0)
    n = 12
    z = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n)))
    A = Q @ np.diag(z) @ Q.conj().T
    ps = pseudospectra(A, 40)
    dist = np.min(np.abs(ps.z[..., None] - z[None, None, :]), axis=-1)
    np.testing.assert_allclose(ps.sigma_min, dist, atol=1e-13)
    assert ps.sigma_min.shape == (40, 40) and ps.x.shape == (40,) and ps.y.shape == (40,)
    np.testing.assert_allclose(np.sort_complex(ps.eigenvalues), np.sort_complex(z), atol=1e-13)
    assert not ps.rectangular
    # the auto box contains every eigenvalue with margin
    assert ps.x[0] < z.real.min() < z.real.max() < ps.x[-1]
    assert ps.y[0] < z.imag.min() < z.imag.max() < ps.y[-1]


def test_real_normal_with_tuple_grid():
    A = np.diag([0.9, -0.5, 0.2])
    xs, ys = np.linspace(-1, 1, 7), np.linspace(-0.5, 0.5, 5)
    ps = pseudospectra(A, (xs, ys))
    assert ps.sigma_min.shape == (5, 7)
    Z = xs[None, :] + 1j * ys[:, None]
    ref = np.min(np.abs(Z[..., None] - np.array([0.9, -0.5, 0.2])), axis=-1)
    np.testing.assert_allclose(ps.sigma_min, ref, atol=1e-15)


@pytest.mark.parametrize("m", [4, 8, 15])
def test_rectangular_arnoldi_is_an_inner_bound(m):
    """sigma_min(z I~ - H~) >= sigma_min(zI - A) >= 0, and >= sigma_min(zI - H_m) (square part)."""
    rng = np.random.default_rng(m)
    n = 40
    A = np.triu(rng.standard_normal((n, n)), 1) * 0.3 + np.diag(rng.uniform(-1, 1, n))
    V, Ht = _arnoldi(A, rng.standard_normal(n), m)
    np.testing.assert_allclose(A @ V[:, :m], V @ Ht, atol=1e-12)  # the Arnoldi relation
    Z = np.linspace(-1.5, 1.5, 15)[None, :] + 1j * np.linspace(-1, 1, 11)[:, None]
    rect = pseudospectra(Ht, Z)
    square = pseudospectra(Ht, Z, rectangular=False)
    true = np.array(
        [np.linalg.svd(z * np.eye(n) - A, compute_uv=False)[-1] for z in Z.reshape(-1)]
    ).reshape(Z.shape)
    assert rect.rectangular and not square.rectangular
    assert np.all(rect.sigma_min >= true * (1 - 1e-12) - 1e-13)
    assert np.all(rect.sigma_min >= square.sigma_min * (1 - 1e-12) - 1e-13)
    # the same value as a brute-force SVD of the (m+1) x m matrix (the Schur reduction is exact)
    It = np.eye(m + 1, m)
    brute = np.array(
        [np.linalg.svd(z * It - Ht, compute_uv=False)[-1] for z in Z.reshape(-1)]
    ).reshape(Z.shape)
    np.testing.assert_allclose(rect.sigma_min, brute, rtol=1e-10, atol=1e-13)
    ref = np.linalg.eigvals(Ht[:m])
    assert np.abs(rect.eigenvalues[:, None] - ref[None, :]).min(axis=1).max() < 1e-10


def test_accepts_result_objects_tensors_and_point_arrays():
    H = np.array([[0.5, 2.0], [0.0, 0.4], [0.0, 0.1]])
    res = SimpleNamespace(hessenberg=H)
    a = pseudospectra(res, 10)
    b = pseudospectra(torch.from_numpy(H), 10)
    np.testing.assert_array_equal(a.sigma_min, b.sigma_min)
    pts = np.array([0.5 + 0.0j, 2.0 + 1.0j])
    c = pseudospectra(H, pts)
    assert c.sigma_min.shape == (1, 2) and c.z.shape == (1, 2)
    with pytest.raises(ValueError, match=r"\(m\+s, m\)"):
        pseudospectra(np.ones((3, 5)), 10)
    with pytest.raises(ValueError, match="grid"):
        pseudospectra(H, "fine")
    with pytest.raises(ValueError, match="hessenberg=None.*method='arnoldi'"):
        pseudospectra(SimpleNamespace(hessenberg=None), 10)


def test_block_krylov_result_is_an_inner_bound_too():
    """eigs(block_size=2) keeps an (m+2) x m matrix: A V_m = V_{m+2} H~ is a decomposition of
    the same kind, so its rectangular sigma_min is again >= the true one (dense SVD oracle)."""
    from kappa_gpu.solvers import eigs

    rng = np.random.default_rng(3)
    n = 60
    A = np.triu(rng.standard_normal((n, n)), 1) * 0.3 + np.diag(rng.uniform(-1, 1, n))
    r = eigs(torch.from_numpy(A), k=4, block_size=2, generator=torch.Generator().manual_seed(0))
    m = r.hessenberg.shape[1]
    assert r.hessenberg.shape == (m + 2, m)
    Z = np.linspace(-1.5, 1.5, 9)[None, :] + 1j * np.linspace(-1, 1, 7)[:, None]
    ps = pseudospectra(r, Z)
    assert ps.rectangular
    true = np.array(
        [np.linalg.svd(z * np.eye(n) - A, compute_uv=False)[-1] for z in Z.reshape(-1)]
    ).reshape(Z.shape)
    assert np.all(ps.sigma_min >= true * (1 - 1e-10) - 1e-12)
    It = np.eye(m + 2, m)
    brute = np.array(
        [np.linalg.svd(z * It - r.hessenberg, compute_uv=False)[-1] for z in Z.reshape(-1)]
    ).reshape(Z.shape)
    np.testing.assert_allclose(ps.sigma_min, brute, rtol=1e-9, atol=1e-12)


def test_non_normal_shows_large_resolvent_near_the_defective_pair():
    """Heavy-ball block next to the upper EP: sigma_min << distance to the eigenvalues."""
    from kappa_gpu.diagnostics._blocks import (
        block_matrices,
        exceptional_points,
        sgd_momentum_coefficients,
    )

    co = sgd_momentum_coefficients(0.9)
    _, s_hi = exceptional_points(*co)
    M = block_matrices(s_hi * (1 - 1e-6), *co)[0]
    ps = pseudospectra(M, 41)
    dist = np.min(np.abs(ps.z[..., None] - ps.eigenvalues[None, None, :]), axis=-1)
    assert np.min(ps.sigma_min / np.maximum(dist, 1e-300)) < 0.05


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed (pip install kappa-gpu[plot])")
def test_plot_saves_png_with_labelled_axes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(3)
    A = np.triu(rng.standard_normal((8, 8)), 1) + np.diag(rng.uniform(-0.9, 0.9, 8))
    ps = pseudospectra(A, 30)
    assert isinstance(ps, Pseudospectra)
    ax = plot_pseudospectra(ps)
    assert ax.get_xlabel() == "Re z" and ax.get_ylabel() == "Im z"
    out = tmp_path / "ps.png"
    ax.figure.savefig(out)
    plt.close(ax.figure)
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, ax2 = plt.subplots()
    assert plot_pseudospectra(ps, levels=[-2, -1], ax=ax2) is ax2
    plt.close(fig)


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    ps = pseudospectra(np.diag([0.5, 0.2]), 5)
    with pytest.raises(ImportError, match=r"pip install kappa-gpu\[plot\]"):
        plot_pseudospectra(ps)

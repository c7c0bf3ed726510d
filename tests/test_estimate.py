"""estimate(): structured vs arnoldi vs dense oracles, known thresholds, exceptional points."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from _cases import one_thread

import kappa_gpu as kg
from kappa_gpu._estimate import estimate
from kappa_gpu.operators import update_operator

# ---------------------------------------------------------------------------------------------
# factories


class Quadratic(torch.nn.Module):
    """loss = 1/2 theta^T A theta: the Hessian is A, prescribed."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, x):
        return self.theta


def quad_loss(out, A):
    return 0.5 * out @ (A @ out)


def quadratic_problem(lams, seed=0):
    n = len(lams)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.as_tensor(lams, dtype=torch.float64)) @ Q.T
    A = 0.5 * (A + A.T)
    return Quadratic(n, seed), (torch.zeros(1, dtype=torch.float64), A)


def mlp_problem(seed=0, d_in=4, width=6, n=32, act=torch.nn.Tanh, extra=()):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, width), *extra, act(), torch.nn.Linear(width, 1)
    ).double()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    return model, (X, y), torch.nn.MSELoss()


def take_steps(model, opt, loss_fn, batch, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()
    opt.zero_grad()


def match(z_small, z_ref):
    """Relative error of each z in z_small against its nearest reference eigenvalue."""
    z_ref = np.asarray(z_ref)
    return np.array([np.min(np.abs(z_ref - z)) / max(abs(z), 1e-300) for z in z_small])


# ---------------------------------------------------------------------------------------------
# structured vs arnoldi vs dense


OPTIMIZERS = {
    "heavy_ball": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.999)),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def _sharpen(model, opt, loss_fn, batch, target=2.5):
    """Scale the learning rate so the top curvature sits at ``a s = target``: the sharp modes
    are then complex pairs (between the exceptional points), the leftmost eigenvalues of J."""
    st = update_operator(model, opt, loss_fn, batch).structure()
    sq = st.D.double().sqrt()
    Ht = st.hessian.to_dense().double()
    s_max = torch.linalg.eigvalsh(sq[:, None] * Ht * sq[None, :]).max().item()
    a = float(st.a.reshape(-1)[0])
    for g in opt.param_groups:
        g["lr"] *= target / (a * s_max)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_structured_and_arnoldi_agree_with_dense(name):
    model, batch, loss_fn = mlp_problem(seed=3)
    opt = OPTIMIZERS[name](model.parameters())
    take_steps(model, opt, loss_fn, batch, steps=5)
    _sharpen(model, opt, loss_fn, batch)
    k = 2
    gen = torch.Generator().manual_seed(0)
    rs = estimate(model, opt, loss_fn, batch, k=k, method="structured", tol=1e-12, generator=gen)
    ra = estimate(
        model,
        opt,
        loss_fn,
        batch,
        k=k,
        method="arnoldi",
        tol=1e-12,
        generator=torch.Generator().manual_seed(0),
    )
    assert rs.method == "structured" and ra.method == "arnoldi"
    assert rs.all_converged and ra.all_converged, (rs.message, ra.message)
    # Dense oracle: numpy eig of the materialized operator.
    J = update_operator(model, opt, loss_fn, batch).to_dense().numpy()
    zd, Vd = np.linalg.eig(J)
    assert np.max(match(rs.eigenvalues, zd)) < 1e-6
    assert np.max(match(ra.eigenvalues, zd)) < 1e-6
    # Same modes both ways: the 2k leftmost eigenvalues of J.
    zs = np.sort_complex(rs.eigenvalues)
    za = np.sort_complex(ra.eigenvalues)
    np.testing.assert_allclose(zs, za, rtol=1e-6)
    left = np.argsort(zd.real)[: 2 * k]
    np.testing.assert_allclose(np.sort_complex(zd[left]), zs, rtol=1e-6)
    # kappa_V of the same eigenvector set, three ways.
    Vn = Vd[:, left] / np.linalg.norm(Vd[:, left], axis=0)
    sv = np.linalg.svd(Vn, compute_uv=False)
    kd = sv[0] / sv[-1]
    assert rs.kappa_V == pytest.approx(kd, rel=1e-4)
    assert ra.kappa_V == pytest.approx(kd, rel=1e-4)
    # Eigenvalue condition numbers agree with the dense ones (scipy left eigenvectors).
    import scipy.linalg as sla

    w, vl, vr = sla.eig(J, left=True, right=True)
    cond = {}
    for i in left:
        x = vr[:, i] / np.linalg.norm(vr[:, i])
        y = vl[:, i] / np.linalg.norm(vl[:, i])
        cond[i] = 1 / abs(np.vdot(y, x))
    ref = np.array([cond[left[np.argmin(np.abs(w[left] - z))]] for z in rs.eigenvalues])
    np.testing.assert_allclose(rs.condition_numbers, ref, rtol=1e-5)
    # Residual certificates are real residuals and small.
    assert np.all(rs.residuals < 1e-8) and np.all(ra.residuals < 1e-8)


# ---------------------------------------------------------------------------------------------
# thresholds on quadratics


@pytest.mark.parametrize("side", [-1, 1])
def test_heavy_ball_stability_edge(side):
    mu, lam_max = 0.9, 4.0
    lams = np.concatenate([[lam_max], np.linspace(0.1, 2.0, 15)])
    model, batch = quadratic_problem(lams)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=mu)
    take_steps(model, opt, quad_loss, batch, 2)
    eta = 2 * (1 + mu) / lam_max * (1 + side * 1e-3)
    opt.param_groups[0]["lr"] = eta
    rep = estimate(model, opt, quad_loss, batch, k=2)
    assert rep.all_converged
    assert (rep.spectral_radius > 1) == (side > 0)
    assert (rep.stability_margin.min() < 0) == (side > 0)


@pytest.mark.parametrize("side", [-1, 1])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_frozen_stability_edge(side, cls):
    b1, b2, eps = 0.9, 0.999, 1e-8
    lams = np.concatenate([[5.0], np.linspace(0.1, 2.0, 15)])
    model, batch = quadratic_problem(lams, seed=1)
    opt = cls(model.parameters(), lr=1e-2, betas=(b1, b2), eps=eps, weight_decay=0.0)
    take_steps(model, opt, quad_loss, batch, 3)
    # D from the optimizer's state, independently of the package: next step t+1.
    p = model.theta
    st = opt.state[p]
    t = float(st["step"]) + 1
    g = batch[1] @ p.detach()
    v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
    denom = v.sqrt() / math.sqrt(1 - b2**t) + eps
    D0 = 1e-2 / ((1 - b1**t) * denom)  # at lr = 1e-2
    sq = D0.sqrt()
    s0 = torch.linalg.eigvalsh(sq[:, None] * batch[1] * sq[None, :]).max().item()
    # Cohen et al. 2022: (1 - b1) lambda_max(D H) = 2 (1 + b1), i.e. 38 / eta for b1 = 0.9.
    lr_edge = 1e-2 * 2 * (1 + b1) / ((1 - b1) * s0)
    opt.param_groups[0]["lr"] = lr_edge * (1 + side * 1e-3)
    rep = estimate(model, opt, quad_loss, batch, k=2)
    assert rep.all_converged
    assert (rep.spectral_radius > 1) == (side > 0)


def test_exceptional_point_scaling_and_at_ep():
    mu = 0.9
    ep = (1 + math.sqrt(mu)) ** 2
    lams = np.concatenate([[1.0], np.linspace(0.05, 0.4, 15)])
    model, batch = quadratic_problem(lams, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=mu)
    take_steps(model, opt, quad_loss, batch, 2)
    kappas = []
    for delta in (1e-2, 1e-3, 1e-4):
        opt.param_groups[0]["lr"] = ep * (1 - delta)  # eta * lambda_max = EP (1 - delta)
        rep = estimate(model, opt, quad_loss, batch, k=2)
        kappas.append(rep.kappa_V)
        assert rep.ep_which[0] == "upper"
        assert rep.ep_ratio[0] == pytest.approx(-delta, rel=1e-6)
    slopes = np.diff(np.log(kappas)) / np.diff(np.log([1e-2, 1e-3, 1e-4]))
    np.testing.assert_allclose(slopes, -0.5, atol=0.05)
    # Exactly at the EP: finite or inf, never NaN, never an exception; the mode is named.
    opt.param_groups[0]["lr"] = ep
    rep = estimate(model, opt, quad_loss, batch, k=2)
    assert not math.isnan(rep.kappa_V)
    assert rep.kappa_V > 1e5
    assert rep.at_ep[0] or abs(rep.ep_ratio[0]) < 1e-12
    assert not np.any(np.isnan(rep.eigenvalues))
    json.dumps(rep.to_dict())


def test_exactly_at_the_ep_growth_is_right_or_withheld():
    """Heavy ball tuned so that the sharpest mode sits exactly on the upper exceptional point
    (a s = (1 + sqrt(mu))^2). Oracle: max_t ||T^t|| of dense J on the two modes' exact 2x2
    block subspace. kappa_V is inf (the message says so), the structured path's growth is the
    oracle's; the arnoldi path's computed eigenvectors can be parallel to rounding, and their
    span then misses the Jordan direction (it reported 2.5 for 55.2): the growth and the Kreiss
    bound are withheld (nan) and the message says why, never a wrong number."""
    mu = 0.9
    ep = (1 + math.sqrt(mu)) ** 2
    withheld = 0
    for seed in (0, 1, 2):
        model, batch, loss_fn = mlp_problem(seed=seed, d_in=5, width=8, n=20)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=mu)
        take_steps(model, opt, loss_fn, batch)
        H = update_operator(model, opt, loss_fn, batch).structure().hessian.to_dense().double()
        lam, W = torch.linalg.eigh(H)
        opt.param_groups[0]["lr"] = ep / float(lam[-1])
        J = update_operator(model, opt, loss_fn, batch).to_dense().numpy()
        q = W[:, [-1, -2]].numpy()
        Z = np.zeros_like(q)
        B, _ = np.linalg.qr(np.block([[q, Z], [Z, q]]))
        T, P, oracle = B.T @ J @ B, np.eye(4), 1.0
        for _ in range(3000):
            P = P @ T
            oracle = max(oracle, np.linalg.norm(P, 2))
        for method in ("structured", "arnoldi"):
            rep = estimate(model, opt, loss_fn, batch, k=2, method=method)
            assert rep.kappa_V == math.inf and "kappa_V is infinite" in rep.message
            if method == "structured" or not math.isnan(rep.transient_growth):
                assert rep.transient_growth == pytest.approx(oracle, rel=1e-8), (seed, method)
            else:
                withheld += 1
                assert math.isnan(rep.kreiss_lower) and np.all(np.isnan(rep.growth_curve))
                assert "parallel" in rep.message and "method='structured'" in rep.message
                assert "raise ncv" not in rep.message, rep.message
                json.dumps(rep.to_dict())
    assert withheld  # seed 1's arnoldi run is such a case


# ---------------------------------------------------------------------------------------------
# report, modes, non-interference, bad input


def test_report_modes_both_and_json():
    model, batch, loss_fn = mlp_problem(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    take_steps(model, opt, loss_fn, batch)
    rep = estimate(model, opt, loss_fn, batch, k=2, modes="both")
    assert rep.modes == "both" and len(rep.eigenvalues) == 8
    assert len(rep.curvatures) == 4
    assert rep.curvatures[:2].min() > rep.curvatures[2:].max()
    d = rep.to_dict()
    text = json.dumps(d)
    assert "kappa_V" in text and d["method"] == "structured"
    # Transient growth: the kappa_V rho^t bound holds along the whole curve.
    assert np.all(rep.growth_curve <= rep.kappa_bound_curve * (1 + 1e-8))
    # Negative-curvature modes have z > 1: growth is unbounded and said so.
    assert rep.spectral_radius > 1
    assert not rep.growth_bounded and rep.transient_growth == math.inf
    assert rep.kreiss_lower == math.inf
    assert 1.0 <= rep.normalized_growth < math.inf
    assert rep.message in rep.summary()
    # The sharp modes alone are stable: finite growth, Kreiss bound below it (a theorem).
    sharp = estimate(model, opt, loss_fn, batch, k=2)
    assert sharp.spectral_radius < 1 and sharp.growth_bounded
    assert 1.0 <= sharp.transient_growth < math.inf
    assert sharp.kreiss_lower <= sharp.transient_growth * (1 + 1e-8)
    assert np.all(sharp.growth_curve <= sharp.kappa_bound_curve * (1 + 1e-8))


def test_adam_full_uses_arnoldi_and_matches_dense():
    model, batch, loss_fn = mlp_problem(seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    take_steps(model, opt, loss_fn, batch, 5)
    _sharpen(model, opt, loss_fn, batch, target=2.0)
    rep = estimate(model, opt, loss_fn, batch, k=2, variant="full", tol=1e-12)
    assert rep.method == "arnoldi" and rep.variant == "full"
    J = update_operator(model, opt, loss_fn, batch, variant="full").to_dense().numpy()
    zd = np.linalg.eigvals(J)
    assert np.max(match(rep.eigenvalues, zd)) < 1e-6
    assert rep.all_converged
    with pytest.raises(ValueError, match="structured"):
        estimate(model, opt, loss_fn, batch, k=2, variant="full", method="structured")


def _snapshot(model, opt):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(opt.state_dict()),
        torch.get_rng_state().clone(),
        [m.training for m in model.modules()],
    )


def _same(a, b):
    sd_a, g_a, o_a, r_a, t_a = a
    sd_b, g_b, o_b, r_b, t_b = b
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    for x, y in zip(g_a, g_b, strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    for pid in o_a["state"]:
        for key, v in o_a["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(o_b["state"][pid][key]))
    assert torch.equal(r_a, r_b) and t_a == t_b


@pytest.mark.parametrize("method", ["structured", "arnoldi"])
def test_estimate_changes_nothing(method):
    model, batch, loss_fn = mlp_problem(
        seed=9, extra=(torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.2))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    take_steps(model, opt, loss_fn, batch)
    loss_fn(model(batch[0]), batch[1]).backward()  # leave a .grad around
    before = _snapshot(model, opt)
    rep = estimate(model, opt, loss_fn, batch, k=2, method=method)
    _same(before, _snapshot(model, opt))
    assert np.isfinite(rep.spectral_radius)


def test_warm_start_is_cheaper():
    model, batch, loss_fn = mlp_problem(seed=11, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    take_steps(model, opt, loss_fn, batch)
    cold = estimate(model, opt, loss_fn, batch, k=4, tol=1e-10)
    take_steps(model, opt, loss_fn, batch, 1)
    warm = estimate(model, opt, loss_fn, batch, k=4, tol=1e-10, warm_start=cold)
    recold = estimate(model, opt, loss_fn, batch, k=4, tol=1e-10)
    np.testing.assert_allclose(
        np.sort_complex(warm.eigenvalues), np.sort_complex(recold.eigenvalues), rtol=1e-7
    )
    assert warm.n_hvp < recold.n_hvp


def test_bad_arguments():
    model, batch, loss_fn = mlp_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    take_steps(model, opt, loss_fn, batch)
    with pytest.raises(ValueError, match="method"):
        estimate(model, opt, loss_fn, batch, method="magic")
    with pytest.raises(ValueError, match="modes"):
        estimate(model, opt, loss_fn, batch, modes="all")
    with pytest.raises(ValueError, match="k must"):
        estimate(model, opt, loss_fn, batch, k=0)
    fresh = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(Exception, match="step"):
        estimate(model, fresh, loss_fn, batch)


def test_public_api_exports_estimate():
    assert kg.estimate is estimate
    assert kg.KappaReport is not None


def test_zero_learning_rate_is_a_clear_error():
    model, batch, loss_fn = mlp_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    take_steps(model, opt, loss_fn, batch)
    opt.param_groups[0]["lr"] = 0.0  # e.g. the last step of a linear schedule
    with pytest.raises(ValueError, match="learning rate is 0"):
        estimate(model, opt, loss_fn, batch)


@pytest.mark.parametrize("name", ["heavy_ball", "adam"])
def test_parameter_the_loss_does_not_reach_is_finite(name):
    """A layer the loss does not reach, registered last or first: its entries are inactive and
    carry block coefficients of their own, so the structured path must read the coefficients
    at a reached entry (entry 0 once gave z = 1, 0, J's eigenvalues on the unused layer, with
    zero residuals). Both orders give the same modes, which are eigenvalues of J."""
    net0, batch, loss_fn = mlp_problem(seed=13)

    class WithUnused(torch.nn.Module):
        def __init__(self, first):
            super().__init__()
            if first:
                self.unused = torch.nn.Linear(2, 2).double()  # no gradient: D = 0 on its entries
            self.net = copy.deepcopy(net0)
            if not first:
                self.unused = torch.nn.Linear(2, 2).double()

        def forward(self, x):
            return self.net(x)

    reps = []
    for first in (False, True):
        model = WithUnused(first)
        assert next(model.named_parameters())[0].startswith("unused") == first
        opt = OPTIMIZERS[name](model.parameters())
        take_steps(model, opt, loss_fn, batch)
        rep = estimate(model, opt, loss_fn, batch, k=2)
        assert rep.method == "structured"
        assert rep.all_converged and np.isfinite(rep.kappa_V)
        J = update_operator(model, opt, loss_fn, batch).to_dense().numpy()
        assert np.max(match(rep.eigenvalues, np.linalg.eigvals(J))) < 1e-6
        reps.append(rep)
    np.testing.assert_allclose(reps[1].curvatures, reps[0].curvatures, rtol=1e-8)
    assert np.max(match(reps[1].eigenvalues, reps[0].eigenvalues)) < 1e-8
    assert np.min(np.abs(reps[0].eigenvalues - 1)) > 1e-3  # not the unused layer's z = 1


# ---------------------------------------------------------------------------------------------
# cost: certificates without extra HVPs, the J tolerance, the warm-started arnoldi refinement


class _Spy:
    """Wraps a solver function and records each call's keyword arguments and result."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        res = self.fn(*args, **kwargs)
        self.calls.append((kwargs, res))
        return res


def _sharp_mlp(name="heavy_ball", width=32, seed=3):
    model, batch, loss_fn = mlp_problem(seed=seed, width=width)
    opt = OPTIMIZERS[name](model.parameters())
    take_steps(model, opt, loss_fn, batch, steps=5)
    _sharpen(model, opt, loss_fn, batch, target=3.0)
    return model, opt, loss_fn, batch


def _structure_problem(name):
    """The update operator of a small float64 MLP after 3 steps of optimizer ``name``
    (``OPTIMIZERS``, ``"sgd"`` without momentum, or ``"unused"`` / ``"unused_first"``: heavy
    ball on a model with a layer the loss does not reach, whose entries have D = 0, registered
    after or before the network)."""
    model, batch, loss_fn = mlp_problem(seed=4)
    if name.startswith("unused"):
        layers = {"net": model, "unused": torch.nn.Linear(2, 2).double()}
        if name == "unused_first":
            layers = dict(reversed(list(layers.items())))
        model = torch.nn.ModuleDict(layers)
        net = model["net"]
        model.forward = lambda x: net(x)  # noqa: E731 - a module whose extra layer is unused
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1)}.get(name) or OPTIMIZERS[
        "heavy_ball" if name.startswith("unused") else name]
    opt = make(model.parameters())
    take_steps(model, opt, loss_fn, batch)
    return update_operator(model, opt, loss_fn, batch)


@pytest.mark.parametrize("name", ["heavy_ball", "nesterov", "adam", "sgd", "unused"])
def test_J_of_the_mode_basis_from_hessian_products(name):
    """_apply_J reproduces J applied to [(U, 0) | (0, D^-1 U)] (or J U) from Ht U alone."""
    from kappa_gpu._estimate import _apply_J, _start_blocks

    op = _structure_problem(name)
    st = op.structure()
    n = st.D.shape[0]
    W = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = W * (st.D > 0)[:, None]  # S has no rows for parameters the loss does not reach
    sq = st.D.sqrt()
    U = sq[:, None] * W
    if st.order == 1:
        B, DinvU = U, None
    else:
        B, _ = _start_blocks(st, W, op.shape[0])
        DinvU = B[n:, 3:]
    before = op.n_hvp
    HtU = st.hessian.matmat(U)
    JB = _apply_J(st, U, HtU, DinvU)
    assert op.n_hvp - before == 3  # one HVP per mode, none for the (0, D^-1 u) directions
    torch.testing.assert_close(JB, op.matmat(B), rtol=1e-12, atol=1e-12)


def test_structured_certificates_reuse_the_lanczos_hvps(monkeypatch):
    """The J certificates cost no HVP beyond eigsh's own (its iteration plus k certificates)."""
    import kappa_gpu._estimate as est

    spy = _Spy(est.eigsh)
    monkeypatch.setattr(est, "eigsh", spy)
    model, opt, loss_fn, batch = _sharp_mlp()
    rep = estimate(model, opt, loss_fn, batch, k=4, tol=1e-8)
    assert rep.all_converged and len(spy.calls) == 1
    res = spy.calls[0][1]
    assert rep.n_hvp == res.n_matvec + res.n_matvec_certify
    assert res.n_matvec_certify == 4


@pytest.mark.parametrize("name", ["heavy_ball", "adam"])
def test_structured_meets_tol_on_the_J_residuals(name):
    """tol is the relative J residual, as for arnoldi: ||J x - z x|| <= tol |z| (unit x)."""
    model, opt, loss_fn, batch = _sharp_mlp(name)
    for tol in (1e-5, 1e-9):
        rep = estimate(model, opt, loss_fn, batch, k=4, tol=tol)
        assert rep.all_converged, rep.message
        assert np.all(rep.residuals <= tol * np.abs(rep.eigenvalues))


def test_structured_refines_modes_that_miss_tol(monkeypatch):
    """When the Lanczos tolerance was too loose for J, block-Lanczos refinement fixes it."""
    import kappa_gpu._estimate as est

    spy = _Spy(est.eigsh)
    monkeypatch.setattr(est, "eigsh", spy)
    monkeypatch.setattr(est, "_tolerance_factor", lambda st, side: 1e3)  # far too loose
    model, opt, loss_fn, batch = _sharp_mlp()
    tol = 1e-8
    rep = estimate(model, opt, loss_fn, batch, k=4, tol=tol)
    assert 2 <= len(spy.calls) <= 4
    first, second = spy.calls[0][0], spy.calls[1][0]
    assert first["tol"] == pytest.approx(1e-5) and second["block_size"] == 4
    assert second["tol"] < tol
    assert rep.all_converged, rep.message
    assert np.all(rep.residuals <= tol * np.abs(rep.eigenvalues))
    assert rep.n_hvp == sum(r.n_matvec + r.n_matvec_certify for _, r in spy.calls)


def test_arnoldi_refines_a_structured_warm_start(monkeypatch):
    """method='arnoldi' started from a structured report: no new Lanczos run, a block start of
    one column per mode, the same modes, and under half the Krylov matvecs of a cold arnoldi
    run (12 vs 27; both then certify the same 8 vectors)."""
    import kappa_gpu._estimate as est

    model, opt, loss_fn, batch = _sharp_mlp(width=64)
    rs = estimate(model, opt, loss_fn, batch, k=4, tol=1e-9)
    spy_h, spy = _Spy(est.eigsh), _Spy(est.eigs)
    monkeypatch.setattr(est, "eigsh", spy_h)
    monkeypatch.setattr(est, "eigs", spy)
    ra = estimate(model, opt, loss_fn, batch, k=4, tol=1e-9, method="arnoldi", warm_start=rs)
    assert spy_h.calls == [] and "block size 4" in ra.target
    assert ra.all_converged, ra.message
    np.testing.assert_allclose(np.sort_complex(ra.eigenvalues), np.sort_complex(rs.eigenvalues),
                               rtol=1e-7)
    assert ra.kappa_V == pytest.approx(rs.kappa_V, rel=1e-4)
    np.testing.assert_allclose(np.sort(ra.condition_numbers), np.sort(rs.condition_numbers),
                               rtol=1e-4)
    (kw, warm), _left = spy.calls
    op = update_operator(model, opt, loss_fn, batch)
    cold = est.eigs(op, k=8, which=kw["which"], tol=1e-9, ncv=kw["ncv"],
                    generator=torch.Generator().manual_seed(0))
    assert cold.converged_all
    assert warm.n_matvec_certify == cold.n_matvec_certify
    assert warm.n_matvec <= 0.5 * cold.n_matvec, (warm.n_matvec, cold.n_matvec)


def test_arnoldi_from_an_older_structured_report_searches_first(monkeypatch):
    """Ritz vectors of an earlier point are not this J's invariant subspace: they warm-start
    the Lanczos run that builds the start block, and the report's point says they are old."""
    import kappa_gpu._estimate as est

    model, opt, loss_fn, batch = _sharp_mlp(width=64)
    old = estimate(model, opt, loss_fn, batch, k=4, tol=1e-9)
    take_steps(model, opt, loss_fn, batch, 1)
    spy = _Spy(est.eigsh)
    monkeypatch.setattr(est, "eigsh", spy)
    ra = estimate(model, opt, loss_fn, batch, k=4, tol=1e-9, method="arnoldi", warm_start=old)
    assert ra.point != old.point
    assert len(spy.calls) == 1 and spy.calls[0][0]["v0"] is old.warm_vectors
    assert ra.all_converged, ra.message
    rs = estimate(model, opt, loss_fn, batch, k=4, tol=1e-9)
    assert rs.point == ra.point
    np.testing.assert_allclose(np.sort_complex(ra.eigenvalues), np.sort_complex(rs.eigenvalues),
                               rtol=1e-7)


def test_arnoldi_with_a_parameter_the_loss_does_not_reach():
    """The structured start block divides by D^1/2: D = 0 entries must not make it NaN."""
    net, batch, loss_fn = mlp_problem(seed=13)
    model = torch.nn.ModuleDict({"net": net, "unused": torch.nn.Linear(2, 2).double()})
    model.forward = lambda x: net(x)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    take_steps(model, opt, loss_fn, batch)
    rep = estimate(model, opt, loss_fn, batch, k=2, method="arnoldi")
    assert rep.all_converged and np.isfinite(rep.kappa_V)
    J = update_operator(model, opt, loss_fn, batch).to_dense().numpy()
    assert np.max(match(rep.eigenvalues, np.linalg.eigvals(J))) < 1e-6


def test_certificates_stay_exact_with_a_zero_learning_rate_group():
    """A group with lr = 0 breaks the 2x2 structure (D = 0 where the Hessian still acts): the
    structured path refuses it (its certificates showed it: S W = D^1/2 Ht U loses Ht U there,
    recomputed; residuals > 1e-3) and auto takes arnoldi."""
    model, batch, loss_fn = mlp_problem(seed=3, width=16)
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.1}], momentum=0.9)
    take_steps(model, opt, loss_fn, batch)
    opt.param_groups[1]["lr"] = 0.0
    with pytest.raises(ValueError, match="lr = 0"):
        estimate(model, opt, loss_fn, batch, k=2, method="structured")
    assert estimate(model, opt, loss_fn, batch, k=2).method == "arnoldi"
    ra = estimate(model, opt, loss_fn, batch, k=2, method="arnoldi")
    assert ra.all_converged, ra.message
    J = update_operator(model, opt, loss_fn, batch).to_dense().numpy()
    assert np.max(match(ra.eigenvalues, np.linalg.eigvals(J))) < 1e-6


def test_backend_is_passed_to_the_operator():
    """``estimate(backend=...)`` reaches update_operator: 'cupy' on CPU raises its clear error."""
    model, batch, loss_fn = mlp_problem(seed=4)
    opt = OPTIMIZERS["heavy_ball"](model.parameters())
    take_steps(model, opt, loss_fn, batch)
    with pytest.raises(ValueError, match="cupy"):
        kg.estimate(model, opt, loss_fn, batch, k=2, backend="cupy")
    with pytest.raises(ValueError, match="backend"):
        kg.estimate(model, opt, loss_fn, batch, k=2, backend="nope")
    r = kg.estimate(model, opt, loss_fn, batch, k=2, backend="torch")
    assert r.converged.all()


@pytest.mark.parametrize("name", ["heavy_ball", "sgd"])
def test_chunked_moments_match_dense_float64(name, monkeypatch):
    """The one-pass chunked post-processing (float64 accumulation over chunks of float32
    vectors, the structured basis never formed) equals the plain dense float64 formulas:
    Grams, true residuals, unit eigenvectors, T, kappa_V; B^T X and the condition numbers of
    the arnoldi path."""
    import kappa_gpu._estimate as est
    from kappa_gpu.diagnostics._conditioning import eigenvalue_condition_numbers, kappa_V

    monkeypatch.setattr(est, "_chunk_rows", lambda device, width: 50)  # 4 chunks, one ragged
    model, batch, loss_fn = mlp_problem(seed=3, width=32)
    model, batch = model.float(), tuple(t.float() for t in batch)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1)}.get(name) or OPTIMIZERS[name]
    opt = make(model.parameters())
    take_steps(model, opt, loss_fn, batch, steps=5)
    if name == "heavy_ball":
        _sharpen(model, opt, loss_fn, batch, target=3.0)  # complex pairs, kappa_V > 1
    op = update_operator(model, opt, loss_fn, batch)
    st = op.structure()
    S, sq = est._sym_operator(st)
    coef = {f: getattr(st, f).double()[:, None] for f in ("D", "a", "a2", "b", "beta", "c")}

    def dense(sub):
        """B, its left basis Bl and J B in float64, written out from the operator's formulas
        with U = sq W, D^-1 U = W / sq, Ht U = (S W) / sq from the stored W and S W."""
        assert sub.SW is not None  # the certificate products were kept (no HVPs for Ht U)
        W, sqc = sub.W.double(), sub.sq.double()[:, None]
        U = sqc * W
        V = torch.where(sqc > 0, W / sqc, 0)
        H = torch.where(sqc > 0, sub.SW.double() / sqc, 0)
        top = coef["c"] * U - coef["D"] * coef["a"] * H
        if st.order == 1:
            return U, V, top
        Z = torch.zeros_like(U)
        B, Bl = torch.cat([torch.cat([U, Z]), torch.cat([Z, V])], 1), torch.cat(
            [torch.cat([V, Z]), torch.cat([Z, U])], 1)
        JB = torch.cat([torch.cat([top, coef["a2"] * H]),
                        torch.cat([-coef["D"] * coef["b"] * V, coef["beta"] * V])], 1)
        return B, Bl, JB

    def close(a, b, rtol):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(b)), (a, b)

    outs = []
    for which, tol in (("LA", 1e-5), ("SA", 1e-5), ("LA", 1e-3)):
        res = est.eigsh(S, k=4, which=which, tol=tol, generator=torch.Generator().manual_seed(0))
        out = est._structured_modes(op, st, sq, res, which, 1e-4)
        if tol == 1e-5:
            outs.append(out)
        sub = out["bases"][0]
        B, Bl, JB = dense(sub)
        C, z = torch.from_numpy(out["C"]), torch.from_numpy(out["z"])
        X = B.to(C.dtype) @ C
        np.testing.assert_allclose(torch.linalg.vector_norm(X, dim=0).numpy(), 1.0, rtol=1e-12)
        r = torch.linalg.vector_norm(JB.to(C.dtype) @ C - X * z, dim=0).numpy()
        # The generic chunked pass (rows of B and J B) against the dense formulas: exact.
        mom = est._moments([sub], out["C"], out["z"])
        np.testing.assert_allclose(mom.residuals, r, rtol=1e-6)
        close(mom.G, B.T @ B, 1e-13)
        close(mom.BtJB, B.T @ JB, 1e-13)
        close(mom.GL, Bl.T @ Bl, 1e-13)
        close(mom.cross, Bl.T @ B, 1e-13)
        # What _structured_modes used: the weighted sums over W and S W (_structured_moments).
        fast = est._structured_moments(sub, out["C"], out["z"], out["s"], out["mode_of"])
        assert fast is not None
        np.testing.assert_allclose(out["residuals"], fast.residuals, rtol=1e-8)
        np.testing.assert_allclose(out["residuals"], r, rtol=1e-6)
        if tol == 1e-3:
            assert np.max(r) > 1e-5, r  # a residual far above the float32 floor, too
        G, BtJB = out["geometry"]
        close(G, B.T @ B, 1e-13)
        close(BtJB, B.T @ JB, 1e-13)
        close(fast.GL, Bl.T @ Bl, 1e-13)
        close(fast.cross, Bl.T @ B, 1e-13)
        # T = Q^T J Q and kappa_V from R (Cholesky of the Gram) vs a Householder QR of B.
        R, T = est._basis_geometry(out["bases"], out["geometry"])
        Q, R0 = torch.linalg.qr(B)
        sgn = torch.sign(torch.diagonal(R0))
        Q, R0 = Q * sgn, R0 * sgn[:, None]
        close(R, R0, 1e-10)
        close(T, Q.T @ JB @ torch.linalg.inv(R0), 1e-10)
        assert float(kappa_V(torch.from_numpy(R @ out["C"]))) == pytest.approx(kappa_V(X),
                                                                                rel=1e-6)
    # Two sides merged (modes="both"): the Gram pass over both bases side by side.
    Bs, JBs = zip(*((dense(o["bases"][0])[0], dense(o["bases"][0])[2]) for o in outs),
                  strict=True)
    B, JB = torch.cat(Bs, 1), torch.cat(JBs, 1)
    mom = est._moments(est._merge(outs)["bases"])
    close(mom.G, B.T @ B, 1e-13)
    close(mom.BtJB, B.T @ JB, 1e-13)

    # Dense (arnoldi) bases: B^T X for complex X, and the condition numbers.
    g = torch.Generator().manual_seed(1)
    N = 200
    Bd, JBd = torch.randn(N, 6, generator=g), torch.randn(N, 6, generator=g)
    Xc = torch.randn(N, 5, generator=g, dtype=torch.complex64)
    Yc = torch.randn(N, 5, generator=g, dtype=torch.complex64)
    mom = est._moments([est._Subspace(B=Bd, JB=JBd)], X=Xc)
    close(mom.G, Bd.double().T @ Bd.double(), 1e-13)
    close(mom.BtJB, Bd.double().T @ JBd.double(), 1e-13)
    close(mom.BtX, Bd.to(torch.complex128).T @ Xc.to(torch.complex128), 1e-13)
    Xc[:, 2] = 0  # a zero column: inf, as the reference says
    cols = torch.tensor([4, 0, 1, 3, 2])
    ref = eigenvalue_condition_numbers(Xc, Yc[:, cols]).numpy()
    got = est._condition_numbers(Xc, Yc, cols)
    assert np.isinf(got[2]) and np.isinf(ref[2])
    np.testing.assert_allclose(np.delete(got, 2), np.delete(ref, 2), rtol=1e-12)


@pytest.mark.parametrize("name", ["heavy_ball", "adam", "sgd", "unused", "unused_first"])
def test_structured_moments_equal_the_row_pass(name):
    """_structured_moments (weighted sums over W and S W) gives what _moments gets from the rows
    of B and J B, in float64: per-entry D (Adam), order 1 (plain SGD), entries with D = 0 (a
    layer the loss does not reach: the masked branch), tight and loose Lanczos residuals."""
    import kappa_gpu._estimate as est

    op = _structure_problem(name)
    st = op.structure()
    S, sq = est._sym_operator(st)
    assert bool((sq == 0).any()) == name.startswith("unused")
    if name == "adam":
        assert float(st.D.max()) > 1.5 * float(st.D[st.D > 0].min())  # D is not uniform
    for tol in (1e-10, 1e-3):
        res = est.eigsh(S, k=3, which="LA", tol=tol, generator=torch.Generator().manual_seed(0))
        out = est._structured_modes(op, st, sq, res, "LA", 1e-4)
        sub = out["bases"][0]
        C, z = out["C"], out["z"]
        fast = est._structured_moments(sub, C, z, out["s"], out["mode_of"])
        ref = est._moments([sub], C, z)
        assert fast is not None
        for f in ("G", "BtJB", "GL", "cross"):
            a, b = getattr(fast, f), getattr(ref, f)
            assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(b)), f
        np.testing.assert_allclose(fast.residuals, ref.residuals, rtol=1e-7,
                                   atol=1e-15 * np.max(np.abs(z)))
        if tol == 1e-3:
            assert np.max(ref.residuals) > 1e-8  # residuals well above rounding, too
    # modes="both": the Gram matrices of the two sides' bases side by side, in their order
    outs = [est._structured_modes(op, st, sq, est.eigsh(S, k=3, which=w, tol=1e-10,
                                                        generator=torch.Generator().manual_seed(0)),
                                  w, 1e-4) for w in ("LA", "SA")]
    bases = est._merge(outs)["bases"]
    fast, ref = est._structured_moments(bases), est._moments(bases)
    assert fast is not None and fast.residuals is None
    for f in ("G", "BtJB", "GL", "cross"):
        a, b = getattr(fast, f), getattr(ref, f)
        assert a.shape == b.shape and np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(b)), f


def test_plain_sgd_structured_and_arnoldi_agree_with_dense():
    """SGD without momentum (J = I - lr Ht, order 1): one eigenvalue per mode on both paths."""
    model, batch, loss_fn = mlp_problem(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    take_steps(model, opt, loss_fn, batch)
    k = 3
    rs = estimate(model, opt, loss_fn, batch, k=k, method="structured", tol=1e-10)
    ra = estimate(model, opt, loss_fn, batch, k=k, method="arnoldi", tol=1e-10)
    assert rs.all_converged and ra.all_converged, (rs.message, ra.message)
    assert len(rs.eigenvalues) == len(ra.eigenvalues) == k
    J = update_operator(model, opt, loss_fn, batch).to_dense().numpy()
    zd = np.linalg.eigvals(J)
    want = np.sort(zd.real)[:k]  # sharpest curvatures: smallest 1 - lr s
    np.testing.assert_allclose(np.sort(rs.eigenvalues.real), want, rtol=1e-8)
    np.testing.assert_allclose(np.sort(ra.eigenvalues.real), want, rtol=1e-8)
    assert ra.kappa_V == pytest.approx(rs.kappa_V, rel=1e-4)


def test_per_group_momentum_says_the_modes_are_not_curvature_targeted():
    """Different momentum per group: no curvature key exists and "SR" can pick a group's bulk
    modes; the report says so. Different lr alone (absorbed in D) stays structured, silent."""
    from _cases import sgd_case

    model, opt, loss_fn, batch = sgd_case(two_groups=True, group2={"momentum": 0.5})
    rep = estimate(model, opt, loss_fn, batch, k=2)
    assert "arnoldi" in rep.method or "Krylov-Schur" in rep.target
    assert "differ between parameter groups (momentum)" in rep.message, rep.message
    assert "beta1" not in rep.message, rep.message  # an SGD run is told about SGD settings
    # AdamW: the same betas, lr differing with weight decay on: c = 1 - lr wd differs
    model, _, loss_fn, batch = sgd_case()
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    opt = torch.optim.AdamW([{"params": first, "lr": 1e-2}, {"params": rest, "lr": 1e-3}],
                            weight_decay=0.01)
    take_steps(model, opt, loss_fn, batch)
    rep = estimate(model, opt, loss_fn, batch, k=2)
    assert "groups (lr * weight_decay (decoupled decay" in rep.message, rep.message
    # Adam: beta1 differs; the message names Adam's settings only
    model, _, loss_fn, batch = sgd_case()
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    opt = torch.optim.Adam([{"params": first, "lr": 1e-2},
                            {"params": rest, "lr": 1e-2, "betas": (0.8, 0.999)}])
    take_steps(model, opt, loss_fn, batch)
    rep = estimate(model, opt, loss_fn, batch, k=2)
    assert "(beta1)" in rep.message, rep.message
    assert "dampening" not in rep.message and "momentum" not in rep.message, rep.message
    model, opt, loss_fn, batch = sgd_case(two_groups=True, group2={"lr": 0.05})
    rep = estimate(model, opt, loss_fn, batch, k=2)
    assert "differ between parameter groups" not in rep.message, rep.message


def _tiny_sgd(dtype):
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    x, y = torch.randn(32, 6, dtype=dtype), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    take_steps(m, opt, F.cross_entropy, (x, y), 3)
    return m, opt, F.cross_entropy, (x, y)


def test_default_tol_follows_the_coarsest_precision():
    """float64 Krylov vectors over a float32 model: the products carry float32 rounding, so
    the default tol is float32's (1e-8 took 2255 HVPs and did not converge); a bfloat16 model
    needs dtype=float32 (said at the door) and gets 1e-2."""
    m, o, lf, b = _tiny_sgd(torch.float32)
    rep = estimate(m, o, lf, b, k=2, dtype=torch.float64)
    assert rep.tol == 1e-4 and rep.all_converged and rep.n_hvp < 100, (rep.tol, rep.n_hvp)
    m, o, lf, b = _tiny_sgd(torch.bfloat16)
    with pytest.raises(ValueError, match=r"pass dtype=torch.float32"):
        estimate(m, o, lf, b, k=2)
    rep = estimate(m, o, lf, b, k=2, dtype=torch.float32)
    assert rep.tol == 1e-2 and rep.all_converged, rep.message
    m, o, lf, b = _tiny_sgd(torch.float64)
    assert estimate(m, o, lf, b, k=2).tol == 1e-8


def test_argument_errors_name_what_the_user_passed():
    m, o, lf, b = _tiny_sgd(torch.float64)
    with pytest.raises(ValueError, match=r"tol must be a finite number >= 0.*got -1"):
        estimate(m, o, lf, b, k=2, tol=-1)
    with pytest.raises(ValueError, match=r"ncv=3 is too small for k=4"):
        estimate(m, o, lf, b, k=4, ncv=3)
    with pytest.raises(ValueError, match=r"computes 8 eigenvalues of J for k=4 modes"):
        estimate(m, o, lf, b, k=4, ncv=8, method="arnoldi")
    rep = estimate(m, o, lf, b, k=np.int64(2))  # numpy integers are integers
    assert rep.all_converged and len(rep.curvatures) == 2
    with pytest.raises(ValueError, match="tol must be"):
        estimate(m, o, lf, b, k=2, tol=True)
    for tol in (np.float32(1e-6), torch.tensor(1e-6), 1e-6):
        assert estimate(m, o, lf, b, k=2, tol=tol).tol == pytest.approx(1e-6)
    rep = estimate(m, o, lf, b, k=3, ncv=4)  # the structured path needs only ncv > k
    assert rep.all_converged, rep.message


def test_fused_attention_error_names_both_modes_and_the_fix():
    """nn.TransformerEncoderLayer on the CPU picks a fused attention kernel with neither double
    backward nor forward AD: one error naming both causes and the math-kernel fix, which
    then works (structured and arnoldi agree)."""
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kappa_gpu.operators import UnsupportedConfigurationError

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))

    torch.manual_seed(0)
    model = Tiny().double()
    x, y = torch.randn(4, 5, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(UnsupportedConfigurationError) as info:
        estimate(model, opt, F.cross_entropy, (x, y), k=2)
    msg = str(info.value)
    assert "reverse-over-reverse failed" in msg and "forward-over-reverse failed" in msg
    assert "sdpa_kernel(SDPBackend.MATH)" in msg
    with sdpa_kernel(SDPBackend.MATH):
        rs = estimate(model, opt, F.cross_entropy, (x, y), k=2)
        ra = estimate(model, opt, F.cross_entropy, (x, y), k=2, method="arnoldi")
    assert rs.all_converged and ra.all_converged, (rs.message, ra.message)
    np.testing.assert_allclose(np.sort_complex(rs.eigenvalues), np.sort_complex(ra.eigenvalues),
                               rtol=1e-6)


def test_precision_floor_is_named_with_a_tol_that_passes():
    """AdamW, a Linear feeding BatchNorm, float32: the bias gradient is ~1e-9, D spans 1e6, and
    the J residuals sit at the products' rounding floor, 15-32x tol, with Lanczos converged.
    The message says so (not "raise ncv or maxiter") and the tol it names converges."""
    import re

    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    X, y = torch.randn(128, 6), torch.randint(0, 3, (128,))
    take_steps(model, opt, F.cross_entropy, (X, y), 10)
    batch = (X[:64], y[:64])
    rep = estimate(model, opt, F.cross_entropy, batch, k=4)
    assert not rep.all_converged
    assert "the floor here" in rep.message and "raise ncv" not in rep.message, rep.message
    tol = float(re.search(r"tol=([0-9.e+-]+) would pass", rep.message).group(1))
    assert 1e-4 < tol < 0.05
    rep2 = estimate(model, opt, F.cross_entropy, batch, k=4, tol=tol)
    assert rep2.all_converged, rep2.message
    np.testing.assert_allclose(np.sort_complex(rep2.eigenvalues), np.sort_complex(rep.eigenvalues),
                               rtol=1e-4)


def test_a_backward_outside_autograd_is_named_not_blamed_on_rounding():
    """A custom Function whose backward goes through numpy has no second derivatives, and no
    autograd node says so: its Hessian products are wrong and not symmetric (not detectable in
    the graph). The certificates miss by ~1000x; the message names broken second derivatives
    from the asymmetry of W^T H W, not rounding, and gives no tol that would 'pass'."""
    import torch.nn as nn
    import torch.nn.functional as F

    class NpTanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.tanh(x)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return torch.from_numpy(g.detach().numpy() * (1 - y.detach().numpy() ** 2))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.b(NpTanh.apply(self.a(x)))

    torch.manual_seed(0)
    model = M()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    take_steps(model, opt, F.cross_entropy, (x, y), 2)
    rep = estimate(model, opt, F.cross_entropy, (x, y), k=2)
    assert not rep.all_converged
    assert "Hessian products are not symmetric" in rep.message, rep.message
    assert "would pass" not in rep.message and "raise ncv" not in rep.message, rep.message


def test_report_repr_is_one_line():
    m, o, lf, b = _tiny_sgd(torch.float64)
    rep = estimate(m, o, lf, b, k=2)
    r = repr(rep)
    assert r.startswith("KappaReport(method=") and "\n" not in r and len(r) < 400, r
    assert f"kappa_V={rep.kappa_V:.4g}" in r and "n_hvp=" in r


def test_k_beyond_the_model_says_what_was_computed():
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # 26 params
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    take_steps(model, opt, F.cross_entropy, (x, y), 2)
    rep = estimate(model, opt, F.cross_entropy, (x, y), k=40)
    assert len(rep.curvatures) == 24
    assert "k=40 modes per side asked, 24 computed" in rep.message, rep.message
    assert "k=" not in estimate(model, opt, F.cross_entropy, (x, y), k=3).message


def test_arnoldi_rank_test_is_at_the_rounding_level_not_n_eps():
    """AdamW's sharp modes in float32 at N = 70k: ill-conditioned (kappa_V ~ 150) but well
    separated eigenvectors. The arnoldi path's rank test took orthonormal_basis's default
    N eps (0.8% here, 2.3% at N = 2e5), cut the imaginary parts of 8 of the 16 eigenvectors,
    and reported kappa_V = inf and 'eigenvectors parallel to rounding'. Oracle: the structured
    path's closed-form blocks at the same point."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 10),
    )
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(256, 512, generator=g), torch.randint(0, 10, (256,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    with one_thread():
        ref = estimate(model, opt, loss_fn, (X, y), k=8, method="structured")
        rep = estimate(model, opt, loss_fn, (X, y), k=8, method="arnoldi")
    assert rep.all_converged and ref.all_converged
    assert "parallel" not in rep.message
    assert math.isfinite(rep.kappa_V) and math.isfinite(rep.transient_growth)
    assert rep.kappa_V == pytest.approx(ref.kappa_V, rel=0.02)


def test_adam_full_with_a_gradient_zero_in_exact_arithmetic_names_the_rounding_floor():
    """An attention key bias has a gradient that is zero in exact arithmetic (softmax ignores
    a constant added to every key): its exp_avg_sq sits near 1e-39 and Adam's full J couples
    theta to it with q ~ 8e15, exact but beyond float64's reach at tol 1e-8. The eigenvalues
    are right; the certificates cannot pass. The message names the cause and does not advise
    more ncv or maxiter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class TF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.1,
                                                        batch_first=True)
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.enc(x).mean(1))

    def mse(o, t):
        return ((o - t) ** 2).mean()

    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with one_thread(), sdpa_kernel(SDPBackend.MATH):
        torch.manual_seed(1)
        m = TF().double().eval()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05)
        for _ in range(4):
            opt.zero_grad()
            mse(m(x), y).backward()
            opt.step()
        r = estimate(m, opt, mse, (x, y), k=3, variant="full")
        J = update_operator(m, opt, mse, (x, y), variant="full").to_dense().numpy()
    ev = np.linalg.eigvals(J)
    assert max(np.min(np.abs(ev - z)) for z in np.asarray(r.eigenvalues)) <= 1e-6
    assert "coupling of theta to exp_avg_sq reaches q =" in r.message
    assert "in_proj_bias" in r.message
    assert "not a matter of ncv or maxiter" in r.message
    assert r.message.count("raise ncv or maxiter") == 0


def test_modes_both_asking_for_more_modes_than_the_model_has_is_a_clear_error():
    """2k > n: the sharp and negative sides would be the same modes (the merged basis had more
    columns than rows: scipy's 'expected square matrix' from deep inside; review case)."""
    from _cases import sgd_case

    case = sgd_case()
    n = sum(p.numel() for p in case[0].parameters())
    with pytest.raises(ValueError, match=r"modes='both'.*only.*k <= "):
        estimate(*case, k=n // 2 + 1, modes="both")
    r = estimate(*case, k=n // 2, modes="both", tol=1e-8)  # the limit itself runs
    J = update_operator(*case).to_dense().numpy()
    ev = np.linalg.eigvals(J)
    assert max(np.min(np.abs(ev - z)) for z in r.eigenvalues) <= 1e-7


@pytest.mark.parametrize("method", ["structured", "arnoldi"])
@pytest.mark.parametrize("kind", ["sgd", "sgd0", "adam"])
def test_modes_skip_the_entries_the_step_does_not_take(kind, method):
    """A Linear the forward never calls: its entries have D = 0, so each is an eigenvector of
    S = D^1/2 Ht D^1/2 with s = 0 that is no mode of the update. For a convex loss they were
    the 'negative' modes: z = 0.9 where J has no such eigenvalue, kappa_V 4.15 instead of
    3.16, every mode unconverged with a message blaming rounding (review case). Oracle: dense
    eig of the operator and the dense modes of the active block. The arnoldi path returned
    their z = 1 (J = I there) with transient growth and Kreiss bound inf."""
    import torch.nn as nn
    from _cases import make_batch, mse, take_steps

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = M().double()
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
           "sgd0": lambda p: torch.optim.SGD(p, lr=0.1),
           "adam": lambda p: torch.optim.Adam(p, lr=0.01)}[kind](m.parameters())
    batch = make_batch()
    take_steps(m, opt, mse, batch, 3)
    case = (m, opt, mse, batch)
    r = estimate(*case, k=2, modes="negative", method=method, tol=1e-8)
    assert bool(np.all(r.converged)), r.message
    ev = np.linalg.eigvals(update_operator(*case).to_dense().numpy())
    assert max(np.min(np.abs(ev - z)) for z in r.eigenvalues) <= 1e-8
    assert bool(np.all(np.abs(r.eigenvalues - 1) > 1e-6)) and math.isfinite(r.transient_growth)
    if method == "arnoldi":
        return
    # the modes are curvatures of the active block (not the s = 0 of unused entries); its
    # smallest is double here (MSE of a Linear: X^T X (x) I), and block size 1 returns one copy
    H = kg.hessian_operator(m, mse, batch, params=list(m.lin.parameters())).to_dense()
    if kind != "adam":
        s_ref = np.linalg.eigvalsh(opt.param_groups[0]["lr"] * H.numpy())
        assert min(s_ref) > 1e-3
        assert all(np.min(np.abs(s_ref - s)) <= 1e-9 for s in r.curvatures)
        assert np.isclose(min(r.curvatures), min(s_ref), rtol=1e-9)
    assert bool(np.all(np.abs(r.curvatures) > 1e-6))


def test_a_momentum_free_group_leaves_its_missing_buffers_out_of_the_modes():
    """Group 2 with momentum 0 has no momentum buffer: J's rows and columns there are 0 (a
    14-fold eigenvalue 0, decoupled). 'SR' picked five of them as the 'sharp' modes, with
    condition numbers up to 53 where the exact value is 1 (left and right vectors paired
    arbitrarily inside the multiple eigenvalue; review case). They are left out now, and
    said. Oracle: dense eig of the operator with its left eigenvectors."""
    import scipy.linalg
    from _cases import sgd_case

    case = sgd_case(two_groups=True, group2={"lr": 0.05, "momentum": 0.0})
    r = estimate(*case, k=3, tol=1e-9)
    assert r.method == "arnoldi" and bool(np.all(r.converged))
    assert "constants of this step" in r.message
    J = update_operator(*case).to_dense().numpy()
    w, vl, vr = scipy.linalg.eig(J, left=True)
    assert int(np.sum(np.abs(w) < 1e-12)) >= 1  # the decoupled zeros exist in J
    assert bool(np.all(np.abs(r.eigenvalues) > 1e-6))  # ... and are no modes
    for z, c in zip(r.eigenvalues, r.condition_numbers, strict=True):
        i = int(np.argmin(np.abs(w - z)))
        assert abs(w[i] - z) <= 1e-8
        x, y = vr[:, i] / np.linalg.norm(vr[:, i]), vl[:, i] / np.linalg.norm(vl[:, i])
        assert c == pytest.approx(1.0 / abs(np.vdot(y, x)), rel=1e-5)


def test_a_reached_group_with_lr_zero_takes_the_arnoldi_path():
    """lr = 0 in one group (a 'frozen' group with momentum): its buffers still follow the
    curvature, which the 2x2 blocks' eigenvectors miss (kappa_V 1.26 where J's is 1.83, with
    residuals 0.16 blamed on rounding; review case). auto takes arnoldi and says why;
    method='structured' refuses. Oracle: dense eig of the operator."""
    from _cases import sgd_case

    case = sgd_case(two_groups=True, group2={"lr": 0.0, "momentum": 0.9, "dampening": 0.0})
    r = estimate(*case, k=2, tol=1e-9)
    assert r.method == "arnoldi" and bool(np.all(r.converged)) and "lr = 0" in r.message
    w, V = np.linalg.eig(update_operator(*case).to_dense().numpy())
    idx = [int(np.argmin(np.abs(w - z))) for z in r.eigenvalues]
    assert max(abs(w[i] - z) for i, z in zip(idx, r.eigenvalues, strict=True)) <= 1e-8
    assert r.kappa_V == pytest.approx(kg.kappa_V(V[:, idx]), rel=1e-6)
    with pytest.raises(ValueError, match="lr = 0"):
        estimate(*case, k=2, method="structured")


def test_adamw_with_decay_on_the_weights_only_targets_the_sharp_modes():
    """Hugging Face's default grouping (weight decay on weights, none on biases/norms) gives
    AdamW's c = 1 - lr wd and 1: not uniform, so the modes were those of smallest Re z -- the
    bulk (z ~ 0.80 real), 1286 HVPs -- instead of the sharpest curvatures (complex pairs near
    0.87 +- 0.39i). A spread below 2e-3 now ranks by the curvature inferred with the majority's
    coefficients (and starts from their structured modes). Oracle: dense eig of the operator,
    ranked by the same curvature key, and kappa_V of those dense eigenvectors."""
    import torch.nn as nn
    import torch.nn.functional as F
    from _cases import take_steps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
        x = torch.randn(48, 6, dtype=torch.float64)
        y = torch.randint(0, 3, (48,))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": rest, "weight_decay": 0.0}], lr=1e-2)
    take_steps(model, opt, F.cross_entropy, (x, y), 20)
    case = (model, opt, F.cross_entropy, (x, y))
    r = estimate(*case, k=3, tol=1e-9)
    assert r.method == "arnoldi" and bool(np.all(r.converged)), r.message
    assert "differ slightly" in r.message
    w, V = np.linalg.eig(update_operator(*case).to_dense().numpy())
    a, b1, c = 0.1, 0.9, 1 - 1e-2 * 0.01
    s = np.real(-(w - c) * (w - b1) / (a * (w - b1) + a * b1))
    top = np.argsort(-s)[:6]
    assert np.allclose(np.sort_complex(r.eigenvalues), np.sort_complex(w[top]), atol=1e-8)
    assert bool(np.all(np.abs(r.eigenvalues.imag) > 0.1))  # the sharp pairs, not the bulk
    idx = [int(np.argmin(np.abs(w - z))) for z in r.eigenvalues]
    assert r.kappa_V == pytest.approx(kg.kappa_V(V[:, idx]), rel=1e-6)


def test_a_float32_adam_miss_from_a_bias_before_batchnorm_names_the_parameter():
    """A Linear bias before a BatchNorm has a gradient that is zero up to rounding: Adam's
    exp_avg_sq ~ 0 there and D = lr / (bc1 (sqrt(v) + eps)) is ~1e6 times the median, which
    multiplies the float32 products' rounding: unconverged, kappa_V 1.92 where float64 and the
    frozen bias give 1.61, and the message blamed non-deterministic products (review case).
    The message now names the parameter and the two ways out, both checked here."""
    import torch.nn as nn
    import torch.nn.functional as F

    def run(freeze=False, dtype=torch.float32):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(),
                                  nn.Linear(16, 3)).to(dtype)
            g = torch.Generator().manual_seed(0)
            X = torch.randn(64, 6, generator=g).to(dtype)
            Y = torch.randint(0, 3, (64,), generator=g)
        if freeze:
            model[0].bias.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                weight_decay=0.1)
        for s in range(8):
            opt.zero_grad()
            F.cross_entropy(model(X[s * 8:(s + 1) * 8]), Y[s * 8:(s + 1) * 8]).backward()
            opt.step()
        return estimate(model, opt, F.cross_entropy, (X[:8], Y[:8]), k=2)

    r32 = run()
    assert not r32.all_converged and "preconditioner reaches" in r32.message
    assert "in 0.bias" in r32.message and "raise ncv or maxiter" not in r32.message
    r64, rfrozen = run(dtype=torch.float64), run(freeze=True)
    assert r64.all_converged and rfrozen.all_converged
    assert "preconditioner reaches" not in r64.message
    assert r64.kappa_V == pytest.approx(rfrozen.kappa_V, rel=1e-3)


def test_a_report_for_other_modes_or_k_at_the_same_point_is_not_trusted():
    """warm_here compared the point only: the vectors of a modes='both', k=2 report span an
    invariant subspace, so a later k=3 'negative' run trusted them, stopped at its first test
    and returned the sharpest mode as a negative one, kappa_V 4.35 where J's is 1.78 (review
    case). Now only the same (modes, k) is trusted; the result equals a cold run's."""
    from _cases import sgd_case

    case = sgd_case()
    r1 = estimate(*case, k=2, modes="both", method="structured", tol=1e-9)
    warm = estimate(*case, k=3, modes="negative", method="arnoldi", warm_start=r1, tol=1e-9)
    cold = estimate(*case, k=3, modes="negative", method="arnoldi", tol=1e-9)
    assert np.allclose(np.sort_complex(warm.eigenvalues), np.sort_complex(cold.eigenvalues),
                       atol=1e-8)
    assert warm.kappa_V == pytest.approx(cold.kappa_V, rel=1e-6)
    assert bool(np.all(warm.curvatures < 0.05))  # no sharp mode among the negative ones
    # the same request at the same point is still trusted: a cheap refinement
    again = estimate(*case, k=3, modes="negative", method="arnoldi", warm_start=cold, tol=1e-9)
    assert again.n_hvp < cold.n_hvp


def test_plain_sgd_with_an_lr_zero_group_takes_arnoldi_for_its_left_vectors():
    """Momentum 0 and one group at lr = 0: the structured right vectors are exact, but its
    left vectors D^-1 u are 0 on that group while J's are not (those parameters feed the
    other group's update): condition numbers 1 where J's are up to 1.9 (review case)."""
    import scipy.linalg
    from _cases import sgd_case

    case = sgd_case(momentum=0.0, two_groups=True, group2={"lr": 0.0})
    r = estimate(*case, k=3, tol=1e-10)
    assert r.method == "arnoldi" and bool(np.all(r.converged))
    w, vl, vr = scipy.linalg.eig(update_operator(*case).to_dense().numpy(), left=True)
    for z, c in zip(r.eigenvalues, r.condition_numbers, strict=True):
        i = int(np.argmin(np.abs(w - z)))
        x, y = vr[:, i] / np.linalg.norm(vr[:, i]), vl[:, i] / np.linalg.norm(vl[:, i])
        assert c == pytest.approx(1.0 / abs(np.vdot(y, x)), rel=1e-5)


def test_modes_both_counts_the_entries_the_step_takes():
    """An unused Linear: 45 parameters, 38 taken; k = 20 with modes='both' returned 80
    eigenvalues of which 76 distinct and kappa_V = inf, flagged converged (review case)."""
    import torch.nn as nn
    from _cases import make_batch, mse, take_steps

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.body(x)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = M().double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    batch = make_batch()
    take_steps(m, opt, mse, batch, 3)
    n_taken = sum(p.numel() for p in m.body.parameters())
    with pytest.raises(ValueError, match=f"only n = {n_taken}"):
        estimate(m, opt, mse, batch, k=n_taken // 2 + 1, modes="both")


def test_adam_full_with_a_loss_without_forward_mode_is_not_warned_about_forward_mode():
    """estimate's frozen start helper asks for forward-mode products; nn.MSELoss has no
    forward-mode rule, so it falls back to reverse mode -- which warned the user about an
    hvp='forward' they never asked for (review case)."""
    import warnings

    import torch.nn as nn
    from _cases import take_steps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    take_steps(m, opt, nn.MSELoss(), (x, y), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = estimate(m, opt, nn.MSELoss(), (x, y), k=2, variant="full", tol=1e-8)
    assert r.all_converged


def test_plain_sgd_arnoldi_reports_the_curvatures():
    """z = c - a s for plain SGD: the arnoldi path reported curvatures as NaN (review case);
    they equal the structured path's."""
    from _cases import sgd_case

    case = sgd_case(momentum=0.0)
    ra = estimate(*case, k=3, method="arnoldi", tol=1e-10)
    rs = estimate(*case, k=3, method="structured", tol=1e-10)
    assert np.allclose(np.sort(ra.curvatures), np.sort(rs.curvatures), rtol=1e-8)

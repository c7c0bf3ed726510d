"""Gradient clipping in the linearized step (``update_operator(..., clip_grad_norm=...)``).

A training step that runs ``torch.nn.utils.clip_grad_norm_`` or ``clip_grad_value_`` between
``backward()`` and ``optimizer.step()`` has the Jacobian ``C H`` in place of ``H`` (``C``: the
clip's Jacobian) and feeds Adam's moments the clipped gradient. Oracles: central finite
differences of real clipped steps, the dense frozen-Adam formula with a dense ``C`` from
autograd, dense ``eig`` for the estimate, the unclipped operator where the clip is inactive.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _cases import (
    ADAM_CASES,
    SGD_CASES,
    dense_gradient,
    fd_jacobian,
    one_thread,
    rel_err,
    trainable,
)
from test_operators import adam_frozen_dense

import kappa_gpu as kg
from kappa_gpu import update_operator
from kappa_gpu.operators import GradientClip

ALL_CASES = {**SGD_CASES, **ADAM_CASES}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield



def _gradient(case) -> torch.Tensor:
    model, opt, loss_fn, batch = case
    return dense_gradient(model, loss_fn, batch, trainable(opt))


def _threshold(case, kind: str) -> float:
    """A threshold at which the clip is active and no entry sits near its kink: half the norm;
    for the value clip, the middle of the gap between the two middle |g_i|."""
    g = _gradient(case)
    if kind == "norm":
        return 0.5 * g.norm().item()
    a = g.abs().sort().values
    i = len(a) // 2
    return float(a[i] + a[i + 1]) / 2


CLIPPED = [
    ("heavy-tanh", None, "norm"),
    ("heavy-tanh", None, "value"),
    ("plain-wd-relu-2groups", None, "norm"),
    ("nesterov-maximize-gelu", None, "norm"),
    ("heavy-wd-bn", None, "value"),
    ("heavy-dropout-bn", None, "norm"),
    ("adam-wd-gelu", "full", "norm"),
    ("adamw-gelu", "full", "value"),
    ("adamw-2groups-maximize", "full", "norm"),
]


@pytest.mark.parametrize("name, variant, kind", CLIPPED)
def test_clipped_step_matches_finite_differences_of_real_clipped_steps(name, variant, kind):
    case = ALL_CASES[name]()
    c = _threshold(case, kind)
    op = update_operator(*case, variant=variant, **{f"clip_grad_{kind}": c})
    assert op.clip is not None and op.clip.active and op.clip.kind == kind
    J_fd = fd_jacobian(*case, clip=(kind, c))
    assert rel_err(op.to_dense(), J_fd) <= 1e-6
    # the unclipped operator is the wrong one here (what kappa_gpu analysed before): compared
    # on the columns of d theta minus the identity, the part the curvature enters
    n = op.n_params
    eye = torch.eye(J_fd.shape[0], n, dtype=J_fd.dtype)
    plain = update_operator(*case, variant=variant).to_dense()
    assert rel_err(plain[:, :n] - eye, J_fd[:, :n] - eye) > 1e-2


@pytest.mark.parametrize("name", ["adam-wd-gelu", "adamw-bn", "adam-maximize-tanh"])
def test_adam_frozen_clipped_matches_dense_formula(name):
    case = ALL_CASES[name]()
    c = _threshold(case, "norm")
    op = update_operator(*case, variant="frozen", clip_grad_norm=c)
    assert rel_err(op.to_dense(), adam_frozen_dense(*case, clip=("norm", c))) <= 1e-10


@pytest.mark.parametrize("name, variant, kind", [
    ("heavy-wd-bn", None, "norm"), ("nesterov-relu", None, "value"),
    ("adamw-gelu", "frozen", "norm"), ("adam-tanh", "full", "value"),
])  # fmt: skip
def test_clipped_adjoint_and_block_products(name, variant, kind):
    """``C H`` is not symmetric: the adjoint is ``H C``, checked against the dense transpose;
    matmat/rmatmat are the column-wise products."""
    case = ALL_CASES[name]()
    op = update_operator(*case, variant=variant, **{f"clip_grad_{kind}": _threshold(case, kind)})
    A = op.to_dense()
    assert rel_err(A, A.T) > 1e-3  # genuinely non-symmetric, so rmatvec is tested
    gen = torch.Generator().manual_seed(0)
    Y = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=gen)
    assert rel_err(op.rmatvec(Y[:, 0]), A.T @ Y[:, 0]) <= 1e-12
    assert rel_err(op.rmatmat(Y), A.T @ Y) <= 1e-12
    assert rel_err(op.matmat(Y), A @ Y) <= 1e-12


@pytest.mark.parametrize("name, variant", [("heavy-tanh", None), ("adamw-gelu", "frozen")])
def test_fused_coefficient_table_with_a_clip_matches_the_torch_path(name, variant):
    """The fused path (through the kernels' torch reference on the CPU) applies the clip's
    Jacobian around its one HVP as the torch path does."""
    case = ALL_CASES[name]()
    kw = dict(variant=variant, clip_grad_norm=_threshold(case, "norm"))
    ref = update_operator(*case, **kw)
    op = update_operator(*case, **kw)
    op._fuse("torch")
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=gen)
    assert rel_err(op.matvec(X[:, 0]), ref.matvec(X[:, 0])) <= 1e-12
    assert rel_err(op.rmatvec(X[:, 0]), ref.rmatvec(X[:, 0])) <= 1e-12
    assert rel_err(op.rmatmat(X), ref.rmatmat(X)) <= 1e-12


@pytest.mark.parametrize("kind", ["norm", "value"])
def test_an_inactive_clip_is_the_unclipped_operator(kind):
    case = SGD_CASES["heavy-wd-bn"]()
    g = _gradient(case)
    c = 10 * g.norm().item() if kind == "norm" else 2 * g.abs().max().item()
    op = update_operator(*case, **{f"clip_grad_{kind}": c})
    plain = update_operator(*case)
    assert not op.clip.active and op.clip.scale == 1.0 and op.clip.n_clipped == 0
    assert torch.equal(op.to_dense(), plain.to_dense())
    assert op.structure() is not None
    assert "inactive here" in op.clip.describe()


def test_gradient_clip_jacobian_is_the_autograd_jacobian_of_torch_clipping():
    """``GradientClip`` against autograd through the same formula torch's clip_grad_norm_ uses
    (``clip_coef = max_norm / (norm + 1e-6)``, clamped at 1), and the clipped gradient against
    torch's clip_grad_norm_ / clip_grad_value_ themselves."""
    g = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for kind, c, f in [
        ("norm", 0.3 * g.norm().item(),
         lambda x: x * torch.clamp(0.3 * g.norm() / (x.norm() + 1e-6), max=1.0)),
        ("value", 0.8, lambda x: x.clamp(-0.8, 0.8)),
    ]:  # fmt: skip
        clip = GradientClip(kind, c, g)
        C = torch.autograd.functional.jacobian(f, g)
        assert rel_err(clip.jacobian(X), C @ X) <= 1e-13
        assert rel_err(clip.jacobian(X[:, 0]), C @ X[:, 0]) <= 1e-13
        p = torch.nn.Parameter(torch.zeros(40, dtype=torch.float64))
        p.grad = g.clone()
        if kind == "norm":
            torch.nn.utils.clip_grad_norm_([p], c)
        else:
            torch.nn.utils.clip_grad_value_([p], c)
        assert torch.allclose(clip.clipped(g), p.grad, rtol=1e-14, atol=0)
        assert torch.equal(X, X.clone())  # jacobian() leaves its input alone


def test_estimate_with_an_active_clip_runs_arnoldi_on_the_clipped_step():
    """The eigenvalues are those of the clipped step's Jacobian (dense eig of the finite-
    difference Jacobian of real clipped steps); the message says the clip is active;
    method='structured' is refused with the reason."""
    case = SGD_CASES["heavy-tanh"]()
    c = _threshold(case, "norm")
    r = kg.estimate(*case, k=2, clip_grad_norm=c, tol=1e-8)
    assert r.method == "arnoldi" and bool(np.all(r.converged))
    assert "gradient clipping by norm" in r.message and "active here" in r.message
    ev = np.linalg.eigvals(fd_jacobian(*case, clip=("norm", c)).numpy())
    z = np.asarray(r.eigenvalues)
    assert max(np.min(np.abs(ev - zz)) for zz in z) <= 1e-6
    plain = kg.estimate(*case, k=2, tol=1e-8)
    assert max(np.min(np.abs(np.asarray(plain.eigenvalues) - zz)) for zz in z) > 1e-3
    with pytest.raises(ValueError, match="structured.*gradient clipping by norm"):
        kg.estimate(*case, k=2, clip_grad_norm=c, method="structured")
    # warm starts do not mix the clipped and the unclipped operator at the same point
    assert r.point != plain.point


@pytest.mark.parametrize("kw, match", [
    (dict(clip_grad_norm=1.0, clip_grad_value=1.0), "at most one"),
    (dict(clip_grad_norm=0.0), "positive finite"),
    (dict(clip_grad_norm=-1.0), "positive finite"),
    (dict(clip_grad_value=float("nan")), "positive finite"),
    (dict(clip_grad_norm=True), "positive finite"),
    (dict(clip_grad_value="x"), "positive finite"),
])  # fmt: skip
def test_bad_clip_arguments_are_clear_errors_before_any_work(kw, match):
    case = SGD_CASES["heavy-tanh"]()
    with pytest.raises(ValueError, match=match):
        update_operator(*case, **kw)
    model, opt, loss_fn, _ = case
    with pytest.raises(ValueError, match=match):  # the monitor checks at construction
        kg.KappaMonitor(model, opt, loss_fn, **kw)


def test_a_zero_gradient_under_a_tiny_max_norm_is_scaled_not_nan():
    """g = 0 with max_norm < 1e-6: torch's clip_coef = max_norm / 1e-6 < 1 scales the (zero)
    gradient, so C = s I (autograd of torch's formula at 0 agrees); it was 0/0 = NaN."""
    g = torch.zeros(12, dtype=torch.float64)
    clip = GradientClip("norm", 1e-7, g)
    assert clip.active and clip.scale == pytest.approx(0.1)
    C = torch.autograd.functional.jacobian(
        lambda x: x * torch.clamp(1e-7 / (x.norm() + 1e-6), max=1.0), g)
    X = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(clip.jacobian(X)).all()
    assert rel_err(clip.jacobian(X), C @ X) <= 1e-14
    huge = GradientClip("norm", 1.0, torch.full((4,), 1e160, dtype=torch.float64))
    assert torch.isfinite(huge.jacobian(X[:4])).all()  # ||g|| (||g|| + 1e-6) would overflow


def test_the_message_at_the_clip_boundary_says_what_torch_compares():
    """||g|| < max_norm < ||g|| + 1e-6: torch clips (by 1 - 2e-6); the message must not say
    ||g|| > max_norm, nor round the factor to 1."""
    case = SGD_CASES["heavy-tanh"]()
    gn = _gradient(case).norm().item()
    op = update_operator(*case, clip_grad_norm=gn + 5e-7)
    assert op.clip.active and op.clip.scale < 1.0
    text = op.clip.describe()
    assert "+ 1e-6 > max_norm" in text and "scaled by 0.999998" in text


def test_a_norm_clip_with_trainable_parameters_outside_the_optimizer_is_said():
    """The operator's norm runs over the optimizer's parameters; clip_grad_norm_ over
    model.parameters() (the usual loop, the HF Trainer) also counts trainable ones the optimizer
    does not hold, and then has another clip factor: warned, and in op.notes."""
    model, _, loss_fn, batch = SGD_CASES["heavy-tanh"]()
    head = list(model.parameters())[-2:]
    opt = torch.optim.SGD(head, lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()
    with pytest.warns(UserWarning, match="trainable scalar.*the optimizer does not hold"):
        op = update_operator(model, opt, loss_fn, batch, clip_grad_norm=1e-3)
    assert any("does not hold" in note for note in op.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        update_operator(model, opt, loss_fn, batch)  # no clip: nothing to say
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in head))
        update_operator(model, opt, loss_fn, batch, clip_grad_norm=1e-3)  # all held


@pytest.mark.parametrize("kind", ["norm", "value"])
def test_clip_square_root_and_its_inverse(kind):
    g = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    clip = GradientClip(kind, 0.4 * g.norm().item() if kind == "norm" else 0.5, g)
    eye = torch.eye(30, dtype=torch.float64)
    C, R = clip.jacobian(eye), clip.sqrt_jacobian(eye)
    assert rel_err(R @ R, C) <= 1e-12 and rel_err(R, R.T) <= 1e-15
    if kind == "norm":
        assert rel_err(clip.sqrt_jacobian(R, inverse=True), eye) <= 1e-9


def test_clipped_sgd_is_similar_to_the_symmetrized_structure():
    """SGD with one lr and a norm clip: J = P J' P^-1 with P = diag(C^1/2, C^1/2) and J' the
    block operator on the symmetric curvature C^1/2 Ht C^1/2 (what estimate starts Arnoldi
    from, with a block start). Dense check."""
    case = SGD_CASES["heavy-wd-bn"]()
    op = update_operator(*case, clip_grad_norm=_threshold(case, "norm"))
    st = op.similar_structure()
    assert op.structure() is None
    Hs = st.hessian.to_dense()
    assert rel_err(Hs, Hs.T) <= 1e-12
    n = op.n_params
    a, a2, b, beta, c = (float(getattr(st, f)[0]) for f in ("a", "a2", "b", "beta", "c"))
    D = float(st.D[0])
    eye = torch.eye(n, dtype=torch.float64)
    Jp = torch.cat([torch.cat([c * eye - D * a * Hs, -D * b * eye], 1),
                    torch.cat([a2 * Hs, beta * eye], 1)], 0)
    R = op.clip.sqrt_jacobian(eye)
    P = torch.block_diag(R, R)
    Pinv = torch.block_diag(*[op.clip.sqrt_jacobian(eye, inverse=True)] * 2)
    assert rel_err(P @ Jp @ Pinv, op.to_dense()) <= 1e-8
    case = ADAM_CASES["adamw-gelu"]()
    assert update_operator(*case).similar_structure() is None  # no clip: structure() itself
    assert update_operator(*case, variant="full",
                           clip_grad_norm=_threshold(case, "norm")).similar_structure() is None


def test_a_value_clip_that_cuts_every_entry_leaves_no_curvature_and_still_estimates():
    """Every |g_i| above clip_value: C = 0, the step ignores the curvature (J is constant in
    the parameters' direction), and the symmetrized start is zero: the estimate starts at
    random instead of failing ('v0 is zero'); eigenvalues against dense eig."""
    case = SGD_CASES["heavy-tanh"]()
    c = 0.5 * _gradient(case).abs().min().item()
    op = update_operator(*case, clip_grad_value=c)
    assert op.clip.n_clipped == op.n_params
    r = kg.estimate(*case, k=2, clip_grad_value=c, tol=1e-8)
    assert r.method == "arnoldi"
    ev = np.linalg.eigvals(op.to_dense().numpy())
    assert max(np.min(np.abs(ev - zz)) for zz in np.asarray(r.eigenvalues)) <= 1e-6

"""The plain-torch block passes (CPU fallback, kernel oracle) against dense oracles.

Two independent oracles, both in float64 on small problems (n = 7, two parameter groups with
different hyper-parameters, a random symmetric H):

1. J written densely from the DESIGN.md section 2 formulas (per-entry diagonal matrices);
2. central finite differences of real ``torch.optim`` steps on the quadratic loss
   ``0.5 theta^T H theta + b^T theta`` (whose Hessian is exactly H) — torch.optim is the
   ground truth.

The reference passes give J x (matvec with hv = H x1) and J^T y (pre, hv = H u, post); both are
materialized on identity columns (the ``(n, s)`` matmat path) and compared whole.
"""

from __future__ import annotations

import pytest
import torch

from kappa_gpu._cuda import (
    BlockParams,
    adam_block_params,
    adam_coefficients,
    reference_matvec,
    reference_rmatvec_post,
    reference_rmatvec_pre,
    sgd_block_params,
)
from kappa_gpu._cuda._reference import check_call

F64 = torch.float64
SIZES = [3, 4]  # two parameter groups
N = sum(SIZES)


def _sym(n: int, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, n, generator=gen, dtype=F64)
    return (A + A.T) / 2


def _per_entry(vals) -> torch.Tensor:
    return torch.cat(
        [torch.full((k,), float(v), dtype=F64) for k, v in zip(SIZES, vals, strict=True)]
    )


def _diag(vals) -> torch.Tensor:
    return torch.diag(_per_entry(vals))


# -- materializing the reference passes ------------------------------------------------------


def _blocks(X: torch.Tensor, nb: int) -> list[torch.Tensor]:
    return [X[k * N : (k + 1) * N] for k in range(nb)]


def ref_J(params: BlockParams, H: torch.Tensor, coef=()) -> torch.Tensor:
    """J from the reference matvec applied to all identity columns at once (matmat)."""
    nb = params.nblocks
    X = torch.eye(nb * N, dtype=F64)
    xs = _blocks(X, nb)
    Y = reference_matvec(params, xs, H @ xs[0], coef)
    return torch.cat(Y)


def ref_JT(params: BlockParams, H: torch.Tensor, coef=()) -> torch.Tensor:
    """J^T from the reference pre/HVP/post passes on all identity columns."""
    nb = params.nblocks
    Y = torch.eye(nb * N, dtype=F64)
    ys = _blocks(Y, nb)
    u = reference_rmatvec_pre(params, ys, coef)
    X = reference_rmatvec_post(params, ys, H @ u, coef)
    return torch.cat(X)


def _check_pair(J_ref: torch.Tensor, J_dense: torch.Tensor, params, H, coef, gen, tol=1e-12):
    scale = J_dense.abs().max()
    assert (ref_J(params, H, coef) - J_dense).abs().max() <= tol * scale
    assert (ref_JT(params, H, coef) - J_dense.T).abs().max() <= tol * scale
    # <J x, y> = <x, J^T y> through the vector (s = 1) passes
    nb = params.nblocks
    x = torch.randn(nb * N, generator=gen, dtype=F64)
    y = torch.randn(nb * N, generator=gen, dtype=F64)
    xs, ys = _blocks(x, nb), _blocks(y, nb)
    Jx = torch.cat(reference_matvec(params, xs, H @ xs[0], coef))
    u = reference_rmatvec_pre(params, ys, coef)
    JTy = torch.cat(reference_rmatvec_post(params, ys, H @ u, coef))
    assert abs(Jx @ y - x @ JTy) <= 1e-12 * (Jx.norm() * y.norm() + x.norm() * JTy.norm())
    assert (Jx - J_ref @ x).abs().max() <= tol * scale * x.abs().max() * nb * N


# -- DESIGN.md formulas, written densely ------------------------------------------------------

SGD_CASES = {
    "heavy_ball": dict(
        lr=[0.1, 0.05],
        momentum=[0.9, 0.8],
        dampening=[0.1, 0.0],
        weight_decay=[0.01, 0.0],
        nesterov=[False, False],
    ),
    "nesterov": dict(
        lr=[0.1, 0.05],
        momentum=[0.9, 0.7],
        dampening=[0.0, 0.0],
        weight_decay=[0.0, 0.02],
        nesterov=[True, True],
    ),
    "mixed": dict(
        lr=[0.1, 0.05],
        momentum=[0.9, 0.7],
        dampening=[0.2, 0.0],
        weight_decay=[0.01, 0.02],
        nesterov=[False, True],
    ),
    "plain": dict(
        lr=[0.1, 0.05],
        momentum=[0.0, 0.0],
        dampening=[0.0, 0.0],
        weight_decay=[0.01, 0.0],
        nesterov=[False, False],
    ),
}


def dense_sgd(H, hp, maximize):
    """DESIGN.md: heavy ball / nesterov / momentum-0 J with per-group diagonal coefficients."""
    Ht = (-H if maximize else H) + _diag(hp["weight_decay"])
    E, I = _diag(hp["lr"]), torch.eye(N, dtype=F64)
    mus = hp["momentum"]
    if all(m == 0 for m in mus):
        return I - E @ Ht
    rows_a, rows_b = [], []
    # row blocks per group: J[theta_g] = I - E a Ht, -E b ; J[buf_g] = (1-d) Ht, mu
    a = [
        1 + m * (1 - d) if ne else 1 - d
        for m, d, ne in zip(mus, hp["dampening"], hp["nesterov"], strict=True)
    ]
    b = [m * m if ne else m for m, ne in zip(mus, hp["nesterov"], strict=True)]
    one_minus_d = [1 - d for d in hp["dampening"]]
    rows_a = torch.cat([I - E @ _diag(a) @ Ht, -E @ _diag(b)], dim=1)
    rows_b = torch.cat([_diag(one_minus_d) @ Ht, _diag(mus)], dim=1)
    return torch.cat([rows_a, rows_b], dim=0)


@pytest.mark.parametrize("case", sorted(SGD_CASES))
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_reference_against_design_formulas(case, maximize, gen):
    hp = SGD_CASES[case]
    H = _sym(N, gen)
    params = sgd_block_params(SIZES, maximize=maximize, **hp)
    assert params.kind == ("order1" if case == "plain" else "order2")
    J = dense_sgd(H, hp, maximize)
    _check_pair(J, J, params, H, (), gen)


ADAM_HP = dict(
    lr=[1e-2, 3e-3],
    betas=[(0.9, 0.999), (0.8, 0.99)],
    eps=[1e-3, 1e-2],
    weight_decay=[0.1, 0.05],
    step=[3, 7],
)


def _adam_state(gen):
    theta = torch.randn(N, generator=gen, dtype=F64)
    g = torch.randn(N, generator=gen, dtype=F64)
    m = 0.3 * torch.randn(N, generator=gen, dtype=F64)
    v = 0.5 + torch.rand(N, generator=gen, dtype=F64)
    return theta, g, m, v


def dense_adam(H, theta, g, m, v, decoupled, maximize, full):
    """DESIGN.md Adam/AdamW frozen and full J, written from m', v', denom per entry."""
    lr, eps = _per_entry(ADAM_HP["lr"]), _per_entry(ADAM_HP["eps"])
    b1 = _per_entry([b[0] for b in ADAM_HP["betas"]])
    b2 = _per_entry([b[1] for b in ADAM_HP["betas"]])
    t = _per_entry(ADAM_HP["step"]) + 1
    wd = _per_entry(ADAM_HP["weight_decay"])
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    sgn = -1.0 if maximize else 1.0
    wd_l2 = torch.zeros_like(wd) if decoupled else wd
    c = 1 - lr * wd if decoupled else torch.ones_like(wd)
    gt = sgn * g + wd_l2 * theta
    m1 = b1 * m + (1 - b1) * gt
    v1 = b2 * v + (1 - b2) * gt**2
    denom = v1.sqrt() / bc2.sqrt() + eps
    D = lr / (bc1 * denom)
    Ht = sgn * H + torch.diag(wd_l2)
    dg = torch.diag
    if not full:
        return torch.cat(
            [
                torch.cat([dg(c) - dg((1 - b1) * D) @ Ht, -dg(b1 * D)], dim=1),
                torch.cat([dg(1 - b1) @ Ht, dg(b1)], dim=1),
            ]
        )
    # dm' = b1 dm + (1-b1) Ht dth ; dv' = b2 dv + 2 (1-b2) gt Ht dth
    # dth' = c dth - D dm' + (lr/bc1) m' ddenom / denom^2, ddenom = dv' / (2 sqrt(v') sqrt(bc2))
    Jm = torch.cat([dg(1 - b1) @ Ht, dg(b1), torch.zeros(N, N, dtype=F64)], dim=1)
    Jv = torch.cat([dg(2 * (1 - b2) * gt) @ Ht, torch.zeros(N, N, dtype=F64), dg(b2)], dim=1)
    k = (lr / bc1) * m1 / denom**2 / (2 * v1.sqrt() * bc2.sqrt())
    Jth = torch.cat([dg(c), torch.zeros(N, 2 * N, dtype=F64)], dim=1) - dg(D) @ Jm + dg(k) @ Jv
    return torch.cat([Jth, Jm, Jv])


def _adam_params(theta, g, m, v, decoupled, maximize, variant):
    hp = {k: ADAM_HP[k] for k in ("lr", "betas", "weight_decay")}
    params = adam_block_params(SIZES, decoupled=decoupled, maximize=maximize, variant=variant, **hp)
    coef = adam_coefficients(
        theta,
        g,
        m,
        v,
        SIZES,
        eps=ADAM_HP["eps"],
        step=ADAM_HP["step"],
        decoupled=decoupled,
        maximize=maximize,
        variant=variant,
        **hp,
    )
    return params, coef


@pytest.mark.parametrize("variant", ["frozen", "full"])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_reference_against_design_formulas(variant, decoupled, maximize, gen):
    H = _sym(N, gen)
    theta, g, m, v = _adam_state(gen)
    params, coef = _adam_params(theta, g, m, v, decoupled, maximize, variant)
    assert params.kind == ("order2" if variant == "frozen" else "adam_full")
    J = dense_adam(H, theta, g, m, v, decoupled, maximize, full=variant == "full")
    _check_pair(J, J, params, H, coef, gen)


def test_adam_full_q_is_zero_where_v_new_is_zero(gen):
    theta, g, m, v = _adam_state(gen)
    g[0], m[0], v[0] = 0.0, 0.0, 0.0  # v' = 0 at entry 0 (no weight decay)
    _, q, _ = adam_coefficients(theta, g, m, v, SIZES, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, step=2)
    assert q[0] == 0 and torch.isfinite(q).all()


# -- real torch.optim steps, finite differences ------------------------------------------------


def _quadratic(gen):
    H = _sym(N, gen)
    b = torch.randn(N, generator=gen, dtype=F64)
    return H, b


def _fd_jacobian(step, z0: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    cols = []
    for k in range(z0.numel()):
        e = torch.zeros_like(z0)
        e[k] = h
        cols.append((step(z0 + e) - step(z0 - e)) / (2 * h))
    return torch.stack(cols, dim=1)


def _sgd_step(H, b, hp, maximize):
    def step(z):
        theta, buf = z[:N], z[N:]
        ps, groups, o = [], [], 0
        for gi, k in enumerate(SIZES):
            p = torch.nn.Parameter(theta[o : o + k].clone())
            ps.append(p)
            groups.append({"params": [p], **{key: hp[key][gi] for key in hp}})
            o += k
        opt = torch.optim.SGD(groups, lr=0.1, maximize=maximize, foreach=False)
        full = torch.cat([p.detach() for p in ps])
        grad = H @ full + b
        o = 0
        for p, k, mu in zip(ps, SIZES, hp["momentum"], strict=True):
            p.grad = grad[o : o + k].clone()
            if mu != 0:
                opt.state[p]["momentum_buffer"] = buf[o : o + k].clone()
            o += k
        opt.step()
        new_buf = [
            opt.state[p]["momentum_buffer"] if mu != 0 else torch.zeros_like(p)
            for p, mu in zip(ps, hp["momentum"], strict=True)
        ]
        return torch.cat([torch.cat([p.detach() for p in ps]), torch.cat(new_buf)])

    return step


@pytest.mark.parametrize("case", ["heavy_ball", "nesterov", "mixed", "zero_group"])
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_reference_against_torch_optim_steps(case, maximize, gen):
    hp = dict(SGD_CASES.get(case, SGD_CASES["mixed"]))
    if case == "zero_group":  # a momentum-free group next to a momentum group
        hp["momentum"], hp["nesterov"] = [0.0, 0.7], [False, True]
    H, b = _quadratic(gen)
    z0 = torch.randn(2 * N, generator=gen, dtype=F64)
    J_fd = _fd_jacobian(_sgd_step(H, b, hp, maximize), z0)
    params = sgd_block_params(SIZES, maximize=maximize, **hp)
    J = ref_J(params, H)
    assert (J - J_fd).abs().max() <= 1e-7 * J_fd.abs().max()
    assert (ref_JT(params, H) - J_fd.T).abs().max() <= 1e-7 * J_fd.abs().max()


def _adam_step(H, b, decoupled, maximize):
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam

    def step(z):
        theta, m, v = z[:N], z[N : 2 * N], z[2 * N :]
        ps, groups, o = [], [], 0
        for gi, k in enumerate(SIZES):
            p = torch.nn.Parameter(theta[o : o + k].clone())
            ps.append(p)
            groups.append(
                {
                    "params": [p],
                    "lr": ADAM_HP["lr"][gi],
                    "betas": ADAM_HP["betas"][gi],
                    "eps": ADAM_HP["eps"][gi],
                    "weight_decay": ADAM_HP["weight_decay"][gi],
                }
            )
            o += k
        opt = cls(groups, maximize=maximize, foreach=False)
        grad = H @ torch.cat([p.detach() for p in ps]) + b
        o = 0
        for gi, (p, k) in enumerate(zip(ps, SIZES, strict=True)):
            p.grad = grad[o : o + k].clone()
            opt.state[p]["step"] = torch.tensor(float(ADAM_HP["step"][gi]))
            opt.state[p]["exp_avg"] = m[o : o + k].clone()
            opt.state[p]["exp_avg_sq"] = v[o : o + k].clone()
            o += k
        opt.step()
        return torch.cat(
            [torch.cat([p.detach() for p in ps])]
            + [torch.cat([opt.state[p][key] for p in ps]) for key in ("exp_avg", "exp_avg_sq")]
        )

    return step


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_full_reference_against_torch_optim_steps(decoupled, maximize, gen):
    H, b = _quadratic(gen)
    theta = torch.randn(N, generator=gen, dtype=F64)
    m = 0.3 * torch.randn(N, generator=gen, dtype=F64)
    v = 0.5 + torch.rand(N, generator=gen, dtype=F64)
    z0 = torch.cat([theta, m, v])
    J_fd = _fd_jacobian(_adam_step(H, b, decoupled, maximize), z0)
    g = H @ theta + b
    params, coef = _adam_params(theta, g, m, v, decoupled, maximize, "full")
    J = ref_J(params, H, coef)
    scale = J_fd.abs().max()
    assert (J - J_fd).abs().max() <= 1e-7 * scale
    assert (ref_JT(params, H, coef) - J_fd.T).abs().max() <= 1e-7 * scale


# -- storage dtypes, layouts, tables, validation ----------------------------------------------


def _random_case(kind: str, n: int, gen, sizes=None):
    sizes = sizes or [n // 3, 0, n - n // 3]
    k = len(sizes)
    r = lambda: torch.rand(k, generator=gen, dtype=F64).tolist()  # noqa: E731
    if kind == "order1":
        params = BlockParams.order1(sizes, c=r(), Da=r(), wd=r(), sign=[1.0, -1.0, 1.0][:k])
        coef = []
    elif kind == "order2":
        params = BlockParams.order2(
            sizes, a=r(), a2=r(), b=r(), beta=r(), c=r(), D=r(), wd=r(), sign=-1.0
        )
        coef = [torch.rand(n, generator=gen, dtype=F64)]
    else:
        params = BlockParams.adam_full(sizes, a=r(), b1=r(), b2=r(), c=r(), wd=r(), sign=1.0)
        coef = [torch.rand(n, generator=gen, dtype=F64) for _ in range(3)]
    return params, coef


@pytest.mark.parametrize("kind", ["order1", "order2", "adam_full"])
def test_reference_bf16_storage_rounds_once(kind, gen):
    n, s = 37, 3
    params, coef = _random_case(kind, n, gen)
    nb = params.nblocks
    xs = [torch.randn(n, s, generator=gen).to(torch.bfloat16) for _ in range(nb)]
    hv = torch.randn(n, s, generator=gen).to(torch.bfloat16)
    cf16 = [c.to(torch.bfloat16) for c in coef]
    got = reference_matvec(params, xs, hv, cf16)
    want = reference_matvec(params, [x.float() for x in xs], hv.float(), [c.float() for c in cf16])
    for g_, w in zip(got, want, strict=True):
        assert g_.dtype == torch.bfloat16
        assert torch.equal(g_, w.to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["order1", "order2", "adam_full"])
def test_reference_layouts_are_read_in_place(kind, gen):
    """(n, s) row-major, (s, n).T and column slices give the same result, column by column."""
    n, s = 11, 4
    params, coef = _random_case(kind, n, gen)
    nb = params.nblocks
    base = [torch.randn(n, s, generator=gen, dtype=F64) for _ in range(nb + 1)]
    layouts = {
        "rows": base,
        "cols": [t.T.contiguous().T for t in base],
        "slice": [torch.cat([t, torch.randn(n, 3, dtype=F64)], dim=1)[:, :s] for t in base],
    }
    want = [
        reference_matvec(params, [t[:, j] for t in base[:nb]], base[nb][:, j], coef)
        for j in range(s)
    ]
    for name, ts in layouts.items():
        got = reference_matvec(params, ts[:nb], ts[nb], coef)
        for j in range(s):
            for g_, w in zip(got, want[j], strict=True):
                assert torch.allclose(g_[:, j], w, rtol=1e-14, atol=1e-14), name
        u = reference_rmatvec_pre(params, ts[:nb], coef)
        assert torch.allclose(
            u[:, 1],
            reference_rmatvec_pre(params, [t[:, 1] for t in base[:nb]], coef),
            rtol=1e-14,
            atol=1e-14,
        )


def test_block_params_merges_equal_neighbours_and_drops_empty_segments():
    p = BlockParams.order1([2, 0, 3, 4, 1], Da=[0.1, 0.5, 0.1, 0.2, 0.2], wd=0.0)
    assert p.offsets == (0, 5, 10) and p.n == 10
    assert p.column("Da") == [0.1, 0.2]
    assert [(lo, hi, seg.Da) for lo, hi, seg in p.segments()] == [(0, 5, 0.1), (5, 10, 0.2)]
    empty = BlockParams.order1([0], Da=0.1)
    assert empty.n == 0 and len(empty.rows) == 1


def test_block_params_validation_messages():
    with pytest.raises(ValueError, match="kind must be one of"):
        BlockParams.build("adam", [3], a=1.0)
    with pytest.raises(TypeError, match="missing \\['Da'\\]"):
        BlockParams.build("order1", [3], c=1.0, wd=0.0, sign=1.0)
    with pytest.raises(ValueError, match="2 values for 3 segments"):
        BlockParams.order1([1, 1, 1], Da=[0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        BlockParams.order1([1], Da=float("nan"))
    with pytest.raises(ValueError, match="non-negative"):
        BlockParams.order1([-1], Da=0.1)


def test_operand_validation_messages(gen):
    params, coef = _random_case("order2", 6, gen, sizes=[2, 4])
    x = [torch.randn(6, dtype=F64) for _ in range(2)]
    hv = torch.randn(6, dtype=F64)
    with pytest.raises(ValueError, match="takes 3 vectors"):
        reference_matvec(params, x[:1], hv, coef)
    with pytest.raises(ValueError, match="shape \\(6,\\) or \\(6, s\\)"):
        reference_matvec(params, x, torch.randn(5, dtype=F64), coef)
    with pytest.raises(TypeError, match="several dtypes"):
        reference_matvec(params, x, hv.float(), coef)
    with pytest.raises(ValueError, match="several devices"):
        reference_matvec(params, x, torch.empty(6, dtype=F64, device="meta"), coef)
    with pytest.raises(ValueError, match="coefficient 'D' must be a \\(6,\\) tensor"):
        reference_matvec(params, x, hv, [torch.ones(5, dtype=F64)])
    with pytest.raises(ValueError, match="overlaps input 0"):
        reference_matvec(params, x, hv, coef, out=[x[0], torch.empty(6, dtype=F64)])
    buf = torch.empty(6, dtype=F64)
    with pytest.raises(ValueError, match="overlapping elements"):
        reference_matvec(params, x, hv, coef, out=[buf.as_strided((6,), (0,)), buf])
    with pytest.raises(ValueError, match="adam_full needs the coefficient vector"):
        check_call(
            BlockParams.adam_full([6], a=0.1, b1=0.9, b2=0.99),
            "pre",
            x + [hv],
            [None, None, None],
            None,
        )
    # out= is honoured and returned
    out = [torch.empty(6, dtype=F64), torch.empty(6, dtype=F64)]
    got = reference_matvec(params, x, hv, coef, out=out)
    assert got[0] is out[0] and got[1] is out[1]

"""KappaMonitor end to end with the real :func:`kappa_gpu.estimate` on small real models.

- non-interference: a run with the monitor and the same run without it end bitwise equal
  (parameters, gradients, optimizer state, buffers, RNG state), Dropout + BatchNorm,
  SGD-momentum and AdamW;
- warm start: the previous report reaches the estimator and is used (fewer HVPs at an unchanged
  point); the issue's target (every-10-steps estimates at most 40% of the first one's HVPs) is
  an ``xfail`` test that reports the measured ratio;
- injected faults (an operator that raises, a NaN loss, a solver that does not converge, a
  solver error) never stop training and are reported in the records;
- the budget flags and caps.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _cases import one_thread

from kappa_gpu._monitor import KappaMonitor

_estimate = pytest.importorskip("kappa_gpu._estimate", reason="kappa_gpu.estimate not importable")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny models: extra intra-op threads only add synchronization
        yield


def make_data(n_batches: int = 30, batch: int = 32, n_in: int = 8, n_out: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_in, n_out, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, n_in, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def make_model(kind: str = "dropout_bn", hidden: int = 32, n_in: int = 8, n_out: int = 3):
    if kind == "dropout_bn":
        return nn.Sequential(
            nn.Linear(n_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.Tanh(),
            nn.Dropout(0.2), nn.Linear(hidden, n_out),
        )  # fmt: skip
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, n_out),
    )


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd_momentum":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    raise ValueError(name)


def train(model, opt, data, monitor=None, *, pass_loss=False, before_step=None):
    records = []
    for i, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if before_step is not None:
            before_step(i)
        if monitor is not None:
            rec = monitor.step((x, y), loss=loss if pass_loss else None)
            if rec is not None:
                records.append(rec)
    return records


def snapshot(model, opt):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [p.grad.clone() for p in model.parameters()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "opt": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def assert_bitwise_equal(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a["grads"], b["grads"], strict=True))
    assert a["buffers"].keys() == b["buffers"].keys()
    assert all(torch.equal(a["buffers"][n], b["buffers"][n]) for n in a["buffers"])
    assert torch.equal(a["rng"], b["rng"]) and a["training"] == b["training"]
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for key in sa[i]:
            va, vb = sa[i][key], sb[i][key]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, (i, key)
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("pass_loss", [False, True], ids=["loss-evaluated", "loss-given"])
def test_non_interference_end_to_end(opt_name, pass_loss):
    data = make_data()
    results = []
    for with_monitor in (True, False):
        torch.manual_seed(0)
        model = make_model("dropout_bn")
        opt = make_optimizer(opt_name, model)
        mon = (
            KappaMonitor(model, opt, F.cross_entropy, every=10, k=2, tol=1e-3)
            if with_monitor
            else None
        )
        records = train(model, opt, data, mon, pass_loss=pass_loss)
        if with_monitor:
            assert [r.step for r in records] == [10, 20, 30]
            # Non-interference is only meaningful if the estimates really ran.
            assert all(r.ok and r.n_hvp > 0 for r in records), [r.error for r in records]
        results.append(snapshot(model, opt))
    assert_bitwise_equal(*results)


def _warm_run(warm_start: bool):
    data = make_data(n_batches=80, batch=128, n_in=10, n_out=4, seed=1)
    torch.manual_seed(1)
    model = make_model("mlp", hidden=48, n_in=10, n_out=4)  # 3076 parameters
    opt = make_optimizer("sgd_momentum", model)
    mon = KappaMonitor(model, opt, F.cross_entropy, every=10, k=8, warm_start=warm_start)
    records = train(model, opt, data, mon, pass_loss=True)
    assert len(records) == 8 and all(r.ok for r in records), [r.error for r in records]
    return records


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="issue-6 target not met: measured median ratio 0.60 (first estimate 58 HVPs, warm "
    "ones 32-41, each within 0-9% of a cold start at the same point; 0.66 before the solvers "
    "tested convergence after every step). The top-8 curvature "
    "subspace of this 3k-parameter MLP turns by 5-50 degrees (principal angles, even on one "
    "fixed probe batch) between "
    "estimates 10 SGD steps apart; a warm start pays only below ~1e-2 (16 vs 35 matvecs at "
    "1e-3 on a fixed operator, 33 at 1e-1), the log law of README 'Monitoring a training run'",
)
def test_warm_start_target_40_percent():
    """Estimates every 10 steps after the first need at most 40% of the first one's HVPs."""
    records = _warm_run(True)
    assert not records[0].warm_started and all(r.warm_started for r in records[1:])
    first = records[0].n_hvp
    ratio = statistics.median(r.n_hvp for r in records[1:]) / first
    print(
        f"warm-start HVPs: first {first}, then {[r.n_hvp for r in records[1:]]}; "
        f"median ratio {ratio:.3f}"
    )
    assert ratio <= 0.4


def test_warm_start_at_an_unchanged_point_is_cheaper():
    """End to end: the monitor hands the previous report to the estimator, and it is used."""
    data = make_data(n_batches=12, batch=128, n_in=10, n_out=4, seed=1)
    torch.manual_seed(1)
    model = make_model("mlp", hidden=48, n_in=10, n_out=4)
    opt = make_optimizer("sgd_momentum", model)
    train(model, opt, data)
    mon = KappaMonitor(model, opt, F.cross_entropy, k=8)
    cold = mon.step(data[0], force=True)
    warm = mon.step(data[0], force=True)  # no training in between: same J
    assert cold.ok and warm.ok and warm.warm_started and not cold.warm_started
    assert warm.n_hvp <= 0.8 * cold.n_hvp, (cold.n_hvp, warm.n_hvp)
    assert warm.kappa_V == pytest.approx(cold.kappa_V, rel=1e-2)


def test_operator_failure_is_isolated(monkeypatch):
    real = _estimate.update_operator
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected operator failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(_estimate, "update_operator", flaky)
    data = make_data()
    torch.manual_seed(0)
    model = make_model("dropout_bn")
    opt = make_optimizer("sgd_momentum", model)
    mon = KappaMonitor(model, opt, F.cross_entropy, every=10, k=2, tol=1e-3)
    records = train(model, opt, data, mon)
    assert [r.status for r in records] == ["ok", "error", "ok"]
    assert records[1].error == "RuntimeError: injected operator failure"
    assert mon.failures == {"RuntimeError": 1}


@pytest.mark.parametrize("pass_loss", [False, True], ids=["precheck", "in-estimate"])
def test_nan_loss_at_one_step_is_isolated(pass_loss):
    poison = {"on": False}

    def loss_fn(out, y):
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if poison["on"] else loss

    data = make_data()
    torch.manual_seed(0)
    model = make_model("dropout_bn")
    opt = make_optimizer("sgd_momentum", model)
    mon = KappaMonitor(model, opt, loss_fn, every=10, k=2, tol=1e-3)

    def before(i):
        poison["on"] = i == 20

    records = train(model, opt, data, mon, pass_loss=pass_loss, before_step=before)
    assert [r.status for r in records] == ["ok", "error", "ok"], [r.error for r in records]
    assert "NonFinite" in records[1].error or "nan" in records[1].error.lower()
    assert mon.n_failures == 1


def test_solver_that_does_not_converge_is_reported():
    data = make_data()
    torch.manual_seed(0)
    model = make_model("mlp")
    opt = make_optimizer("sgd_momentum", model)
    mon = KappaMonitor(model, opt, F.cross_entropy, every=10, k=4, ncv=6, maxiter=1, tol=1e-12)
    records = train(model, opt, data, mon)
    assert len(records) == 3
    assert all(r.status == "unconverged" and not r.converged for r in records)
    assert all("not converged" in r.message for r in records)


def test_solver_error_is_isolated(monkeypatch):
    def broken(*args, **kwargs):
        raise ArithmeticError("injected solver breakdown")

    monkeypatch.setattr(_estimate, "eigsh", broken)
    monkeypatch.setattr(_estimate, "eigs", broken)
    data = make_data(n_batches=20)
    torch.manual_seed(0)
    model = make_model("mlp")
    opt = make_optimizer("sgd_momentum", model)
    mon = KappaMonitor(model, opt, F.cross_entropy, every=10, k=2)
    records = train(model, opt, data, mon)
    assert [r.status for r in records] == ["error", "error"]
    assert records[0].error == "ArithmeticError: injected solver breakdown"


def test_budget_caps_maxiter_and_flags():
    data = make_data()
    torch.manual_seed(0)
    model = make_model("mlp")
    opt = make_optimizer("sgd_momentum", model)
    mon = KappaMonitor(model, opt, F.cross_entropy, every=10, k=2, tol=1e-3, budget_s=1e-4)
    records = train(model, opt, data, mon)
    assert all(r.ok for r in records), [r.error for r in records]
    assert all(r.maxiter == 1 for r in records)  # the smallest cap the solver takes
    assert all(r.budget_limited for r in records)  # 0.1 ms cannot be met


def test_inside_autocast_the_estimate_is_the_same():
    """A mixed-precision loop calls the monitor inside its torch.autocast region: every estimate
    failed there ("addmv input tensors must have the same dtype"). kappa_gpu computes in the
    model's dtype wherever it is called from: the same numbers as outside, and the region is
    still on afterwards."""
    import kappa_gpu as kg

    data = make_data(n_batches=3)
    torch.manual_seed(0)
    model = make_model("mlp")
    opt = make_optimizer("sgd_momentum", model)
    train(model, opt, data)
    x, y = data[-1]
    ref = kg.estimate(model, opt, F.cross_entropy, (x, y), k=2, generator=torch.Generator())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rep = kg.estimate(model, opt, F.cross_entropy, (x, y), k=2,
                          generator=torch.Generator())
        mon = KappaMonitor(model, opt, F.cross_entropy, every=1, k=2, warm_start=False)
        rec = mon.step((x, y))
        assert torch.is_autocast_enabled("cpu")
    assert rep.kappa_V == ref.kappa_V and (rep.eigenvalues == ref.eigenvalues).all()
    assert rec.ok, rec.error
    assert rec.kappa_V == pytest.approx(ref.kappa_V, rel=1e-4)


def test_namedtuple_and_defaultdict_batches_keep_their_type():
    """The monitor moves the batch to the model's device; it rebuilt namedtuples (PackedSequence
    among them) as plain tuples, so a model reading batch.x failed where kg.estimate worked."""
    import collections

    import kappa_gpu as kg

    Batch = collections.namedtuple("Batch", "x y")

    class ByName(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model("mlp")

        def forward(self, b):
            return self.net(b["x"] if isinstance(b, dict) else b.x)

    data = make_data(n_batches=3)
    torch.manual_seed(0)
    model = ByName()
    opt = make_optimizer("sgd_momentum", model)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model.net(x), y).backward()
        opt.step()
    x, y = data[-1]
    dd = collections.defaultdict(list, x=x)
    for inputs in (Batch(x, y), dd):
        ref = kg.estimate(model, opt, F.cross_entropy, (inputs, y), k=2)
        rec = KappaMonitor(model, opt, F.cross_entropy, every=1, k=2).step((inputs, y))
        assert rec.ok, rec.error
        assert rec.kappa_V == pytest.approx(ref.kappa_V, rel=1e-4)

"""KappaMonitor with a stub estimator: scheduling, failure isolation, warnings, outputs, budget.

These tests do not depend on the eigen-solvers (the estimator is the ``estimator=`` hook); the
end-to-end tests with the real :func:`kappa_gpu.estimate` are in ``test_monitor_estimate.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from kappa_gpu._monitor import KappaMonitor, KappaWarning, MonitorRecord, WarningRules
from kappa_gpu._report import KappaReport


def fake_report(
    kappa: float = 10.0,
    rho: float = 0.95,
    *,
    converged: bool = True,
    n_hvp: int = 40,
    seconds: float = 0.01,
    ep_ratio=(0.5,),
    ep_which=("upper",),
    curvatures=(1.0,),
    margins=(0.05,),
    warm: torch.Tensor | None = None,
    eigenvalues=None,
) -> KappaReport:
    m = len(curvatures)
    kwargs = dict(
        eigenvalues=(np.full(2 * m, rho, dtype=np.complex128) if eigenvalues is None
                     else np.asarray(eigenvalues, dtype=np.complex128)),
        kappa_V=kappa,
        condition_numbers=np.ones(2 * m),
        spectral_radius=rho,
        curvatures=np.asarray(curvatures, dtype=np.float64),
        mode_of=np.repeat(np.arange(m), 2),
        ep_ratio=np.asarray(ep_ratio, dtype=np.float64),
        ep_which=list(ep_which),
        discriminant=np.ones(m),
        stability_margin=np.asarray(margins, dtype=np.float64),
        at_ep=np.zeros(m, dtype=bool),
        transient_growth=2.0,
        growth_argmax=3,
        growth_curve=np.ones(4),
        growth_bounded=True,
        kappa_bound_curve=np.ones(4),
        kreiss_lower=1.5,
        residuals=np.zeros(2 * m),
        converged=np.full(2 * m, converged),
        n_hvp=n_hvp,
        seconds=seconds,
        method="structured",
        variant=None,
        optimizer="sgd",
        modes="sharp",
        target="stub",
        n_params=10,
        state_dim=20,
        tol=1e-4,
        message="ok" if converged else "2 of 2 eigenvalues not converged",
        warm_vectors=torch.zeros(10, 1) if warm is None else warm,
    )
    # Required fields added to KappaReport later get a neutral value.
    for f in dataclasses.fields(KappaReport):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in kwargs and no_default:
            kwargs[f.name] = 1.0
    return KappaReport(**kwargs)


class StubEstimator:
    """Records its calls; returns the reports of ``script`` in turn (or raises them)."""

    def __init__(self, script=None):
        self.script = list(script or [])
        self.calls: list[dict] = []

    def __call__(self, model, optimizer, loss_fn, batch, k, **kwargs):
        self.calls.append(dict(kwargs, k=k, batch=batch))
        item = self.script.pop(0) if self.script else fake_report()
        if isinstance(item, BaseException):
            raise item
        return item() if callable(item) else item


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.functional.cross_entropy
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    return model, opt, loss_fn, batch


def run(monitor: KappaMonitor, model, opt, loss_fn, batch, steps: int) -> list[MonitorRecord]:
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        opt.step()
        rec = monitor.step(batch, loss=loss)
        if rec is not None:
            out.append(rec)
    return out


def test_schedule_warmup_and_force():
    model, opt, loss_fn, batch = setup()
    est = StubEstimator()
    mon = KappaMonitor(model, opt, loss_fn, every=5, warmup=10, estimator=est)
    recs = run(mon, model, opt, loss_fn, batch, 22)
    assert [r.step for r in recs] == [10, 15, 20]
    assert mon.step(batch, force=True).step == 23
    assert mon.step(batch, step=100) is not None  # explicit step numbers (framework counters)
    assert mon.n_steps == 100 and len(mon.records) == 5
    assert all(c["k"] == 8 and c["method"] == "auto" and c["modes"] == "sharp" for c in est.calls)


def test_a_zero_learning_rate_skips_the_due_estimate(caplog):
    """A linear-decay schedule ends at lr = 0 (Hugging Face's Trainer steps the scheduler
    before on_step_end): nothing to estimate, so no estimate and no failure, one log line."""
    import logging

    model, opt, loss_fn, batch = setup()
    est = StubEstimator()
    mon = KappaMonitor(model, opt, loss_fn, every=2, estimator=est)
    run(mon, model, opt, loss_fn, batch, 2)
    assert len(est.calls) == 1
    for g in opt.param_groups:
        g["lr"] = 0.0
    with caplog.at_level(logging.INFO, logger="kappa_gpu"):
        assert run(mon, model, opt, loss_fn, batch, 4) == []
    assert len(est.calls) == 1 and mon.n_failures == 0
    assert sum("lr is 0 in every parameter group" in r.getMessage() for r in caplog.records) == 1
    assert mon.step(batch, force=True) is not None and len(est.calls) == 2  # forced: runs


def test_warm_start_passes_previous_report_and_private_generator():
    model, opt, loss_fn, batch = setup()
    reports = [fake_report(), fake_report(), fake_report()]
    est = StubEstimator(list(reports))
    mon = KappaMonitor(model, opt, loss_fn, every=2, estimator=est, seed=7)
    recs = run(mon, model, opt, loss_fn, batch, 6)
    assert est.calls[0]["warm_start"] is None
    assert est.calls[1]["warm_start"] is reports[0]
    assert est.calls[2]["warm_start"] is reports[1]
    assert [r.warm_started for r in recs] == [False, True, True]
    gens = [c["generator"] for c in est.calls]
    assert all(isinstance(g, torch.Generator) for g in gens) and gens[0] is gens[1]
    # The stored report drops its warm-start vectors (memory); last_report keeps them.
    assert recs[-1].report.warm_vectors is None and mon.last_report is reports[2]


def test_record_fields_and_loss():
    model, opt, loss_fn, batch = setup()
    mon = KappaMonitor(model, opt, loss_fn, every=1, estimator=StubEstimator())
    opt.zero_grad()
    loss = loss_fn(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    rec = mon.step(batch, loss=loss)
    assert rec.status == "ok" and rec.converged and rec.error is None
    assert rec.loss == pytest.approx(loss.item())
    assert (rec.rho, rec.kappa_V, rec.nearest_ep_ratio) == (0.95, 10.0, 0.5)
    assert rec.transient_growth == 2.0 and rec.n_hvp == 40 and rec.seconds > 0
    assert rec.min_stability_margin == 0.05
    # Without a loss the monitor evaluates it on the batch (and leaves the RNG alone).
    state = torch.get_rng_state()
    rec2 = mon.step(batch)
    assert torch.equal(state, torch.get_rng_state())
    with torch.no_grad():
        assert rec2.loss == pytest.approx(loss_fn(model(batch[0]), batch[1]).item(), rel=1e-6)
    d = rec2.to_dict()
    json.dumps(d)
    assert d["status"] == "ok" and d["warnings"] == []


def test_a_loss_that_is_not_a_number_does_not_cost_the_estimate(caplog):
    """loss= only fills the record's loss field: a value float() cannot read (a string, a
    multi-element object) is logged once and replaced by the monitor's own evaluation; the
    estimate still runs (it used to become an error record)."""
    model, opt, loss_fn, batch = setup()
    mon = KappaMonitor(model, opt, loss_fn, every=1, estimator=StubEstimator())
    with caplog.at_level(logging.WARNING, logger="kappa_gpu"):
        recs = [mon.step(batch, loss="abc"), mon.step(batch, loss=object())]
    assert all(r.status == "ok" for r in recs), [r.error for r in recs]
    with torch.no_grad():
        own = loss_fn(model(batch[0]), batch[1]).item()
    assert all(r.loss == pytest.approx(own, rel=1e-6) for r in recs)
    assert caplog.text.count("is not a number") == 1


def test_batch_callable_evaluated_only_when_due():
    model, opt, loss_fn, batch = setup()
    calls = []

    def get():
        calls.append(1)
        return batch

    mon = KappaMonitor(model, opt, loss_fn, every=3, estimator=StubEstimator())
    for _ in range(7):
        mon.step(get)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "fault",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        ValueError("operator failed"),
        FloatingPointError("nan"),
    ],
)
def test_exceptions_are_isolated_logged_once_and_counted(fault, caplog):
    model, opt, loss_fn, batch = setup()
    est = StubEstimator([fault, fault, fake_report()])
    mon = KappaMonitor(model, opt, loss_fn, every=2, estimator=est)
    with caplog.at_level(logging.DEBUG, logger="kappa_gpu"):
        recs = run(mon, model, opt, loss_fn, batch, 6)
    assert [r.status for r in recs] == ["error", "error", "ok"]
    name = type(fault).__name__
    assert recs[0].error == f"{name}: {fault}" and not recs[0].ok
    assert mon.failures[name] == 2 and mon.n_failures == 2
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and name in r.message]
    assert len(warned) == 1 and "step 2" in warned[0].message
    # After a failure the next estimate starts cold.
    assert est.calls[1]["warm_start"] is None and est.calls[2]["warm_start"] is None


def test_strict_reraises():
    model, opt, loss_fn, batch = setup()
    mon = KappaMonitor(
        model, opt, loss_fn, every=1, strict=True, estimator=StubEstimator([ValueError("boom")])
    )
    with pytest.raises(ValueError, match="boom"):
        mon.step(batch)


def test_nan_loss_on_the_monitor_batch_is_an_error_record():
    model, opt, loss_fn, batch = setup()
    est = StubEstimator()
    mon = KappaMonitor(model, opt, loss_fn, every=1, estimator=est)
    bad = (batch[0] * float("nan"), batch[1])
    rec = mon.step(bad)
    assert rec.status == "error" and "NonFiniteError" in rec.error and not est.calls
    assert mon.step(batch).status == "ok"


def test_unconverged_and_nan_results():
    model, opt, loss_fn, batch = setup()
    est = StubEstimator([fake_report(converged=False), fake_report(kappa=float("nan"))])
    mon = KappaMonitor(model, opt, loss_fn, every=1, estimator=est)
    r1, r2 = mon.step(batch), mon.step(batch)
    assert r1.status == "unconverged" and not r1.converged and "not converged" in r1.message
    assert r2.status == "error" and r2.error.startswith("NonFiniteResult")
    assert mon.failures["NonFiniteResult"] == 1 and mon.last_report is None


def test_kappa_jump_rule_and_on_warning():
    model, opt, loss_fn, batch = setup()
    kappas = [10, 12, 11, 9, 200, 12]
    est = StubEstimator([fake_report(kappa=kv) for kv in kappas])
    got: list[KappaWarning] = []
    mon = KappaMonitor(
        model,
        opt,
        loss_fn,
        every=1,
        estimator=est,
        on_warning=got.append,
        rules=WarningRules(kappa_factor=5, window=3, min_history=3),
    )
    recs = [mon.step(batch) for _ in kappas]
    assert [len(r.warnings) for r in recs] == [0, 0, 0, 0, 1, 0]
    w = recs[4].warnings[0]
    assert w.rule == "kappa_jump" and w.value == 200 and w.threshold == 5 * 11
    assert recs[4].kappa_baseline == 11 and math.isnan(recs[1].kappa_baseline)
    assert got == [w] and mon.warnings == [w]


def test_near_ep_and_stability_edge_rules():
    model, opt, loss_fn, batch = setup()
    reports = [
        # near the upper EP (2% below it): fires near_ep only
        fake_report(
            ep_ratio=[-0.02, 0.5],
            ep_which=["upper", "upper"],
            curvatures=[3.0, 1.0],
            margins=[0.05, 0.05],
        ),
        # near the lower EP: ignored by default
        fake_report(ep_ratio=[0.01], ep_which=["lower"], curvatures=[0.01], margins=[0.05]),
        # past the upper EP, real pair close to -1: stability_edge
        fake_report(ep_ratio=[0.2], ep_which=["upper"], curvatures=[4.0], margins=[0.01],
                    eigenvalues=[-0.99, -0.91]),
        # unstable sharp mode
        fake_report(ep_ratio=[0.5], ep_which=["upper"], curvatures=[5.0], margins=[-0.3]),
        # negative curvature with z > 1: not an edge event
        fake_report(ep_ratio=[np.nan], ep_which=["none"], curvatures=[-1.0], margins=[-0.01]),
        # plain SGD (no EP) near z = -1: margin rule alone
        fake_report(ep_ratio=[np.nan], ep_which=["none"], curvatures=[19.9], margins=[0.005],
                    eigenvalues=[-0.995, -0.995]),
        # plain SGD at a small lr: z = 1 - lr s near +1 is a flat mode, not an edge (it fired
        # at every estimate; review case)
        fake_report(ep_ratio=[np.nan], ep_which=["none"], curvatures=[0.0075],
                    margins=[0.0075], eigenvalues=[0.9925, 0.9925]),
    ]
    mon = KappaMonitor(
        model,
        opt,
        loss_fn,
        every=1,
        estimator=StubEstimator(reports),
        rules=WarningRules(min_history=100),
    )
    rules = [[w.rule for w in mon.step(batch).warnings] for _ in reports]
    assert rules == [
        ["near_ep"],
        [],
        ["stability_edge"],
        ["stability_edge"],
        [],
        ["stability_edge"],
        [],
    ]


def test_warning_rule_validation():
    with pytest.raises(ValueError, match="kappa_factor"):
        WarningRules(kappa_factor=0.5)
    with pytest.raises(ValueError, match="ep_which"):
        WarningRules(ep_which=("middle",))


def test_on_warning_exception_is_isolated():
    model, opt, loss_fn, batch = setup()

    def bad(_):
        raise RuntimeError("callback bug")

    mon = KappaMonitor(
        model,
        opt,
        loss_fn,
        every=1,
        on_warning=bad,
        estimator=StubEstimator([fake_report(ep_ratio=[0.0])]),
        rules=WarningRules(min_history=100),
    )
    rec = mon.step(batch)
    assert rec.warnings and mon.failures["RuntimeError"] == 1


def test_jsonl_csv_and_tensorboard_outputs(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install kappa-gpu[tensorboard]")
    model, opt, loss_fn, batch = setup()
    est = StubEstimator([fake_report(), ValueError("boom"), fake_report(kappa=float("inf"))])
    with KappaMonitor(
        model, opt, loss_fn, every=2, log_dir=tmp_path, csv=True, estimator=est
    ) as mon:
        run(mon, model, opt, loss_fn, batch, 6)
    lines = [json.loads(x) for x in (tmp_path / "kappa_monitor.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6]
    assert [x["status"] for x in lines] == ["ok", "error", "ok"]
    assert lines[1]["error"] == "ValueError: boom" and lines[2]["kappa_V"] == "inf"
    rows = list(csv.DictReader((tmp_path / "kappa_monitor.csv").open()))
    assert [r["step"] for r in rows] == ["2", "4", "6"] and rows[0]["kappa_V"] == "10.0"
    assert list(tmp_path.glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("kappa/rho")] == [2, 6]


def test_tensorboard_missing_warns_once(tmp_path, monkeypatch, caplog):
    import sys

    import kappa_gpu._monitor as m

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(m, "_TB_MISSING_WARNED", False)
    model, opt, loss_fn, batch = setup()
    with caplog.at_level(logging.WARNING, logger="kappa_gpu"):
        for _ in range(2):
            mon = KappaMonitor(
                model, opt, loss_fn, every=1, log_dir=tmp_path, estimator=StubEstimator()
            )
            assert mon.step(batch).status == "ok"
            assert mon.step(batch).status == "ok"
    msgs = [r.message for r in caplog.records if "TensorBoard" in r.message]
    assert len(msgs) == 1 and "kappa-gpu[tensorboard]" in msgs[0]
    assert (tmp_path / "kappa_monitor.jsonl").exists()


def test_budget_sets_maxiter_from_measured_hvp_cost():
    model, opt, loss_fn, batch = setup()
    # 0.01 s per HVP measured; budget 1 s -> allowance 100 HVPs; ncv = 20, k = 8:
    # maxiter = (100 - (20 + 16)) // 12 = 5.
    reports = [fake_report(n_hvp=100, seconds=1.0), fake_report(converged=False), fake_report()]
    est = StubEstimator(reports)
    mon = KappaMonitor(
        model, opt, loss_fn, every=1, budget_s=1.0, estimator=est, hvp_cost_factor=1e-9
    )
    recs = [mon.step(batch) for _ in range(3)]
    assert est.calls[1]["maxiter"] == 5
    assert recs[1].budget_limited and recs[1].maxiter == 5
    assert not recs[2].budget_limited  # converged within the cap


def test_overhead_accounting():
    model, opt, loss_fn, batch = setup()
    mon = KappaMonitor(model, opt, loss_fn, every=5, estimator=StubEstimator())
    run(mon, model, opt, loss_fn, batch, 20)
    ov = mon.overhead()
    assert ov.n_steps == 20 and ov.n_estimates == 4 and ov.n_failures == 0
    assert ov.train_seconds > 0 and ov.monitor_seconds > 0
    assert ov.ratio == pytest.approx(ov.monitor_seconds / ov.train_seconds)
    assert ov.n_hvp == 160 and "overhead" in str(ov)
    assert mon.records[-1].overhead > 0


class _Clock:
    """A fake ``time`` module for the monitor: ``perf_counter`` reads ``now``, which the test
    advances (training steps) and the stub estimator advances (its cost)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    @staticmethod
    def time() -> float:
        return 0.0


def test_max_overhead_skips_due_estimates_to_stay_under_the_cap(monkeypatch, caplog):
    """Training steps of 1 s, estimates of 5 s, every=1, max_overhead=0.5: after the first
    estimate (which measures the cost) an estimate runs only when monitor + 5 s fits in half
    the training time, so the ratio never exceeds 0.5 after step 10 and estimates come about
    every 10 steps; without the cap every step estimates (ratio 5)."""
    import kappa_gpu._monitor as m

    clock = _Clock()
    monkeypatch.setattr(m, "time", clock)
    model, opt, loss_fn, batch = setup()

    def costly(*args, **kwargs):
        clock.now += 5.0
        return fake_report()

    def train(mon, steps):
        ratios, done = [], []
        for step in range(1, steps + 1):
            clock.now += 1.0  # the training step
            rec = mon.step(batch)
            ratios.append(mon.overhead().ratio)
            if rec is not None:
                done.append(step)
        return ratios, done

    with caplog.at_level(logging.INFO, logger="kappa_gpu"):
        capped = KappaMonitor(model, opt, loss_fn, every=1, max_overhead=0.5, estimator=costly)
        ratios, done = train(capped, 100)
    ov = capped.overhead()
    assert done[0] == 1 and ov.n_estimates == len(done) and ov.n_skipped == 100 - len(done)
    assert 8 <= len(done) <= 12  # 5 s estimates within half of 100 s of training
    assert max(ratios[10:]) <= 0.5 + 1e-12 and ratios[-1] > 0.4
    assert np.all(np.diff(done[1:]) >= 2)  # spaced out, not bunched
    assert "skipped (max_overhead)" in str(ov)
    assert sum("skipping due estimates" in r.getMessage() for r in caplog.records) == 1
    # forced estimates ignore the cap; no cap: every due step estimates
    assert capped.step(batch, force=True) is not None
    free = KappaMonitor(model, opt, loss_fn, every=1, estimator=costly)
    ratios, done = train(free, 10)
    assert len(done) == 10 and free.overhead().n_skipped == 0 and ratios[-1] == 5.0
    with pytest.raises(ValueError, match="max_overhead"):
        KappaMonitor(model, opt, loss_fn, max_overhead=0)
    for bad in (True, np.bool_(True), "0.1", -0.1, math.inf):
        with pytest.raises(ValueError, match="max_overhead"):
            KappaMonitor(model, opt, loss_fn, max_overhead=bad)


def test_argument_validation():
    model, opt, loss_fn, _ = setup()
    with pytest.raises(ValueError, match="every"):
        KappaMonitor(model, opt, loss_fn, every=0)
    with pytest.raises(ValueError, match="budget_s"):
        KappaMonitor(model, opt, loss_fn, budget_s=0)
    with pytest.raises(ValueError, match="log_dir"):
        KappaMonitor(model, opt, loss_fn, csv=True)
    with pytest.raises(TypeError, match="set by the monitor"):
        KappaMonitor(model, opt, loss_fn, generator=None)
    with pytest.raises(TypeError, match="optimizer"):
        KappaMonitor(model, "sgd", loss_fn)
    # what estimate would reject, rejected when the monitor is built (not as error records at
    # the first due estimate); a custom estimator takes what it likes
    with pytest.raises(ValueError, match="method must be one of"):
        KappaMonitor(model, opt, loss_fn, method="lanczos")
    with pytest.raises(ValueError, match="modes must be one of"):
        KappaMonitor(model, opt, loss_fn, modes="all")
    with pytest.raises(TypeError, match=r"unknown estimate argument\(s\) \['foo'\]"):
        KappaMonitor(model, opt, loss_fn, foo=1)
    with pytest.raises(ValueError, match="tol must be"):
        KappaMonitor(model, opt, loss_fn, tol=-1)
    with pytest.raises(ValueError, match="tensorboard=True needs a log_dir"):
        KappaMonitor(model, opt, loss_fn, tensorboard=True)
    KappaMonitor(model, opt, loss_fn, tol=1e-3, ncv=30, hvp="forward")  # accepted
    KappaMonitor(model, opt, loss_fn, tol=np.float32(1e-5))  # as estimate accepts it
    KappaMonitor(model, opt, loss_fn, method="custom", foo=1, estimator=lambda *a, **k: None)


def test_profiler_range_around_estimates():
    from torch.profiler import ProfilerActivity, profile

    model, opt, loss_fn, batch = setup()
    mon = KappaMonitor(model, opt, loss_fn, every=1, estimator=StubEstimator())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mon.step(batch)
    assert any(e.name == "kappa_gpu.estimate" for e in prof.events())


def test_wrapped_models_are_unwrapped():
    from kappa_gpu._monitor import unwrap_model

    model, opt, loss_fn, batch = setup()
    assert unwrap_model(nn.DataParallel(model)) is model
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(model) is model
    mon = KappaMonitor(nn.DataParallel(model), opt, loss_fn, estimator=StubEstimator())
    assert mon.model is model and mon.active


def test_rank_zero_only(monkeypatch):
    import kappa_gpu._monitor as m

    model, opt, loss_fn, batch = setup()
    monkeypatch.setattr(m, "_distributed_rank", lambda: 1)
    est = StubEstimator()
    mon = KappaMonitor(model, opt, loss_fn, every=1, estimator=est)
    assert not mon.active and mon.step(batch) is None and not est.calls
    mon = KappaMonitor(model, opt, loss_fn, every=1, estimator=est, rank_zero_only=False)
    assert mon.active and mon.step(batch) is not None


def test_default_estimator_is_looked_up_at_call_time(monkeypatch):
    import kappa_gpu._estimate as e

    model, opt, loss_fn, batch = setup()
    est = StubEstimator()
    monkeypatch.setattr(e, "estimate", est)
    mon = KappaMonitor(model, opt, loss_fn, every=1)
    assert mon.step(batch).status == "ok" and len(est.calls) == 1


def test_an_estimate_in_eval_mode_says_so():
    """A loop that validates (model.eval()) and then calls the monitor: J is the eval-mode
    step (running statistics, no dropout), not the training step; the record said nothing
    (review case). Train mode adds no note."""
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2),
                          nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    mon = KappaMonitor(model, opt, F.cross_entropy, every=1, k=2)
    rec = mon.step((x, y), force=True)
    assert rec.status != "error" and "eval mode" not in rec.message
    model.eval()
    rec = mon.step((x, y), force=True)
    assert rec.status != "error" and "eval mode" in rec.message and "BatchNorm1d" in rec.message
    assert not model.training  # left as it was

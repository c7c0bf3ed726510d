"""``kappa-gpu reproduce --quick`` end to end, and the pieces it is built from.

The end-to-end test trains the quick grid (two 81-parameter runs, 9 estimates each) in two
spawned workers and writes everything into a tmp dir: about 10 s on 2 idle CPU cores, up to
~45 s when they are shared.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kappa_gpu.experiments._spikes import SpikeRule, detect_spikes
from kappa_gpu.experiments._stats import auc, chance_rate, lead_times
from kappa_gpu.experiments.reproduce import METRICS, main_reproduce

pytest.importorskip("matplotlib")


def _finite_numbers(obj, path="") -> list[str]:
    """Paths of numbers in a JSON tree that are not finite (strings 'inf'/'nan' included)."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad += _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path)
    elif isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        bad.append(path)
    return bad


def test_quick_end_to_end(tmp_path):
    out = tmp_path / "rep"
    # 9-15 s on an idle 2-core machine, up to ~45 s when the cores are shared; no timing
    # assertion (it would be flaky), the duration shows in pytest --durations
    assert main_reproduce(["--quick", "--out", str(out), "--quiet"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    for key in ("command", "options", "spike_rule", "metrics", "runs", "groups", "figures",
                "seconds_total"):
        assert key in summary, key
    assert (out / "summary.md").read_text().startswith("Command: `kappa-gpu reproduce --quick")
    assert summary["options"]["quick"] is True
    assert set(summary["groups"]) >= {"all", "sgd-momentum"}
    g = summary["groups"]["sgd-momentum"]
    assert g["n_runs"] == 2 and g["n_spikes"] >= 1  # the quick grid has a spiking run
    assert sum(g["n_estimates"].values()) > 0
    for m in METRICS:
        s = g["metrics"][m]
        for key in ("median_stable", "median_unstable", "ratio_unstable_stable",
                    "auc_unstable_vs_stable", "auc_pre_vs_stable", "warning_threshold",
                    "detection_rate", "lead_times"):
            assert key in s, (m, key)
        assert 0.0 <= s["auc_unstable_vs_stable"] <= 1.0
        assert s["median_stable"] > 0
    # no inf/nan anywhere in the summary: it is for people and for the README table
    assert _finite_numbers(summary["groups"]) == []

    runs = sorted((out / "runs").glob("*.jsonl"))
    assert len(runs) == 2
    for path in runs:
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        head, recs = lines[0], lines[1:]
        assert head["kind"] == "run"
        assert {"config", "spikes", "loss", "n_params"} <= set(head)
        assert 2 * head["n_params"] <= 600  # small enough for the dense eig
        assert all(np.isfinite(head["loss"]))
        assert len(recs) >= 5
        for r in recs:
            assert r["kind"] == "estimate"
            assert r["phase"] in ("stable", "pre", "spike", "diverged")
            for m in ("loss", "ritz_rho", "ritz_kappa_V", "ritz_nearest_ep_ratio",
                      "ritz_normalized_growth", "dense_rho", "dense_kappa_V", "dense_max_cond"):
                assert isinstance(r[m], float) and math.isfinite(r[m]), (path.name, m, r[m])
            # max_t ||T^t|| is unbounded (written "inf") exactly when rho >= 1
            g = r["ritz_transient_growth"]
            assert (g == "inf") if r["ritz_rho"] >= 1 else (isinstance(g, float) and g >= 1)
            assert r["ritz_converged"] is True
            # the sharp Ritz modes are a subset of the spectrum: rho can only be smaller
            assert r["ritz_rho"] <= r["dense_rho"] * (1 + 1e-8)

    for name in summary["figures"]:
        p = out / name
        assert p.exists() and p.stat().st_size > 10_000, name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("fig3_spectrum") for n in summary["figures"])
    assert not any(isinstance(v, dict) and "failed" in v for v in summary["figures"].values())


def test_spike_definition():
    rule = SpikeRule()
    # smooth decay, one spike (x10) at 100..109, recovery, then divergence at 300
    loss = list(np.exp(-np.arange(300) / 100.0))
    for t in range(100, 110):
        loss[t] *= 10.0
    loss.append(1e9)
    a = detect_spikes(loss, rule)
    assert len(a.spikes) == 1
    s = a.spikes[0]
    assert (s.onset, s.end) == (100, 110) and s.height > 9
    assert a.diverged_at == 300
    assert a.phase_name(99) == "pre" and a.phase_name(100 - rule.lookahead) == "pre"
    assert a.phase_name(100 - rule.lookahead - 1) == "stable"
    assert a.phase_name(105) == "spike" and a.phase_name(200) == "stable"
    assert a.phase_name(300 - rule.lookahead) == "pre" and a.phase_name(300) == "diverged"
    # an oscillation right after a spike is part of it, not a new one
    loss2 = list(np.ones(200))
    for t in (100, 101, 102, 106, 107):
        loss2[t] = 5.0
    b = detect_spikes(loss2, rule)
    assert len(b.spikes) == 1 and (b.spikes[0].onset, b.spikes[0].end) == (100, 108)
    assert detect_spikes(np.ones(50), rule).spikes == []


def test_auc_and_lead_times():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    p = rng.integers(0, 6, 50).astype(float)
    n = rng.integers(0, 6, 40).astype(float)
    p[0] = np.inf
    assert auc(p, n) == pytest.approx(mannwhitneyu(p, n).statistic / (50 * 40))
    assert auc([2, 3], [0, 1]) == 1.0 and auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 1], [1, 1]) == 0.5
    r = np.sqrt(0.9)
    assert auc([r, r * (1 + 1e-15)], [r * (1 - 1e-15), r]) == 0.5  # rounding-level ties
    assert math.isnan(auc([], [1.0]))
    steps = np.arange(0, 100, 10)
    vals = np.array([0, 0, 5, 5, 5, 0, 5, 5, 5, 5.0])
    # the first above-threshold estimate in the window [e - lookback, e) sets the lead time
    assert lead_times(steps, vals, [35, 55, 100], 1.0, lookback=100) == [15, 35, 80]
    assert lead_times(steps, vals, [35, 55, 100], 1.0, lookback=10) == [5, None, 10]
    assert lead_times(steps, vals, [55], 1.0, starts=[50]) == [None]
    stable = np.array([True] * 5 + [False] + [True] * 4)
    # all-stable windows of 30 steps (3 estimates) that start at or after step 0 end at
    # 30, 40, 80 and 90; each holds a value above the threshold
    assert chance_rate(steps, vals, stable, 1.0, lookback=30) == (4, 4)
    assert chance_rate(steps, vals, stable, 6.0, lookback=30) == (4, 0)


def test_dense_pseudospectra_matches_svd():
    """The inverse-iteration pseudospectra of figure 3 agree with the SVD-based ones of
    kappa_gpu.diagnostics.pseudospectra to well within a contour line."""
    from kappa_gpu.diagnostics import pseudospectra
    from kappa_gpu.experiments._plots import dense_pseudospectra

    rng = np.random.default_rng(0)
    A = 0.3 * np.triu(rng.standard_normal((40, 40))) + np.diag(np.linspace(-1, 1, 40))
    xs, ys = np.linspace(-1.5, 1.5, 9), np.linspace(-1, 1, 7)
    ratio = dense_pseudospectra(A, xs, ys).sigma_min / pseudospectra(A, (xs, ys)).sigma_min
    assert np.all(np.abs(ratio - 1) < 1e-2)

"""``kappa-gpu reproduce``: the two-layer experiment of arXiv:2605.23476, on this machine.

The claim under test: on two-layer networks the spectral radius rho(J) of the linearized
optimizer update does not separate stable from unstable training phases, while the eigenvector
condition number kappa(V) separates them by about an order of magnitude and rises before loss
spikes.

What it does: trains a sweep of small two-layer networks (teacher-student regression and a
3-class Gaussian-mixture classifier; full batch and mini-batch; learning rates from stable
through spiking to diverging, chosen by the regime search recorded in ``docs/reproduce.md``)
with heavy-ball SGD and/or Adam. Every ``--every`` steps it measures, at the current point and
on the full training set (the Jacobian of the expected step, also for mini-batch runs):

* **Ritz view** -- :func:`kappa_gpu.estimate` with ``k`` sharp modes (structured path):
  ``spectral_radius`` and ``kappa_V`` of those modes, their eigenvalue condition numbers, the
  nearest exceptional-point ratio, the transient growth on their invariant subspace, and the
  sharpness relative to the stability edge;
* **dense view** -- ``update_operator(...).to_dense()`` and ``scipy.linalg.eig(left=True)``:
  rho(J) of all eigenvalues (> 1 along negative curvature), kappa(V) of all unit eigenvectors,
  and the per-eigenvalue condition numbers ``1 / |y^H x|`` (independent of column scaling).

Loss spikes, divergence and stable/unstable phases follow the automatic definition in
:mod:`kappa_gpu.experiments._spikes`. Outputs in ``--out``: ``runs/<run>.jsonl`` (one line per
run header, then one per estimate), ``summary.json`` and the figures
``fig1_example_run_<optimizer>.png``, ``fig2_distributions_<optimizer>.png``,
``fig3_spectrum_<optimizer>.png`` and ``fig4_lead_times.png`` (:mod:`._plots`).

Entry points: :func:`main_reproduce` (argv), :func:`add_reproduce_parser` and
:func:`run_from_args` (for a ``kappa-gpu reproduce`` subcommand), :func:`reproduce` (Python).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from kappa_gpu.experiments._problems import RunConfig, make_problem, n_params_of, train
from kappa_gpu.experiments._spikes import PHASES, SpikeRule, detect_spikes
from kappa_gpu.experiments._stats import (
    auc,
    chance_rate,
    finite_or_none,
    lead_times,
    median_ratio,
)

__all__ = [
    "DEFAULT_GRID",
    "QUICK_GRID",
    "METRICS",
    "OPTIMIZERS",
    "reproduce",
    "load_runs",
    "run_instrumented",
    "summarize",
    "format_summary",
    "format_markdown",
    "main_reproduce",
    "add_reproduce_parser",
    "run_from_args",
]

OPTIMIZERS = ("sgd-momentum", "adam")

# The default sweep, per optimizer: (role, RunConfig with seed 0). Chosen from the regime
# search (docs/reproduce.md): "stable" never spiked in the search, "spiking" spiked in most
# seeds and usually recovered, "diverging" diverged in most seeds. All with label noise 0.2
# (the loss then has a floor, so a factor-2 rise is a real event, not a wiggle at 1e-6).
_T = 1000
DEFAULT_GRID: dict[str, list[tuple[str, RunConfig]]] = {
    "sgd-momentum": [
        ("stable", RunConfig("teacher", "sgd-momentum", 0.1, 0, 16, 0.2, None, 0, _T)),
        ("spiking", RunConfig("teacher", "sgd-momentum", 0.5, 0, 16, 0.2, None, 100, _T)),
        ("spiking", RunConfig("teacher", "sgd-momentum", 0.5, 0, 24, 0.2, None, 0, _T)),
        ("spiking", RunConfig("teacher", "sgd-momentum", 0.7, 0, 16, 0.2, None, 100, _T)),
        ("diverging", RunConfig("teacher", "sgd-momentum", 0.8, 0, 16, 0.2, None, 100, _T)),
        ("spiking-minibatch", RunConfig("teacher", "sgd-momentum", 0.1, 0, 16, 0.2, 32, 0, _T)),
        ("stable", RunConfig("blobs", "sgd-momentum", 1.0, 0, 16, 0.2, None, 0, _T)),
        ("spiking", RunConfig("blobs", "sgd-momentum", 5.0, 0, 16, 0.2, None, 0, _T)),
    ],
    "adam": [
        ("stable", RunConfig("teacher", "adam", 0.01, 0, 16, 0.2, None, 0, _T)),
        ("spiking", RunConfig("teacher", "adam", 0.1, 0, 16, 0.2, None, 0, _T)),
        ("spiking", RunConfig("teacher", "adam", 0.2, 0, 24, 0.2, None, 0, _T)),
        ("spiking-minibatch", RunConfig("teacher", "adam", 0.05, 0, 16, 0.2, 32, 0, _T)),
        ("stable", RunConfig("blobs", "adam", 0.2, 0, 16, 0.2, None, 0, _T)),
        ("spiking", RunConfig("blobs", "adam", 1.0, 0, 16, 0.2, None, 0, _T)),
    ],
}

# --quick (CI): one stable and one spiking run per optimizer, 200 steps, 81-parameter nets
# (the Adam spiking one: 161).
QUICK_GRID: dict[str, list[tuple[str, RunConfig]]] = {
    "sgd-momentum": [
        ("stable", RunConfig("teacher", "sgd-momentum", 0.1, 0, 8, 0.2, None, 0, 200)),
        ("spiking", RunConfig("teacher", "sgd-momentum", 0.8, 0, 8, 0.2, None, 100, 200)),
    ],
    "adam": [
        ("stable", RunConfig("teacher", "adam", 0.01, 0, 8, 0.2, None, 0, 200)),
        ("spiking", RunConfig("teacher", "adam", 0.2, 0, 16, 0.2, None, 0, 200)),
    ],
}

#: The metrics compared, with the view they come from; "higher = more unstable" for all.
METRICS: dict[str, str] = {
    "ritz_rho": "rho(J), top-k sharp Ritz modes (estimate)",
    "ritz_kappa_V": "kappa(V), top-k sharp Ritz modes (estimate)",
    "ritz_max_cond": "max eigenvalue condition number, sharp Ritz modes",
    "ritz_transient_growth": "max_t ||T^t||, T = J on the sharp invariant subspace (inf if rho>=1)",
    "ritz_normalized_growth": "max_t ||(T / rho)^t||: amplification beyond rho^t",
    "ritz_edge_ratio": "sharpness / stability edge, a s_max / (2 (1 + beta))",
    "dense_rho": "rho(J), full spectrum (dense eig)",
    "dense_kappa_V": "kappa(V), all unit eigenvectors (dense eig)",
    "dense_max_cond": "max eigenvalue condition number, full spectrum",
}

GROWTH_HORIZON = 100  # steps of the transient-growth curve
_WARN_QUANTILE = 0.9  # warning threshold: the 90th percentile of the metric in stable phases
_LOOKBACK = 100  # steps before a spike in which a threshold crossing counts as its warning
_LOOKAHEADS = (30, 60, 100)  # pre-spike windows H for the sensitivity of the pre-spike AUC


# -- one instrumented run (runs in a worker process) -----------------------------------------
def _dense_view(op) -> dict[str, Any]:
    """rho, kappa(V) and eigenvalue condition numbers of the dense J (float64 LAPACK)."""
    import scipy.linalg

    J = op.to_dense().detach().cpu().numpy().astype(np.float64)
    z, YL, XR = scipy.linalg.eig(J, left=True, right=True)
    # scipy returns unit 2-norm columns for both; kappa(V) in the 2-norm via the SVD.
    sv = np.linalg.svd(XR, compute_uv=False)
    kv = float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf
    with np.errstate(divide="ignore"):
        cond = 1.0 / np.abs(np.sum(np.conj(YL) * XR, axis=0))
    return {
        "dense_rho": float(np.max(np.abs(z))),
        "dense_kappa_V": kv,
        "dense_max_cond": float(np.max(cond)),
        "dense_median_cond": float(np.median(cond)),
        "dense_n_outside": int(np.sum(np.abs(z) > 1.0 + 1e-12)),
        "_z": z,
    }


def _coefficients(cfg: RunConfig):
    from kappa_gpu.diagnostics import adam_frozen_coefficients, sgd_momentum_coefficients

    if cfg.optimizer == "adam":
        return adam_frozen_coefficients(0.9)
    return sgd_momentum_coefficients(0.9)


def _ritz_view(prob, opt, k: int, warm, seed: int, coeffs) -> tuple[dict[str, Any], Any]:
    import torch

    from kappa_gpu._estimate import estimate

    # horizon: max_t ||T^t|| over t <= 100 (the growth of these modes peaks at t ~ 10-40);
    # the default horizon runs to decay, up to 1000+ steps when rho >= 1, and costs more
    # than the Lanczos run itself on these small networks.
    rep = estimate(prob.model, opt, prob.loss_fn, (prob.X, prob.y), k=k, modes="sharp",
                   warm_start=warm, generator=torch.Generator().manual_seed(seed),
                   horizon=GROWTH_HORIZON)
    s_max = float(np.max(rep.curvatures)) if len(rep.curvatures) else float("nan")
    cond = np.asarray(rep.condition_numbers, dtype=np.float64)
    return {
        "ritz_rho": float(rep.spectral_radius),
        "ritz_kappa_V": float(rep.kappa_V),
        "ritz_max_cond": float(np.nanmax(cond)) if np.any(~np.isnan(cond)) else float("nan"),
        "ritz_transient_growth": float(rep.transient_growth),
        "ritz_normalized_growth": float(getattr(rep, "normalized_growth", float("nan"))),
        "ritz_nearest_ep_ratio": float(rep.nearest_ep_ratio),
        "ritz_edge_ratio": coeffs.a * s_max / (2.0 * (1.0 + coeffs.beta)),
        "ritz_s_max": s_max,
        "ritz_converged": bool(rep.all_converged),
        "ritz_n_hvp": int(rep.n_hvp),
        "ritz_method": rep.method,
        "_z": np.asarray(rep.eigenvalues),
    }, rep


def run_instrumented(
    cfg: RunConfig,
    every: int = 20,
    k: int = 8,
    rule: SpikeRule | None = None,
    dense: bool = True,
) -> dict[str, Any]:
    """Train one run and measure both views every ``every`` steps.

    Args:
        cfg: the run.
        every: steps between estimates (the first at step ``every``).
        k: sharp modes of the Ritz view.
        rule: the spike definition (default :class:`SpikeRule()`).
        dense: also compute the dense view (``2n`` HVPs and an ``O((2n)^3)`` eig each time).

    Returns:
        ``{"config", "n_params", "loss", "spikes", "records", "snapshot_step", "seconds"}``:
        the per-step loss, the spike analysis, one record per estimate (with its phase) and the
        step of the estimate just before the highest spike (for the spectrum figure).

    Cost: per estimate about ``3k + 2k`` HVPs (Ritz) plus ``2n`` HVP columns and a dense
    ``2n x 2n`` eig with left vectors (dense). An estimate that raises (e.g. a non-finite
    gradient at the edge of divergence) is recorded with its error and NaN metrics.
    """
    import torch

    from kappa_gpu.operators import update_operator

    rule = rule or SpikeRule()
    t0 = time.perf_counter()
    prob = make_problem(cfg)
    coeffs = _coefficients(cfg)
    records: list[dict[str, Any]] = []
    warm = {"rep": None}

    def hook(t: int, loss: float, prob_, opt) -> bool:
        if t % every:
            return False
        rec: dict[str, Any] = {"step": t, "loss": loss, "lr": opt.param_groups[0]["lr"]}
        te = time.perf_counter()
        try:
            ritz, rep = _ritz_view(prob_, opt, k, warm["rep"], cfg.seed, coeffs)
            warm["rep"] = rep
            ritz.pop("_z")
            rec.update(ritz)
        except Exception as err:  # recorded, not fatal: the run goes on
            rec["ritz_error"] = f"{type(err).__name__}: {err}"[:300]
            warm["rep"] = None
        if dense:
            try:
                op = update_operator(prob_.model, opt, prob_.loss_fn, (prob_.X, prob_.y))
                dv = _dense_view(op)
                dv.pop("_z")
                rec.update(dv)
            except Exception as err:
                rec["dense_error"] = f"{type(err).__name__}: {err}"[:300]
        rec["seconds"] = time.perf_counter() - te
        records.append(rec)
        return True

    with torch.random.fork_rng(devices=[]):
        loss = train(cfg, prob, hook=hook, diverge_factor=rule.diverge_factor)
    analysis = detect_spikes(loss, rule)
    for rec in records:
        rec["phase"] = analysis.phase_name(rec["step"])
    for m in METRICS:
        for rec in records:
            rec.setdefault(m, float("nan"))
    # the estimate just before the highest spike onset (or divergence): the spectrum figure
    # re-trains the (deterministic) run to that step
    snapshot_step = None
    events = [(s.height, s.onset) for s in analysis.spikes]
    if analysis.diverged_at is not None:
        events.append((math.inf, analysis.diverged_at))
    if events and records:
        _, onset = max(events)
        before = [r["step"] for r in records if r["step"] < onset]
        if before:
            snapshot_step = before[-1]
    return {
        "config": cfg.to_dict(),
        "n_params": n_params_of(prob.model),
        "loss": loss,
        "spikes": analysis.to_dict(),
        "records": records,
        "snapshot_step": snapshot_step,
        "seconds": time.perf_counter() - t0,
    }


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _run_job(job: tuple[str, RunConfig, int, int, SpikeRule, bool]) -> dict[str, Any]:
    role, cfg, every, k, rule, dense = job
    out = run_instrumented(cfg, every=every, k=k, rule=rule, dense=dense)
    out["role"] = role
    return out


# -- aggregation ------------------------------------------------------------------------------
def _values(records: list[dict], metric: str, phases: Sequence[str]) -> np.ndarray:
    return np.array([r.get(metric, math.nan) for r in records if r["phase"] in phases],
                    dtype=np.float64)


def _events(run: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Spike onsets and divergence of a run, with the first step each warning may use."""
    sp = run["spikes"]["spikes"]
    ev = [s["onset"] for s in sp]
    starts = [0] + [s["end"] for s in sp[:-1]]
    if run["spikes"]["diverged_at"] is not None:
        ev.append(run["spikes"]["diverged_at"])
        starts.append(sp[-1]["end"] if sp else 0)
    return ev, starts


def _median(v: np.ndarray) -> float | None:
    v = v[~np.isnan(v)]
    return finite_or_none(np.median(v)) if len(v) else None


def _run_median(run: dict[str, Any], m: str) -> float:
    v = np.array([r.get(m, math.nan) for r in run["records"]], dtype=np.float64)
    return float(np.median(v[~np.isnan(v)])) if np.any(~np.isnan(v)) else math.nan


def _rephase(run: dict[str, Any], lookahead: int) -> list[str]:
    """The phases of a run's estimates under a different ``pre`` window."""
    rule = SpikeRule(**{**run["spikes"]["rule"], "lookahead": lookahead})
    a = detect_spikes(run["loss"], rule)
    return [a.phase_name(r["step"]) for r in run["records"]]


def _stats_group(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Separation statistics of every metric over a group of runs (see :func:`summarize`)."""
    recs = [r for run in runs for r in run["records"]]
    unstable = ("pre", "spike", "diverged")
    out: dict[str, Any] = {
        "n_runs": len(runs),
        "n_spiking_runs": sum(1 for r in runs if r["spikes"]["n_spikes"] > 0),
        "n_diverged_runs": sum(1 for r in runs if r["spikes"]["diverged_at"] is not None),
        "n_spikes": sum(r["spikes"]["n_spikes"] for r in runs),
        "n_estimates": {p: sum(1 for r in recs if r["phase"] == p) for p in PHASES},
        "n_failed_estimates": sum(1 for r in recs if "ritz_error" in r or "dense_error" in r),
        "lookback": _LOOKBACK,
        "metrics": {},
    }
    rephased = {H: [_rephase(run, H) for run in runs] for H in _LOOKAHEADS}
    # run level: does the run spike or diverge at all? (per-run median of the metric)
    bad_run = [r["spikes"]["n_spikes"] > 0 or r["spikes"]["diverged_at"] is not None
               for r in runs]
    per_event: dict[str, list[int | None]] = {}
    for m in METRICS:
        st = _values(recs, m, ("stable",))
        un = _values(recs, m, unstable)
        pre = _values(recs, m, ("pre",))
        within = []  # within-run AUC: runs with at least 3 estimates in both classes
        for run in runs:
            a = _values(run["records"], m, unstable)
            b = _values(run["records"], m, ("stable",))
            if len(a) >= 3 and len(b) >= 3:
                within.append(auc(a, b))
        pre_by_h = {}
        for H, phases in rephased.items():
            vals = [(r.get(m, math.nan), ph) for run, phs in zip(runs, phases, strict=True)
                    for r, ph in zip(run["records"], phs, strict=True)]
            pre_by_h[str(H)] = finite_or_none(auc([v for v, ph in vals if ph == "pre"],
                                                  [v for v, ph in vals if ph == "stable"]))
        med_run = [_run_median(run, m) for run in runs]
        bad_vals = [v for v, b in zip(med_run, bad_run, strict=True) if b]
        good_vals = [v for v, b in zip(med_run, bad_run, strict=True) if not b]
        run_auc = auc(bad_vals, good_vals)
        have = bool(np.any(~np.isnan(st)))  # False for a metric the runs did not record
        # method="higher": a sample value, so +inf (unbounded growth) never enters an
        # interpolation; "above +inf" then never alarms
        thr = float(np.nanquantile(st, _WARN_QUANTILE, method="higher")) if have else math.nan
        leads: list[int | None] = []
        n_win = n_alarm = 0
        # the same with a per-run threshold (90th percentile of that run's stable estimates):
        # calibrated in hindsight, but removes level differences between problems and lrs
        leads_run: list[int | None] = []
        n_win_run = n_alarm_run = 0
        for run in runs:
            steps = np.array([r["step"] for r in run["records"]])
            if not len(steps):
                continue
            vals = np.array([r.get(m, math.nan) for r in run["records"]], dtype=np.float64)
            ev, starts = _events(run)
            stable = np.array([r["phase"] == "stable" for r in run["records"]])
            if ev:
                leads += lead_times(steps, vals, ev, thr, starts, _LOOKBACK)
            nw, na = chance_rate(steps, vals, stable, thr, _LOOKBACK)
            n_win, n_alarm = n_win + nw, n_alarm + na
            sv = vals[stable & ~np.isnan(vals)]
            if len(sv) >= 5:
                thr_run = float(np.quantile(sv, _WARN_QUANTILE, method="higher"))
                if ev:
                    leads_run += lead_times(steps, vals, ev, thr_run, starts, _LOOKBACK)
                nw, na = chance_rate(steps, vals, stable, thr_run, _LOOKBACK)
                n_win_run, n_alarm_run = n_win_run + nw, n_alarm_run + na
        hits = [x for x in leads if x is not None]
        hits_run = [x for x in leads_run if x is not None]
        per_event[m] = leads
        out["metrics"][m] = {
            "median_stable": _median(st),
            "median_unstable": _median(un),
            "median_pre": _median(pre),
            "ratio_unstable_stable": finite_or_none(median_ratio(un, st)),
            "ratio_pre_stable": finite_or_none(median_ratio(pre, st)),
            "auc_unstable_vs_stable": finite_or_none(auc(un, st)),
            "auc_pre_vs_stable": finite_or_none(auc(pre, st)),
            "auc_pre_vs_stable_by_lookahead": pre_by_h,
            "auc_within_run_median": finite_or_none(np.median(within)) if within else None,
            "n_runs_within": len(within),
            "auc_run_level": finite_or_none(run_auc),
            "ratio_run_level": finite_or_none(median_ratio(bad_vals, good_vals)),
            "warning_threshold": finite_or_none(thr),
            "n_events": len(leads),
            "detection_rate": (len(hits) / len(leads)) if leads and have else None,
            "chance_rate": (n_alarm / n_win) if n_win and have else None,
            "lead_time_median": finite_or_none(np.median(hits)) if hits else None,
            "lead_time_q25": finite_or_none(np.quantile(hits, 0.25)) if hits else None,
            "lead_time_q75": finite_or_none(np.quantile(hits, 0.75)) if hits else None,
            "lead_times": hits,
            "per_run_threshold": {
                "n_events": len(leads_run),
                "detection_rate": (len(hits_run) / len(leads_run)) if leads_run else None,
                "chance_rate": (n_alarm_run / n_win_run) if n_win_run else None,
                "lead_time_median": finite_or_none(np.median(hits_run)) if hits_run else None,
            },
        }
    # paired: on the events both warn of, does the metric cross its threshold before rho does?
    for m in METRICS:
        for ref in ("ritz_rho", "dense_rho"):
            pairs = [(a, b) for a, b in zip(per_event[m], per_event[ref], strict=True)
                     if a is not None and b is not None]
            d = np.array([a - b for a, b in pairs], dtype=np.float64)
            out["metrics"][m][f"earlier_than_{ref}"] = {
                "n_both": len(pairs),
                "frac_earlier": finite_or_none(np.mean(d > 0)) if len(d) else None,
                "frac_later": finite_or_none(np.mean(d < 0)) if len(d) else None,
                "median_extra_lead": finite_or_none(np.median(d)) if len(d) else None,
            }
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics over all runs, per optimizer, and per optimizer x (full batch, mini-batch,
    teacher-student, classification).

    For every metric of :data:`METRICS`: medians in stable / unstable / pre-spike phases and
    their ratios; the ROC AUC (Mann-Whitney) of the metric as a classifier of unstable vs
    stable estimates (pooled over runs; the median of the within-run AUCs; pre-spike vs stable
    for pre windows of 30, 60 and 100 steps); a run-level ratio and AUC (each run's median
    value, runs that spike or diverge vs runs that never do); and an early warning: the
    threshold is the 90th percentile of stable-phase values, a spike counts as warned of if the
    metric is above it at some estimate in the 100 steps before the onset (not before the
    previous spike's end), with the lead time from that first crossing, and ``chance_rate``
    is the fraction of equally long all-stable windows that contain an alarm (the false-alarm
    baseline); ``earlier_than_ritz_rho`` / ``earlier_than_dense_rho``: on the events that both
    warn of, how often and by how many steps the metric's first crossing precedes rho's;
    ``per_run_threshold``: the warning analysis with each run's own 90th percentile (runs with
    >= 5 stable estimates).
    """
    groups: dict[str, list[dict]] = {"all": runs}
    for opt in OPTIMIZERS:
        sel = [r for r in runs if r["config"]["optimizer"] == opt]
        if sel:
            groups[opt] = sel
            for mode, test in (("full", lambda c: c["batch_size"] is None),
                               ("minibatch", lambda c: c["batch_size"] is not None),
                               ("teacher", lambda c: c["problem"] == "teacher"),
                               ("blobs", lambda c: c["problem"] == "blobs")):
                sub = [r for r in sel if test(r["config"])]
                if sub:
                    groups[f"{opt}/{mode}"] = sub
    return {name: _stats_group(rs) for name, rs in groups.items()}


# -- driver -----------------------------------------------------------------------------------
def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else str(f)  # "inf" / "nan", as KappaReport.to_dict
    return v


class _Progress:
    """tqdm over runs if installed, else one stderr line per finished run."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet, self.bar = total, 0, quiet, None
        self.t0 = time.perf_counter()
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, run: dict[str, Any]) -> None:
        self.done += 1
        if self.quiet:
            return
        info = (f"{run['config']['name']}: {run['spikes']['n_spikes']} spikes"
                f"{', diverged' if run['spikes']['diverged_at'] is not None else ''}")
        if self.bar is not None:
            self.bar.set_postfix_str(info[-60:])
            self.bar.update(1)
        else:
            dt = time.perf_counter() - self.t0
            print(f"[{self.done}/{self.total}] {dt:6.0f} s  {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _jobs(optimizers: Sequence[str], seeds: int, quick: bool, every: int, k: int,
          rule: SpikeRule, dense: bool, steps: int | None) -> list[tuple]:
    grid = QUICK_GRID if quick else DEFAULT_GRID
    jobs = []
    for opt in optimizers:
        for seed in range(seeds):
            for role, base in grid[opt]:
                cfg = dataclasses.replace(base, seed=seed)
                if steps is not None:
                    cfg = dataclasses.replace(cfg, steps=steps)
                jobs.append((role, cfg, every, k, rule, dense))
    return jobs


def reproduce(
    out: str | Path = "kappa_reproduce",
    optimizers: Sequence[str] = ("sgd-momentum",),
    seeds: int = 2,
    *,
    quick: bool = False,
    every: int | None = None,
    k: int = 8,
    steps: int | None = None,
    workers: int | None = None,
    dense: bool = True,
    figures: bool = True,
    quiet: bool = False,
    rule: SpikeRule | None = None,
    reanalyze: bool = False,
) -> dict[str, Any]:
    """Run the sweep, write the JSONL time series, the summary and the figures.

    Args:
        out: output directory (created).
        optimizers: any of :data:`OPTIMIZERS`.
        seeds: seeds per configuration (seed = data, initialization and batch order).
        quick: the small CI grid (:data:`QUICK_GRID`) instead of :data:`DEFAULT_GRID`.
        every: steps between estimates (default 20).
        k: sharp Ritz modes per estimate.
        steps: override every run's length.
        workers: worker processes (default: ``min(2, cpu count)``); each uses one thread.
        dense: compute the dense view too.
        figures: write the PNG figures (needs matplotlib).
        quiet: no progress output.
        rule: the spike definition.
        reanalyze: train nothing: re-read ``out/runs/*.jsonl`` (phases re-derived from the
            stored loss with ``rule``) and rewrite the summary and figures.

    Returns:
        The summary dict that is also written to ``out/summary.json``.
    """
    rule = rule or SpikeRule()
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {o!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    every = every or 20
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    jobs = _jobs(optimizers, seeds, quick, every, k, rule, dense, steps)
    # the longest runs first, so the two workers finish together
    jobs.sort(key=lambda j: -(j[1].steps * (j[1].width + 8) * (2 if j[1].problem == "blobs"
                                                                 else 1)))
    workers = workers or min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    progress = _Progress(0 if reanalyze else len(jobs), quiet or reanalyze)
    runs: list[dict[str, Any]] = []
    # Workers are spawned (never forked: a forked OpenMP runtime can hang) with one BLAS and
    # one torch thread each: on 2 cores, 2 single-threaded processes beat threaded LAPACK,
    # which thrashes on the 300-600-wide eigen-decompositions.
    saved = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "MKL_NUM_THREADS")}
    summary: dict[str, Any] = {}
    try:
        for v in saved:
            os.environ[v] = "1"
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as ex:
            if reanalyze:
                runs = load_runs(out)
                if not runs:
                    raise FileNotFoundError(f"--reanalyze: no runs/*.jsonl in {out}")
                optimizers = tuple(o for o in OPTIMIZERS
                                   if any(r["config"]["optimizer"] == o for r in runs))
                seeds = len({r["config"]["seed"] for r in runs})
                every = int(np.median([np.diff([x["step"] for x in r["records"]]).min()
                                       for r in runs if len(r["records"]) > 1] or [every]))
            else:
                futs = [ex.submit(_run_job, j) for j in jobs]
                for f in as_completed(futs):
                    run = f.result()
                    runs.append(run)
                    _write_run(out, run)
                    progress.update(run)
            progress.close()
            runs.sort(key=lambda r: r["config"]["name"])
            summary.update({
                "command": "kappa-gpu reproduce " + " ".join(
                    _argv_of(optimizers, seeds, quick, every, k, steps, out)
                    + (["--reanalyze"] if reanalyze else [])),
                "options": {"optimizers": list(optimizers), "seeds": seeds, "quick": quick,
                            "every": every, "k": k, "steps": steps, "workers": workers,
                            "dense": dense, "reanalyze": reanalyze},
                "spike_rule": rule.to_dict(),
                "warning_quantile": _WARN_QUANTILE,
                "growth_horizon": GROWTH_HORIZON,
                "metrics": METRICS,
                "seconds_runs": time.perf_counter() - t0,
                "runs": [{"name": r["config"]["name"], "role": r["role"],
                          "n_params": r["n_params"], "n_spikes": r["spikes"]["n_spikes"],
                          "diverged_at": r["spikes"]["diverged_at"],
                          "n_estimates": len(r["records"]), "seconds": r["seconds"]}
                         for r in runs],
                "groups": summarize(runs),
            })  # fmt: skip
            if figures:
                tf = time.perf_counter()
                try:  # the summary below is written whatever happens to the figures
                    from kappa_gpu.experiments import _plots

                    summary["figures"] = _plots.make_figures(
                        out, runs, summary, optimizers, executor=ex, grid=32 if quick else 48)
                except ImportError as err:
                    summary["figures_error"] = (
                        f"{err}: figures skipped (pip install 'kappa-gpu[plot]' for "
                        "matplotlib, then rerun with --reanalyze to draw them)")
                    print(f"kappa-gpu reproduce: {summary['figures_error']}", file=sys.stderr)
                summary["seconds_figures"] = time.perf_counter() - tf
    finally:
        for v, val in saved.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val
        progress.close()
    summary["seconds_total"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1))
    (out / "summary.md").write_text(format_markdown(_json_safe(summary)))
    if not quiet:
        print(format_summary(summary), file=sys.stderr)
        print(f"wrote {out / 'summary.json'} and {len(runs)} runs in {out / 'runs'} "
              f"({summary['seconds_total']:.0f} s)", file=sys.stderr)
    return summary


def _argv_of(optimizers, seeds, quick, every, k, steps, out) -> list[str]:
    a = [f"--optimizer {','.join(optimizers)}", f"--seeds {seeds}", f"--every {every}",
         f"-k {k}", f"--out {out}"]
    if quick:
        a.insert(0, "--quick")
    if steps is not None:
        a.append(f"--steps {steps}")
    return a


def load_runs(out: str | Path, rule: SpikeRule | None = None) -> list[dict[str, Any]]:
    """Read the runs written by :func:`reproduce` back from ``out/runs/*.jsonl``.

    Spikes and phases are re-derived from the stored loss curve with ``rule`` (so a changed
    spike definition can be applied without training again).
    """
    rule = rule or SpikeRule()
    runs = []
    for path in sorted(Path(out, "runs").glob("*.jsonl")):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        head = lines[0]
        recs = [{k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in r.items()
                 if k != "kind"} for r in lines[1:]]
        loss = [float(x) for x in head["loss"]]
        analysis = detect_spikes(loss, rule)
        for r in recs:
            r["phase"] = analysis.phase_name(r["step"])
        snapshot_step = None
        events = [(sp.height, sp.onset) for sp in analysis.spikes]
        if analysis.diverged_at is not None:
            events.append((math.inf, analysis.diverged_at))
        if events and recs:
            before = [r["step"] for r in recs if r["step"] < max(events)[1]]
            snapshot_step = before[-1] if before else None
        runs.append({"config": head["config"], "role": head["role"],
                     "n_params": head["n_params"], "loss": loss,
                     "spikes": analysis.to_dict(), "records": recs,
                     "snapshot_step": snapshot_step, "seconds": head["seconds"]})
    return runs


def _write_run(out: Path, run: dict[str, Any]) -> None:
    path = out / "runs" / f"{run['config']['name']}.jsonl"
    head = {"kind": "run", "role": run["role"], "config": run["config"],
            "n_params": run["n_params"], "spikes": run["spikes"],
            "snapshot_step": run["snapshot_step"], "seconds": run["seconds"],
            "loss": run["loss"]}
    with path.open("w") as f:
        f.write(json.dumps(_json_safe(head)) + "\n")
        for rec in run["records"]:
            f.write(json.dumps(_json_safe({"kind": "estimate", **rec})) + "\n")


def format_summary(summary: dict[str, Any]) -> str:
    """A terminal table: per group and metric, ratio, AUCs and lead times."""
    lines = []
    for g, st in summary["groups"].items():
        n = st["n_estimates"]
        lines.append(
            f"\n[{g}] {st['n_runs']} runs, {st['n_spiking_runs']} spiking, "
            f"{st['n_diverged_runs']} diverged, {st['n_spikes']} spikes; estimates: "
            + ", ".join(f"{p} {n[p]}" for p in PHASES)
        )
        lines.append(f"  {'metric':<22} {'med stable':>10} {'med unstab':>10} {'ratio':>7} "
                     f"{'AUC':>5} {'pre30':>5} {'pre100':>6} {'inrun':>5} {'runs':>5} "
                     f"{'warned':>6} {'chance':>6} {'lead':>5}")
        for m, s in st["metrics"].items():
            def f(x, fmt):
                return format(x, fmt) if isinstance(x, (int, float)) else "-"
            pre = s["auc_pre_vs_stable_by_lookahead"]
            lines.append(
                f"  {m:<22} {f(s['median_stable'], '10.4g')} {f(s['median_unstable'], '10.4g')}"
                f" {f(s['ratio_unstable_stable'], '7.3g')} {f(s['auc_unstable_vs_stable'], '5.2f')}"
                f" {f(pre.get('30'), '5.2f')} {f(pre.get('100'), '6.2f')}"
                f" {f(s['auc_within_run_median'], '5.2f')} {f(s['auc_run_level'], '5.2f')}"
                f" {f(s['detection_rate'], '6.2f')} {f(s['chance_rate'], '6.2f')}"
                f" {f(s['lead_time_median'], '5.0f')}"
            )
    lines.append(
        "\nratio: median unstable / median stable; AUC: unstable vs stable estimates (pooled); "
        "pre30/pre100: pre-spike (30/100 steps) vs stable; inrun: median within-run AUC; runs: "
        "run-level AUC (median of the run, spiking vs never-spiking runs); warned: spikes with "
        "a threshold crossing in the 100 steps before; chance: the same for all-stable windows; "
        "lead: median steps from crossing to onset."
    )
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any], groups: Sequence[str] | None = None) -> str:
    """The summary as markdown tables (one per group), for docs and the README."""
    out = [f"Command: `{summary['command']}` ({summary.get('seconds_total', 0):.0f} s)."]
    names = groups or list(summary["groups"])

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    for g in names:
        st = summary["groups"].get(g)
        if st is None:
            continue
        n = st["n_estimates"]
        out.append(
            f"\n**{g}**: {st['n_runs']} runs ({st['n_spiking_runs']} spiking, "
            f"{st['n_diverged_runs']} diverged), {st['n_spikes']} spikes; estimates "
            + ", ".join(f"{p} {n[p]}" for p in PHASES) + ".\n"
        )
        out.append("| metric | median stable | median unstable | ratio | AUC | AUC pre-30 | "
                   "AUC pre-100 | within-run AUC | run-level ratio | run-level AUC | warned | "
                   "chance | lead | warned (run thr.) | chance (run thr.) |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m, s in st["metrics"].items():
            pre = s["auc_pre_vs_stable_by_lookahead"]
            det, ch = s["detection_rate"], s["chance_rate"]
            out.append(
                f"| {m} | {f(s['median_stable'], '.4g')} | {f(s['median_unstable'], '.4g')} | "
                f"{f(s['ratio_unstable_stable'], '.3g')} | {f(s['auc_unstable_vs_stable'], '.2f')}"
                f" | {f(pre.get('30'), '.2f')} | {f(pre.get('100'), '.2f')} | "
                f"{f(s['auc_within_run_median'], '.2f')} | {f(s['ratio_run_level'], '.3g')} | "
                f"{f(s['auc_run_level'], '.2f')} | "
                f"{f(None if det is None else 100 * det, '.0f')}% | "
                f"{f(None if ch is None else 100 * ch, '.0f')}% | "
                f"{f(s['lead_time_median'], '.0f')} | "
                f"{pct(s['per_run_threshold']['detection_rate'])} | "
                f"{pct(s['per_run_threshold']['chance_rate'])} |"
            )
        out.append("\nOn the spikes both warn of: how often the metric crossed its threshold "
                   "earlier / later than rho did, and the median extra lead (steps).\n")
        out.append("| metric | vs Ritz rho: n, earlier, later, extra lead | "
                   "vs dense rho: n, earlier, later, extra lead |")
        out.append("|---|---|---|")
        for m, s in st["metrics"].items():
            cells = []
            for ref in ("ritz_rho", "dense_rho"):
                e = s.get(f"earlier_than_{ref}") or {}
                fe, fl = e.get("frac_earlier"), e.get("frac_later")
                cells.append(
                    f"{e.get('n_both', 0)}, {f(None if fe is None else 100 * fe, '.0f')}%, "
                    f"{f(None if fl is None else 100 * fl, '.0f')}%, "
                    f"{f(e.get('median_extra_lead'), '.0f')}"
                )
            out.append(f"| {m} | {cells[0]} | {cells[1]} |")
    return "\n".join(out) + "\n"


# -- command line -----------------------------------------------------------------------------
def add_reproduce_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand to an ``argparse`` subparsers object; returns it."""
    p = subparsers.add_parser(
        "reproduce",
        help="reproduce the two-layer experiment of arXiv:2605.23476 (rho vs kappa(V))",
        description=__doc__.split("\n\n")[0],
    )
    _add_arguments(p)
    p.set_defaults(run=run_from_args)  # cli.py may dispatch with args.run(args)
    return p


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else, exit code 2)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizer", default="sgd-momentum",
                   help="sgd-momentum, adam, or both (comma-separated or 'both'); "
                        "default sgd-momentum")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="seeds per configuration (default 2; 1 with --quick)")
    p.add_argument("--out", default="kappa_reproduce", help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny grid for CI (< 1 minute)")
    p.add_argument("--every", type=positive_int, default=None,
                   help="steps between estimates (default 20)")
    p.add_argument("-k", type=positive_int, default=8, help="sharp Ritz modes per estimate")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="override the steps of every run")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes (default 2)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense-spectrum view")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.add_argument("--reanalyze", action="store_true",
                   help="train nothing: recompute summary and figures from DIR/runs/*.jsonl")


def _parse_optimizers(s: str) -> tuple[str, ...]:
    if s in ("both", "all"):
        return OPTIMIZERS
    opts = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [o for o in opts if o not in OPTIMIZERS]
    if bad or not opts:
        raise SystemExit(f"--optimizer must be sgd-momentum, adam or both, got {s!r}")
    return opts


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``reproduce`` from parsed arguments (of :func:`add_reproduce_parser`); exit code."""
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    try:
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {seeds}")
        reproduce(args.out, _parse_optimizers(args.optimizer), seeds, quick=args.quick,
                  every=args.every, k=args.k, steps=args.steps, workers=args.workers,
                  dense=not args.no_dense, figures=not args.no_figures, quiet=args.quiet,
                  reanalyze=args.reanalyze)
    except (ValueError, FileNotFoundError) as e:  # bad arguments: a message, not a traceback
        print(f"kappa-gpu reproduce: error: {e}", file=sys.stderr)
        return 2
    return 0


def main_reproduce(argv: list[str] | None = None) -> int:
    """``kappa-gpu reproduce [--optimizer ...] [--seeds N] [--out DIR] [--quick]``."""
    p = argparse.ArgumentParser(prog="kappa-gpu reproduce", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main_reproduce())

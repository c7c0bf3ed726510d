"""Figures of ``kappa-gpu reproduce`` (matplotlib, Agg backend, PNG).

1. ``fig1_example_run_<opt>.png`` -- loss, rho(J), kappa(V) and the sharpness against step for
   one spiking run, spikes shaded.
2. ``fig2_distributions_<opt>.png`` -- rho, kappa(V) and the largest eigenvalue condition
   number in stable vs unstable (and pre-spike) phases, over all runs, both views.
3. ``fig3_spectrum_<opt>.png`` -- the spectrum of J just before the highest spike of the
   example run: all eigenvalues (dense), the sharp Ritz values of ``estimate``, the unit
   circle, the exceptional-point locus of the 2x2 blocks, and the eps-pseudospectra of the
   dense J near the sharp end.
4. ``fig4_lead_times.png`` -- when each metric crosses its warning threshold before a spike.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["make_figures", "dense_pseudospectra", "pick_example_run"]

_C = {"stable": "tab:blue", "unstable": "tab:red", "pre": "tab:orange"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_example_run(runs: list[dict[str, Any]], optimizer: str) -> dict[str, Any] | None:
    """The run shown in figures 1 and 3: a full-batch run of ``optimizer`` that spikes and
    does not diverge, with the highest spike (ties: the lowest seed); falls back to any
    spiking run, then to any run."""
    mine = [r for r in runs if r["config"]["optimizer"] == optimizer and r["records"]]
    if not mine:
        return None

    def best_height(r):
        hs = [s["height"] for s in r["spikes"]["spikes"]]
        hs = [h if isinstance(h, (int, float)) else math.inf for h in hs]
        return max(hs) if hs else 0.0

    tiers = [
        [r for r in mine if r["config"]["batch_size"] is None and r["spikes"]["n_spikes"]
         and r["spikes"]["diverged_at"] is None and r["snapshot_step"] is not None],
        [r for r in mine if r["spikes"]["n_spikes"] and r["snapshot_step"] is not None],
        mine,
    ]
    for tier in tiers:
        if tier:
            return max(tier, key=lambda r: (min(best_height(r), 1e6), -r["config"]["seed"]))
    return None


def _arr(records, key) -> np.ndarray:
    return np.array([r.get(key, np.nan) for r in records], dtype=np.float64)


def _shade(ax, run) -> None:
    for i, s in enumerate(run["spikes"]["spikes"]):
        ax.axvspan(s["onset"], max(s["end"], s["onset"] + 1), color="tab:red", alpha=0.15,
                   lw=0, label="loss spike" if i == 0 else None)
    d = run["spikes"]["diverged_at"]
    if d is not None:
        ax.axvline(d, color="k", lw=1.2, ls="--", label="divergence")


def fig_example_run(path: Path, run: dict[str, Any], thresholds: dict[str, float]) -> None:
    """Figure 1 for one run (see module docstring)."""
    plt = _plt()
    recs = run["records"]
    t = _arr(recs, "step")
    loss = np.asarray(run["loss"], dtype=np.float64)
    c = run["config"]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True,
                             gridspec_kw={"height_ratios": [1.2, 1, 1.2, 0.9]})
    ax = axes[0]
    ax.semilogy(np.arange(len(loss)), loss, color="k", lw=0.9, label="full-batch loss")
    _shade(ax, run)
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right", fontsize=8)
    bs = "full batch" if c["batch_size"] is None else f"batch {c['batch_size']}"
    ax.set_title(f"{c['problem']} / {c['optimizer']}: lr {c['lr']:g}, width {c['width']}, "
                 f"{bs}, warm-up {c['warmup']}, seed {c['seed']}  "
                 f"({run['n_params']} params, {run['spikes']['n_spikes']} spikes)", fontsize=10)

    ax = axes[1]
    ax.plot(t, _arr(recs, "ritz_rho"), "-", color="tab:purple", lw=1.2,
            label="rho, top-k sharp Ritz modes")
    ax.plot(t, _arr(recs, "dense_rho"), "-", color="tab:green", lw=1.0,
            label="rho, full spectrum (dense)")
    ax.axhline(1.0, color="0.3", lw=0.8, ls=":")
    ax.axhline(math.sqrt(0.9), color="0.6", lw=0.8, ls="--", label="sqrt(beta) = 0.949")
    _shade(ax, run)
    ax.set_ylabel("spectral radius rho(J)")
    ax.legend(loc="upper left", fontsize=8, ncol=2)

    ax = axes[2]
    ax.semilogy(t, _arr(recs, "ritz_kappa_V"), "-", color="tab:purple", lw=1.2,
                label="kappa(V), sharp Ritz modes")
    ax.semilogy(t, _arr(recs, "dense_kappa_V"), "-", color="tab:green", lw=1.0,
                label="kappa(V), full spectrum")
    ax.semilogy(t, _arr(recs, "dense_max_cond"), ":", color="tab:olive", lw=1.0,
                label="max eigenvalue cond., full spectrum")
    ax.semilogy(t, _arr(recs, "ritz_normalized_growth"), "--", color="tab:blue", lw=1.0,
                label="max_t ||(T/rho)^t||, sharp modes")
    thr = thresholds.get("ritz_kappa_V")
    if thr is not None and math.isfinite(thr):
        ax.axhline(thr, color="tab:purple", lw=0.8, ls="--",
                   label=f"warning threshold (Ritz) {thr:.3g}")
    _shade(ax, run)
    ax.set_ylabel("condition number / growth")
    ax.legend(loc="upper left", fontsize=8, ncol=2)

    ax = axes[3]
    ax.plot(t, _arr(recs, "ritz_edge_ratio"), "-", color="tab:brown", lw=1.2,
            label="sharpness / stability edge")
    ax.axhline(1.0, color="0.3", lw=0.8, ls=":")
    _shade(ax, run)
    ax.set_ylabel("a s_max / 2(1+beta)")
    ax.set_xlabel("step")
    ax.legend(loc="upper left", fontsize=8)
    for a in axes:
        a.grid(alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_distributions(path: Path, runs: list[dict[str, Any]], stats: dict[str, Any],
                      optimizer: str) -> None:
    """Figure 2 for one optimizer: histograms per phase, both views."""
    plt = _plt()
    recs = [r for run in runs if run["config"]["optimizer"] == optimizer for r in run["records"]]
    panels = [("ritz_rho", False), ("ritz_kappa_V", True), ("ritz_max_cond", True),
              ("dense_rho", False), ("dense_kappa_V", True), ("dense_max_cond", True)]
    labels = {"ritz_rho": "rho(J), sharp Ritz modes", "ritz_kappa_V": "kappa(V), sharp Ritz",
              "ritz_max_cond": "max eig. cond., sharp Ritz", "dense_rho": "rho(J), full spectrum",
              "dense_kappa_V": "kappa(V), full spectrum",
              "dense_max_cond": "max eig. cond., full spectrum"}
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (m, logx) in zip(axes.ravel(), panels, strict=True):
        groups = {
            "stable": np.array([r.get(m, np.nan) for r in recs if r["phase"] == "stable"]),
            "unstable": np.array([r.get(m, np.nan) for r in recs if r["phase"] != "stable"]),
            "pre": np.array([r.get(m, np.nan) for r in recs if r["phase"] == "pre"]),
        }
        allv = np.concatenate(list(groups.values()))
        allv = allv[np.isfinite(allv) & ((allv > 0) if logx else True)]
        if len(allv) == 0:
            ax.set_visible(False)
            continue
        # rho has a long tail past 1 during spikes: clip it at the 98th percentile
        lo, hi = np.quantile(allv, [0.001, 0.999 if logx else 0.98])
        if hi <= lo:
            hi = lo * 1.01 + 1e-12
        bins = (np.geomspace(lo, hi, 40) if logx else np.linspace(lo, hi, 40))
        for name, v in groups.items():
            v = v[np.isfinite(v)]
            v = np.clip(v, lo, hi)
            if len(v) == 0:
                continue
            kw = dict(bins=bins, weights=np.full(len(v), 1.0 / len(v)),
                      label=f"{name} (n={len(v)})", color=_C[name])
            if name == "pre":
                ax.hist(v, histtype="step", lw=1.6, **kw)
            else:
                ax.hist(v, alpha=0.45, **kw)
        if logx:
            ax.set_xscale("log")
        s = stats["metrics"][m]

        def fmt(x, f):
            return format(x, f) if isinstance(x, (int, float)) else "-"

        ax.set_title(f"{labels[m]}\nmedian ratio {fmt(s['ratio_unstable_stable'], '.3g')}, "
                     f"AUC {fmt(s['auc_unstable_vs_stable'], '.2f')} "
                     f"(pre {fmt(s['auc_pre_vs_stable'], '.2f')})", fontsize=9)
        ax.set_xlabel(labels[m] + (" (log)" if logx else " (last bin: >= 98th percentile)"),
                      fontsize=8)
        ax.set_ylabel("fraction of estimates", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.25)
    fig.suptitle(f"{optimizer}: stable vs unstable phases over {stats['n_runs']} runs "
                 f"({stats['n_spikes']} spikes, {stats['n_diverged_runs']} diverged)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dense_pseudospectra(J: np.ndarray, xs: np.ndarray, ys: np.ndarray, iters: int = 12):
    """eps-pseudospectra ``sigma_min(zI - J)`` of a dense matrix on the grid ``xs x ys``.

    One complex Schur form ``J = U R U^H``, then per point inverse iteration on
    ``(zI - R)^H (zI - R)`` (two triangular solves per iteration, ``O(N^2)``), started from
    the previous point's vector. A few digits are enough for contour lines; the result is a
    :class:`kappa_gpu.diagnostics.Pseudospectra` (``rectangular=False``) for
    :func:`kappa_gpu.diagnostics.plot_pseudospectra`. Cost: ``O(N^3)`` once plus
    ``O(iters N^2)`` per grid point (about 1 s for N = 322 on a 50 x 50 grid).
    """
    import scipy.linalg

    from kappa_gpu.diagnostics import Pseudospectra

    R, _ = scipy.linalg.schur(J.astype(np.complex128), output="complex")
    N = R.shape[0]
    Z = xs[None, :] + 1j * ys[:, None]
    smin = np.empty(Z.shape)
    rng = np.random.default_rng(0)
    v = rng.standard_normal(N) + 1j * rng.standard_normal(N)
    eye = np.eye(N)
    for idx in np.ndindex(Z.shape):
        A = Z[idx] * eye - R  # upper triangular
        est = math.inf
        for _ in range(iters):
            w = scipy.linalg.solve_triangular(A, v, trans="C", lower=False, check_finite=False)
            w = scipy.linalg.solve_triangular(A, w, lower=False, check_finite=False)
            nw = np.linalg.norm(w)
            if not np.isfinite(nw) or nw == 0:
                est = 0.0
                v = rng.standard_normal(N) + 0j
                break
            est = 1.0 / math.sqrt(nw)  # ||(A^H A)^-1 v|| -> 1 / sigma_min^2 for unit v
            v = w / nw
        smin[idx] = est
    return Pseudospectra(x=xs, y=ys, z=Z, sigma_min=smin,
                         eigenvalues=np.linalg.eigvals(J), rectangular=False)


def fig_spectrum(path: Path, run: dict[str, Any], grid: int = 48) -> dict[str, Any]:
    """Figure 3 (see module docstring); returns what was plotted (for the summary)."""
    import torch

    from kappa_gpu._estimate import estimate
    from kappa_gpu.diagnostics import block_eigen, exceptional_points, plot_pseudospectra
    from kappa_gpu.experiments._problems import RunConfig, train
    from kappa_gpu.experiments.reproduce import _coefficients
    from kappa_gpu.operators import update_operator

    plt = _plt()
    step = int(run["snapshot_step"])
    cfg = RunConfig(**{k: v for k, v in run["config"].items() if k != "name"})
    got: dict[str, Any] = {}

    def hook(t, loss, prob, opt) -> bool:
        # the run is deterministic: re-train it to the snapshot step and measure there
        if t != step:
            return False
        batch = (prob.X, prob.y)
        got["rep"] = estimate(prob.model, opt, prob.loss_fn, batch, k=8, modes="sharp",
                              generator=torch.Generator().manual_seed(0))
        got["J"] = update_operator(prob.model, opt, prob.loss_fn, batch).to_dense().numpy()
        return True

    with torch.random.fork_rng(devices=[]):
        train(dataclasses.replace(cfg, steps=step + 1), hook=hook)
    rep, J = got["rep"], got["J"]
    zd = np.linalg.eigvals(J)
    zr = np.asarray(rep.eigenvalues)
    co = _coefficients(cfg)
    s_lo, s_hi = (float(x) for x in exceptional_points(*co))
    s_edge = 2.0 * (1.0 + co.beta) / co.a
    s_grid = np.concatenate([np.linspace(-0.02 * s_edge, s_lo, 200),
                             np.linspace(s_lo, s_hi, 400), np.linspace(s_hi, 1.05 * s_edge, 200)])
    zl, _ = block_eigen(s_grid, *co)
    z_ep = np.concatenate([block_eigen(np.array([s_lo]), *co)[0][0, :1],
                           block_eigen(np.array([s_hi]), *co)[0][0, :1]])

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
    th = np.linspace(0, 2 * np.pi, 400)

    def decorate(ax, legend_loc=None):
        ax.plot(zl[:, 0].real, zl[:, 0].imag, "-", color="tab:gray", lw=0.8, alpha=0.8,
                label="2x2 block eigenvalues z(s)")
        ax.plot(zl[:, 1].real, zl[:, 1].imag, "-", color="tab:gray", lw=0.8, alpha=0.8)
        ax.plot(z_ep.real, z_ep.imag, "*", color="tab:red", ms=13, mec="k", mew=0.5,
                label="exceptional points", zorder=5)
        ax.plot(zr.real, zr.imag, "x", color="tab:purple", ms=9, mew=2,
                label=f"Ritz values (k={len(rep.curvatures)} sharp modes)", zorder=6)
        if legend_loc is None:
            if ax.get_legend() is not None:
                ax.get_legend().remove()
        else:
            ax.legend(loc=legend_loc, fontsize=8)

    ax = axes[0]
    ax.plot(np.cos(th), np.sin(th), "--", color="0.4", lw=0.9, label="|z| = 1")
    ax.plot(math.sqrt(co.beta) * np.cos(th), math.sqrt(co.beta) * np.sin(th), ":",
            color="0.6", lw=0.9, label="|z| = sqrt(beta)")
    ax.plot(zd.real, zd.imag, ".", color="tab:green", ms=4,
            label=f"all {len(zd)} eigenvalues (dense)")
    decorate(ax, "lower left")
    ax.set_aspect("equal")
    ax.set_xlabel("Re z")
    ax.set_ylabel("Im z")
    ax.set_title(f"spectrum of J at step {step}: rho(dense) = "
                 f"{np.abs(zd).max():.4f}, rho(Ritz) = {rep.spectral_radius:.4f}", fontsize=10)
    ax.grid(alpha=0.25)

    # zoom on the sharp end: the leftmost Ritz values (largest curvature), the upper
    # exceptional point z = -sqrt(c beta) and the stability edge z = -1
    ax = axes[1]
    sharp = zr[np.argsort(zr.real)[: min(4, len(zr))]]
    x_lo = min(-1.08, float(sharp.real.min()) - 0.08)
    x_hi = max(float(sharp.real.max()) + 0.1, x_lo + 0.3)
    half = max(0.5 * (x_hi - x_lo), float(np.abs(sharp.imag).max()) + 0.08)
    cx = 0.5 * (x_lo + x_hi)
    xs = np.linspace(cx - half, cx + half, grid)
    ys = np.linspace(-half, half, grid)
    ps = dense_pseudospectra(J, xs, ys)
    L = np.log10(np.maximum(ps.sigma_min, 1e-300))
    lo, hi = np.floor(2 * np.quantile(L, 0.01)) / 2, min(np.ceil(2 * L.max()) / 2, 0.0)
    levels = np.arange(lo, hi + 0.25, 0.5)
    if len(levels) > 8:
        levels = np.unique(np.round(np.linspace(lo, hi, 8) * 2) / 2)
    plot_pseudospectra(ps, levels=levels, ax=ax)
    decorate(ax)  # same markers as the left panel; its legend explains them
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(ys[0], ys[-1])
    ax.set_title(f"sharp end: log10 eps-pseudospectra of the dense J ({J.shape[0]} x "
                 f"{J.shape[1]})\nkappa(V) Ritz = {rep.kappa_V:.3g}, nearest EP ratio = "
                 f"{rep.nearest_ep_ratio:+.3g}, sharpness/edge = "
                 f"{co.a * float(np.max(rep.curvatures)) / (2 * (1 + co.beta)):.3f}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"run": run["config"]["name"], "step": step,
            "pseudospectra_of": "dense J (complex Schur + inverse iteration)",
            "ritz_kappa_V": rep.kappa_V, "dense_rho": float(np.abs(zd).max())}


def fig_lead_times(path: Path, summary: dict[str, Any], optimizers) -> None:
    """Figure 4: per optimizer, the share of spikes warned of against the chance rate, and the
    lead times of the warnings."""
    plt = _plt()
    metrics = [("ritz_kappa_V", "tab:purple"), ("ritz_rho", "tab:pink"),
               ("ritz_normalized_growth", "tab:blue"), ("ritz_edge_ratio", "tab:brown"),
               ("dense_kappa_V", "tab:green"), ("dense_rho", "tab:olive")]
    opts = [o for o in optimizers if o in summary["groups"]]
    nrow = max(1, len(opts))
    fig, axes = plt.subplots(nrow, 2, figsize=(13, 4.3 * nrow), squeeze=False)
    x = np.arange(len(metrics))
    names = [m.replace("_", " ").replace("ritz", "Ritz") for m, _ in metrics]
    for row, o in zip(axes, opts, strict=False):
        g = summary["groups"][o]
        st = g["metrics"]
        ax = row[0]
        det = [100 * (st[m]["detection_rate"] or 0.0) for m, _ in metrics]
        ch = [100 * (st[m]["chance_rate"] or 0.0) for m, _ in metrics]
        ax.bar(x - 0.2, det, 0.4, color=[c for _, c in metrics], label="spikes warned of")
        ax.bar(x + 0.2, ch, 0.4, color="0.75", label="all-stable windows with an alarm (chance)")
        for xi, d in zip(x, det, strict=True):
            ax.text(xi - 0.2, d + 1, f"{d:.0f}", ha="center", fontsize=7)
        ax.set_xticks(x, names, rotation=20, fontsize=8)
        ax.set_ylabel("% of windows")
        ax.set_ylim(0, 105)
        n_ev = st[metrics[0][0]]["n_events"]
        ax.set_title(f"{o}: {n_ev} spikes/divergences; alarm = above the 90th percentile of "
                     f"stable phases\nwithin the {g['lookback']} steps before the onset",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.25, axis="y")
        ax = row[1]
        data = [st[m]["lead_times"] or [np.nan] for m, _ in metrics]
        bp = ax.boxplot(data, positions=x, widths=0.5, patch_artist=True, showfliers=True)
        for patch, (_, c) in zip(bp["boxes"], metrics, strict=True):
            patch.set_facecolor(c)
            patch.set_alpha(0.5)
        ax.set_xticks(x, names, rotation=20, fontsize=8)
        ax.set_ylabel("lead time (steps before the onset)")
        ax.set_title(f"{o}: lead times of the warned spikes", fontsize=9)
        ax.grid(alpha=0.25, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spectrum_job(path: str, run: dict[str, Any], grid: int) -> dict[str, Any]:
    """Figure 3 as a picklable job (runs in a worker process: single-threaded BLAS)."""
    try:
        return fig_spectrum(Path(path), run, grid=grid)
    except Exception as err:  # a figure must not sink the run's numbers
        return {"failed": f"{type(err).__name__}: {err}"}


def make_figures(out: Path, runs: list[dict[str, Any]], summary: dict[str, Any],
                 optimizers, executor=None, grid: int = 48) -> dict[str, Any]:
    """Write all figures into ``out``; returns ``{file name: what it shows}``.

    Figure 3 (a dense eig and pseudospectra) is submitted to ``executor`` when given, so it
    runs beside the others; ``grid`` is its pseudospectra grid per axis.
    """
    out = Path(out)
    done: dict[str, Any] = {}
    pending = {}
    for o in optimizers:
        if o not in summary["groups"]:
            continue
        ex = pick_example_run(runs, o)
        if ex is not None and ex["snapshot_step"] is not None:
            p = out / f"fig3_spectrum_{o}.png"
            if executor is not None:
                pending[p.name] = executor.submit(_spectrum_job, str(p), ex, grid)
            else:
                done[p.name] = _spectrum_job(str(p), ex, grid)
    for o in optimizers:
        if o not in summary["groups"]:
            continue
        st = summary["groups"][o]
        thr = {m: s["warning_threshold"] for m, s in st["metrics"].items()}
        ex = pick_example_run(runs, o)
        if ex is not None:
            p = out / f"fig1_example_run_{o}.png"
            fig_example_run(p, ex, thr)
            done[p.name] = ex["config"]["name"]
        p = out / f"fig2_distributions_{o}.png"
        fig_distributions(p, runs, st, o)
        done[p.name] = o
    p = out / "fig4_lead_times.png"
    fig_lead_times(p, summary, optimizers)
    done[p.name] = list(optimizers)
    for name, fut in pending.items():
        done[name] = fut.result()
    return dict(sorted(done.items()))

"""Scaling of ``kg.estimate`` on the CPU: time per estimate, HVPs and peak memory, 10^4 .. 10^7
parameters, MLPs and a small transformer, structured and arnoldi paths.

Every point runs in a fresh interpreter (``_common.run_child``), so that its peak memory is its
own. The child builds the model and its optimizer (heavy-ball SGD after three real steps), takes
its resident set (model + optimizer state + batch + autograd buffers: what a training job holds
anyway) and resets the high-water mark (``/proc/self/clear_refs``), runs one
``kg.estimate(k, method=...)``, and reports seconds, HVPs, whether every mode converged (the
answer check: true-residual certificates from real matvecs) and the peak resident set beyond
the model (``VmHWM`` minus ``VmRSS`` before), split in two phases: inside the eigen-solver calls
(the high-water mark is read and reset when ``eigsh``/``eigs`` is entered and left) and the rest
of the estimate (the report's eigenvectors and certificates). The parent also records
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` as an independent bound.

The memory the estimate itself needs, for ``n`` parameters, ``k`` modes, ``ncv`` Lanczos vectors
(default ``max(2k + 1, 20)``), float32:

- the Lanczos basis, ``(ncv + 1) n`` entries: ``(ncv + 1) * n * 4`` bytes (840 MB at 10^7);
- the report's eigenvectors in the 2n-dimensional state: right and left, complex64,
  ``2 * (2n x 2k) * 8`` bytes (4.8 GiB at 10^7), plus the certificate products
  ``J [U 0; 0 D^-1 U]`` and the projected subspace ``Q, JQ`` (float32, ``2n x 2k`` each) and
  short-lived temporaries: this, not the basis, sets the peak (docs/benchmarks.md);
- the batched HVPs of the certificates (``k`` and ``2k`` columns at once through ``vmap``): their
  activations and dual tensors times the number of columns.

    python bench/bench_scaling.py --full                # the documented table (minutes)
    python bench/bench_scaling.py --models mlp --sizes 1e7 --methods structured --full
    pytest bench/bench_scaling.py --benchmark-disable   # smoke: 10^4 parameters, subprocess
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from _common import (
    FULL,
    MLP_WIDTHS,
    machine,
    mlp_problem,
    n_params,
    run_child,
    set_threads,
    transformer_problem,
    vm_hwm_bytes,
    vm_rss_bytes,
)

SIZES = (1e4, 1e5, 1e6, 1e7)
MODELS = ("mlp", "transformer")
METHODS = ("structured", "arnoldi")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def point(model: str, size: float, method: str, k: int = 8, tol: float | None = None,
          threads: int = 1, seed: int = 0) -> dict:
    """One estimate, run in the child: build, baseline memory, estimate, peak memory."""
    set_threads(threads)
    size = float(size)
    if model == "mlp":
        net, opt, loss_fn, data = mlp_problem(MLP_WIDTHS[size], seed=seed)
    else:
        net, opt, loss_fn, data = transformer_problem(size, seed=seed)
    n = n_params(net)
    rss_before = vm_rss_bytes()
    peak_build = vm_hwm_bytes()
    reset = _reset_peak()
    # Phases: the eigen-solver calls (basis + HVPs) and the rest of the estimate (the report's
    # eigenvectors and certificates); the high-water mark is read and reset at each solver exit.
    import kappa_gpu._estimate as est

    phase = {"solver_peak": 0, "solver_seconds": 0.0, "solver_calls": 0}
    solvers = {name: getattr(est, name) for name in ("eigs", "eigsh")}

    def watched(fn):
        def run(*a, **kw):
            # the high-water mark of what ran since the last reset (not a solver)
            phase["other_peak"] = max(phase.get("other_peak", 0), vm_hwm_bytes())
            _reset_peak()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phase["solver_seconds"] += time.perf_counter() - t
                phase["solver_calls"] += 1
                phase["solver_peak"] = max(phase["solver_peak"], vm_hwm_bytes())
                _reset_peak()
        return run

    for name, fn in solvers.items():
        setattr(est, name, watched(fn))
    t0 = time.perf_counter()
    try:
        rep = est.estimate(net, opt, loss_fn, data, k=k, method=method, tol=tol,
                           generator=torch.Generator().manual_seed(seed))
    finally:
        for name, fn in solvers.items():
            setattr(est, name, fn)
    seconds = time.perf_counter() - t0
    other_peak = max(phase.get("other_peak", 0), vm_hwm_bytes())
    peak = max(phase["solver_peak"], other_peak)
    ncv = max(2 * k + 1, 20)
    return {
        "model": model,
        "size": size,
        "method": rep.method,
        "n_params": n,
        "state_dim": rep.state_dim,
        "k": k,
        "tol": rep.tol,
        "seconds": seconds,
        "n_hvp": rep.n_hvp,
        "seconds_per_hvp": seconds / max(rep.n_hvp, 1),
        "converged": bool(rep.all_converged),
        "max_residual": float(max(rep.residuals)) if len(rep.residuals) else None,
        "kappa_V": rep.kappa_V,
        "curvatures": [float(c) for c in rep.curvatures],
        "rss_before_bytes": rss_before,
        "peak_build_bytes": peak_build,
        "peak_bytes": peak,
        "peak_reset": reset,
        "beyond_model_bytes": peak - rss_before if reset else None,
        "solver_beyond_model_bytes": phase["solver_peak"] - rss_before if reset else None,
        "report_beyond_model_bytes": other_peak - rss_before if reset else None,
        "solver_seconds": phase["solver_seconds"],
        "solver_calls": phase["solver_calls"],
        "basis_bytes_predicted": (ncv + 1) * n * 4 * (2 if rep.method == "arnoldi" else 1),
        "threads": torch.get_num_threads(),
    }


def run(models=MODELS, sizes=SIZES, methods=METHODS, k: int = 8, threads: int = 1,
        arnoldi_max: float = 1e6, timeout: float | None = None, log=print) -> list[dict]:
    """All requested points, each in its own child; arnoldi above ``arnoldi_max`` is skipped
    (recorded as skipped: it needs several times the structured path's HVPs, see the docs)."""
    rows = []
    for model in models:
        for size in sizes:
            for method in methods:
                if method == "arnoldi" and size > arnoldi_max:
                    rows.append({"model": model, "size": size, "method": method,
                                 "skipped": f"arnoldi above {arnoldi_max:.0e} parameters"})
                    continue
                kw = {"model": model, "size": size, "method": method, "k": k,
                      "threads": threads}
                res = run_child("bench_scaling", "point", kw, timeout=timeout)
                if not res["converged"]:
                    raise AssertionError(f"estimate did not converge, not recording: {res}")
                rows.append(res)
                log(f"{model:11} {res['n_params']:>11,} {method:10} {res['seconds']:8.1f} s "
                    f"{res['n_hvp']:5d} HVPs  peak {res['peak_bytes'] / 2**30:6.2f} GiB  "
                    f"beyond model {(res['beyond_model_bytes'] or 0) / 2**30:6.2f} GiB")
    return rows


# -- pytest (smoke: 10^4 parameters unless KAPPA_BENCH_FULL=1) ------------------------------------
def test_scaling_smoke(benchmark):
    sizes = SIZES if FULL else (1e4,)
    rows = benchmark.pedantic(run, kwargs={"sizes": sizes, "k": 8 if FULL else 2,
                                           "models": MODELS if FULL else ("mlp",),
                                           "log": lambda *_: None},
                              rounds=1, iterations=1)  # fmt: skip
    done = [r for r in rows if "skipped" not in r]
    assert done and all(r["converged"] and r["n_hvp"] > 0 for r in done)
    assert all(r["peak_bytes"] >= r["rss_before_bytes"] for r in done)
    benchmark.extra_info["rows"] = rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="all sizes up to 1e7 (else 1e4, 1e5)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--sizes", nargs="+", type=float, default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arnoldi-max", type=float, default=1e6)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sizes = a.sizes or (list(SIZES) if a.full or FULL else [1e4, 1e5])
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    rows = run(a.models, sizes, a.methods, a.k, a.threads, a.arnoldi_max)
    out = {"machine": machine(), "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run a chosen set of benchmarks and write one JSON file and one Markdown table of ratios.

Sets (``--sets``, default all):

- ``arpack``: ``kg.eigs`` vs ARPACK on the heavy-ball operator of an MLP (time, matvecs, engine
  overhead, several start vectors, ARPACK's tolerance, block sizes, warm starts);
  ``bench_arpack.compare``;
- ``batch``: the same race (block size 1, one start vector) with a 4x larger batch: the engine's
  cost per step does not depend on the batch, the HVP's does;
- ``hessian``: top-k Hessian eigenvalues, ``kg.eigsh`` vs ARPACK, hessian-eigenthings' Lanczos,
  PyHessian-style power iteration, PyHessian; ``bench_hessian.compare``;
- ``scaling``: ``kg.estimate`` time, HVPs and peak memory from 10^4 to 10^7 parameters, MLP and
  transformer, structured and arnoldi paths, each point in its own process;
  ``bench_scaling.run``.

Smoke sizes by default (a minute or two); ``--full`` for the documented figures (about 25
minutes on two cores, half of it the scaling set)::

    OPENBLAS_NUM_THREADS=1 python bench/report.py --full --out out/bench
    python bench/report.py --sets arpack hessian          # smoke sizes, quick

Everything runs with one torch thread and ``OPENBLAS_NUM_THREADS=1`` (set here for this process
when not given, before numpy loads; the scaling children inherit it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/scipy load OpenBLAS

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

SETS = ("arpack", "batch", "hessian", "scaling")


def _gib(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def md_warm(w: dict | None, count_key: str, count_label: str) -> list[str]:
    """The warm-start table of a race (``bench_arpack``/``bench_hessian`` ``warm_race``)."""
    if not w:
        return []
    out = ["", f"Warm starts ({w['label']}; median of {w['reps']}):", "",
           f"| run | seconds | {count_label} | time vs ARPACK cold |", "|---|---|---|---|"]
    for name, r in w.items():
        if isinstance(r, dict):
            out.append(f"| {name} | {r['seconds']:.2f} | {r[count_key]} | "
                       f"**{r['time_ratio_vs_arpack_cold']:.2f}x** |")
    return out


def md_arpack(res: dict) -> list[str]:
    p, c = res["problem"], res["cold"]
    ar = c["arpack"]
    out = [
        f"### `kg.eigs` vs ARPACK: heavy-ball J of an MLP ({p['n_params']:,} parameters, state "
        f"{p['state_dim']:,}, {p['dtype']})",
        "",
        f"{p['model']}; {p['optimizer']}. k={c['k']}, tol={c['tol']:g}, which=\"{c['which']}\", "
        f"sigma={c['sigma']:g}; median of {c['reps']} interleaved runs; bare matvec "
        f"{1e3 * c['bare_matvec_s']['1']:.1f} ms (block of 4: "
        f"{1e3 * c['bare_matvec_s'].get('4', float('nan')):.1f} ms per column).",
        "",
        "| run | kappa_gpu | ARPACK | time ratio | matvecs kg / ARPACK | matvec ratio | "
        "engine overhead kg (ARPACK) | outside operator | eigenvalue error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name, r, a):
        return (f"| {name} | {r['seconds']:.2f} s | {a['seconds']:.2f} s | "
                f"**{r['time_ratio']:.2f}x** | {r['matvecs']} / {a['matvecs']} | "
                f"**{r['matvec_ratio']:.2f}x** | {r['overhead']:+.0%} ({a['overhead']:+.0%}) | "
                f"{r['outside_operator_fraction']:.0%} | {r['max_rel_eig_error_vs_arpack']:.1e} |")

    runs = [c, *res.get("other_starts", [])]
    for r in runs:
        out.append(row(f"cold, block 1, start seed {r['start_seed']}", r["kg_s1"], r["arpack"]))
    for r in runs:
        out.append(row(f"same, at ARPACK's test (tol {r['kg_s1_arpack_tol']['tol']:.1e}), "
                       f"seed {r['start_seed']}", r["kg_s1_arpack_tol"], r["arpack"]))
    for key in [k for k in c if k.startswith("kg_s") and k not in ("kg_s1", "kg_s1_arpack_tol")]:
        r = c[key]
        out.append(row(f"cold, block {r['block_size']} (ncv {r['ncv']}), seed "
                       f"{c['start_seed']}", r, ar))
    m = res.get("median_over_starts")
    if m:
        out += ["", f"Median over the {len(runs)} start vectors, block 1: time ratio "
                f"**{m['time_ratio']:.2f}x**, matvec ratio **{m['matvec_ratio']:.2f}x**, engine "
                f"overhead **{m['overhead']:+.0%}** ({m['outside_operator_fraction']:.0%} of the "
                f"wall time outside the operator); at ARPACK's convergence test: time "
                f"{m['arpack_tol_time_ratio']:.2f}x, matvecs {m['arpack_tol_matvec_ratio']:.2f}x."]
    return out + md_warm(res.get("warm"), "matvecs", "matvecs")


def md_batch(res: dict) -> list[str]:
    c, p = res["cold"], res["problem"]
    r = c["kg_s1"]
    return ["", f"Batch {p['model'].split('batch ')[1].split(',')[0]} (HVP "
            f"{1e3 * c['bare_matvec_s']['1']:.1f} ms): kappa_gpu {r['seconds']:.2f} s vs ARPACK "
            f"{c['arpack']['seconds']:.2f} s (**{r['time_ratio']:.2f}x**), matvecs "
            f"{r['matvec_ratio']:.2f}x, engine overhead **{r['overhead']:+.0%}** (ARPACK "
            f"{c['arpack']['overhead']:+.0%}); {r['outside_operator_fraction']:.0%} of kappa_gpu's "
            f"wall time outside the operator (in-run matvec "
            f"{1e3 * r['inside_operator_s'] / r['matvecs']:.1f} ms)."]


def md_hessian(res: dict) -> list[str]:
    p = res["problem"]
    out = [f"### Top-{res['k']} Hessian eigenvalues ({p['n_params']:,} parameters, "
           f"{p['dtype']}), tol={res['tol']:g}", "",
           f"{p['model']}; bare HVP {1e3 * res['bare_hvp_s']['1']:.1f} ms. ARPACK's eigenvalues "
           "are the reference.", "",
           "| solver | seconds | HVPs | time vs ARPACK | HVPs vs ARPACK | max rel. error |",
           "|---|---|---|---|---|---|"]
    n_ar = res["arpack"]["hvps"]
    names = {"arpack": "ARPACK (scipy eigsh, same HVP)",
             "power_pyhessian_defaults": "PyHessian-style power iteration, tol 1e-3 (ours, "
                                         "same HVP)",
             "power_tol": f"PyHessian-style power iteration, tol {res['tol']:g} (ours, same HVP)",
             "hessian_eigenthings_lanczos": "hessian-eigenthings 1.0 lanczos (same HVP)",
             "pyhessian_itself": "PyHessian 0.1 (its own HVP)"}
    for key, r in res.items():
        if not (isinstance(r, dict) and "seconds" in r):
            continue
        name = names.get(key, f"kg.eigsh block {r.get('block_size', '?')}")
        hv = f"{r['hvps']}" + (f" ({r['hvps_search']} with the search)"
                               if "hvps_search" in r else "")
        err = f"{r.get('max_rel_error', 0.0):.1e}"
        if r.get("reference") == "LM":  # power iteration: largest |lambda|, signs aside
            mag = r.get("max_rel_error_magnitudes")
            if mag is None and "eigenvalues" in r:
                mag = magnitude_error(r["eigenvalues"], res["reference_eigenvalues_LM"])
            err = f"{mag:.1e} on the magnitudes (set: {err})"
        out.append(f"| {name} | {r['seconds']:.2f} | {hv} | "
                   f"**{r.get('time_ratio', 1.0):.2f}x** | {r['hvps'] / n_ar:.2f}x | {err} |")
    if "reference_eigenvalues_LM" in res:
        out += ["", "Reference (ARPACK, LA): "
                + ", ".join(f"{x:.5g}" for x in res["reference_eigenvalues"])
                + "; largest magnitude (LM, power iteration's target): "
                + ", ".join(f"{x:.5g}" for x in res["reference_eigenvalues_LM"]) + "."]
    return out + md_warm(res.get("warm"), "hvps", "HVPs")


def magnitude_error(got, ref) -> float:
    from _common import magnitude_error as f

    return f(got, ref)


def md_scaling(rows: list[dict]) -> list[str]:
    out = ["### `kg.estimate` scaling (CPU, one thread, k=8, float32)", "",
           "| model | parameters | path | seconds (solver) | HVPs | s / HVP | peak RSS | beyond "
           "the model: all (solver / rest) | basis (predicted) | converged |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['model']} | ~{r['size']:.0e} | {r['method']} | skipped: "
                       f"{r['skipped']} | | | | | | |")
            continue
        out.append(f"| {r['model']} | {r['n_params']:,} | {r['method']} | {r['seconds']:.1f} "
                   f"({r.get('solver_seconds', 0.0):.1f}) | {r['n_hvp']} | "
                   f"{r['seconds_per_hvp']:.3f} | {_gib(r['peak_bytes'])} | "
                   f"{_gib(r['beyond_model_bytes'])} ({_gib(r.get('solver_beyond_model_bytes'))}"
                   f" / {_gib(r.get('report_beyond_model_bytes'))}) | "
                   f"{_gib(r['basis_bytes_predicted'])} | {'yes' if r['converged'] else 'NO'} |")
    return out


def md_machine(m: dict) -> list[str]:
    return ["### Machine", "", "```", *m["cpu"],
            f"memory: {_gib(m['memory_bytes'])}",
            f"python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, scipy {m['scipy']}",
            f"torch threads: {m['torch_threads']}, OPENBLAS_NUM_THREADS="
            f"{m['OPENBLAS_NUM_THREADS']}, OMP_NUM_THREADS={m['OMP_NUM_THREADS']}",
            f"load average at the start: {m['loadavg']}", "```"]


def markdown(res: dict) -> list[str]:
    """The Markdown report of a ``report.json`` (whichever sets it holds)."""
    md: list[str] = []
    if "arpack" in res:
        md += md_arpack(res["arpack"])
    if "batch" in res:
        md += md_batch(res["batch"])
    if "hessian" in res:
        md += [""] + md_hessian(res["hessian"])
    if "scaling" in res:
        md += [""] + md_scaling(res["scaling"])
    md += [""] + md_machine(res["machine"])
    md += [f"load average at the end: {res.get('loadavg_end')}; the run took "
           f"{res.get('seconds', 0.0):.0f} s", "", f"Command: `{res.get('command', '?')}`"]
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--full", action="store_true", help="the documented sizes (long)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default="out/bench", help="directory for report.json/report.md")
    ap.add_argument("--from-json", default=None, metavar="REPORT_JSON",
                    help="only rebuild the Markdown table from an earlier report.json")
    a = ap.parse_args(argv)
    if a.from_json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        with open(a.from_json) as f:
            res = json.load(f)
        md = markdown(res)
        print("\n".join(md))
        return 0
    if a.full:
        os.environ["KAPPA_BENCH_FULL"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common
    import bench_arpack
    import bench_hessian
    import bench_scaling

    _common.set_threads(1)
    reps = a.reps or (5 if a.full else 1)
    width = 160 if a.full else 16
    args = " ".join(sys.argv[1:] if argv is None else argv)
    res: dict = {"machine": _common.machine(), "full": a.full,
                 "command": f"OPENBLAS_NUM_THREADS=1 python bench/report.py {args}"}
    t0 = time.perf_counter()
    if "arpack" in a.sets:
        res["arpack"] = bench_arpack.compare(width, reps, (1, 4, 8) if a.full else (1, 4),
                                             seeds=(7, 1, 2) if a.full else (7,))
    if "batch" in a.sets:
        res["batch"] = bench_arpack.compare(width, min(reps, 3), (1,), warm_steps=0,
                                            seeds=(7,), batch=1024)
    if "hessian" in a.sets:
        res["hessian"] = bench_hessian.compare(width, reps, (1, 4, 8), k=6 if a.full else 3)
    if "scaling" in a.sets:
        sizes = bench_scaling.SIZES if a.full else (1e4,)
        res["scaling"] = bench_scaling.run(sizes=sizes, k=8)
    res["seconds"] = time.perf_counter() - t0
    res["loadavg_end"] = _common.machine()["loadavg"]
    md = markdown(res)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

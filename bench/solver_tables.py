"""Two tables of the solver issue, printed as Markdown (a script; not collected by pytest).

    OPENBLAS_NUM_THREADS=1 python bench/solver_tables.py

1. matvec counts against ARPACK on the cases of ``tests/test_solvers_arpack.py`` (same k, tol,
   ncv and start vector: ARPACK's effective start ``A v0``, its one matvec charged to us);
2. warm vs cold matvecs after a 1e-3 relative perturbation, on the at-scale operators of the same
   test file (power-law Hessian n = 10^5 and its heavy-ball J), tol 1e-4, cold = mean of 3 seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_solvers_arpack as T  # noqa: E402
from test_solvers_problems import CountingOperator, arpack_count, match_error  # noqa: E402

from kappa_gpu.solvers import eigs, eigsh  # noqa: E402


def arpack_table() -> None:
    print("| case | tol | ARPACK matvecs | kappa_gpu matvecs (+1 for A v0) | ratio "
          "| max rel. eig. diff |")
    print("|---|---|---|---|---|---|")
    for case in sorted(T.CASES):
        build, which, k, sigma, sym = T.CASES[case]
        M = build()
        n = M.shape[0]
        ncv = min(max(2 * k + 1, 20), n)
        for tol in (1e-10, 0.0):
            v0 = np.random.default_rng(7).standard_normal(n)
            w, na = arpack_count(M, k, which, tol, ncv, v0, shift=sigma or 0.0, symmetric=sym)
            solver = eigsh if sym else eigs
            kw = {} if sym else {"sigma": sigma}
            Av0 = torch.from_numpy(M @ v0 - (sigma or 0.0) * v0)
            r = solver(CountingOperator(M), k=k, which=which, tol=tol, ncv=ncv, v0=Av0, **kw)
            w = np.asarray(w, dtype=complex)
            err = match_error(r.eigenvalues.numpy(), np.concatenate([w, np.conj(w)]))
            print(f"| {case} | {tol:g} | {na} | {r.n_matvec + 1} | "
                  f"{(r.n_matvec + 1) / na:.2f} | {err:.1e} |")


def warm_table() -> None:
    print("| operator | warm | cold | ratio |")
    print("|---|---|---|---|")
    for k in (3, 6):
        H1, H2 = T._hessian_pair(100_000, 100.0)
        first = eigsh(H1, k=k, tol=1e-4, generator=torch.Generator().manual_seed(0))
        cold = T._cold_mean(eigsh, H2, k=k, tol=1e-4)
        w = eigsh(H2, k=k, tol=1e-4, v0=first.eigenvectors)
        print(f"| eigsh k={k}, Hessian n=1e5 | {w.n_matvec} | {cold:.1f} | "
              f"{w.n_matvec / cold:.2f} |")
    for which, sigma in (("LM", 1.0), ("LI", None)):
        H1, H2 = T._hessian_pair(100_000, 60.0)
        kw = dict(k=6, which=which, sigma=sigma, tol=1e-4)
        first = eigs(T._HeavyBall(H1), generator=torch.Generator().manual_seed(0), **kw)
        cold = T._cold_mean(eigs, T._HeavyBall(H2), **kw)
        w = eigs(T._HeavyBall(H2), v0=first.eigenvectors, **kw)
        print(f"| eigs heavy ball, {which} k=6 | {w.n_matvec} | {cold:.1f} | "
              f"{w.n_matvec / cold:.2f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    arpack_table()
    print()
    warm_table()

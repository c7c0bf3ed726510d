"""Shared pieces of the benchmark suite (``bench_arpack``, ``bench_hessian``, ``bench_scaling``,
``report``); not collected by pytest (it collects ``bench_*.py``).

- **Sizes.** Smoke (default): tiny problems, what CI runs with ``--benchmark-disable``, every
  file well under 30 s. Full: ``KAPPA_BENCH_FULL=1`` under pytest, or ``--full`` for the scripts
  and ``bench/report.py``; the figures of ``docs/benchmarks.md``.
- **Threads.** Every comparison runs with one torch thread (:func:`set_threads`) and, for SciPy's
  OpenBLAS, ``OPENBLAS_NUM_THREADS=1`` in the environment (it is read when numpy loads, so set it
  on the command line; ``report.py`` sets it for itself and its children). One thread on each
  side makes kappa_gpu and ARPACK compete for the same core and keeps the medians stable on a
  shared machine; :func:`machine` records what was in effect.
- **Timing.** Candidates run round-robin (:func:`interleaved`), so a change of the machine's
  load hits all alike; medians are reported.
- **Checks.** :func:`match_error` compares eigenvalues up to order and conjugation; a benchmark
  asserts it before a time is recorded.
- **Baselines.** ARPACK through ``A.to_scipy()`` with a counting matvec (:func:`arpack`); a
  PyHessian-style deflated power iteration (:func:`pyhessian_power`, written here, on the same
  HVP); hessian-eigenthings' Lanczos and PyHessian itself when installed (optional imports).
- **Problems.** The heavy-ball MLP of ``bench_estimate.make_problem`` (reused); a small
  transformer (:func:`transformer_problem`, ``torch.nn.TransformerEncoderLayer``).
- **Memory.** :func:`run_child` runs a function in a fresh interpreter and returns its peak RSS
  (``VmHWM``) next to its result.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import kappa_gpu as kg

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # bench modules import each other (bench_estimate.make_problem)
    sys.path.insert(0, HERE)

from bench_estimate import make_problem  # noqa: E402  (after the path is set)

__all__ = [
    "FULL",
    "set_threads",
    "machine",
    "interleaved",
    "median",
    "Timed",
    "bare_matvec_seconds",
    "match_error",
    "magnitude_error",
    "MLP_WIDTHS",
    "mlp_problem",
    "TRANSFORMER_SIZES",
    "TinyTransformer",
    "transformer_problem",
    "n_params",
    "arpack",
    "pyhessian_power",
    "vm_hwm_bytes",
    "vm_rss_bytes",
    "run_child",
]

#: Full sizes (the documented figures) instead of smoke sizes.
FULL = os.environ.get("KAPPA_BENCH_FULL", "0").lower() not in ("", "0", "false", "no")


# -- environment ----------------------------------------------------------------------------------
def set_threads(n: int = 1) -> None:
    """One (or ``n``) torch intra-op thread(s); see the module docstring for OpenBLAS."""
    torch.set_num_threads(n)


def _lscpu_head(lines: int = 15) -> list[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return [platform.processor() or platform.machine()]
    keep = ("Architecture", "CPU(s):", "Model name", "Thread(s) per core", "Core(s) per socket",
            "L1d", "L2", "L3", "Hypervisor")  # fmt: skip
    return [" ".join(ln.split()) for ln in out.splitlines()[:40] if ln.startswith(keep)][:lines]


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, memory, versions, thread settings, load."""
    import scipy

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": _lscpu_head(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch_threads": torch.get_num_threads(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.is_available(),
    }


# -- timing ---------------------------------------------------------------------------------------
def median(xs) -> float:
    return float(statistics.median(xs))


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> tuple[dict, dict]:
    """Run every candidate ``reps`` times, round-robin; ``(seconds lists, last results)``."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return times, last


class Timed(kg.LinearOperator):
    """Wraps an operator and adds up the seconds spent inside its products.

    ``seconds`` is the in-run HVP time: the part of a solver's wall time the operator itself
    takes (with the cache state the solver leaves it), the rest being the solver's own work.
    The wrapper costs a ``perf_counter`` pair per call.
    """

    def __init__(self, A: kg.LinearOperator):
        super().__init__(A.shape, A.dtype, A.device)
        self.A, self.seconds, self.calls = A, 0.0, 0

    def _timed(self, fn, x):
        t0 = time.perf_counter()
        y = fn(x)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return y

    def _matvec(self, x):
        return self._timed(self.A._matvec, x)

    def _matmat(self, X):
        return self._timed(self.A._matmat, X)

    def _rmatvec(self, y):
        return self._timed(self.A._rmatvec, y)

    def _rmatmat(self, Y):
        return self._timed(self.A._rmatmat, Y)

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def bare_matvec_seconds(A: kg.LinearOperator, reps: int = 5, s: int = 1, seed: int = 0) -> list:
    """Seconds of ``reps`` bare products with a random vector (``s > 1``: one ``matmat`` of ``s``
    columns, divided by ``s``: the cost of one column inside a block)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(A.shape[1], s, generator=g, dtype=A.dtype).to(A.device)
    x = X[:, 0].contiguous()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        A.matvec(x) if s == 1 else A.matmat(X)
        out.append((time.perf_counter() - t0) / s)
    return out


# -- checks ---------------------------------------------------------------------------------------
def match_error(got, ref) -> float:
    """Largest relative distance from a value of either set to the other set (closed under
    conjugation: SciPy returns one member of a pair that straddles ``k``, kappa_gpu both)."""
    got = np.asarray(got, dtype=np.complex128).ravel()
    ref = np.asarray(ref, dtype=np.complex128).ravel()
    if got.size == 0 or ref.size == 0:
        return float("inf")

    def one_way(a, b):
        b = np.concatenate([b, np.conj(b)])
        d = np.abs(a[:, None] - b[None, :]).min(axis=1)
        return float(np.max(d / np.maximum(np.abs(a), 1e-30)))

    return max(one_way(got, ref), one_way(ref, got))


def magnitude_error(got, ref) -> float:
    """Largest relative error between the sorted magnitudes ``|z|`` of two sets (for solvers
    that find the largest ``|lambda|`` without caring about signs, e.g. power iteration)."""
    g = np.sort(np.abs(np.asarray(got, dtype=np.complex128).ravel()))[::-1]
    r = np.sort(np.abs(np.asarray(ref, dtype=np.complex128).ravel()))[::-1]
    m = min(len(g), len(r))
    if m == 0:
        return float("inf")
    return float(np.max(np.abs(g[:m] - r[:m]) / np.maximum(r[:m], 1e-30)))


# -- problems -------------------------------------------------------------------------------------
#: MLP widths of ``bench_estimate.make_problem`` (512-w-w/2-10, batch 256) for a parameter count.
MLP_WIDTHS = {1e4: 19, 1e5: 160, 1e6: 1024, 1e7: 4000}


def mlp_problem(width: int, *, seed: int = 0, batch: int = 256, dtype=torch.float32):
    """``bench_estimate.make_problem``: MLP 512-width-width/2-10 (tanh), cross-entropy, heavy-ball
    SGD (lr 0.05, momentum 0.9) after 3 full-batch steps. ``width=160``: 95,770 parameters
    (state of the heavy-ball operator: 191,540 entries)."""
    model, opt, loss_fn, data = make_problem(width, n=batch, seed=seed)
    if dtype != torch.float32:
        model.to(dtype)
        data = (data[0].to(dtype), data[1])
    return model, opt, loss_fn, data


class TinyTransformer(torch.nn.Module):
    """Token embedding + learned positions, ``layers`` x ``nn.TransformerEncoderLayer`` (pre-norm,
    GELU, no dropout), mean-pooled linear head: a small sequence classifier."""

    def __init__(self, vocab: int, d: int, heads: int, ff: int, layers: int, seq: int, out: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=True)
            for _ in range(layers)
        )  # fmt: skip
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, out)

    def forward(self, tokens):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        # The math attention backend: torch 2.13's fused CPU (flash) kernel has neither a
        # forward-mode rule nor a double backward, so no HVP of any kind goes through it.
        with sdpa_kernel([SDPBackend.MATH]):
            for blk in self.blocks:
                h = blk(h)
        return self.head(self.norm(h).mean(dim=1))


#: (vocab, d_model, heads, ff, layers) for about 1e4 .. 1e7 parameters (seq 32, batch 32).
TRANSFORMER_SIZES = {
    1e4: (64, 16, 2, 64, 2),
    1e5: (256, 48, 4, 192, 3),
    1e6: (512, 128, 4, 512, 4),
    1e7: (1024, 384, 6, 1536, 5),
}


def transformer_problem(size: float, *, seed: int = 0, batch: int = 32, seq: int = 32,
                        steps: int = 3):
    """A :class:`TinyTransformer` of about ``size`` parameters on random token sequences (the
    label is a fixed function of the tokens), heavy-ball SGD after ``steps`` steps."""
    vocab, d, heads, ff, layers = TRANSFORMER_SIZES[size]
    torch.manual_seed(seed)
    model = TinyTransformer(vocab, d, heads, ff, layers, seq, 10)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    y = tokens[:, : seq // 2].sum(dim=1) % 10
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(tokens), y).backward()
        opt.step()
    opt.zero_grad()
    return model, opt, loss_fn, (tokens, y)


def train_more(prob: dict, steps: int) -> None:
    """``steps`` more full-batch optimizer steps on a problem dict (model, opt, loss_fn, data),
    gradients cleared after: the point a warm-start race moves to."""
    model, opt, loss_fn, (X, y) = prob["model"], prob["opt"], prob["loss_fn"], prob["data"]
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    opt.zero_grad()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- baselines ------------------------------------------------------------------------------------
def arpack(A: kg.LinearOperator, k: int, which: str, tol: float, v0: np.ndarray, *,
           sigma: float | None = None, ncv: int | None = None, symmetric: bool = False,
           maxiter: int | None = None):
    """SciPy's ARPACK on ``A.to_scipy()`` (``A - sigma I`` for a shifted target, the same Krylov
    space as kappa_gpu's ``sigma`` ordering; SciPy's own ``sigma`` would invert).

    Returns ``(eigenvalues, eigenvectors, matvecs)``; the matvecs are counted at the operator,
    ARPACK's first application to ``v0`` included.
    """
    import scipy.sparse.linalg as ssl

    S = A.to_scipy()
    shift = float(sigma or 0.0)
    count = [0]

    def mv(x):
        count[0] += 1
        y = S.matvec(x)
        return y - shift * x.reshape(y.shape) if shift else y

    L = ssl.LinearOperator(A.shape, matvec=mv, dtype=S.dtype)
    fn = ssl.eigsh if symmetric else ssl.eigs
    w, V = fn(L, k=k, which=which, tol=tol, ncv=ncv, v0=v0, maxiter=maxiter)
    return np.asarray(w, dtype=np.complex128) + shift, V, count[0]


def pyhessian_power(H: kg.LinearOperator, top_n: int, *, max_iter: int = 100, tol: float = 1e-3,
                    generator: torch.Generator | None = None):
    """PyHessian's ``hessian.eigenvalues`` (Yao et al. 2020), re-implemented on a flat vector.

    Deflated power iteration exactly as PyHessian 0.1 does it: for each of ``top_n`` values a
    random start, then per iteration Gram-Schmidt against the eigenvectors found so far (one
    pass), one HVP, Rayleigh quotient ``v^T H v``, ``v = Hv / ||Hv||``; stop when the Rayleigh
    quotient changed by less than ``tol`` relative (``|e - e'| / (|e| + 1e-6)``), keeping the
    previous estimate, or after ``max_iter`` HVPs. It finds the largest-magnitude values.

    Returns ``(eigenvalues, eigenvectors (n, top_n), hvps)``.
    """
    n = H.shape[0]
    vals: list[float] = []
    vecs: list[torch.Tensor] = []
    hvps = 0
    for _ in range(top_n):
        v = torch.randn(n, generator=generator, dtype=H.dtype).to(H.device)
        v = v / (torch.linalg.vector_norm(v) + 1e-6)
        ev = None
        for _ in range(max_iter):
            for u in vecs:  # PyHessian's orthnormal(): one classical pass, then normalize
                v = v - torch.dot(v, u) * u
            v = v / (torch.linalg.vector_norm(v) + 1e-6)
            Hv = H.matvec(v)
            hvps += 1
            tmp = float(torch.dot(Hv, v))
            v = Hv / (torch.linalg.vector_norm(Hv) + 1e-6)
            if ev is None:
                ev = tmp
            elif abs(ev - tmp) / (abs(ev) + 1e-6) < tol:
                break
            else:
                ev = tmp
        vals.append(float(ev))
        vecs.append(v)
    return np.array(vals), torch.stack(vecs, dim=1), hvps


# -- memory ---------------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def vm_hwm_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def vm_rss_bytes() -> int:
    """Current resident set size of this process (``VmRSS``)."""
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else vm_hwm_bytes()


def run_child(module: str, func: str, kwargs: dict, timeout: float | None = None) -> dict:
    """``module.func(**kwargs)`` in a fresh interpreter (same thread settings), its JSON result,
    plus ``child_maxrss_bytes`` from ``getrusage(RUSAGE_CHILDREN)`` of this process.

    The child measures its own ``VmHWM``/``VmRSS`` where it matters (before and after the
    estimate); ``ru_maxrss`` of the children is the independent cross-check (largest child so
    far, so it is only exact for the largest run).
    """
    import resource

    call = f"{module}.{func}(**json.loads({json.dumps(kwargs)!r}))"
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import {module}; "
            f"print('@@RESULT@@' + json.dumps({call}))")
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(HERE))  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"child {module}.{func}({kwargs}) failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")  # fmt: skip
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")][-1]
    out = json.loads(line[len("@@RESULT@@"):])
    out["children_maxrss_bytes"] = (
        int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
    )
    return out

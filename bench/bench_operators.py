"""Cost of one update-operator matvec against one bare HVP of the same model.

The claim measured: a matvec of the heavy-ball operator (state (theta, buffer), 2n) costs at most
1.3x one bare HVP computed the same way, nothing else around it. Two baselines, each against
the operator built with the matching ``hvp=``:

- ``hvp="auto"`` (default) against a bare reverse-over-reverse HVP through a cached graph
  (``g = autograd.grad(loss, params, create_graph=True)`` once, then
  ``autograd.grad(g, params, v, retain_graph=True)`` per product);
- ``hvp="forward"`` against a bare forward-over-reverse HVP (``jvp(grad(f))`` over
  ``functional_call``, tangents as a tuple of tensors).

The overhead is the split/flatten of the 2n-vector, the staleness check and a few elementwise
vector operations. Printed too: the default operator against the bare ``jvp(grad(f))`` (what the
default path gains over forward mode).

Sizes (environment variable ``KAPPA_BENCH_SIZE``):

- ``small`` (default; ~10k parameters): fast, for ``pytest bench --benchmark-disable`` smoke runs;
- ``1m``: an MLP 512-1024-512-10 (tanh, 1,055,242 parameters), batch 256, cross-entropy.

Two ways to run it:

    pytest bench/bench_operators.py                   # pytest-benchmark timings of both
    python bench/bench_operators.py [--size 1m] [--reps 15] [--threads N]
                                                       # interleaved timing; prints the ratio,
                                                       # exits 1 when it is above --max-ratio

Both check the answer first (the operator's matvec against the formula built from the bare HVP)
and refuse to time a wrong one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from kappa_gpu.operators import update_operator

SIZES = {
    # name: (n_in, hidden, hidden2, n_out, batch)
    "small": (32, 128, 64, 10, 64),
    "1m": (512, 1024, 512, 10, 256),
}
SIZE = os.environ.get("KAPPA_BENCH_SIZE", "small").lower()
LR, MOMENTUM = 0.05, 0.9


def build(size: str = SIZE, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Model, heavy-ball SGD after one real step, loss, batch."""
    n_in, hidden, hidden2, n_out, nb = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden2), nn.Tanh(),
            nn.Linear(hidden2, n_out),
        ).to(dtype=dtype, device=device)  # fmt: skip
    x = torch.randn(nb, n_in, generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, n_out, (nb,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, F.cross_entropy, (x, y)


def bare_hvp(model, loss_fn, batch):
    """The baseline: ``v -> H v`` with ``jvp(grad(f))``, tangents a tuple (no flattening)."""
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    primals = tuple(p.detach() for p in model.parameters())

    def f(ps):
        return loss_fn(functional_call(model, dict(zip(names, ps, strict=True)), (x,)), y)

    def hvp(tangents):
        return jvp(grad(f), (primals,), (tangents,))[1]

    return hvp, primals


def bare_hvp_cached(model, loss_fn, batch):
    """The baseline of ``hvp="auto"``: double backward through a gradient graph built once."""
    x, y = batch
    leaves = [p.detach().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    out = functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
    g = torch.autograd.grad(loss_fn(out, y), leaves, create_graph=True)

    def hvp(tangents):
        return torch.autograd.grad(g, leaves, grad_outputs=tangents, retain_graph=True)

    return hvp


def setup(size: str = SIZE, hvp_mode: str = "forward", device: str = "cpu"):
    """Build both and check the operator's answer against the bare HVP (refuse wrong answers)."""
    model, opt, loss_fn, batch = build(size, device=device)
    op = update_operator(model, opt, loss_fn, batch, hvp=hvp_mode)
    hvp, primals = bare_hvp(model, loss_fn, batch)
    if hvp_mode == "auto":
        hvp = bare_hvp_cached(model, loss_fn, batch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(op.shape[1], generator=gen, dtype=op.dtype).to(device)
    got = op.matvec(x)  # first: it also loads torch's forward-mode decompositions quietly
    x1, x2 = op.split(x)
    tangents, o = [], 0
    for p in primals:
        tangents.append(x1[o : o + p.numel()].view_as(p))
        o += p.numel()
    tangents = tuple(tangents)
    Hx1 = torch.cat([h.reshape(-1) for h in hvp(tangents)])
    want = torch.cat([x1 - LR * (Hx1 + MOMENTUM * x2), Hx1 + MOMENTUM * x2])
    err = ((got - want).norm() / want.norm()).item()
    if not err <= 1e-4:  # float32
        raise AssertionError(f"operator matvec disagrees with the bare HVP: rel. error {err:.2e}")
    return op, x, hvp, tangents


@pytest.mark.parametrize("hvp_mode", ["auto", "forward"])
def test_bare_hvp(benchmark, hvp_mode):
    _, _, hvp, tangents = setup(hvp_mode=hvp_mode)
    benchmark(hvp, tangents)


@pytest.mark.parametrize("hvp_mode", ["auto", "forward"])
def test_heavy_ball_matvec(benchmark, hvp_mode):
    op, x, _, _ = setup(hvp_mode=hvp_mode)
    benchmark(op.matvec, x)


def _time(fn, arg) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn(arg)
    sync()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1m", choices=sorted(SIZES))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-ratio", type=float, default=1.3)
    ap.add_argument("--device", default="cpu", help="e.g. cuda (bench/gpu_check.sh runs it there)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ok = True
    meds = {}
    for mode in ("auto", "forward"):
        op, x, hvp, tangents = setup(args.size, mode, args.device)
        base = "reverse-over-reverse, cached graph" if mode == "auto" else "torch.func jvp(grad)"
        print(f"{args.size}: n = {op.n_params:,} parameters, operator {op.shape}, "
              f"{torch.get_num_threads()} threads, hvp={mode!r} -> {op.hvp_mode}")  # fmt: skip
        for _ in range(3):  # warm up both
            hvp(tangents)
            op.matvec(x)
        bare, mv = [], []
        for _ in range(args.reps):  # interleaved, so drifting machine load hits both alike
            bare.append(_time(hvp, tangents))
            mv.append(_time(op.matvec, x))
        b, m = statistics.median(bare), statistics.median(mv)
        meds[mode] = (b, m)
        ratio = m / b
        ok &= ratio <= args.max_ratio
        print(f"  bare HVP ({base}): median {b * 1e3:.1f} ms (min {min(bare) * 1e3:.1f})")
        print(f"  heavy-ball matvec:   median {m * 1e3:.1f} ms (min {min(mv) * 1e3:.1f})")
        print(f"  ratio matvec / bare HVP = {ratio:.3f} (median), {min(mv) / min(bare):.3f} "
              f"(min); limit {args.max_ratio}")  # fmt: skip
    print(f"default matvec / bare jvp(grad) HVP = {meds['auto'][1] / meds['forward'][0]:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

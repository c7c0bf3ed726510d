"""Overhead of :class:`kappa_gpu.KappaMonitor` in a real training loop (a script, not a test).

Trains a ~1M-parameter MLP (SGD with momentum, or AdamW) on a synthetic classification task
and runs the monitor every ``--every`` steps with ``k`` modes. Reports the monitor's overhead
(monitor seconds / training seconds, training seconds measured between ``monitor.step`` calls),
the cost of each estimate, and the warm-start HVP ratio. It refuses to report a time when an
estimate failed or nothing converged (a fast wrong answer is not a result), and exits non-zero
when the overhead is above ``--max-overhead``.

The estimate uses a probe batch of ``--probe-batch`` examples (the first ``probe_batch`` rows of
the current training batch): curvature on a subsample, the usual practice; the HVP cost scales
with it, the training step with ``--batch``.

    python bench/bench_monitor.py                       # defaults: 1.06M params, every=100, k=8
    python bench/bench_monitor.py --steps 2000 --json out.json --device cuda
    python bench/bench_monitor.py --steps 2000 --cap 0.1   # KappaMonitor(max_overhead=0.1)
    pytest bench/bench_monitor.py        # a 20-step smoke run (checks, no timing claim)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def build(n_in: int, hidden: int, hidden2: int, n_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden2), nn.GELU(),
        nn.Linear(hidden2, n_out),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=512, help="training batch size")
    ap.add_argument("--probe-batch", type=int, default=64, help="examples in the estimate")
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--cap", type=float, default=None,
                    help="KappaMonitor(max_overhead=CAP): skip due estimates above this ratio")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-overhead", type=float, default=0.10)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    ap.add_argument("--scale", type=float, default=1.0, help="scale the hidden widths")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kappa_gpu._monitor import KappaMonitor

    dev = torch.device(args.device)
    n_in, n_out = 256, 10
    hidden, hidden2 = max(1, round(1024 * args.scale)), max(1, round(768 * args.scale))
    torch.manual_seed(0)
    model = build(n_in, hidden, hidden2, n_out).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    teacher = torch.randn(n_in, n_out, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    pool = []
    for _ in range(32):  # a pool of batches, cycled: data loading is not what is measured
        x = torch.randn(args.batch, n_in, device=dev, generator=g)
        pool.append((x, (x @ teacher).argmax(1)))
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = KappaMonitor(
        model,
        opt,
        F.cross_entropy,
        every=args.every,
        k=args.k,
        method=args.method,
        budget_s=args.budget_s,
        max_overhead=args.cap,
    )

    t_start = time.perf_counter()
    for step in range(args.steps):
        x, y = pool[step % len(pool)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        monitor.step((x[: args.probe_batch], y[: args.probe_batch]), loss=loss)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t_start
    ov = monitor.overhead()
    recs = list(monitor.records)

    failed = [r for r in recs if not r.ok]
    if not recs or failed or not any(r.converged for r in recs):
        print(
            f"REFUSED: {len(failed)} of {len(recs)} estimates failed "
            f"({[r.error for r in failed][:3]}), converged: {[r.converged for r in recs]}"
        )
        return 2
    hvps = [r.n_hvp for r in recs]
    warm = statistics.median(hvps[1:]) / hvps[0] if len(hvps) > 1 else float("nan")
    out = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "n_params": n_params,
        "optimizer": args.optimizer,
        "steps": args.steps,
        "every": args.every,
        "k": args.k,
        "batch": args.batch,
        "probe_batch": args.probe_batch,
        "wall_seconds": wall,
        "train_seconds": ov.train_seconds,
        "monitor_seconds": ov.monitor_seconds,
        "overhead": ov.ratio,
        "cap": args.cap,  # KappaMonitor(max_overhead=...); --max-overhead is the pass mark
        "n_skipped": ov.n_skipped,
        "estimate_steps": [r.step for r in recs],
        "train_step_ms": 1e3 * ov.train_seconds / max(ov.n_steps, 1),
        "estimate_seconds": [round(r.seconds, 4) for r in recs],
        "n_hvp": hvps,
        "warm_start_hvp_ratio": warm,
        "converged": [r.converged for r in recs],
        "kappa_V": [r.kappa_V for r in recs],
        "rho": [r.rho for r in recs],
    }
    print(str(ov))
    print(
        f"  {n_params} params, {args.optimizer}, batch {args.batch}, probe {args.probe_batch}, "
        f"train step {out['train_step_ms']:.1f} ms; HVPs per estimate {hvps} "
        f"(warm/first median {warm:.2f}); estimate s {out['estimate_seconds']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if ov.ratio > args.max_overhead:
        print(f"overhead {ov.ratio:.3f} is above --max-overhead {args.max_overhead}")
        return 1
    return 0


def test_bench_monitor_smoke():
    """``pytest bench/bench_monitor.py``: the script runs and its estimates are sound (no time
    is asserted: overhead figures come from the full run)."""
    n = torch.get_num_threads()
    try:
        rc = main(
            [
                "--steps",
                "20",
                "--every",
                "10",
                "--k",
                "2",
                "--batch",
                "64",
                "--probe-batch",
                "16",
                "--scale",
                "0.05",
                "--max-overhead",
                "inf",
                "--threads",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(n)
    assert rc == 0


if __name__ == "__main__":
    sys.exit(main())

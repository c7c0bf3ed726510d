"""The ``kappa-gpu`` command.

``kappa-gpu demo`` trains a small embedded model on synthetic data, estimates the
non-normality of its optimizer update every few steps, prints a table and writes a JSON file.
``kappa-gpu reproduce`` re-runs the two-layer experiment of arXiv:2605.23476 (see
docs/reproduce.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kappa_gpu._report import _jsonable

__all__ = ["main", "run_demo"]


def _demo_problem(seed: int, n: int = 256, d_in: int = 8, width: int = 32):
    """A teacher-student regression: a 2-layer tanh student fits a random 2-layer teacher."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(d_in, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        y = teacher(X)
        y = y / y.std()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
    ).double()
    return model, (X, y)


def run_demo(
    steps: int = 300,
    every: int = 25,
    k: int = 4,
    lr: float = 0.35,
    momentum: float = 0.9,
    seed: int = 0,
    out: str | Path | None = "kappa_demo.json",
    stream=None,
) -> list[dict]:
    """Train the demo model with heavy-ball SGD and estimate every ``every`` steps.

    Returns the records (one dict per estimate) and writes them with the full reports to
    ``out`` as JSON (skipped when ``out`` is None).
    """
    from kappa_gpu._estimate import estimate

    stream = stream or sys.stdout
    model, batch = _demo_problem(seed)
    loss_fn = torch.nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"kappa-gpu demo: 2-layer tanh MLP ({n_params} parameters), teacher-student regression, "
        f"SGD lr={lr} momentum={momentum}, estimate every {every} steps (k={k}, structured)",
        file=stream,
    )
    header = f"{'step':>6} {'loss':>11} {'rho':>9} {'kappa_V':>10} {'EP ratio':>9} " \
             f"{'growth':>8} {'HVPs':>5} {'conv':>5}"
    print(header, file=stream)
    print("-" * len(header), file=stream)
    records, reports = [], []
    warm = None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            rep = estimate(model, opt, loss_fn, batch, k=k, warm_start=warm,
                           generator=torch.Generator().manual_seed(seed))
            warm = rep
            rec = {
                "step": step,
                "loss": float(loss.detach()),
                "rho": rep.spectral_radius,
                "kappa_V": rep.kappa_V,
                "nearest_ep_ratio": rep.nearest_ep_ratio,
                "transient_growth": rep.transient_growth,
                "n_hvp": rep.n_hvp,
                "converged": rep.all_converged,
            }
            records.append(rec)
            reports.append(rep.to_dict())
            print(
                f"{step:>6d} {rec['loss']:>11.4e} {rec['rho']:>9.5f} {rec['kappa_V']:>10.4g} "
                f"{rec['nearest_ep_ratio']:>+9.3f} {rec['transient_growth']:>8.3g} "
                f"{rec['n_hvp']:>5d} {'yes' if rec['converged'] else 'NO':>5}",
                file=stream,
            )
    elapsed = time.perf_counter() - t0
    print(f"done in {elapsed:.1f} s", file=stream)
    if out is not None:
        Path(out).write_text(
            json.dumps({"config": {"steps": steps, "every": every, "k": k, "lr": lr,
                                   "momentum": momentum, "seed": seed, "n_params": n_params},
                        # strict JSON: a nan ratio (no complex mode) or inf growth as strings,
                        # as in the reports' to_dict()
                        "records": _jsonable(records), "reports": reports},
                       indent=1, allow_nan=False)
        )
        print(f"wrote {out}", file=stream)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kappa-gpu",
        description="kappa_gpu: non-normality (kappa(V), exceptional points, transient growth) "
        "of a PyTorch optimizer's update, measured while a model trains.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    from kappa_gpu.experiments.reproduce import add_reproduce_parser, positive_int

    d = sub.add_parser("demo", help="train a small model and estimate kappa(V) as it trains",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--steps", type=positive_int, default=300, help="training steps")
    d.add_argument("--every", type=positive_int, default=25, help="steps between estimates")
    d.add_argument("-k", type=positive_int, default=4, help="sharp modes per estimate")
    d.add_argument("--lr", type=float, default=0.35, help="SGD learning rate")
    d.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (heavy ball)")
    d.add_argument("--seed", type=int, default=0, help="seed of data, model and estimates")
    d.add_argument("--out", default="kappa_demo.json", help="JSON output file")
    add_reproduce_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        out = Path(args.out)
        if out.is_dir() or not out.resolve().parent.is_dir():
            d.error(f"--out {args.out}: not a file in an existing directory")
        run_demo(args.steps, args.every, args.k, args.lr, args.momentum, args.seed, args.out)
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

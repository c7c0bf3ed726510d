"""The regime search: where do two-layer networks really spike? (plain torch, no kappa_gpu)

Trains a grid of :class:`~kappa_gpu.experiments._problems.RunConfig` runs without any
instrumentation, applies the spike definition of :mod:`kappa_gpu.experiments._spikes` to each
full-batch loss curve and tabulates, per configuration (over seeds): the fraction of runs that
spike, the mean number of spikes, the fraction that diverge and the median final loss. The
chosen regimes of the default sweep (:data:`kappa_gpu.experiments.reproduce.DEFAULT_GRID`) come
from its output; ``docs/reproduce.md`` records the tables.

Run::

    python -m kappa_gpu.experiments._search --stage 1 --out search1.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from kappa_gpu.experiments._problems import RunConfig, train
from kappa_gpu.experiments._spikes import detect_spikes

__all__ = ["search_grid", "run_one", "summarize", "main"]

_LRS = {
    "sgd-momentum": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    "adam": (0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
}


def search_grid(stage: int, seeds: int = 2, steps: int = 1000) -> list[RunConfig]:
    """The configurations of one search stage.

    Stage 1: learning rate x optimizer x problem x (full batch, batch 32) x label noise
    (0, 0.2), width 16, no warm-up. Stage 2 (full batch, label noise 0.2): width (8, 16, 24)
    x warm-up (0, 100 steps) at the learning rates around the edge found in stage 1 (larger
    ones for the classifier, which did not spike full-batch in stage 1).
    """
    out = []
    if stage == 1:
        for prob, opt, bs, noise in itertools.product(
            ("teacher", "blobs"), ("sgd-momentum", "adam"), (None, 32), (0.0, 0.2)
        ):
            for lr, seed in itertools.product(_LRS[opt], range(seeds)):
                out.append(RunConfig(prob, opt, lr, seed, 16, noise, bs, 0, steps))
    elif stage == 2:
        lrs = {
            ("teacher", "sgd-momentum"): (0.4, 0.5, 0.6, 0.7, 0.8),
            ("teacher", "adam"): (0.05, 0.1, 0.2),
            ("blobs", "sgd-momentum"): (1.0, 2.0, 3.0, 5.0),
            ("blobs", "adam"): (0.2, 0.5, 1.0),
        }
        for (prob, opt), width, warmup in itertools.product(lrs, (8, 16, 24), (0, 100)):
            for lr, seed in itertools.product(lrs[prob, opt], range(seeds)):
                out.append(RunConfig(prob, opt, lr, seed, width, 0.2, None, warmup, steps))
    else:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    return out


def run_one(cfg: RunConfig) -> dict:
    """Train one run (one thread) and return its spike statistics."""
    import torch

    torch.set_num_threads(1)
    loss = train(cfg)
    a = detect_spikes(loss)
    final = loss[-1]
    return {
        "config": cfg.to_dict(),
        "n_spikes": len(a.spikes),
        "diverged_at": a.diverged_at,
        "final_loss": final if math.isfinite(final) else None,
        "frac_unstable": float(np.mean(a.phase != 0)),
        "heights": [s.height for s in a.spikes],
    }


def summarize(results: list[dict]) -> list[dict]:
    """Group results over seeds: one row per configuration without the seed."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        c = dict(r["config"])
        c.pop("seed"), c.pop("name")
        groups[tuple(sorted(c.items()))].append(r)
    rows = []
    for key, rs in groups.items():
        c = dict(key)
        finals = [r["final_loss"] for r in rs if r["final_loss"] is not None]
        rows.append({
            **c,
            "runs": len(rs),
            "frac_spiking": float(np.mean([r["n_spikes"] > 0 for r in rs])),
            "mean_spikes": float(np.mean([r["n_spikes"] for r in rs])),
            "frac_diverged": float(np.mean([r["diverged_at"] is not None for r in rs])),
            "median_final_loss": float(np.median(finals)) if finals else None,
            "median_height": float(np.median(sum((r["heights"] for r in rs), [])))
            if any(r["heights"] for r in rs) else None,
        })  # fmt: skip
    return rows


def _table(rows: list[dict]) -> str:
    cols = ("problem", "optimizer", "lr", "width", "label_noise", "batch_size", "warmup",
            "frac_spiking", "mean_spikes", "frac_diverged", "median_final_loss", "median_height")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append("full" if (c == "batch_size" and v is None)
                         else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--stage {1,2} --seeds N --steps T --out FILE --workers W``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    grid = search_grid(args.stage, args.seeds, args.steps)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as ex:
        results = []
        for i, r in enumerate(ex.map(run_one, grid, chunksize=4)):
            results.append(r)
            if (i + 1) % 20 == 0:
                print(f"{i + 1}/{len(grid)} runs, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
    rows = summarize(results)
    print(_table(rows))
    print(f"\n{len(grid)} runs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The two-layer problems of the reproduction: data, models, losses and the training loop.

Everything here is plain torch (no kappa_gpu): it is shared by the regime search
(:mod:`kappa_gpu.experiments._search`) and the instrumented sweep
(:mod:`kappa_gpu.experiments.reproduce`), so both train exactly the same runs.

Models are float64: the Hessian-vector products and the dense eigen-decompositions of the
update Jacobian are compared against each other, and float32 rounding would blur eigenvector
condition numbers in the 1e4 .. 1e8 range that matter here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "RunConfig",
    "Problem",
    "make_problem",
    "make_optimizer",
    "batches",
    "lr_at",
    "mse",
    "cross_entropy",
    "n_params_of",
    "train",
]


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, written out: ``F.mse_loss`` has no forward-mode rule in torch 2.13,
    so operators built with ``hvp="forward"`` would fall back to rebuilding the graph for every
    product (the default reverse mode takes either)."""
    return ((out - target) ** 2).mean()


def cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch (integer class targets)."""
    return F.cross_entropy(out, target)


@dataclass(frozen=True)
class RunConfig:
    """One training run of the sweep.

    Attributes:
        problem: ``"teacher"`` (teacher-student regression, MSE) or ``"blobs"`` (3-class
            Gaussian-mixture classification, cross-entropy).
        optimizer: ``"sgd-momentum"`` (heavy ball, momentum 0.9) or ``"adam"``
            (betas (0.9, 0.999), eps 1e-8).
        lr: peak learning rate.
        seed: data, initialization and mini-batch order.
        width: hidden width of the two-layer student.
        label_noise: regression: std of Gaussian noise added to the teacher's targets
            (relative to their std); classification: fraction of labels flipped at random.
        batch_size: ``None`` for full batch, else the mini-batch size (reshuffled each epoch).
        warmup: linear learning-rate warm-up steps (0 for none).
        steps: optimizer steps.
        n_samples: training set size.
        d_in: input dimension.
    """

    problem: str
    optimizer: str
    lr: float
    seed: int = 0
    width: int = 16
    label_noise: float = 0.0
    batch_size: int | None = None
    warmup: int = 0
    steps: int = 1000
    n_samples: int = 256
    d_in: int = 8

    @property
    def name(self) -> str:
        """A short, file-name-safe identifier."""
        bs = "full" if self.batch_size is None else f"mb{self.batch_size}"
        return (
            f"{self.problem}_{self.optimizer}_lr{self.lr:g}_w{self.width}_n{self.label_noise:g}"
            f"_{bs}_wu{self.warmup}_s{self.seed}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-safe dict, plus ``name``."""
        d = asdict(self)
        d["name"] = self.name
        return d


@dataclass
class Problem:
    """A model, its loss and the full training set (inputs, targets)."""

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    X: torch.Tensor
    y: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)


def _teacher_student(cfg: RunConfig, g: torch.Generator) -> Problem:
    """A 2-layer tanh student fits a random 2-layer tanh teacher (width 8), targets normalized
    to unit std, then Gaussian noise of std ``label_noise`` added."""
    X = torch.randn(cfg.n_samples, cfg.d_in, generator=g, dtype=torch.float64)
    W1 = torch.randn(cfg.d_in, 8, generator=g, dtype=torch.float64) / math.sqrt(cfg.d_in)
    w2 = torch.randn(8, 1, generator=g, dtype=torch.float64)
    y = torch.tanh(2.0 * X @ W1) @ w2
    y = (y - y.mean()) / y.std()
    if cfg.label_noise > 0:
        y = y + cfg.label_noise * torch.randn(y.shape, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(cfg.d_in, cfg.width), nn.Tanh(), nn.Linear(cfg.width, 1))
    return Problem(model, mse, X, y)


def _blobs(cfg: RunConfig, g: torch.Generator, n_classes: int = 3) -> Problem:
    """3 Gaussian clusters per class (9 in all) in ``d_in`` dimensions, a fraction
    ``label_noise`` of labels replaced by random ones; 2-layer tanh classifier."""
    centers = 1.5 * torch.randn(3 * n_classes, cfg.d_in, generator=g, dtype=torch.float64)
    cluster = torch.randint(0, 3 * n_classes, (cfg.n_samples,), generator=g)
    X = centers[cluster] + torch.randn(cfg.n_samples, cfg.d_in, generator=g, dtype=torch.float64)
    y = cluster % n_classes
    if cfg.label_noise > 0:
        flip = torch.rand(cfg.n_samples, generator=g, dtype=torch.float64) < cfg.label_noise
        y = torch.where(flip, torch.randint(0, n_classes, (cfg.n_samples,), generator=g), y)
    model = nn.Sequential(
        nn.Linear(cfg.d_in, cfg.width), nn.Tanh(), nn.Linear(cfg.width, n_classes)
    )
    return Problem(model, cross_entropy, X, y)


def make_problem(cfg: RunConfig) -> Problem:
    """Build the data and the (float64) model of ``cfg``, deterministically from ``cfg.seed``.

    The data seed and the initialization seed are both derived from ``cfg.seed``; the global
    torch RNG is not touched (the model is initialized under a forked RNG).
    """
    g = torch.Generator().manual_seed(10_007 * cfg.seed + 17)
    builders = {"teacher": _teacher_student, "blobs": _blobs}
    if cfg.problem not in builders:
        raise ValueError(f"problem must be one of {sorted(builders)}, got {cfg.problem!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        prob = builders[cfg.problem](cfg, g)
    prob.model.double()
    return prob


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Heavy-ball SGD (momentum 0.9) or Adam (betas (0.9, 0.999), eps 1e-8) at ``cfg.lr``."""
    if cfg.optimizer == "sgd-momentum":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    raise ValueError(f"optimizer must be 'sgd-momentum' or 'adam', got {cfg.optimizer!r}")


def lr_at(cfg: RunConfig, step: int) -> float:
    """The learning rate of (1-based) ``step``: linear warm-up over ``cfg.warmup`` steps."""
    if cfg.warmup > 0 and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    return cfg.lr


def batches(cfg: RunConfig, prob: Problem) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The mini-batches of the run, forever: the full set each step, or a reshuffle each
    epoch (seeded by ``cfg.seed``; the last incomplete batch of an epoch is dropped)."""
    n = prob.X.shape[0]
    if cfg.batch_size is None or cfg.batch_size >= n:
        while True:
            yield prob.X, prob.y
    g = torch.Generator().manual_seed(7919 * cfg.seed + 3)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            yield prob.X[idx], prob.y[idx]


def n_params_of(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(
    cfg: RunConfig,
    prob: Problem | None = None,
    *,
    hook: Callable[[int, float, Problem, torch.optim.Optimizer], bool] | None = None,
    diverge_factor: float = 100.0,
) -> list[float]:
    """Train ``cfg`` and return the full-batch training loss per step.

    ``loss[t]`` is measured at the parameters after ``t`` steps (``loss[0]`` at
    initialization). Training stops early once the loss is non-finite or above
    ``diverge_factor * loss[0]`` (that last value is kept, so the run reads as diverged).

    Args:
        cfg: the run.
        prob: a prebuilt :func:`make_problem` (default: built from ``cfg``).
        hook: called as ``hook(t, loss[t], prob, optimizer)`` after each loss measurement
            ``t >= 1`` that does not stop training, with the optimizer's learning rate already
            set to the one of the coming step ``t + 1``; it must leave model and optimizer as it
            found them (``kappa_gpu.estimate`` does) and return True when it did any work.
        diverge_factor: the divergence threshold (as in :class:`SpikeRule`).

    Returns:
        The loss curve, ``len <= cfg.steps + 1``. Cost: one forward/backward per step, plus a
        full-batch forward per step for mini-batch runs.
    """
    prob = prob or make_problem(cfg)
    opt = make_optimizer(cfg, prob.model)
    it = batches(cfg, prob)
    full = cfg.batch_size is None or cfg.batch_size >= prob.X.shape[0]
    losses: list[float] = []

    def full_loss() -> float:
        with torch.no_grad():
            return float(prob.loss_fn(prob.model(prob.X), prob.y))

    for step in range(1, cfg.steps + 2):
        last = step == cfg.steps + 1
        loss = None
        if full and not last:
            xb, yb = next(it)
            loss = prob.loss_fn(prob.model(xb), yb)  # = the full-batch loss at theta_{step-1}
            losses.append(float(loss.detach()))
        else:
            losses.append(full_loss())
        L = losses[-1]
        if step > 1 and (not math.isfinite(L) or L > diverge_factor * losses[0]):
            break
        if last:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        if hook is not None and step > 1:
            fired = hook(step - 1, L, prob, opt)
            if fired and loss is not None:
                # rebuild the graph: the hook ran its own autograd passes in between
                loss = prob.loss_fn(prob.model(xb), yb)
        if loss is None:
            xb, yb = next(it)
            loss = prob.loss_fn(prob.model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return losses

"""``KappaMonitor``: :func:`kappa_gpu.estimate` inside a training job, cheap and harmless.

Usage in a plain loop (call ``step`` *after* ``optimizer.step()``)::

    monitor = KappaMonitor(model, optimizer, loss_fn, every=100, log_dir="runs/kappa")
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        record = monitor.step((inputs, targets), loss=loss)   # None on most steps
    monitor.close()
    print(monitor.overhead())

What the monitor guarantees:

* **Non-interference.** An estimate leaves the model's parameters, ``.grad``, buffers, the
  optimizer state, the train/eval mode and the global RNG state bitwise as they were
  (:func:`kappa_gpu.estimate` guarantees it for the operator; the monitor's own loss evaluation
  runs with cloned buffers under :func:`torch.random.fork_rng`, and the eigen-solver always gets
  the monitor's private :class:`torch.Generator`). A run with the monitor and the same run
  without it end bitwise equal.
* **Failure isolation.** Any exception inside the monitor (out of memory, a non-finite loss, a
  solver or operator error, an I/O error) is caught; the first failure of each exception type is
  logged at WARNING level on the ``"kappa_gpu"`` logger with its reason (later ones of the same
  type at DEBUG level), counted in :attr:`KappaMonitor.failures`, and returned as a record with
  ``status="error"`` and ``error="<Type>: <message>"``; training continues. After a failure the
  next estimate starts cold (no warm start). ``strict=True`` re-raises instead (for debugging).
  Non-convergence is not an exception: the record has ``status="unconverged"`` and the
  estimator's message. A due step at which every group's lr is 0 (the last step of a
  linear-decay schedule) is skipped with one INFO log line: the update moves nothing.
* **Warm start.** Each estimate starts the eigen-solver from the previous successful estimate's
  Ritz vectors (``warm_start=previous_report``).
* **DistributedDataParallel.** With a DDP-wrapped model (``torch.distributed`` initialized,
  more than one rank) every rank takes part in each estimate (it is a collective: gradients and
  HVPs are averaged over the ranks, see ``docs/multi_gpu.md``), so call :meth:`KappaMonitor.step`
  on every rank, each with its own batch. Before each estimate the ranks agree (one tiny
  collective): if preparing it failed on one rank, every rank records the failure instead of
  entering the estimate; the budget's ``maxiter`` is rank 0's, and the recorded loss is the mean
  over the ranks. Every rank gets the same record; only the group's rank 0 writes the files and
  TensorBoard scalars and logs (``rank_zero_only=True``, the default), while ``on_warning`` runs
  on every rank (so a reaction such as lowering the learning rate stays in sync). To estimate on
  rank 0's batch alone instead, pass ``model.module``.
* **Cost accounting.** ``seconds`` between consecutive :meth:`KappaMonitor.step` calls (minus
  the monitor's own time) count as training time; the monitor's own time inside ``step`` as
  monitor time. :meth:`KappaMonitor.overhead` gives the ratio. On CUDA the device is
  synchronized before an estimate, so that queued training kernels count as training time.

Early warning (the rule, thresholds in :class:`WarningRules`). A successful estimate raises one
:class:`KappaWarning` per rule that fires:

1. ``"kappa_jump"``: ``kappa_V > kappa_factor * baseline``, where ``baseline`` is the median
   ``kappa_V`` of the last ``window`` successful records before this one (at least
   ``min_history`` of them); or ``kappa_V > kappa_max`` when ``kappa_max`` is set.
   (The paper reports kappa(V) an order of magnitude apart between stable and unstable
   phases; our reproduction measured a factor 1.3-1.6: docs/reproduce.md.)
2. ``"near_ep"``: a mode within ``ep_margin`` (relative, in curvature) of an exceptional point
   of a kind in ``ep_which`` (default only the ``"upper"`` EP, the one just below the stability
   edge; the lower EP sits in the flat bulk and fires constantly): ``|ep_ratio| <= ep_margin``.
3. ``"stability_edge"``: a positive-curvature mode whose eigenvalues are real and past the upper
   EP (or that has no EP: plain SGD) with ``stability_margin = 1 - max|z| < edge_margin``, or
   any positive-curvature mode with a negative margin (unstable). Negative-curvature modes
   (``s < 0``, real ``z > 1``) are not edge-of-stability events and never fire this rule.

Warnings are :class:`KappaWarning` dataclasses (not Python ``warnings``): they are appended to
the record's ``warnings``, logged at WARNING level on the ``"kappa_gpu"`` logger, passed to
``on_warning(warning)``, and written with the record.

Overhead cap (``max_overhead``). With ``max_overhead=f`` a due estimate is skipped (no record;
counted in :attr:`MonitorOverhead.n_skipped`, logged once at INFO level) when running it would
take the monitor's time above ``f`` times the training time so far, its cost predicted by the
mean wall time of the estimates so far: ``monitor_seconds + mean_estimate > f *
train_seconds``. The first estimate always runs (it measures the cost; the ratio may exceed
``f`` until training has paid it back), and ``force=True`` always estimates. After that no
estimate takes the ratio above ``f`` (up to the prediction's error): estimates come every
``every`` steps while that fits and at the next due step after training has caught up
otherwise, a fixed price for an early warning that arrives less often. Not with a DDP model
(every rank must enter every estimate, and the ranks' clocks differ): raise ``every`` there.

Budget (``budget_s``). The estimator has no time hook, so the cap is enforced through the
solver's ``maxiter`` (its maximum number of restarts): the seconds per HVP measured on the
previous successful estimate (its ``seconds / n_hvp``, overheads included: conservative) or,
before the first one, ``hvp_cost_factor`` times the last measured training step, give an HVP
allowance ``budget_s / seconds_per_hvp``; with ``ncv`` basis vectors and ``2 k`` certificate
HVPs per side, ``maxiter = (allowance - sides * (ncv + 2 k)) // (sides * (ncv - k))``
(at least 1). The estimator then returns its best result so far with per-mode converged flags
(its Ritz pairs are certified by true residuals either way). A record is flagged
``budget_limited=True`` when the cap was applied and the estimate did not converge, or when it
took longer than ``budget_s`` anyway (the first restart cannot be cut short).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import csv
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kappa_gpu._distributed import agree_before_estimate, model_communicator
from kappa_gpu._report import KappaReport, _jsonable

__all__ = [
    "KappaMonitor",
    "MonitorRecord",
    "KappaWarning",
    "WarningRules",
    "MonitorOverhead",
    "unwrap_model",
]

logger = logging.getLogger("kappa_gpu")

#: Set once per process when TensorBoard output was asked for but is not installed.
_TB_MISSING_WARNED = False

_STATUSES = ("ok", "unconverged", "error")


@dataclass
class KappaWarning:
    """An early warning raised by :class:`KappaMonitor` (a record, not a Python warning).

    Attributes:
        step: the training step of the estimate that raised it.
        rule: ``"kappa_jump"``, ``"near_ep"`` or ``"stability_edge"`` (see the module docs).
        value: the quantity the rule tested (kappa_V, |ep_ratio| or the stability margin).
        threshold: the threshold it crossed.
        message: one human-readable line.
        converged: whether the estimate behind it had all eigenvalues converged (an unconverged
            estimate's numbers are estimates themselves).
    """

    step: int
    rule: str
    value: float
    threshold: float
    message: str
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class WarningRules:
    """Thresholds of the early-warning rule (module docs of :mod:`kappa_gpu._monitor`).

    Attributes:
        kappa_factor: ``kappa_jump`` fires when kappa_V exceeds this multiple of the baseline.
        window: number of previous successful records whose median kappa_V is the baseline.
        min_history: no ``kappa_jump`` before this many previous successful records.
        kappa_max: optional absolute ceiling on kappa_V (``None``: off).
        ep_margin: ``near_ep`` fires when a mode's ``|ep_ratio| <= ep_margin``.
        ep_which: which exceptional points count (``"upper"``, ``"lower"``).
        edge_margin: ``stability_edge`` fires when a sharp real mode whose largest root heads
            to z = -1 has its margin below this (a flat mode near z = +1 does not), or when
            any mode has |z| > 1.
        enabled: set False to switch all rules off.
    """

    kappa_factor: float = 5.0
    window: int = 5
    min_history: int = 3
    kappa_max: float | None = None
    ep_margin: float = 0.05
    ep_which: tuple[str, ...] = ("upper",)
    edge_margin: float = 0.02
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.kappa_factor > 1:
            raise ValueError(f"kappa_factor must be > 1, got {self.kappa_factor}")
        if self.window < 1 or self.min_history < 1:
            raise ValueError(
                f"window and min_history must be >= 1, got {self.window}, {self.min_history}"
            )
        if self.ep_margin < 0 or self.edge_margin < 0:
            raise ValueError("ep_margin and edge_margin must be >= 0")
        bad = set(self.ep_which) - {"upper", "lower"}
        if bad:
            raise ValueError(f"ep_which entries must be 'upper' or 'lower', got {sorted(bad)}")
        self.ep_which = tuple(self.ep_which)


@dataclass
class MonitorRecord:
    """One estimate of the monitor (successful or not).

    Attributes:
        step: the training step (optimizer steps taken) at which it was made.
        time: Unix time at the end of the estimate.
        status: ``"ok"``, ``"unconverged"`` (estimate returned, not all eigenvalues converged)
            or ``"error"`` (an exception was caught; ``error`` says which).
        error: ``"<ExceptionType>: <message>"`` for ``status="error"``, else ``None``.
        loss: the loss at this step (given to :meth:`KappaMonitor.step` or evaluated on the
            batch), ``nan`` if unknown.
        rho: spectral radius of the computed modes.
        kappa_V: eigenvector condition number of the computed modes (native coordinates).
        nearest_ep_ratio: signed relative distance of the mode nearest to an exceptional point.
        min_stability_margin: min over modes of ``1 - max|z|``.
        transient_growth: max_t ||T^t|| on the computed invariant subspace.
        normalized_growth: max_t ||(T / rho)^t||: the growth the spectral radius does not
            explain.
        kreiss_lower: a lower bound of the Kreiss constant.
        converged: whether every eigenvalue converged.
        n_hvp: Hessian-vector products spent; seconds: wall time of the estimate.
        monitor_seconds: all monitor time of this step (loss evaluation and output included).
        warm_started: whether the estimate was started from the previous one's Ritz vectors.
        budget_limited: see the module docs (``budget_s``); maxiter: the maxiter passed (or
            ``None``: the estimator's default).
        kappa_baseline: the rolling baseline the ``kappa_jump`` rule compared with (or nan).
        overhead: cumulative monitor seconds / training seconds at this record.
        method: the estimator's method; message: its status line (or the error's reason).
        warnings: the :class:`KappaWarning` s raised by this record.
        report: the full :class:`~kappa_gpu.KappaReport` (without its warm-start vectors), or
            ``None`` on error; serialized only with ``full_report=True``.
    """

    step: int
    time: float
    status: str
    error: str | None = None
    loss: float = float("nan")
    rho: float = float("nan")
    kappa_V: float = float("nan")
    nearest_ep_ratio: float = float("nan")
    min_stability_margin: float = float("nan")
    transient_growth: float = float("nan")
    normalized_growth: float = float("nan")
    kreiss_lower: float = float("nan")
    converged: bool = False
    n_hvp: int = 0
    seconds: float = 0.0
    monitor_seconds: float = 0.0
    warm_started: bool = False
    budget_limited: bool = False
    maxiter: int | None = None
    kappa_baseline: float = float("nan")
    overhead: float = float("nan")
    method: str = ""
    message: str = ""
    warnings: list[KappaWarning] = field(default_factory=list)
    report: KappaReport | None = field(default=None, repr=False)

    #: The scalar fields, in CSV column order.
    SCALARS = (
        "step", "time", "status", "error", "loss", "rho", "kappa_V", "nearest_ep_ratio",
        "min_stability_margin", "transient_growth", "normalized_growth", "kreiss_lower",
        "converged", "n_hvp",
        "seconds", "monitor_seconds", "warm_started", "budget_limited", "maxiter",
        "kappa_baseline", "overhead", "method", "message",
    )  # fmt: skip

    @property
    def ok(self) -> bool:
        """True unless an exception was caught."""
        return self.status != "error"

    def to_dict(self, full_report: bool = False) -> dict[str, Any]:
        """A JSON-safe dict (non-finite floats as strings, as :meth:`KappaReport.to_dict`)."""
        out = {k: _jsonable(getattr(self, k)) for k in self.SCALARS}
        out["warnings"] = [w.to_dict() for w in self.warnings]
        if full_report and self.report is not None:
            out["report"] = self.report.to_dict()
        return out

    def scalars(self) -> dict[str, float]:
        """The numeric fields as floats (for loggers: TensorBoard, Lightning, HF)."""
        keys = (
            "rho", "kappa_V", "nearest_ep_ratio", "min_stability_margin", "transient_growth",
            "normalized_growth", "kreiss_lower", "n_hvp", "seconds", "overhead", "loss",
        )  # fmt: skip
        out = {k: float(getattr(self, k)) for k in keys}
        out["converged"] = float(self.converged)
        out["error"] = float(self.status == "error")
        out["warnings"] = float(len(self.warnings))
        out["budget_limited"] = float(self.budget_limited)
        return out


@dataclass
class MonitorOverhead:
    """What the monitor cost relative to training (:meth:`KappaMonitor.overhead`).

    Attributes:
        monitor_seconds: total time spent inside :meth:`KappaMonitor.step`.
        train_seconds: total time between ``step`` calls (and from construction to the first).
        ratio: ``monitor_seconds / train_seconds`` (nan before any training time).
        n_steps, n_estimates, n_failures: counts.
        n_hvp: HVPs spent by all estimates.
        mean_estimate_seconds: mean wall time of one estimate (nan if none).
        n_skipped: due estimates skipped to stay under ``max_overhead``.
    """

    monitor_seconds: float
    train_seconds: float
    ratio: float
    n_steps: int
    n_estimates: int
    n_failures: int
    n_hvp: int
    mean_estimate_seconds: float
    n_skipped: int = 0

    def __str__(self) -> str:
        skipped = f", {self.n_skipped} skipped (max_overhead)" if self.n_skipped else ""
        return (
            f"kappa_gpu monitor overhead: {100 * self.ratio:.2f}% ({self.monitor_seconds:.2f} s "
            f"monitor / {self.train_seconds:.2f} s training; {self.n_estimates} estimates over "
            f"{self.n_steps} steps{skipped}, {self.n_failures} caught exception(s) (estimates, "
            f"callbacks, writers), {self.n_hvp} HVPs, "
            f"{self.mean_estimate_seconds:.3f} s per estimate)"
        )


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a nested batch to ``device`` (non-tensors as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        items = [_to_device(o, device) for o in obj]
        if hasattr(obj, "_fields"):  # a namedtuple (PackedSequence too): keep its type
            return type(obj)(*items)
        return tuple(items)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping's type and state (defaultdict's factory)
        for k, v in obj.items():
            out[k] = _to_device(v, device)
        return out
    return obj


def check_monitor_kwargs(owner: str, **kwargs: Any) -> None:
    """A TypeError naming ``owner`` when ``kwargs`` are not :class:`KappaMonitor` keywords (a
    callback builds its monitor at the first training step: a misspelt option would otherwise
    fail there, inside ``fit`` / ``train``)."""
    import inspect

    if kwargs.get("estimator") is not None:
        return  # a custom estimator takes what it takes
    own = {"model", "optimizer", "loss_fn", "estimate_kwargs"}
    mon = [k for k in inspect.signature(KappaMonitor).parameters if k not in own]
    # generator is the monitor's own (reserved); the rest go on to estimate
    est = sorted(_estimate_options() - set(mon) - {"generator"})
    unknown = [k for k in kwargs if k not in mon and k not in est]
    if unknown:
        raise TypeError(
            f"{owner}: unknown KappaMonitor option(s) {unknown}; monitor options: "
            f"{', '.join(mon)}; estimator options: {', '.join(est)}"
        )
    from kappa_gpu.operators._update import _clip_spec

    try:  # values the monitor would refuse at the first training step
        _clip_spec(kwargs.get("clip_grad_norm"), kwargs.get("clip_grad_value"))
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from None


def trainer_clipping(
    owner: str, where: str, value: Any, algorithm: Any, monitor_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The clip options a callback passes on for a trainer that clips gradients.

    ``where``: the trainer's setting (``"max_grad_norm"``), ``value`` its threshold (0/None:
    no clipping), ``algorithm`` ``"norm"`` or ``"value"``. Options the user passed
    (``clip_grad_norm`` / ``clip_grad_value``, even None) win. Logs once what is modelled.
    """
    if "clip_grad_norm" in monitor_kwargs or "clip_grad_value" in monitor_kwargs:
        return {}
    try:
        clip = float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return {}
    if not clip > 0 or not math.isfinite(clip):
        return {}
    kind = str(getattr(algorithm, "value", algorithm) or "norm").lower()
    key = "clip_grad_value" if kind == "value" else "clip_grad_norm"
    logger.info(
        "%s: %s=%g: the trainer clips gradients by %s, and J is the clipped step's Jacobian "
        "(%s=%g). Where the clip is active the estimate takes the arnoldi path; pass %s=None "
        "to analyse the unclipped step instead", owner, where, clip,
        "value" if key == "clip_grad_value" else "norm", key, clip, key,
    )
    return {key: clip}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside ``DistributedDataParallel``/``DataParallel``/``torch.compile``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
    return model


def _distributed_rank() -> int:
    """This process's rank, 0 when ``torch.distributed`` is not in use."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def _as_float(x: Any) -> float:
    if x is None:
        return float("nan")
    if isinstance(x, torch.Tensor):  # float64: a float64 model's loss keeps its digits
        return float(x.detach().double().mean().item())
    return float(x)


def _estimate_options() -> set[str]:
    """The keyword arguments of :func:`kappa_gpu.estimate` a monitor may pass on."""
    import inspect

    from kappa_gpu._estimate import estimate

    return set(inspect.signature(estimate).parameters) - {"model", "optimizer", "loss_fn",
                                                          "batch"}


def _check_estimate_arguments(method: str, modes: str, kwargs: dict[str, Any]) -> None:
    """What :func:`kappa_gpu.estimate` would reject, rejected when the monitor is built."""
    from kappa_gpu._estimate import check_arguments

    check_arguments(method, modes, kwargs.get("tol"))
    from kappa_gpu.operators._update import _clip_spec

    _clip_spec(kwargs.get("clip_grad_norm"), kwargs.get("clip_grad_value"))
    known = _estimate_options()
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"unknown estimate argument(s) {unknown}; KappaMonitor passes its extra keyword "
            f"arguments to kappa_gpu.estimate, which takes {sorted(known)}"
        )


class KappaMonitor:
    """Runs :func:`kappa_gpu.estimate` every ``every`` optimizer steps of a training loop.

    See the module docs for the guarantees (non-interference, failure isolation, warm start),
    the early-warning rule and the budget.

    Args:
        model: the model being trained (in the train/eval mode of the training step). A
            ``DistributedDataParallel`` model (initialized process group of more than one rank)
            is estimated collectively on every rank (module docs). A ``DataParallel`` wrapper
            or a ``torch.compile`` module is unwrapped (:func:`unwrap_model`): the estimate
            runs the plain module on one process, without recompiling under ``torch.func``.
        optimizer: its ``torch.optim.SGD`` / ``Adam`` / ``AdamW``.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar, as for ``estimate``.
        every: estimate at every step that is a multiple of ``every`` (and ``>= warmup``).
        k: curvature modes per estimate.
        method: passed to ``estimate`` (``"auto"``, ``"structured"``, ``"arnoldi"``).
        modes: passed to ``estimate`` (``"sharp"``, ``"negative"``, ``"both"``).
        budget_s: cap on the seconds of one estimate (see the module docs); ``None``: no cap.
        max_overhead: cap on the monitor's time as a fraction of the training time (e.g.
            ``0.05``): due estimates that would exceed it are skipped (module docs). ``None``:
            every due estimate runs. Not with a DDP model.
        warmup: no estimate before this step (the first steps are a transient; the optimizer
            needs state). Default 1.
        log_dir: directory for ``kappa_monitor.jsonl`` (one record per estimate, appended and
            flushed), ``kappa_monitor.csv`` (``csv=True``) and TensorBoard scalars. ``None``:
            records are only kept in memory (:attr:`records`).
        csv: also write a CSV of the scalar fields (needs ``log_dir``).
        tensorboard: ``True``/``False``, a ``SummaryWriter`` to write to, or ``None`` (default:
            on when ``log_dir`` is set). Uses ``torch.utils.tensorboard`` (extra
            ``kappa-gpu[tensorboard]``); when it is missing, a warning is logged once and
            TensorBoard output is skipped.
        on_warning: called with each :class:`KappaWarning`; exceptions it raises are isolated
            like the monitor's own (``strict=True`` re-raises).
        rules: the :class:`WarningRules` (thresholds).
        strict: re-raise exceptions instead of isolating them (debugging).
        estimator: the function called as ``estimator(model, optimizer, loss_fn, batch, k,
            method=..., modes=..., warm_start=..., generator=..., **estimate_kwargs)``;
            default :func:`kappa_gpu.estimate` (looked up at call time). A hook for tests and
            for custom estimators.
        compute_loss: when :meth:`step` gets no ``loss``, evaluate ``loss_fn`` on the batch
            (one forward pass, buffers cloned, RNG forked) so the record has one.
        hvp_cost_factor: seconds of one HVP in units of one training step, used for the budget
            before the first estimate has measured it.
        full_report: also write the full report of each estimate to the JSONL file.
        max_records: records kept in memory (oldest dropped first).
        seed: seed of the monitor's private generator for the solver's start vectors.
        warm_start: start each estimate from the previous one's Ritz vectors (set False to
            measure what the warm start saves).
        rank_zero_only: when ``torch.distributed`` is initialized, only the process of rank 0
            estimates; elsewhere :meth:`step` returns ``None`` at once (:attr:`active`). With a
            DDP model every rank estimates (a collective) and this means: only the process
            group's rank 0 writes files and TensorBoard scalars and logs.
        **estimate_kwargs: passed to the estimator (``variant``, ``tol``, ``ncv``, ``maxiter``,
            ``horizon``, ``dtype``, ``seed``...).

    Attributes:
        records: the records of the estimates (a deque of at most ``max_records``).
        warnings: every :class:`KappaWarning` raised.
        failures: ``Counter`` of caught exceptions by type name.
        last_report: the last successful :class:`KappaReport` (the next warm start).
        active: False on non-zero ranks with ``rank_zero_only`` (the monitor does nothing);
            always True with a DDP model (every rank takes part in the estimates).
        writes: whether this process writes the files/TensorBoard scalars and logs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        every: int = 100,
        k: int = 8,
        method: str = "auto",
        modes: str = "sharp",
        budget_s: float | None = None,
        max_overhead: float | None = None,
        warmup: int = 1,
        log_dir: str | os.PathLike | None = None,
        csv: bool = False,
        tensorboard: Any = None,
        on_warning: Callable[[KappaWarning], Any] | None = None,
        rules: WarningRules | None = None,
        strict: bool = False,
        estimator: Callable[..., KappaReport] | None = None,
        compute_loss: bool = True,
        hvp_cost_factor: float = 2.0,
        full_report: bool = False,
        max_records: int = 10_000,
        seed: int = 0,
        rank_zero_only: bool = True,
        warm_start: bool = True,
        **estimate_kwargs: Any,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # DDP with a process group of > 1 rank: estimates are collectives over that group, run
        # on the wrapper (estimate unwraps it itself); None otherwise
        self._comm = model_communicator(model)
        self._estimate_model = model
        model = unwrap_model(model)
        if self._comm is None:
            self._estimate_model = model
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model(inputs), targets)")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s must be > 0 seconds (or None for no cap), got {budget_s}")
        if max_overhead is not None and (
            isinstance(max_overhead, (bool, np.bool_))
            or not isinstance(max_overhead, (int, float, np.number))
            or not 0 < max_overhead < math.inf
        ):
            raise ValueError(
                f"max_overhead must be a fraction > 0 of the training time (e.g. 0.05), or None "
                f"for no cap; got {max_overhead}"
            )
        if max_overhead is not None and self._comm is not None:
            raise ValueError(
                "max_overhead is not available with a DistributedDataParallel model: every rank "
                "must enter every estimate, and the ranks' timings differ; raise `every` instead"
            )
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if csv and log_dir is None:
            raise ValueError("csv=True needs a log_dir to write kappa_monitor.csv into")
        reserved = {"generator", "method", "modes", "k"} & set(estimate_kwargs)
        if reserved:
            raise TypeError(
                f"{sorted(reserved)} are set by the monitor; pass k/method/modes "
                "as KappaMonitor arguments"
            )
        if tensorboard is True and log_dir is None:
            raise ValueError("tensorboard=True needs a log_dir (or pass a SummaryWriter)")
        if estimator is None:
            # Checked here, not at the first due estimate (an error record hundreds of steps in)
            _check_estimate_arguments(method, modes, estimate_kwargs)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.every = every
        self.k = k
        self.method = method
        self.modes = modes
        self.budget_s = budget_s
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.warmup = int(warmup)
        self.on_warning = on_warning
        self.rules = rules if rules is not None else WarningRules()
        self.strict = bool(strict)
        self.estimator = estimator
        self.compute_loss = bool(compute_loss)
        self.hvp_cost_factor = float(hvp_cost_factor)
        self.full_report = bool(full_report)
        self.seed = int(seed)
        self.estimate_kwargs = dict(estimate_kwargs)
        self.warm_start = bool(warm_start)
        if self._comm is not None:
            self.active = True  # every rank must enter every estimate
            self.writes = not rank_zero_only or self._comm.rank == 0
        else:
            self.active = not (rank_zero_only and _distributed_rank() != 0)
            self.writes = self.active

        self.records: collections.deque[MonitorRecord] = collections.deque(maxlen=max_records)
        self.warnings: list[KappaWarning] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.last_report: KappaReport | None = None

        self._step = 0
        self._n_estimates = 0
        self._n_skipped = 0  # due estimates skipped by max_overhead
        self._n_hvp = 0
        self._estimate_seconds = 0.0
        self._monitor_seconds = 0.0
        self._train_seconds = 0.0
        self._last_train_step: float | None = None  # seconds of the last training step
        self._exit = time.perf_counter()  # the clock of training time starts here
        self._generators: dict[torch.device, torch.Generator] = {}
        self._logged_failure_types: set[str] = set()
        self._lr_zero_logged = False
        self._bad_loss_logged = False
        self._kappa_history: collections.deque[float] = collections.deque(maxlen=self.rules.window)

        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self._jsonl = None
        self._csv_file = None
        self._csv_writer = None
        self._want_csv = bool(csv)
        self._tb: Any = None
        self._tb_owned = False
        self._want_tb = tensorboard if tensorboard is not None else (log_dir is not None)
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)

    # ------------------------------------------------------------------ public API

    @property
    def n_steps(self) -> int:
        """Training steps seen so far (:meth:`step` calls, or the last explicit ``step=``)."""
        return self._step

    @property
    def n_failures(self) -> int:
        """Caught exceptions so far."""
        return int(sum(self.failures.values()))

    def due(self, step: int | None = None) -> bool:
        """Whether an estimate is due at ``step`` (default: the next :meth:`step` call)."""
        s = self._step + 1 if step is None else int(step)
        return s >= self.warmup and s >= 1 and s % self.every == 0

    def step(
        self,
        batch: Any,
        *,
        loss: Any = None,
        step: int | None = None,
        force: bool = False,
    ) -> MonitorRecord | None:
        """Count one training step; estimate when due. Call after ``optimizer.step()``.

        Args:
            batch: ``(inputs, targets)`` (or a list of such pairs) the estimate uses, on any
                device (moved to the model's); or a zero-argument callable returning one,
                called only when an estimate is due.
            loss: this step's training loss (tensor or float), recorded as is; read (one
                device sync) only on estimate steps.
            step: the step number, if the caller counts (e.g. ``trainer.global_step``);
                default: the number of ``step`` calls.
            force: estimate now even if not due.

        Returns:
            The :class:`MonitorRecord` of the estimate, or ``None`` when none was due.
            Never raises unless ``strict=True``.
        """
        if not self.active:
            return None
        step_no = self._step + 1 if step is None else int(step)
        due = force or self.due(step_no)
        if due:
            self._sync()  # kernels the training step queued count as training time
        t_in = time.perf_counter()
        dt = t_in - self._exit
        self._train_seconds += dt
        self._last_train_step = dt
        self._step = step_no
        record = None
        try:
            if due:
                if not force and self._over_cap():
                    self._n_skipped += 1
                elif not force and self._lr_is_zero():
                    pass  # nothing to estimate (a schedule's last step); logged once
                else:
                    record = self._estimate_record(batch, loss)
        finally:
            t_out = time.perf_counter()
            self._monitor_seconds += t_out - t_in
            self._exit = t_out
        if record is not None:
            record.monitor_seconds = t_out - t_in
            record.overhead = self._ratio()
            self._emit(record)
        return record

    def _lr_is_zero(self) -> bool:
        """Every group's lr is 0 (a linear-decay schedule's last step, as Hugging Face's
        Trainer runs it before ``on_step_end``): J moves nothing and estimate would refuse, so
        the due estimate is skipped, with one log line, instead of an error record."""
        try:
            zero = all(float(g["lr"]) == 0.0 for g in self.optimizer.param_groups)
        except (KeyError, TypeError, ValueError, RuntimeError):
            return False
        if zero and not self._lr_zero_logged:
            self._lr_zero_logged = True
            logger.info("kappa_gpu monitor: lr is 0 in every parameter group at step %d; "
                        "skipping the due estimate (nothing to estimate)", self._step)
        return zero

    def overhead(self) -> MonitorOverhead:
        """Monitor time relative to training time so far."""
        return MonitorOverhead(
            monitor_seconds=self._monitor_seconds,
            train_seconds=self._train_seconds,
            ratio=self._ratio(),
            n_steps=self._step,
            n_estimates=self._n_estimates,
            n_failures=self.n_failures,
            n_hvp=self._n_hvp,
            mean_estimate_seconds=(
                self._estimate_seconds / self._n_estimates if self._n_estimates else float("nan")
            ),
            n_skipped=self._n_skipped,
        )

    def close(self) -> None:
        """Flush and close the output files and the TensorBoard writer the monitor opened."""
        for f in (self._jsonl, self._csv_file):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
        self._jsonl = self._csv_file = self._csv_writer = None
        if self._tb is not None and self._tb_owned:
            with contextlib.suppress(Exception):
                self._tb.close()
        self._tb = None

    def __enter__(self) -> KappaMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _sync(self) -> None:
        """Wait for the device's queued work (CUDA), so that it is timed as training."""
        try:
            device = self._device()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception:  # a device error surfaces in the estimate, isolated there
            pass

    def _over_cap(self) -> bool:
        """Whether the estimate due now would take the monitor above ``max_overhead``."""
        if self.max_overhead is None or self._n_estimates == 0:
            return False
        expected = self._estimate_seconds / self._n_estimates
        if self._monitor_seconds + expected <= self.max_overhead * self._train_seconds:
            return False
        if self._n_skipped == 0 and self.writes:
            logger.info(
                "kappa_gpu monitor: skipping due estimates while one (%.3g s) would take the "
                "monitor above max_overhead=%g of the training time (now %.3g); they resume when "
                "training has caught up",
                expected, self.max_overhead, self._ratio(),
            )
        return True

    def _ratio(self) -> float:
        return self._monitor_seconds / self._train_seconds if self._train_seconds > 0 else math.nan

    def _device(self) -> torch.device:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                return p.device
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = g
        return g

    def _n_params(self) -> int:
        return sum(
            p.numel() for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad
        )

    def _budget_maxiter(self) -> int | None:
        """The solver ``maxiter`` that keeps one estimate within ``budget_s`` (module docs)."""
        if self.budget_s is None:
            return None
        rep = self.last_report
        if rep is not None and rep.n_hvp > 0 and rep.seconds > 0:
            sec_per_hvp = rep.seconds / rep.n_hvp
        elif self._last_train_step is not None and self._last_train_step > 0:
            sec_per_hvp = self.hvp_cost_factor * self._last_train_step
        else:
            return None
        allowance = self.budget_s / sec_per_hvp
        n = max(self._n_params(), 1)
        k = self.k
        ncv = self.estimate_kwargs.get("ncv") or min(max(2 * k + 1, 20), n)
        sides = 2 if self.modes == "both" else 1
        fixed = sides * (ncv + 2 * k)
        per_restart = sides * max(ncv - k, 1)
        maxiter = max(1, int((allowance - fixed) // per_restart))
        user = self.estimate_kwargs.get("maxiter")
        return min(maxiter, int(user)) if user is not None else maxiter

    def _loss_value(self, batch: Any) -> float:
        """``loss_fn(model(inputs), targets)`` without touching buffers, grads or the RNG."""
        from torch.func import functional_call

        from kappa_gpu.operators._validate import normalize_batches

        pairs = normalize_batches(batch)
        # Buffers are cloned so that BatchNorm's running statistics (and num_batches_tracked)
        # are updated on the clones, not the model; fork_rng restores the RNG after dropout.
        state = dict(self.model.named_parameters())
        state.update({n: b.clone() for n, b in self.model.named_buffers()})
        devices = [d for d in {p.device for p in state.values()} if d.type == "cuda"]
        total = 0.0
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for inputs, targets in pairs:
                out = functional_call(self.model, state, (inputs,))
                total += _as_float(self.loss_fn(out, targets))
        return total / len(pairs)

    def _estimate_record(self, batch: Any, loss: Any) -> MonitorRecord:
        step = self._step
        warm = self.last_report if self.warm_start else None
        maxiter: int | None = None
        t0 = time.perf_counter()
        loss_value = float("nan")  # under DDP: the ranks' mean once agreed (failure records too)
        try:
            device = self._device()
            failed: Exception | None = None
            try:
                if callable(batch) and not isinstance(batch, (tuple, list, torch.Tensor)):
                    batch = batch()
                batch = _to_device(batch, device)
                if device.type == "cuda":  # queued training kernels count as training time
                    torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                try:
                    loss_value = _as_float(loss) if loss is not None else float("nan")
                except (TypeError, ValueError, RuntimeError) as exc:
                    # The record's loss field only: not a reason to lose the estimate.
                    if not self._bad_loss_logged:
                        self._bad_loss_logged = True
                        logger.warning(
                            "KappaMonitor: loss=%.60r is not a number (%s: %s); ignored, the "
                            "record's loss is the monitor's own evaluation", loss,
                            type(exc).__name__, exc)
                    loss = None
                if loss is None and self.compute_loss:
                    loss_value = self._loss_value(batch)
                maxiter = self._budget_maxiter()
            except Exception as exc:
                if self._comm is None:
                    raise
                failed = exc  # raised below on every rank together
            if self._comm is not None:
                # DDP: all ranks enter the collective estimate or none does; one maxiter for all
                loss_value, maxiter = agree_before_estimate(self._comm, failed, loss_value, maxiter)
            # Under DDP every rank decides alike (the mean loss; a NaN one fails in the
            # estimate's gradient check, on every rank together): a local loss=None must not
            # send one rank out of the collective estimate.
            if not math.isfinite(loss_value) and loss is None and self._comm is None:
                from kappa_gpu.operators._validate import NonFiniteError

                raise NonFiniteError(
                    f"the loss on the monitor's batch is {loss_value} at step {step}; "
                    "skipping this estimate"
                )
            kwargs = dict(self.estimate_kwargs)
            if maxiter is not None:
                kwargs["maxiter"] = maxiter
            estimator = self.estimator
            if estimator is None:
                from kappa_gpu._estimate import estimate as estimator
            with torch.profiler.record_function("kappa_gpu.estimate"), torch.enable_grad():
                report = estimator(
                    self._estimate_model,
                    self.optimizer,
                    self.loss_fn,
                    batch,
                    self.k,
                    method=self.method,
                    modes=self.modes,
                    warm_start=warm,
                    generator=self._generator(device),
                    **kwargs,
                )
            seconds = time.perf_counter() - t0
            record = self._record_from_report(step, report, loss_value, seconds, warm, maxiter)
        except Exception as exc:
            if self.strict:
                raise
            record = self._record_failure(step, exc, loss, time.perf_counter() - t0, maxiter,
                                          loss_value)
            oom = isinstance(exc, torch.cuda.OutOfMemoryError)
            del exc  # drop the traceback's frames (and their tensors) before freeing the cache
            if oom and torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._n_estimates += 1
        self._estimate_seconds += record.seconds
        self._n_hvp += record.n_hvp
        self.records.append(record)
        return record

    def _record_from_report(
        self,
        step: int,
        report: KappaReport,
        loss_value: float,
        seconds: float,
        warm: KappaReport | None,
        maxiter: int | None,
    ) -> MonitorRecord:
        converged = bool(report.all_converged)
        kv = float(report.kappa_V)
        rho = float(report.spectral_radius)
        margins = np.asarray(report.stability_margin, dtype=np.float64)
        budget_limited = self.budget_s is not None and (
            (maxiter is not None and not converged) or seconds > self.budget_s
        )
        stored = dataclasses.replace(report, warm_vectors=None)
        record = MonitorRecord(
            step=step,
            time=time.time(),
            status="ok" if converged else "unconverged",
            loss=loss_value,
            rho=rho,
            kappa_V=kv,
            nearest_ep_ratio=float(report.nearest_ep_ratio),
            min_stability_margin=float(np.min(margins)) if margins.size else math.nan,
            transient_growth=float(report.transient_growth),
            normalized_growth=float(getattr(report, "normalized_growth", math.nan)),
            kreiss_lower=float(report.kreiss_lower),
            converged=converged,
            n_hvp=int(report.n_hvp),
            seconds=seconds,
            warm_started=warm is not None and getattr(warm, "warm_vectors", None) is not None,
            budget_limited=bool(budget_limited),
            maxiter=maxiter,
            method=str(report.method),
            message=str(report.message) + self._mode_note(),
            report=stored,
        )
        if math.isnan(rho) or math.isnan(kv):
            # A NaN result is a failure: counted, logged once, never a warm start or baseline.
            record.status = "error"
            record.error = f"NonFiniteResult: rho = {rho}, kappa_V = {kv}"
            self._count_failure(step, "NonFiniteResult", record.error)
            record.message = f"estimate returned NaN numbers; {record.message}"
            self.last_report = None
            return record
        record.kappa_baseline = self._baseline()
        record.warnings = self._check_rules(record, report)
        self._kappa_history.append(kv)
        self.last_report = report
        return record

    def _record_failure(
        self, step: int, exc: BaseException, loss: Any, seconds: float, maxiter: int | None,
        loss_value: float = math.nan,
    ) -> MonitorRecord:
        """``loss_value``: the loss already known (under DDP the ranks' mean, so that every
        rank records the same), else ``loss`` as given."""
        name = type(exc).__name__
        reason = f"{name}: {exc}"
        self._count_failure(step, name, reason)
        # Start the next estimate cold: the warm vectors may be what failed.
        self.last_report = None
        if math.isnan(loss_value):
            try:
                loss_value = _as_float(loss)
            except Exception:  # noqa: BLE001 - the loss itself may be what is broken
                loss_value = math.nan
        return MonitorRecord(
            step=step,
            time=time.time(),
            status="error",
            error=reason,
            loss=loss_value,
            seconds=seconds,
            maxiter=maxiter,
            message=f"estimate failed: {reason}",
        )

    def _count_failure(self, step: int, name: str, reason: str) -> None:
        """Count a failure; log the first of each type at WARNING, later ones at DEBUG."""
        self.failures[name] += 1
        if not self.writes:
            return
        if name not in self._logged_failure_types:
            self._logged_failure_types.add(name)
            logger.warning(
                "kappa_gpu monitor: estimate at step %d failed (%s); training continues, the "
                "record has status='error'. Further %s failures are logged at DEBUG level.",
                step, reason, name,
            )  # fmt: skip
        else:
            logger.debug("kappa_gpu monitor: estimate at step %d failed (%s)", step, reason)

    def _baseline(self) -> float:
        hist = list(self._kappa_history)
        if len(hist) < self.rules.min_history:
            return math.nan
        return float(statistics.median(hist))

    def _check_rules(self, record: MonitorRecord, report: KappaReport) -> list[KappaWarning]:
        r = self.rules
        if not r.enabled:
            return []
        out: list[KappaWarning] = []
        step, conv, kv = record.step, record.converged, record.kappa_V

        def add(rule: str, value: float, threshold: float, message: str) -> None:
            out.append(KappaWarning(step, rule, float(value), float(threshold), message, conv))

        base = record.kappa_baseline
        if math.isfinite(base) and not math.isnan(kv) and kv > r.kappa_factor * base:
            add(
                "kappa_jump",
                kv,
                r.kappa_factor * base,
                f"step {step}: kappa_V = {kv:.4g} is above {r.kappa_factor:g} x the rolling "
                f"baseline {base:.4g} (median of the last {len(self._kappa_history)} estimates)",
            )
        elif r.kappa_max is not None and not math.isnan(kv) and kv > r.kappa_max:
            add(
                "kappa_jump",
                kv,
                r.kappa_max,
                f"step {step}: kappa_V = {kv:.4g} is above kappa_max = {r.kappa_max:.4g}",
            )

        ratio = np.asarray(report.ep_ratio, dtype=np.float64)
        which = list(report.ep_which)
        curv = np.asarray(report.curvatures, dtype=np.float64)
        margin = np.asarray(report.stability_margin, dtype=np.float64)
        n = min(len(ratio), len(which))
        near = [i for i in range(n) if which[i] in r.ep_which and abs(ratio[i]) <= r.ep_margin]
        if near:
            i = min(near, key=lambda j: abs(ratio[j]))
            add(
                "near_ep",
                abs(ratio[i]),
                r.ep_margin,
                f"step {step}: mode {i} (curvature {curv[i]:.4g}) is within "
                f"{100 * abs(ratio[i]):.2g}% of the {which[i]} exceptional point "
                f"(ep_ratio {ratio[i]:+.3g}); kappa_V = {kv:.4g}",
            )

        zs = np.asarray(report.eigenvalues, dtype=np.complex128)
        mode_of = np.asarray(report.mode_of)

        def toward_minus_one(i: int) -> bool:
            # The edge is z -> -1 (a s -> 2 (1 + beta)). A mode with z near +1 (plain SGD at a
            # small lr: z = 1 - lr s) is flat, not at an edge: its small margin is no warning.
            zi = zs[mode_of == i] if len(mode_of) == len(zs) else zs[i:i + 1]
            return bool(len(zi) == 0 or zi[np.argmax(np.abs(zi))].real < 0)

        edge = []
        for i in range(min(len(margin), len(curv))):
            if not curv[i] > 0 or not math.isfinite(margin[i]):
                continue
            past_upper = i < n and which[i] == "upper" and ratio[i] >= 0
            no_ep = i >= n or np.isnan(ratio[i]) or which[i] == "none"
            if margin[i] < 0 or ((past_upper or no_ep) and margin[i] < r.edge_margin
                                 and toward_minus_one(i)):
                edge.append(i)
        if edge:
            i = min(edge, key=lambda j: margin[j])
            add(
                "stability_edge",
                margin[i],
                r.edge_margin,
                f"step {step}: mode {i} (curvature {curv[i]:.4g}) has stability margin "
                f"1 - |z| = {margin[i]:+.3g} (edge of stability at 0)",
            )
        return out

    def _mode_note(self) -> str:
        """A note when the model is in eval mode while it has modules that train differently
        (dropout, batch statistics): J is then the step of the eval-mode model, not the
        training step's (a loop that validates before calling the monitor)."""
        model = getattr(self.model, "module", self.model)
        if model.training:
            return ""
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if isinstance(m, (torch.nn.modules.dropout._DropoutNd,
                                          torch.nn.modules.batchnorm._BatchNorm))})
        if not kinds:
            return ""
        return (f"; the model was in eval mode at this estimate ({', '.join(kinds)} act "
                "differently in training): J is that of an eval-mode step; call the monitor "
                "in train mode, after optimizer.step(), to analyse the training step")

    def _emit(self, record: MonitorRecord) -> None:
        """Write the record (JSONL, CSV, TensorBoard) and deliver its warnings; isolated."""
        for w in record.warnings:
            self.warnings.append(w)
            if self.writes:
                logger.warning("kappa_gpu early warning [%s]: %s", w.rule, w.message)
            if self.on_warning is not None:  # on every rank: reactions stay in sync under DDP
                self._isolated("on_warning callback", self.on_warning, w)
        if not self.writes:
            return
        if self.log_dir is not None:
            self._isolated("writing the JSONL/CSV record", self._write_files, record)
        if self._want_tb:
            self._isolated("writing TensorBoard scalars", self._write_tb, record)

    def _isolated(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            if self.strict:
                raise
            name = type(exc).__name__
            self.failures[name] += 1
            key = f"{what}:{name}"
            if key not in self._logged_failure_types:
                self._logged_failure_types.add(key)
                logger.warning(
                    "kappa_gpu monitor: %s failed (%s: %s); training continues", what, name, exc
                )

    def _write_files(self, record: MonitorRecord) -> None:
        assert self.log_dir is not None
        if self._jsonl is None:
            self._jsonl = open(os.path.join(self.log_dir, "kappa_monitor.jsonl"), "a")  # noqa: SIM115
        self._jsonl.write(json.dumps(record.to_dict(self.full_report)) + "\n")
        self._jsonl.flush()
        if self._want_csv:
            if self._csv_writer is None:
                path = os.path.join(self.log_dir, "kappa_monitor.csv")
                fresh = not os.path.exists(path) or os.path.getsize(path) == 0
                self._csv_file = open(path, "a", newline="")  # noqa: SIM115
                self._csv_writer = csv.DictWriter(
                    self._csv_file, fieldnames=[*MonitorRecord.SCALARS, "n_warnings"]
                )
                if fresh:
                    self._csv_writer.writeheader()
            row = record.to_dict()
            row.pop("warnings")
            row["n_warnings"] = len(record.warnings)
            self._csv_writer.writerow(row)
            self._csv_file.flush()

    def _write_tb(self, record: MonitorRecord) -> None:
        global _TB_MISSING_WARNED
        if self._tb is None:
            if self._want_tb is True:
                if self.log_dir is None:
                    raise ValueError("tensorboard=True needs a log_dir (or pass a SummaryWriter)")
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    self._want_tb = False
                    if not _TB_MISSING_WARNED:
                        _TB_MISSING_WARNED = True
                        logger.warning(
                            "kappa_gpu monitor: TensorBoard output skipped: %s. Install it with "
                            "`pip install kappa-gpu[tensorboard]`.", exc,
                        )  # fmt: skip
                    return
                self._tb = SummaryWriter(log_dir=self.log_dir)
                self._tb_owned = True
            else:
                self._tb = self._want_tb  # a writer given by the user
        for name, value in record.scalars().items():
            if math.isfinite(value):
                self._tb.add_scalar(f"kappa/{name}", value, record.step)
        self._tb.flush()

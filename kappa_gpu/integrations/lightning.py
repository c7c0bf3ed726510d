"""``KappaCallback``: :class:`kappa_gpu.KappaMonitor` inside ``lightning.Trainer.fit``.

Needs Lightning 2.x (``pip install kappa-gpu[lightning]``; the ``lightning`` package, whose
``lightning.pytorch.Callback`` this subclasses)::

    import lightning as L
    from kappa_gpu.integrations.lightning import KappaCallback

    trainer = L.Trainer(callbacks=[KappaCallback(torch.nn.functional.cross_entropy, every=100)])
    trainer.fit(module, loader)

How it plugs in:

* The estimate uses ``loss_fn(pl_module(inputs), targets)`` on the batch Lightning passes to
  ``on_train_batch_end`` (after the optimizer step), so ``loss_fn`` must be given: the
  ``training_step`` cannot be reused (it logs, may do anything). ``batch_transform(batch)``
  turns Lightning's batch into ``(inputs, targets)`` when it is not already such a pair.
* The optimizer is ``trainer.optimizers[optimizer_index]`` (the raw ``torch.optim`` optimizer).
* The step number is ``trainer.global_step`` (optimizer steps): with gradient accumulation the
  batches that did not step the optimizer are skipped.
* Rank zero only: on other ranks the callback does nothing (no estimate, no log). Records are
  logged with ``pl_module.log(..., rank_zero_only=True, on_step=True, on_epoch=False)`` under
  ``"{prefix}{name}"`` (default ``"kappa/rho"``, ``"kappa/kappa_V"``, ...); the full records are
  in :attr:`KappaCallback.records` and, with ``log_dir``, in the monitor's JSONL file.
* Gradient clipping: ``Trainer(gradient_clip_val=..., gradient_clip_algorithm=...)`` is passed
  on as ``clip_grad_norm`` (the default algorithm) or ``clip_grad_value``, so J is the Jacobian
  of the clipped step (logged once at train start). Where the clip is active the estimate takes
  the arnoldi path. A ``configure_gradient_clipping`` override of your own is not seen: pass
  ``clip_grad_norm=`` / ``clip_grad_value=`` to the callback yourself (``None``: analyse the
  unclipped step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kappa_gpu._monitor import (
    KappaMonitor,
    MonitorRecord,
    check_monitor_kwargs,
    trainer_clipping,
)

try:
    from lightning.pytorch import Callback
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kappa_gpu.integrations.lightning needs Lightning 2.x (the `lightning` package): "
        "pip install kappa-gpu[lightning]"
    ) from _err

__all__ = ["KappaCallback"]

#: The record fields logged through ``pl_module.log``.
LOGGED = (
    "rho", "kappa_V", "nearest_ep_ratio", "min_stability_margin", "transient_growth",
    "converged", "n_hvp", "seconds", "overhead", "warnings", "error",
)  # fmt: skip


class KappaCallback(Callback):
    """Runs a :class:`~kappa_gpu.KappaMonitor` every ``every`` optimizer steps of ``fit``.

    Args:
        loss_fn: ``loss_fn(pl_module(inputs), targets)`` -> scalar loss.
        every: estimate every ``every`` optimizer steps (``trainer.global_step``).
        k: curvature modes per estimate.
        batch_transform: maps Lightning's training batch to ``(inputs, targets)``; default:
            the batch as is (a ``(inputs, targets)`` pair).
        optimizer_index: which of ``trainer.optimizers`` to analyse.
        prefix: prefix of the logged metric names.
        log: whether to log through ``pl_module.log`` (stored as ``log_metrics``: Lightning
            assigns ``callback.log = pl_module.log`` on every callback).
        **monitor_kwargs: passed to :class:`~kappa_gpu.KappaMonitor` (``method``, ``budget_s``,
            ``log_dir``, ``on_warning``, ``rules``, ``strict``, estimator options...).

    Attributes:
        monitor: the :class:`~kappa_gpu.KappaMonitor` (``None`` before training starts and on
            ranks other than zero).
        records: its records (empty list where there is no monitor).
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        every: int = 100,
        k: int = 8,
        batch_transform: Callable[[Any], Any] | None = None,
        optimizer_index: int = 0,
        prefix: str = "kappa/",
        log: bool = True,
        **monitor_kwargs: Any,
    ):
        super().__init__()
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(pl_module(inputs), targets)")
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) \
                or optimizer_index < 0:
            raise ValueError(f"optimizer_index must be an int >= 0, got {optimizer_index!r}")
        check_monitor_kwargs("KappaCallback", **monitor_kwargs)
        self.loss_fn = loss_fn
        self.every = every
        self.k = k
        self.batch_transform = batch_transform
        self.optimizer_index = optimizer_index
        self.prefix = prefix
        self.log_metrics = log
        self.monitor_kwargs = monitor_kwargs
        self.monitor: KappaMonitor | None = None
        self._last_step: int | None = None

    @property
    def records(self) -> list[MonitorRecord]:
        return list(self.monitor.records) if self.monitor is not None else []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        optimizers = trainer.optimizers
        if not optimizers:
            raise RuntimeError("KappaCallback: the trainer has no optimizer")
        if self.optimizer_index >= len(optimizers):
            raise ValueError(
                f"KappaCallback(optimizer_index={self.optimizer_index}): the trainer has "
                f"{len(optimizers)} optimizer(s), indices 0..{len(optimizers) - 1}"
            )
        clip = trainer_clipping(
            "KappaCallback", "gradient_clip_val", getattr(trainer, "gradient_clip_val", None),
            getattr(trainer, "gradient_clip_algorithm", None), self.monitor_kwargs,
        )
        opt = optimizers[self.optimizer_index]
        opt = getattr(opt, "_optimizer", opt)  # a LightningOptimizer wraps the torch one
        self.monitor = KappaMonitor(
            pl_module, opt, self.loss_fn, every=self.every, k=self.k, **clip,
            **self.monitor_kwargs,
        )
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None or not trainer.is_global_zero:
            return
        step = int(trainer.global_step)
        if step == self._last_step:  # gradient accumulation: no optimizer step on this batch
            return
        self._last_step = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, (torch.Tensor, float, int)):
            loss = None
        transform = self.batch_transform

        def get_batch() -> Any:  # evaluated only when an estimate is due
            return transform(batch) if transform is not None else batch

        record = self.monitor.step(get_batch, loss=loss, step=step)
        if record is not None and self.log_metrics:
            values = record.scalars()
            for name in LOGGED:
                pl_module.log(
                    f"{self.prefix}{name}",
                    values[name],
                    on_step=True,
                    on_epoch=False,
                    prog_bar=False,
                    logger=True,
                    rank_zero_only=True,
                )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()

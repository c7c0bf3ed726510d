"""``KappaTrainerCallback``: :class:`kappa_gpu.KappaMonitor` inside ``transformers.Trainer``.

Needs transformers and accelerate (``pip install kappa-gpu[hf]``)::

    from kappa_gpu.integrations.hf import KappaTrainerCallback

    probe = next(iter(trainer.get_train_dataloader()))        # a dict with "labels"
    trainer.add_callback(KappaTrainerCallback(probe, every=100))
    trainer.train()

Design decisions (the Trainer does not hand the batch to callbacks):

* **Which batch.** A fixed *probe batch* given at construction (a dict of tensors as the model
  takes it, labels included), or ``batch_fn()`` called each time an estimate is due (e.g. drawing
  from your own iterator). A fixed probe batch makes the estimates of a run comparable (only the
  weights change between them) and makes warm starts effective. It is moved to the model's
  device at each estimate.
* **Which loss** (:class:`HFModelLoss`). ``kappa_gpu`` differentiates
  ``loss_fn(model(inputs), targets)``; Hugging Face models take ``model(**batch)`` and return an
  output with ``.loss``. The callback wraps the model in :class:`HFModelLoss`, an
  ``nn.Module`` whose ``forward(inputs)`` calls ``model(**inputs)``:

  - ``loss_fn=None`` (default): the forward returns the model's own ``.loss`` (label shifting,
    ``ignore_index`` and all, exactly what the Trainer optimizes without a custom
    ``compute_loss``); the batch is ``(probe, None)`` and the loss function the identity.
  - ``loss_fn`` given: the forward returns ``.logits`` of the model called without the
    ``label_key`` entry, and the loss is ``loss_fn(logits, probe[label_key])``.

  The wrapper owns no parameters or buffers of its own; its parameters are the model's (names
  prefixed ``"model."``), so the Trainer's optimizer matches it.
* **Which optimizer.** The ``optimizer`` the Trainer passes to ``on_step_end``, unwrapped from
  accelerate's ``AcceleratedOptimizer`` (``.optimizer``) down to the ``torch.optim`` one.
* **Where.** ``on_step_end`` (after ``optimizer.step()``, the scheduler step and
  ``zero_grad``), step number ``state.global_step``, only where ``state.is_world_process_zero``.
* **Output.** Records go to :attr:`KappaTrainerCallback.records`, to the monitor's files with
  ``log_dir``, and (``log_history=True``) as ``{"step": ..., "kappa/<name>": ...}`` entries
  appended to ``state.log_history`` (saved in ``trainer_state.json``; finite values only, as
  that file must stay strict JSON: a failed estimate's NaN fields, or an infinite kappa_V, are
  in the records and the JSONL file).
* **Gradient clipping.** The Trainer clips gradients by default (``max_grad_norm=1.0``,
  ``clip_grad_norm_`` over the model's parameters); the callback passes it on as
  ``clip_grad_norm``, so J is the Jacobian of the clipped step (logged once). Where the clip is
  active (``||g|| > max_grad_norm``) the estimate takes the arnoldi path (1.6x the HVPs of
  the structured one with SGD, 3.4x with AdamW on a 95,770-parameter MLP). Pass
  ``clip_grad_norm=None`` to the callback to analyse the unclipped step instead (cheaper, but
  not the step that runs while the clip is active).
* The Trainer's own logging cadence is not touched (no ``control.should_log``).
"""

from __future__ import annotations

import math
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
    from transformers import TrainerCallback
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kappa_gpu.integrations.hf needs transformers and accelerate: pip install kappa-gpu[hf]"
    ) from _err

__all__ = ["KappaTrainerCallback", "HFModelLoss", "unwrap_optimizer"]

#: The record fields appended to ``state.log_history``.
LOGGED = (
    "rho", "kappa_V", "nearest_ep_ratio", "min_stability_margin", "transient_growth",
    "converged", "n_hvp", "seconds", "overhead", "warnings", "error", "loss",
)  # fmt: skip


def _identity_loss(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """The loss is the model's own: ``HFModelLoss`` already returned it."""
    return outputs


class HFModelLoss(torch.nn.Module):
    """Adapts a Hugging Face model to ``loss_fn(model(inputs), targets)``.

    Args:
        model: a ``transformers`` model (``model(**inputs)`` returns an output with ``.loss`` /
            ``.logits``).
        use_model_loss: return ``model(**inputs).loss`` (inputs include the labels); otherwise
            ``.logits`` (inputs without the labels).

        attn_implementation: the attention implementation used inside this wrapper's forward
            (default ``"eager"``; ``None`` leaves the model's). PyTorch's fused SDPA / flash
            attention kernels have no second derivatives (e.g. ``derivative for
            aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``),
            and every HVP needs them; the eager implementation computes the same function with
            differentiable ops. The model's ``config._attn_implementation`` is switched for the
            duration of each forward call and restored after it, so training is not affected.

    The wrapper's train/eval flag is kept equal to the model's by the callback without calling
    ``train()`` (which would recurse into the model).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        use_model_loss: bool = True,
        attn_implementation: str | None = "eager",
    ):
        super().__init__()
        self.model = model
        self.use_model_loss = use_model_loss
        self.attn_implementation = attn_implementation

    def forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        config = getattr(self.model, "config", None)
        old = getattr(config, "_attn_implementation", None)
        switch = self.attn_implementation is not None and old not in (
            None,
            self.attn_implementation,
        )
        if switch:
            config._attn_implementation = self.attn_implementation
        try:
            out = self.model(**inputs)
        finally:
            if switch:
                config._attn_implementation = old
        key = "loss" if self.use_model_loss else "logits"
        value = out[key] if isinstance(out, dict) or hasattr(out, "keys") else None
        if value is None:
            value = getattr(out, key, None)
        if value is None:
            raise ValueError(
                f"the model's output has no `{key}`"
                + (" (are the labels in the probe batch?)" if key == "loss" else "")
            )
        return value


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside accelerate's ``AcceleratedOptimizer`` (if any)."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        else:
            break
    return optimizer


class KappaTrainerCallback(TrainerCallback):
    """Runs a :class:`~kappa_gpu.KappaMonitor` every ``every`` steps of ``Trainer.train``.

    Args:
        probe_batch: a fixed batch (dict of tensors, as the model takes it; with the labels).
        batch_fn: alternatively, a zero-argument callable returning such a batch, called when
            an estimate is due. Exactly one of ``probe_batch`` / ``batch_fn`` must be given.
        loss_fn: ``None``: the model's own loss; else ``loss_fn(logits, labels)`` (module docs).
        label_key: the key of the labels in the batch (used when ``loss_fn`` is given).
        attn_implementation: attention used in the estimate's forward passes
            (:class:`HFModelLoss`; default ``"eager"``, ``None``: the model's own).
        every: estimate every ``every`` optimizer steps (``state.global_step``).
        k: curvature modes per estimate.
        prefix: prefix of the names appended to ``state.log_history``.
        log_history: whether to append records to ``state.log_history``.
        **monitor_kwargs: passed to :class:`~kappa_gpu.KappaMonitor` (``method``, ``budget_s``,
            ``log_dir``, ``on_warning``, ``rules``, ``strict``, estimator options...).

    Attributes:
        monitor: the :class:`~kappa_gpu.KappaMonitor` (created at the first step end on the
            main process; ``None`` elsewhere).
        records: its records.
    """

    def __init__(
        self,
        probe_batch: dict[str, Any] | None = None,
        *,
        batch_fn: Callable[[], dict[str, Any]] | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        label_key: str = "labels",
        attn_implementation: str | None = "eager",
        every: int = 100,
        k: int = 8,
        prefix: str = "kappa/",
        log_history: bool = True,
        **monitor_kwargs: Any,
    ):
        if (probe_batch is None) == (batch_fn is None):
            raise ValueError(
                "KappaTrainerCallback needs exactly one of probe_batch= (a fixed batch dict, "
                "labels included) or batch_fn= (a callable returning one): the Trainer does "
                "not pass batches to callbacks"
            )
        if probe_batch is not None and not hasattr(probe_batch, "keys"):
            raise TypeError(
                f"probe_batch must be a dict of model inputs, got {type(probe_batch).__name__}"
            )
        check_monitor_kwargs("KappaTrainerCallback", **monitor_kwargs)
        self.probe_batch = probe_batch
        self.batch_fn = batch_fn
        self.loss_fn = loss_fn
        self.label_key = label_key
        self.attn_implementation = attn_implementation
        self.every = every
        self.k = k
        self.prefix = prefix
        self.log_history = log_history
        self.monitor_kwargs = monitor_kwargs
        self.monitor: KappaMonitor | None = None
        self.adapter: HFModelLoss | None = None

    @property
    def records(self) -> list[MonitorRecord]:
        return list(self.monitor.records) if self.monitor is not None else []

    def _pair(self, batch: Any) -> tuple[Any, Any]:
        """The ``(inputs, targets)`` pair of the adapter's convention."""
        batch = dict(batch)
        if self.loss_fn is None:
            return batch, None
        if self.label_key not in batch:
            raise KeyError(f"the batch has no {self.label_key!r} entry (label_key)")
        labels = batch.pop(self.label_key)
        return batch, labels

    def _build(self, model: torch.nn.Module, optimizer: Any, args: Any = None) -> None:
        self.adapter = HFModelLoss(
            model,
            use_model_loss=self.loss_fn is None,
            attn_implementation=self.attn_implementation,
        )
        loss_fn = self.loss_fn if self.loss_fn is not None else _identity_loss
        clip = trainer_clipping("KappaTrainerCallback", "max_grad_norm",
                                getattr(args, "max_grad_norm", None), "norm",
                                self.monitor_kwargs)
        self.monitor = KappaMonitor(
            self.adapter,
            unwrap_optimizer(optimizer),
            loss_fn,
            every=self.every,
            k=self.k,
            **clip,
            **self.monitor_kwargs,
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if self.monitor is None:
            if model is None or optimizer is None:
                return
            self._build(model, optimizer, args)
        assert self.monitor is not None and self.adapter is not None
        # Keep the wrapper's flag in step with the model's (not .train(): it would recurse).
        self.adapter.training = self.adapter.model.training

        def get_batch() -> tuple[Any, Any]:  # evaluated only when an estimate is due
            return self._pair(self.probe_batch if self.batch_fn is None else self.batch_fn())

        record = self.monitor.step(get_batch, step=int(state.global_step))
        if record is not None and self.log_history:
            entry: dict[str, Any] = {"step": int(state.global_step)}
            values = record.scalars()
            # Finite numbers only: trainer_state.json is written with json.dump, where NaN and
            # inf become bare NaN / Infinity tokens that strict JSON readers reject (the
            # monitor's JSONL file keeps them, as strings).
            entry.update({f"{self.prefix}{name}": values[name] for name in LOGGED
                          if math.isfinite(values[name])})
            state.log_history.append(entry)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()

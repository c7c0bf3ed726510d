"""Errors raised by the operator builders, and the checks done once, at the door.

Every error says what is wrong and what to do about it. One class per meaning, each also a
subclass of the built-in exception a caller would expect (``TypeError`` for a wrong optimizer
type, ``ValueError`` for bad values), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "OperatorError",
    "UnsupportedOptimizerError",
    "UnsupportedConfigurationError",
    "MissingOptimizerStateError",
    "ParameterMismatchError",
    "NoTrainableParametersError",
    "NonFiniteError",
    "BatchError",
    "StaleOperatorError",
    "DistributedError",
]


class OperatorError(Exception):
    """Base class of the errors raised while building or applying an operator."""


class UnsupportedOptimizerError(OperatorError, TypeError):
    """The optimizer's type has no linearized update operator."""


class UnsupportedConfigurationError(OperatorError, ValueError):
    """A supported optimizer with settings the operator cannot represent (e.g. amsgrad)."""


class MissingOptimizerStateError(OperatorError, ValueError):
    """The optimizer has no state (momentum buffer, moments) yet."""


class ParameterMismatchError(OperatorError, ValueError):
    """The optimizer's (or the given) parameters are not parameters of the model."""


class NoTrainableParametersError(OperatorError, ValueError):
    """There is no parameter with ``requires_grad=True`` to differentiate."""


class NonFiniteError(OperatorError, ValueError):
    """The loss or its gradient is not finite at the current point."""


class BatchError(OperatorError, ValueError):
    """``loss_fn(model(inputs), targets)`` failed on the given batch."""


class StaleOperatorError(OperatorError, RuntimeError):
    """The model changed (parameters stepped, train/eval mode switched) since the build."""


class DistributedError(OperatorError, RuntimeError):
    """Under ``torch.distributed``: another rank failed, or the ranks disagree on their inputs.

    Raised on every rank of the process group together (see :mod:`kappa_gpu._distributed`), so
    that no rank is left waiting in a collective.
    """


SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def describe(obj: Any, depth: int = 0) -> str:
    """A short description of a batch component: tensor shapes and dtypes, nested."""
    if isinstance(obj, torch.Tensor):
        dt = str(obj.dtype).replace("torch.", "")
        where = "" if obj.device.type == "cpu" else f"@{obj.device}"
        return f"Tensor{tuple(obj.shape)}:{dt}{where}"
    if depth > 2:
        return type(obj).__name__
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(describe(o, depth + 1) for o in obj[:6])
        more = ", ..." if len(obj) > 6 else ""
        br = "()" if isinstance(obj, tuple) else "[]"
        return f"{br[0]}{inner}{more}{br[1]}"
    if isinstance(obj, dict):
        inner = ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in list(obj.items())[:6])
        return "{" + inner + "}"
    return type(obj).__name__


def normalize_batches(batch: Any) -> list[tuple[Any, Any]]:
    """Return the batch as a list of ``(inputs, targets)`` pairs.

    Accepted: one pair ``(inputs, targets)`` (a tuple, or a list of two whose first item is a
    tensor), or an iterable of such pairs (the loss is then the mean over them).
    """
    if isinstance(batch, tuple) or (
        isinstance(batch, list) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)
    ):
        pairs: list[Any] = [batch]
    elif isinstance(batch, Iterable) and not isinstance(batch, (torch.Tensor, str, bytes, dict)):
        pairs = list(batch)
        if not pairs:
            raise BatchError("batch is an empty iterable; pass (inputs, targets) or a list of them")
    else:
        raise BatchError(
            f"batch must be (inputs, targets) or a list of such pairs, got {describe(batch)}"
        )
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise BatchError(
                f"batch {i} is {describe(pair)}; each batch must be a pair (inputs, targets) "
                "so that the loss is loss_fn(model(inputs), targets)"
            )
        out.append((pair[0], pair[1]))
    return out


def check_optimizer_type(optimizer: Any) -> str:
    """Return ``"sgd"`` or ``"adam"`` for a supported optimizer; raise otherwise.

    Subclasses are accepted only when they keep the base class's ``step`` (so the update rule
    is the one the operator implements).
    """
    for cls, kind in ((torch.optim.SGD, "sgd"), (torch.optim.Adam, "adam")):
        # unwrap: torch patches ``step`` per class with a profiling wrapper on first use
        if isinstance(optimizer, cls) and inspect.unwrap(type(optimizer).step) is inspect.unwrap(
            cls.step
        ):
            return kind
    names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)
    extra = ""
    if isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        extra = " (a subclass that overrides step() has an update rule of its own)"
    raise UnsupportedOptimizerError(
        f"no update operator for {type(optimizer).__module__}.{type(optimizer).__qualname__}"
        f"{extra}; supported optimizers: {names}. For other optimizers use hessian_operator() "
        "or build a LinearOperator for the update rule yourself"
    )


def scalar(x: Any) -> float:
    """A hyper-parameter (float or 0-d tensor) as a Python float."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)

"""Autocast off for kappa_gpu's own computations.

A user's ``torch.autocast`` region (mixed-precision training) would otherwise reach the HVP
engine's forward passes and the solvers' Gram-Schmidt products: bfloat16 Hessian products, and
``addmv`` calls mixing bfloat16 and float32 operands, which raise. kappa_gpu computes in the
operator's dtype (the model's, or ``dtype=``) whatever region it is called from.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["autocast_off", "without_autocast"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, TypeError, ValueError):  # a device type this build does not know
        return False


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Disable autocast for the CPU and CUDA (restored on exit); free when it is off."""
    with contextlib.ExitStack() as stack:
        for dev in ("cpu", "cuda"):
            if _enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def without_autocast(fn: _F) -> _F:
    """Decorator: run ``fn`` under :func:`autocast_off`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with autocast_off():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

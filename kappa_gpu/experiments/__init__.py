"""Experiments: the reproduction of arXiv:2605.23476's two-layer study (``kappa-gpu reproduce``).

- :mod:`kappa_gpu.experiments.reproduce` -- the instrumented sweep, summary and figures;
  :func:`~kappa_gpu.experiments.reproduce.main_reproduce` is the command line, and
  :func:`~kappa_gpu.experiments.reproduce.add_reproduce_parser` /
  :func:`~kappa_gpu.experiments.reproduce.run_from_args` plug it into ``kappa-gpu``.
- ``_problems`` (two-layer problems and the training loop), ``_spikes`` (the spike and phase
  definition), ``_stats`` (AUC, lead times), ``_plots`` (figures), ``_search`` (the regime
  search, plain torch).

The names below are imported lazily, so ``python -m kappa_gpu.experiments.reproduce`` works
without importing the module twice. The Python function is
``kappa_gpu.experiments.reproduce.reproduce`` (the submodule owns the name ``reproduce``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["add_reproduce_parser", "main_reproduce", "run_from_args"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("kappa_gpu.experiments.reproduce"), name)
    raise AttributeError(f"module 'kappa_gpu.experiments' has no attribute {name!r}")

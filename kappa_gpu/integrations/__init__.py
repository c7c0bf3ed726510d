"""Training-framework integrations of :class:`kappa_gpu.KappaMonitor`.

- :class:`kappa_gpu.integrations.lightning.KappaCallback` -- a Lightning 2.x ``Callback``
  (extra ``kappa-gpu[lightning]``).
- :class:`kappa_gpu.integrations.hf.KappaTrainerCallback` -- a transformers ``TrainerCallback``
  (extra ``kappa-gpu[hf]``).

Each framework is imported only when its integration is used: ``import kappa_gpu`` never imports
Lightning or transformers. Accessing a name here imports its module; a missing framework raises
an ``ImportError`` naming the extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["KappaCallback", "KappaTrainerCallback", "HFModelLoss"]

_WHERE = {
    "KappaCallback": "kappa_gpu.integrations.lightning",
    "KappaTrainerCallback": "kappa_gpu.integrations.hf",
    "HFModelLoss": "kappa_gpu.integrations.hf",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'kappa_gpu.integrations' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

"""kappa_gpu: non-normality of the linearized optimizer update, matrix-free, on any device.

Public API (everything else is private):

- :class:`LinearOperator`, :func:`aslinearoperator` — the one operator abstraction.
"""

from kappa_gpu._linop import LinearOperator, aslinearoperator

__version__ = "0.1.0"

__all__ = ["LinearOperator", "aslinearoperator", "__version__"]

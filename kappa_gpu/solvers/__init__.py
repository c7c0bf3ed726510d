"""Eigen-solvers on torch tensors, on any device: Krylov-Schur (``eigs``) and thick-restart
Lanczos (``eigsh``), returning :class:`EigResult` with certificates and costs.

    >>> from kappa_gpu.solvers import eigs, eigsh, EigResult, ConvergenceError
"""

from kappa_gpu.solvers._krylov_schur import eigs
from kappa_gpu.solvers._lanczos import eigsh
from kappa_gpu.solvers._result import ConvergenceError, EigResult

__all__ = ["eigs", "eigsh", "EigResult", "ConvergenceError"]

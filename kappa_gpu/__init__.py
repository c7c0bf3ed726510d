"""kappa_gpu: non-normality of the linearized optimizer update, matrix-free, on any device.

Loss spikes often come while the spectral radius rho(J) of the linearized optimizer update says
"stable"; the eigenvector condition number kappa(V) of J says otherwise (arXiv:2605.23476).
kappa_gpu measures it for real PyTorch models and torch.optim optimizers.

Public API (everything else is private):

Estimating
    :func:`estimate` -> :class:`KappaReport` -- one call: kappa(V), exceptional points, transient
    growth and certificates for a model, its optimizer, a loss and a batch.

In training jobs
    :class:`KappaMonitor` -- ``monitor.step(batch)`` after ``optimizer.step()``: estimates every N
    steps, warm-started, failure-isolated, with early-warning rules (:class:`WarningRules`,
    :class:`KappaWarning`) and JSONL/CSV/TensorBoard logs; Lightning and Hugging Face callbacks in
    :mod:`kappa_gpu.integrations`. DDP-wrapped models are supported (``process_group=``).

Operators (solvers see only these)
    :class:`LinearOperator`, :func:`aslinearoperator` -- the one operator abstraction.
    :func:`update_operator` -> :class:`UpdateOperator` -- the exact Jacobian of one SGD / Adam /
    AdamW step (with adjoint and :class:`BlockStructure`).
    :func:`hessian_operator` -- the loss Hessian (one HVP per column).

Solvers
    :func:`eigs` (Krylov-Schur), :func:`eigsh` (thick-restart Lanczos) -> :class:`EigResult`;
    :class:`ConvergenceError` with ``strict=True``.

Diagnostics
    :func:`kappa_V`, :func:`eigenvalue_condition_numbers`, :func:`pseudospectra`,
    :func:`plot_pseudospectra`, :func:`transient_growth`, :func:`kreiss_lower_bound`; more in
    :mod:`kappa_gpu.diagnostics` (closed-form 2x2 blocks, exceptional points).

Errors
    :class:`OperatorError` and its subclasses, in :mod:`kappa_gpu.operators`.
"""

from kappa_gpu._estimate import estimate
from kappa_gpu._linop import LinearOperator, aslinearoperator
from kappa_gpu._monitor import KappaMonitor, KappaWarning, MonitorRecord, WarningRules
from kappa_gpu._report import KappaReport
from kappa_gpu.diagnostics import (
    eigenvalue_condition_numbers,
    kappa_V,
    kreiss_lower_bound,
    plot_pseudospectra,
    pseudospectra,
    transient_growth,
)
from kappa_gpu.operators import (
    BlockStructure,
    OperatorError,
    UpdateOperator,
    hessian_operator,
    update_operator,
)
from kappa_gpu.solvers import ConvergenceError, EigResult, eigs, eigsh

__version__ = "0.1.0"

__all__ = [
    "estimate",
    "KappaReport",
    "KappaMonitor",
    "MonitorRecord",
    "KappaWarning",
    "WarningRules",
    "LinearOperator",
    "aslinearoperator",
    "update_operator",
    "UpdateOperator",
    "BlockStructure",
    "hessian_operator",
    "OperatorError",
    "eigs",
    "eigsh",
    "EigResult",
    "ConvergenceError",
    "kappa_V",
    "eigenvalue_condition_numbers",
    "pseudospectra",
    "plot_pseudospectra",
    "transient_growth",
    "kreiss_lower_bound",
    "__version__",
]

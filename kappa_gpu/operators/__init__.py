"""Matrix-free operators built from a model: Hessians and linearized optimizer updates.

- :func:`hessian_operator` — the Hessian of ``loss_fn(model(inputs), targets)`` (one HVP per
  column: reverse-over-reverse through the gradient's graph, kept with the operator, or
  forward-over-reverse with ``hvp="forward"``; each falls back to the other).
- :func:`update_operator` — the exact Jacobian ``J`` of one ``torch.optim`` SGD / Adam / AdamW
  step with respect to the optimizer state (DESIGN.md section 2), with its adjoint, and its
  :class:`BlockStructure` (DESIGN.md section 3) for the structured solvers.

Errors are subclasses of :class:`OperatorError` (and of the built-in ``TypeError`` /
``ValueError`` / ``RuntimeError`` they refine).
"""

from kappa_gpu.operators._hvp import HessianOperator, hessian_operator
from kappa_gpu.operators._update import (
    BlockStructure,
    GradientClip,
    UpdateOperator,
    update_operator,
)
from kappa_gpu.operators._validate import (
    BatchError,
    DistributedError,
    MissingOptimizerStateError,
    NonFiniteError,
    NoTrainableParametersError,
    OperatorError,
    ParameterMismatchError,
    StaleOperatorError,
    UnsupportedConfigurationError,
    UnsupportedOptimizerError,
)

__all__ = [
    "update_operator",
    "GradientClip",
    "hessian_operator",
    "UpdateOperator",
    "HessianOperator",
    "BlockStructure",
    "OperatorError",
    "UnsupportedOptimizerError",
    "UnsupportedConfigurationError",
    "MissingOptimizerStateError",
    "ParameterMismatchError",
    "NoTrainableParametersError",
    "NonFiniteError",
    "BatchError",
    "DistributedError",
    "StaleOperatorError",
]

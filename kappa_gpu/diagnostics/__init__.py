"""Dense, model-independent diagnostics of the optimizer Jacobian (float64 numpy).

Each private module adds its public names below; append new blocks, keep ``__all__`` in step.
"""

__all__: list[str] = []

# -- closed-form 2x2 blocks, exceptional points, stability edges (DESIGN.md section 3) --------
from kappa_gpu.diagnostics._blocks import (  # noqa: E402
    BlockCoefficients,
    EPRatio,
    StabilityMargin,
    adam_frozen_coefficients,
    block_eigen,
    block_matrices,
    discriminant,
    ep_ratio,
    exceptional_points,
    native_eigenvectors,
    order1_eigen,
    order1_stability_margin,
    sgd_momentum_coefficients,
    stability_margin,
)

__all__ += [
    "BlockCoefficients",
    "EPRatio",
    "StabilityMargin",
    "adam_frozen_coefficients",
    "block_eigen",
    "block_matrices",
    "discriminant",
    "ep_ratio",
    "exceptional_points",
    "native_eigenvectors",
    "order1_eigen",
    "order1_stability_margin",
    "sgd_momentum_coefficients",
    "stability_margin",
]

# -- transient growth, Kreiss constant, projection onto a computed subspace ---------------------
from kappa_gpu.diagnostics._transient import (  # noqa: E402
    KreissBound,
    TransientGrowth,
    kreiss_lower_bound,
    orthonormal_basis,
    projected_operator,
    transient_growth,
)

__all__ += [
    "KreissBound",
    "TransientGrowth",
    "kreiss_lower_bound",
    "orthonormal_basis",
    "projected_operator",
    "transient_growth",
]

# -- pseudospectra of the Arnoldi Hessenberg matrix (Wright & Trefethen 2001) -------------------
from kappa_gpu.diagnostics._pseudospectra import (  # noqa: E402
    Pseudospectra,
    plot_pseudospectra,
    pseudospectra,
)

__all__ += ["Pseudospectra", "plot_pseudospectra", "pseudospectra"]

# -- eigenvector / eigenvalue condition numbers of computed eigenpairs --------------------------
from kappa_gpu.diagnostics._conditioning import (  # noqa: E402
    eigenvalue_condition_numbers,
    kappa_V,
)

__all__ += ["eigenvalue_condition_numbers", "kappa_V"]

"""Fused CUDA kernels (through CuPy) for the block arithmetic of the update operators.

The update operators apply ``J`` with one HVP of the ``theta`` block and a few elementwise
vector operations around it (DESIGN.md section 2). This package does that vector work:

- :class:`UpdateBlocks` — built once per operator from a :class:`BlockParams` table (and
  Adam's per-entry vectors), it runs the three passes ``matvec``, ``rmatvec_pre`` and
  ``rmatvec_post`` with a fused kernel (one read of each input, one write of each output) on
  CUDA tensors when CuPy works, and with the plain-torch reference otherwise
  (``backend="auto" | "cupy" | "torch"``).
- :mod:`kappa_gpu._cuda._reference` — the readable torch version of every pass: the CPU
  fallback and the oracle of the kernel tests.
- :mod:`kappa_gpu._cuda._cupy` — finding the ``.cu`` sources, NVRTC compilation, launch on the
  current torch stream.

Nothing here imports CuPy until a pass runs on CUDA tensors.
"""

from kappa_gpu._cuda._cupy import CupyStatus, kernel_dir, status
from kappa_gpu._cuda._dispatch import BACKENDS, FUSED_DTYPES, UpdateBlocks, resolve_backend
from kappa_gpu._cuda._reference import (
    COEFS,
    COLUMNS,
    KINDS,
    NBLOCKS,
    BlockParams,
    adam_block_params,
    adam_coefficients,
    reference_matvec,
    reference_rmatvec_post,
    reference_rmatvec_pre,
    sgd_block_params,
)

__all__ = [
    "BACKENDS",
    "FUSED_DTYPES",
    "KINDS",
    "COLUMNS",
    "NBLOCKS",
    "COEFS",
    "BlockParams",
    "UpdateBlocks",
    "CupyStatus",
    "adam_block_params",
    "adam_coefficients",
    "kernel_dir",
    "reference_matvec",
    "reference_rmatvec_post",
    "reference_rmatvec_pre",
    "resolve_backend",
    "sgd_block_params",
    "status",
]

"""Backend choice for the update-block passes: fused CuPy kernels or the plain-torch path.

``backend="auto"`` (default) runs the fused kernels on CUDA tensors of a supported dtype when
CuPy imports, sees a device and compiles the kernels, and the torch path otherwise;
``"cupy"`` insists (and raises, saying why, where it cannot run); ``"torch"`` always takes the
torch path. Each choice of the torch path is logged at DEBUG level on the ``kappa_gpu`` logger
with its reason. CuPy installed but unable to run (no driver, no NVRTC, a failed compile) costs
ONE ``RuntimeWarning`` per process, then the torch path: never a crash.

Operands: every vector of one call on one device with one dtype; any strides (column slices,
transposed ``(s, n)`` views, ...) are read in place, zero-copy; coefficient vectors that are
not contiguous are copied once when :class:`UpdateBlocks` is built. Outputs must not overlap
the inputs. Violations raise ``ValueError``/``TypeError`` naming the operand and the fix.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch

from kappa_gpu._cuda import _cupy
from kappa_gpu._cuda._reference import (
    COEFS,
    BlockParams,
    check_call,
    run_reference,
)

__all__ = ["BACKENDS", "FUSED_DTYPES", "resolve_backend", "UpdateBlocks"]

logger = logging.getLogger("kappa_gpu")

BACKENDS = ("auto", "cupy", "torch")
#: Storage dtypes the fused kernels take (vectors and coefficient vectors alike).
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_warned = False


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"kappa_gpu: CuPy is installed but cannot run the fused kernels ({reason}); using "
            "the torch path. Install the CuPy build that matches your CUDA driver "
            "(pip install 'kappa-gpu[cuda]'), or pass backend='torch' to skip CuPy",
            RuntimeWarning,
            stacklevel=4,
        )


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(
    backend: str, device: torch.device | str, dtypes: Sequence[torch.dtype] = ()
) -> tuple[str, str]:
    """Choose ``"cupy"`` or ``"torch"`` for tensors on ``device`` with storage ``dtypes``.

    Args:
        backend: ``"auto"``, ``"cupy"`` or ``"torch"``.
        device: the device of the vectors.
        dtypes: the storage dtypes involved (vectors and coefficient vectors).

    Returns:
        ``(backend, reason)``; the reason is a sentence for the debug log.

    Raises:
        ValueError: unknown ``backend``; ``"cupy"`` with non-CUDA tensors.
        TypeError: ``"cupy"`` with a dtype the kernels do not take.
        RuntimeError: ``"cupy"`` where CuPy cannot run (the message says why).
    """
    _check_backend(backend)
    device = torch.device(device)
    if backend == "torch":
        return "torch", "backend='torch' was requested"
    if device.type != "cuda":
        if backend == "cupy":
            raise ValueError(
                f"backend='cupy' runs on CUDA tensors only; these are on {device}. Move them "
                "with .cuda(), or use backend='auto' or 'torch'"
            )
        return "torch", f"the tensors are on {device}; the fused CuPy kernels need CUDA tensors"
    bad = [d for d in dtypes if d not in FUSED_DTYPES]
    if bad:
        names = ", ".join(str(d).replace("torch.", "") for d in FUSED_DTYPES)
        if backend == "cupy":
            raise TypeError(f"backend='cupy' has kernels for {names} only, got {bad[0]}")
        return "torch", f"dtype {bad[0]} has no fused kernel (they exist for {names})"
    st = _cupy.status()
    if not st.usable:
        if backend == "cupy":
            raise RuntimeError(f"backend='cupy' cannot run: {st.reason}")
        if st.installed:
            _warn_once(st.reason)
        return "torch", st.reason
    return "cupy", f"CUDA tensors and a working CuPy ({st.reason})"


class UpdateBlocks:
    """The fused block passes of one update operator, built once and applied per product.

    Holds the coefficient table (:class:`BlockParams`) and the per-entry coefficient vectors,
    and runs each pass with the fused CuPy kernel or the plain-torch reference, as
    ``backend`` says (see the module docstring). The three passes:

    - :meth:`matvec`: ``(x blocks, hv = H x[0]) -> J x`` blocks;
    - :meth:`rmatvec_pre`: ``y blocks -> u`` (the HVP input of the adjoint);
    - :meth:`rmatvec_post`: ``(y blocks, hv = H u) -> J^T y`` blocks.

    ``hv`` is always the bare Hessian product: the passes apply ``sign`` (maximize) and the L2
    weight decay ``wd`` of the table themselves. Vectors are ``(n,)`` or ``(n, s)`` (``s``
    columns, any strides). Fused cost per pass: one read of each input, one write of each
    output, one read of each coefficient vector (shared by the ``s`` columns).

    Args:
        params: the coefficient table.
        coef: the family's per-entry vectors: ``()`` (order1), ``()`` or ``(D,)`` (order2),
            ``(D, q, r)`` (adam_full); float32, float64 or bfloat16, on the vectors' device.
            Non-contiguous ones are copied once here.
        backend: ``"auto"``, ``"cupy"`` or ``"torch"``.

    Attributes:
        last_backend: the backend of the last pass (None before the first).
        last_reason: why it was chosen.
    """

    def __init__(
        self, params: BlockParams, coef: Sequence[torch.Tensor] = (), *, backend: str = "auto"
    ):
        _check_backend(backend)
        if not isinstance(params, BlockParams):
            raise TypeError(f"params must be a BlockParams, got {type(params).__name__}")
        coef = list(coef)
        names = COEFS[params.kind]
        if params.kind == "order2" and not coef:
            coef = [None]
        if len(coef) != len(names):
            raise ValueError(
                f"{params.kind} takes the per-entry coefficients {names} "
                f"({'optional' if params.kind == 'order2' else 'required'}), got {len(coef)}"
            )
        for name, c in zip(names, coef, strict=True):
            if c is not None and (not isinstance(c, torch.Tensor) or c.shape != (params.n,)):
                raise ValueError(f"coefficient {name!r} must be a ({params.n},) tensor")
        self.params = params
        self.coef = [None if c is None else c.contiguous() for c in coef]
        self.backend = backend
        self.last_backend: str | None = None
        self.last_reason: str | None = None
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # r enters adam_full's adjoint post pass only through wd: skip reading it if wd == 0
        self._post_needs_r = any(w != 0.0 for w in params.column("wd"))

    @property
    def kind(self) -> str:
        return self.params.kind

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def nblocks(self) -> int:
        return self.params.nblocks

    def __repr__(self) -> str:
        return (
            f"<UpdateBlocks kind={self.kind} n={self.n} segments={len(self.params.rows)} "
            f"backend={self.backend!r}>"
        )

    # -- passes --------------------------------------------------------------------------------
    def matvec(
        self,
        x: Sequence[torch.Tensor],
        hv: torch.Tensor,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The blocks of ``J x`` from the blocks of ``x`` and ``hv = H x[0]``.

        Returns ``out`` if given, else new blocks (views of one contiguous buffer).
        """
        return tuple(self._run("fwd", [*x, hv], out))

    def rmatvec_pre(self, y: Sequence[torch.Tensor], *, out: torch.Tensor | None = None):
        """The HVP input ``u`` of ``J^T y``; the caller then computes ``hv = H u``."""
        return self._run("pre", list(y), None if out is None else [out])[0]

    def rmatvec_post(
        self,
        y: Sequence[torch.Tensor],
        hv: torch.Tensor,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The blocks of ``J^T y`` from the blocks of ``y`` and ``hv = H u``."""
        return tuple(self._run("post", [*y, hv], out))

    # -- internals -----------------------------------------------------------------------------
    def _choose(self, device: torch.device, dtypes: list[torch.dtype]) -> tuple[str, str]:
        return resolve_backend(self.backend, device, dtypes)

    def _note(self, backend: str, reason: str) -> None:
        if (backend, reason) != (self.last_backend, self.last_reason):
            if backend == "torch":
                logger.debug("update blocks (%s): torch path: %s", self.kind, reason)
            else:
                logger.debug("update blocks (%s): fused CuPy kernels: %s", self.kind, reason)
        self.last_backend, self.last_reason = backend, reason

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._tables.get(device)
        if t is None:
            goff = torch.tensor(self.params.offsets, dtype=torch.int64, device=device)
            gtab = torch.tensor(self.params.rows, dtype=torch.float64, device=device).reshape(-1)
            t = self._tables[device] = (goff, gtab)
        return t

    def _run(self, direction: str, ins: list, out) -> list[torch.Tensor]:
        ins, coef, outs = check_call(self.params, direction, ins, self.coef, out)
        device = ins[0].device
        dtypes = [ins[0].dtype] + [c.dtype for c in coef if c is not None]
        backend, reason = self._choose(device, dtypes)
        if backend == "cupy":
            cf = list(coef)
            if direction == "post" and self.kind == "adam_full" and not self._post_needs_r:
                cf[2] = None
            goff, gtab = self._table(device)
            plan = _cupy.plan_launch(
                self.kind, direction, ins, outs, cf, goff, gtab, _cupy.max_blocks(device)
            )
            if plan is None:  # n * s == 0: nothing to compute
                self._note(backend, reason)
                return outs
            if self._prepare(plan, device):
                self._note(backend, reason)
                _cupy.launch(plan, device)
                return outs
            backend, reason = "torch", _cupy.status().reason
        self._note(backend, reason)
        run_reference(self.params, direction, ins, coef, outs)
        return outs

    def _prepare(self, plan: _cupy.LaunchPlan, device: torch.device) -> bool:
        """Compile/load the kernel; on failure: raise (``cupy``) or fall back once (``auto``)."""
        try:
            _cupy.get_kernel(_cupy.device_index(device), plan.name, plan.tdtype, plan.cdtype)
        except Exception as err:
            reason = f"compiling the fused kernels failed: {type(err).__name__}: {err}"
            if self.backend == "cupy":
                raise RuntimeError(f"backend='cupy' cannot run: {reason}") from err
            _cupy.mark_broken(reason)
            _warn_once(reason)
            return False
        return True

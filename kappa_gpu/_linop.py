"""The one operator abstraction of kappa_gpu: a matrix-free linear map on torch tensors.

Solvers see only :class:`LinearOperator`; model-specific code only builds operators.
The interface follows ``scipy.sparse.linalg.LinearOperator`` (shape, dtype, matvec, matmat,
rmatvec) and curvlinops' torch operators, with a ``device`` added: all vectors live on the
operator's device and never leave it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["LinearOperator", "aslinearoperator", "DENSE_LIMIT"]

#: ``to_dense`` refuses operators with more entries than this (about 128 MiB in float64).
DENSE_LIMIT = 16_000_000


class LinearOperator:
    """A matrix-free linear operator ``A`` of shape ``(m, n)`` on torch tensors.

    Subclasses implement ``_matvec`` and, for the adjoint, ``_rmatvec``; ``_matmat`` and
    ``_rmatmat`` default to column loops and should be overridden where a batched product is
    cheaper (one batched HVP for several columns). The public methods validate shapes once and
    dispatch; they never copy vectors to the host.

    Attributes:
        shape: ``(m, n)``.
        dtype: the dtype of the vectors the operator takes and returns.
        device: the device of those vectors.
    """

    #: Whether ``matmat`` takes any strided ``(n, s)`` block, e.g. the transposed view of
    #: ``s`` contiguous rows. The solvers pass such views only to operators that set it (the
    #: Hessian operators, whose engine works row by row); everyone else gets contiguous blocks.
    _strided_ok: bool = False

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str):
        m, n = (int(s) for s in shape)
        if m < 0 or n < 0:
            raise ValueError(f"shape must be non-negative, got {shape}")
        self.shape = (m, n)
        self.dtype = dtype
        self.device = torch.device(device)

    # -- to be provided by subclasses --------------------------------------------------
    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define a matvec")

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no adjoint (rmatvec); construct it with one"
        )

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._matvec(X[:, j]) for j in range(X.shape[1])], dim=1)

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._rmatvec(Y[:, j]) for j in range(Y.shape[1])], dim=1)

    # -- public, validated ---------------------------------------------------------------
    def _check(self, x: torch.Tensor, size: int, ndim: int, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} expects a torch.Tensor, got {type(x).__name__}")
        if x.ndim != ndim or x.shape[0] != size:
            want = f"({size},)" if ndim == 1 else f"({size}, s)"
            raise ValueError(
                f"{what} expects a tensor of shape {want} for an operator of shape "
                f"{self.shape}, got {tuple(x.shape)}"
            )
        if x.device != self.device:
            raise ValueError(
                f"{what}: tensor is on {x.device} but the operator is on {self.device}; "
                f"move it with .to({str(self.device)!r})"
            )
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``A @ x`` for ``x`` of shape ``(n,)``."""
        return self._matvec(self._check(x, self.shape[1], 1, "matvec"))

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """Return ``A^T @ y`` (the adjoint; real operators) for ``y`` of shape ``(m,)``."""
        return self._rmatvec(self._check(y, self.shape[0], 1, "rmatvec"))

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """Return ``A @ X`` for ``X`` of shape ``(n, s)`` (columns are vectors)."""
        return self._matmat(self._check(X, self.shape[1], 2, "matmat"))

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """Return ``A^T @ Y`` for ``Y`` of shape ``(m, s)``."""
        return self._rmatmat(self._check(Y, self.shape[0], 2, "rmatmat"))

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)

    @property
    def T(self) -> LinearOperator:
        """The adjoint operator (``matvec`` of it is ``rmatvec`` of this one)."""
        return _AdjointOperator(self)

    H = T

    def to_dense(self, max_entries: int = DENSE_LIMIT, batch: int = 64) -> torch.Tensor:
        """Materialize ``A`` as a dense ``(m, n)`` tensor by applying it to identity columns.

        Costs ``n`` matvecs (done ``batch`` columns at a time through ``matmat``). Refuses
        operators with more than ``max_entries`` entries: raise the limit explicitly if you
        really mean it.
        """
        m, n = self.shape
        if m * n > max_entries:
            raise ValueError(
                f"to_dense() would build a {m} x {n} matrix ({m * n:,} entries > max_entries="
                f"{max_entries:,}); use matvec/matmat, or pass a larger max_entries if you "
                "really want it"
            )
        cols = []
        for j0 in range(0, n, batch):
            j1 = min(n, j0 + batch)
            E = torch.zeros(n, j1 - j0, dtype=self.dtype, device=self.device)
            E[torch.arange(j0, j1), torch.arange(j1 - j0)] = 1
            cols.append(self.matmat(E))
        if not cols:
            return torch.zeros(m, 0, dtype=self.dtype, device=self.device)
        return torch.cat(cols, dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` over numpy arrays (copies to/from host).

        For interop and cross-checks, e.g. ``scipy.sparse.linalg.eigs(A.to_scipy(), k=6)``.
        """
        from scipy.sparse.linalg import LinearOperator as SciPyLinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def wrap(fn, size):
            # scipy passes (n,) or (n, 1); it reshapes what we return itself.
            def f(v):
                t = torch.as_tensor(np.ascontiguousarray(np.asarray(v).reshape(size)))
                return fn(t.to(device=self.device, dtype=self.dtype)).detach().cpu().numpy()

            return f

        def mm(V):
            t = torch.as_tensor(np.ascontiguousarray(V)).to(device=self.device, dtype=self.dtype)
            return self.matmat(t).detach().cpu().numpy()

        def rmm(V):
            t = torch.as_tensor(np.ascontiguousarray(V)).to(device=self.device, dtype=self.dtype)
            return self.rmatmat(t).detach().cpu().numpy()

        return SciPyLinearOperator(
            self.shape,
            matvec=wrap(self.matvec, self.shape[1]),
            rmatvec=wrap(self.rmatvec, self.shape[0]),
            matmat=mm,
            rmatmat=rmm,
            dtype=np_dtype,
        )

    def __repr__(self) -> str:
        m, n = self.shape
        return f"<{m}x{n} {type(self).__name__} dtype={self.dtype} device={self.device}>"


class _AdjointOperator(LinearOperator):
    def __init__(self, A: LinearOperator):
        super().__init__((A.shape[1], A.shape[0]), A.dtype, A.device)
        self.A = A

    def _matvec(self, x):
        return self.A._rmatvec(x)

    def _rmatvec(self, y):
        return self.A._matvec(y)

    def _matmat(self, X):
        return self.A._rmatmat(X)

    def _rmatmat(self, Y):
        return self.A._matmat(Y)

    @property
    def T(self) -> LinearOperator:
        return self.A


class _DenseOperator(LinearOperator):
    def __init__(self, M: torch.Tensor):
        super().__init__(tuple(M.shape), M.dtype, M.device)
        self.M = M

    def _matvec(self, x):
        return self.M @ x

    def _rmatvec(self, y):
        return self.M.mT @ y

    def _matmat(self, X):
        return self.M @ X

    def _rmatmat(self, Y):
        return self.M.mT @ Y

    def to_dense(self, max_entries: int = DENSE_LIMIT, batch: int = 64) -> torch.Tensor:
        return self.M.clone()


class _CallableOperator(LinearOperator):
    def __init__(self, shape, dtype, device, matvec, rmatvec=None, matmat=None, rmatmat=None):
        super().__init__(shape, dtype, device)
        self._mv, self._rmv, self._mm, self._rmm = matvec, rmatvec, matmat, rmatmat

    def _matvec(self, x):
        return self._mv(x)

    def _rmatvec(self, y):
        if self._rmv is None:
            return super()._rmatvec(y)
        return self._rmv(y)

    def _matmat(self, X):
        return self._mm(X) if self._mm is not None else super()._matmat(X)

    def _rmatmat(self, Y):
        return self._rmm(Y) if self._rmm is not None else super()._rmatmat(Y)


def aslinearoperator(
    A: torch.Tensor | np.ndarray | LinearOperator | Callable[[torch.Tensor], torch.Tensor],
    *,
    shape: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    rmatvec: Callable[[torch.Tensor], torch.Tensor] | None = None,
    matmat: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rmatmat: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LinearOperator:
    """Wrap a dense matrix or a matvec callable as a :class:`LinearOperator`.

    Args:
        A: a 2-D torch tensor or numpy array (kept as is, on its device), an existing
            operator (returned unchanged), a ``scipy.sparse.linalg.LinearOperator`` or SciPy
            sparse matrix (products through numpy on the host, float32/float64), or a
            callable ``x -> A @ x``.
        shape, dtype, device: required with a callable (``dtype`` defaults to float64,
            ``device`` to cpu); ignored otherwise.
        rmatvec, matmat, rmatmat: optional adjoint and batched products for a callable.

    Example:
        >>> import torch, kappa_gpu as kg
        >>> A = kg.aslinearoperator(torch.eye(3, dtype=torch.float64))
        >>> A.matvec(torch.ones(3, dtype=torch.float64))
        tensor([1., 1., 1.], dtype=torch.float64)
    """
    if isinstance(A, LinearOperator):
        return A
    if type(A).__module__.startswith("scipy."):
        return _from_scipy(A)
    if isinstance(A, np.ndarray):
        A = torch.from_numpy(A)
    if isinstance(A, torch.Tensor):
        if A.ndim != 2:
            raise ValueError(f"a dense operator must be 2-D, got shape {tuple(A.shape)}")
        if A.is_complex():
            raise TypeError("kappa_gpu operators are real; got a complex matrix")
        return _DenseOperator(A)
    if callable(A):
        if shape is None:
            raise ValueError("aslinearoperator(callable) needs shape=(m, n)")
        return _CallableOperator(
            shape,
            dtype or torch.float64,
            device or "cpu",
            A,
            rmatvec=rmatvec,
            matmat=matmat,
            rmatmat=rmatmat,
        )
    raise TypeError(
        f"cannot make a LinearOperator from {type(A).__name__}; pass a 2-D tensor, an array, "
        "or a callable with shape="
    )


def _from_scipy(A) -> LinearOperator:
    """A SciPy ``LinearOperator`` or sparse matrix as a host (cpu) operator (the inverse of
    :meth:`LinearOperator.to_scipy`)."""
    import scipy.sparse.linalg as spla

    try:
        S = spla.aslinearoperator(A)
    except TypeError as e:
        raise TypeError(f"cannot make a LinearOperator from {type(A).__name__}: {e}") from None
    if S.dtype is None or np.dtype(S.dtype).kind != "f":
        raise TypeError(f"kappa_gpu operators are real float32/float64; got dtype {S.dtype}")
    dtype = torch.float32 if np.dtype(S.dtype) == np.float32 else torch.float64

    def host(fn):
        def f(x: torch.Tensor) -> torch.Tensor:
            y = np.asarray(fn(x.detach().cpu().numpy()))
            return torch.from_numpy(np.ascontiguousarray(y)).to(dtype=x.dtype, device=x.device)

        return f

    # A scipy operator built from a matvec alone has no adjoint: pass none, so that
    # eigs(left=True) refuses it before spending matvecs (as for a callable without rmatvec)
    adjoint = _scipy_has_adjoint(S)
    return _CallableOperator(tuple(S.shape), dtype, "cpu", host(S.matvec),
                             rmatvec=host(S.rmatvec) if adjoint else None, matmat=host(S.matmat),
                             rmatmat=host(S.rmatmat) if adjoint else None)


def _scipy_has_adjoint(S) -> bool:
    """Whether a SciPy LinearOperator defines its adjoint (a matrix-backed one always does;
    ``LinearOperator(matvec=...)`` only with ``rmatvec=`` or ``rmatmat=``)."""
    import scipy.sparse.linalg as spla

    if type(S).__name__ == "_CustomLinearOperator":  # LinearOperator(shape, matvec=, ...)
        return (getattr(S, "_CustomLinearOperator__rmatvec_impl", None) is not None
                or getattr(S, "_CustomLinearOperator__rmatmat_impl", None) is not None)
    return (type(S)._rmatvec is not spla.LinearOperator._rmatvec
            or type(S)._adjoint is not spla.LinearOperator._adjoint)

"""The exact linearized update operators of torch.optim SGD, Adam and AdamW (DESIGN.md sec. 2).

The state vector is the optimizer's own state, in torch's own coordinates: blocks in the order
``theta`` then the state entries (``momentum_buffer``; ``exp_avg``; ``exp_avg_sq``), and inside
a block the trainable parameters in the order of ``optimizer.param_groups[i]["params"]``
(groups in order, ``requires_grad=False`` skipped), each flattened with ``.reshape(-1)``.

With ``g`` the gradient of the loss on the batch at the current point and ``H`` its Hessian,
``Ht = (+-)H + diag(wd_L2)`` (``-`` for ``maximize=True``; ``wd_L2`` is SGD's and Adam's L2
weight decay, zero for decoupled AdamW decay) and one HVP per product:

- SGD, momentum 0 (state theta)::

      J = I - eta Ht

- SGD heavy ball (state theta, b)::

      J = [[ I - eta (1-d) Ht , -eta mu I ],
           [ (1-d) Ht         ,  mu I     ]]

- SGD nesterov::

      J = [[ I - eta (1 + mu (1-d)) Ht , -eta mu^2 I ],
           [ (1-d) Ht                  ,  mu I       ]]

- Adam/AdamW, ``variant="frozen"`` (preconditioner D = eta / (bc1 denom) held fixed; state
  theta, m)::

      J = [[ c I - (1-b1) D Ht , -b1 D ],
           [ (1-b1) Ht         ,  b1 I ]]

- Adam/AdamW, ``variant="full"`` (exact Jacobian of the real step; state theta, m, v)::

      dm'     = b1 dm + (1-b1) Ht dtheta
      dv'     = b2 dv + 2 (1-b2) gt * (Ht dtheta)
      dtheta' = c dtheta - D dm' + q dv',
      q       = (eta/bc1) m' / (denom^2 * 2 sqrt(v') sqrt(bc2))   (0 where v' = 0)

With gradient clipping before the step (``clip_grad_norm=`` / ``clip_grad_value=``, see
:class:`GradientClip`) the step sees ``clip(g)`` and ``Ht = (+-)C H + diag(wd_L2)``, ``C`` the
clip's symmetric Jacobian at ``g``: the same formulas with a non-symmetric ``Ht`` (adjoint
``(+-)H C + diag(wd_L2)``), and ``gt`` the clipped gradient.

Per-group hyper-parameters make eta, mu, b1, ... diagonal. A parameter the loss does not reach
(its autograd gradient is None) is skipped by ``optimizer.step()`` after ``zero_grad()``: its
rows of J are the identity, and it is marked inactive in :class:`BlockStructure`.

Backends of the block arithmetic (the elementwise work around the one HVP of each product):
``"torch"`` is the in-place torch code of this module (the CPU path and the reference);
``"cupy"`` runs it as one fused CUDA kernel per pass (:mod:`kappa_gpu._cuda`, the same
formulas regrouped per segment: equal to the torch path up to float rounding, not bitwise);
``"auto"`` picks ``"cupy"`` for CUDA tensors when CuPy works, else ``"torch"``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kappa_gpu._cuda import BACKENDS, BlockParams, UpdateBlocks, resolve_backend
from kappa_gpu._distributed import check_not_sharded
from kappa_gpu._linop import LinearOperator
from kappa_gpu.operators._hvp import HessianOperator, _EngineAttributes, _HVPEngine
from kappa_gpu.operators._validate import (
    MissingOptimizerStateError,
    NonFiniteError,
    NoTrainableParametersError,
    StaleOperatorError,
    UnsupportedConfigurationError,
    check_optimizer_type,
    scalar,
)

__all__ = ["UpdateOperator", "BlockStructure", "GradientClip", "update_operator"]

Coef = float | torch.Tensor
#: ``() -> (BlockParams, per-entry coefficient vectors)``: the table the fused kernels read,
#: built only when the fused path is taken.
BlockSpec = Callable[[], tuple[BlockParams, tuple[torch.Tensor, ...]]]

logger = logging.getLogger("kappa_gpu")


#: ``torch.nn.utils.clip_grad_norm_``'s guard: ``clip_coef = max_norm / (total_norm + 1e-6)``
_CLIP_NORM_EPS = 1e-6


def _scale_rows(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``diag(d) x`` for ``x`` of shape ``(n,)`` or ``(n, s)``: a new tensor."""
    return x * (d[:, None] if x.ndim == 2 else d)


class GradientClip:
    """Gradient clipping before the step, linearized at the current gradient ``g``.

    What ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (2-norm over all the optimizer's
    parameters; what the Hugging Face Trainer's ``max_grad_norm`` and Lightning's
    ``gradient_clip_val`` run) or ``clip_grad_value_(params, clip_value)`` do to ``.grad``
    between ``backward()`` and ``optimizer.step()``. The step then sees ``clip(g)``, and its
    Jacobian the chain rule's ``C H`` in place of ``H``, with ``C`` the clip's Jacobian at ``g``:

    - norm, active (``||g|| + 1e-6 > max_norm``): ``clip(g) = s g`` with
      ``s = max_norm / (||g|| + 1e-6)`` and ``C = s (I - g g^T / (||g|| (||g|| + 1e-6)))``:
      the step is scaled down and loses its component along ``g``;
    - value, active (some ``|g_i| > clip_value``): ``clip(g) = clamp(g, -c, c)``,
      ``C = diag(|g| <= c)``: clipped entries do not respond to the parameters;
    - inactive: ``C = I``, the unclipped operator.

    ``C`` is symmetric, so ``(C H)^T = H C``: one HVP per product either way. ``C H`` is not
    symmetric, so while the clip is active ``structure()`` is None and the estimate runs
    Arnoldi on J, started from the modes of the symmetrized curvature ``C^1/2 Ht C^1/2``
    (:meth:`UpdateOperator.similar_structure`; 95,770-parameter MLP, k = 8: 238 HVPs against
    145 for the structured path without the clip with SGD, 256 against 75 with AdamW). For
    SGD with one learning rate J is exactly similar to that structured operator, but the
    similarity is ill-conditioned (the norm clip's ``C`` has the eigenvalue ``s 1e-6 / ||g||``
    along ``g``), so the eigenvectors are Arnoldi's, not mapped ones. At
    ``||g|| + 1e-6 = max_norm`` (or ``|g_i| = c``) the clipped step has no Jacobian; ``C``
    there is the one-sided one of the side ``g`` lies on.

    The norm is the 2-norm over the optimizer's trainable parameters. A training loop that
    clips over ``model.parameters()`` counts trainable parameters the optimizer does not hold
    as well; :func:`update_operator` warns when there are any (``op.notes``).

    Attributes:
        kind: ``"norm"`` or ``"value"``.
        threshold: ``max_norm`` or ``clip_value``.
        grad_norm: ``||g||`` (2-norm, the one the norm clip compares).
        active: whether the clip changes the gradient at this point.
        scale: the norm clip's factor ``s`` (1.0 when inactive; 1.0 for the value clip).
        n_clipped: entries the value clip cuts (0 for the norm clip).
    """

    def __init__(self, kind: str, threshold: float, g: torch.Tensor):
        self.kind = kind
        self.threshold = float(threshold)
        norm = float(torch.linalg.vector_norm(g.double()))
        self.grad_norm = norm
        self.scale = 1.0
        self.n_clipped = 0
        self._uhat: torch.Tensor | None = None  # g / ||g|| (None for g = 0)
        # C = s (I - alpha uhat uhat^T), alpha = ||g|| / (||g|| + 1e-6); kept as
        # sqrt(1 - alpha) = sqrt(1e-6 / (||g|| + 1e-6)), exact where alpha rounds to 1
        self._rest = 1.0
        self._mask: torch.Tensor | None = None
        if kind == "norm":
            coef = self.threshold / (norm + _CLIP_NORM_EPS)
            self.active = coef < 1.0
            if self.active:
                self.scale = coef
                # g = 0 (max_norm < 1e-6: torch scales a zero gradient): C = s I, no direction
                if norm > 0:
                    self._uhat = g / norm
                    self._rest = math.sqrt(_CLIP_NORM_EPS / (norm + _CLIP_NORM_EPS))
        else:
            mask = g.abs() <= self.threshold
            self.n_clipped = int(mask.numel() - int(mask.sum()))
            self.active = self.n_clipped > 0
            if self.active:
                self._mask = mask.to(g.dtype)

    def __repr__(self) -> str:
        return (f"GradientClip(kind={self.kind!r}, threshold={self.threshold:g}, "
                f"grad_norm={self.grad_norm:.4g}, active={self.active})")

    def clipped(self, g: torch.Tensor) -> torch.Tensor:
        """``clip(g)``: the gradient the step takes."""
        if not self.active:
            return g
        if self.kind == "norm":
            return g * self.scale
        return g.clamp(-self.threshold, self.threshold)

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """``C x`` for ``x`` of shape ``(n,)`` or ``(n, s)``: a new tensor (``x`` untouched)."""
        if not self.active:
            return x.clone()
        if self._mask is not None:
            return _scale_rows(x, self._mask)
        if self._uhat is None:  # g = 0: C = s I
            return x * self.scale
        u = self._uhat
        w = (u @ x) * (1.0 - self._rest**2)  # alpha uhat^T x; () or (s,)
        return (x - (u[:, None] * w if x.ndim == 2 else u * w)).mul_(self.scale)

    def sqrt_jacobian(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``R x`` with ``R = C^1/2`` (``inverse``: ``R^-1 x``), for start subspaces.

        Norm clip: ``R = sqrt(s) (I - (1 - sqrt(1 - alpha)) uhat uhat^T)``, with ``C = s (I -
        alpha uhat uhat^T)``; its inverse grows the ``g`` direction by ``sqrt(||g|| / 1e-6)``.
        Value clip: ``R`` is the mask, which has no inverse (``inverse`` returns ``x``).
        A new tensor; ``x`` of shape ``(n,)`` or ``(n, s)``.
        """
        if not self.active:
            return x.clone()
        if self._mask is not None:
            if inverse:
                return x.clone()
            return _scale_rows(x, self._mask)
        root = math.sqrt(self.scale)
        if self._uhat is None:  # g = 0: C = s I
            return x / root if inverse else x * root
        u, rest = self._uhat, self._rest
        coef = (1.0 / rest - 1.0) if inverse else -(1.0 - rest)
        w = (u @ x) * coef
        out = x + (u[:, None] * w if x.ndim == 2 else u * w)
        return out.div_(root) if inverse else out.mul_(root)

    def describe(self) -> str:
        """One sentence for a report: what the clip does at this point."""
        name = "max_norm" if self.kind == "norm" else "clip_value"
        if not self.active:
            where = (f"||g|| = {self.grad_norm:.4g} <= {name}" if self.kind == "norm"
                     else f"every |g_i| <= {name}")
            return (f"gradient clipping by {self.kind} ({name}={self.threshold:g}) is inactive "
                    f"here ({where}): J is the unclipped step's")
        if self.kind == "norm":
            gt = ">" if self.grad_norm > self.threshold else "+ 1e-6 >"
            what = (f"||g|| = {self.grad_norm:.6g} {gt} max_norm, the step is scaled by "
                    f"{self.scale:.6g}")
        else:
            what = f"{self.n_clipped} gradient entries are cut to +-{self.threshold:g}"
        return (f"gradient clipping by {self.kind} ({name}={self.threshold:g}) is active here "
                f"({what}): J includes the clip's Jacobian C H, which the structured path "
                "does not take (estimate runs arnoldi)")


class _GradientMap:
    """``K = C M``: the linear map between the loss's gradient and the one the step takes.

    ``M`` zeroes the padding rows of ``nn.Embedding(padding_idx=p)`` weights (torch masks
    their gradient; None: no such row reached), ``C`` is the active clip's Jacobian at ``M g``
    (None: no active clip). They commute (the norm clip's direction ``M g`` lies in ``M``'s
    range; the value clip's ``C`` is diagonal), so ``K`` is symmetric with the square root
    ``C^1/2 M``.
    """

    def __init__(self, clip: GradientClip | None, mask: torch.Tensor | None,
                 split: bool = False):
        self.clip = clip if clip is not None and clip.active else None
        self.mask = mask
        #: padding rows split by the engine (:meth:`_HVPEngine.split_padding`): the curvature
        #: is its ``G`` (not symmetric) instead of ``H``
        self.split = split

    def curvature(self, engine: _HVPEngine, x: torch.Tensor, adjoint: bool = False
                  ) -> torch.Tensor:
        """``K G x`` (``adjoint``: ``G^T K x``), a new tensor; ``G = H`` unless rows are split."""
        if adjoint:
            return engine.hvp(self.apply(x), "adjoint" if self.split else "full")
        return self.apply(engine.hvp(x, "step" if self.split else "full"))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``K x`` (= ``K^T x``), a new tensor; ``x`` of shape ``(n,)`` or ``(n, s)``."""
        if self.mask is not None:
            y = _scale_rows(x, self.mask)  # a new tensor
            return self.clip.jacobian(y) if self.clip is not None else y
        return self.clip.jacobian(x) if self.clip is not None else x.clone()

    def sqrt(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``K^1/2 x``; ``inverse``: ``C^-1/2 x`` (``M`` has no inverse: left as it is)."""
        y = self.clip.sqrt_jacobian(x, inverse) if self.clip is not None else x.clone()
        if self.mask is not None and not inverse:
            y = _scale_rows(y, self.mask)
        return y


class _MappedHessian(HessianOperator):
    """``Ht = sign K H + diag(shift)``: the curvature the step sees through the gradient map
    ``K`` (:class:`_GradientMap`: clip, padding rows); its adjoint is ``sign H K + diag(shift)``."""

    def __init__(self, engine: _HVPEngine, gmap: _GradientMap, sign: float = 1.0,
                 shift: float | torch.Tensor | None = None):
        super().__init__(engine, sign=sign, shift=shift)
        self.gmap = gmap

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self._signed(self.gmap.curvature(self._engine, x), x)

    def _rmatvec(self, x: torch.Tensor) -> torch.Tensor:
        return self._signed(self.gmap.curvature(self._engine, x, adjoint=True), x)

    _matmat = _matvec
    _rmatmat = _rmatvec


class _SymmetrizedMappedHessian(HessianOperator):
    """``sign K^1/2 H K^1/2 + diag(shift)``: symmetric, and similar to the mapped curvature
    ``sign K H + shift`` when ``K`` is invertible and the shift a scalar. Only a start subspace
    is computed with it (:meth:`UpdateOperator.similar_structure`)."""

    def __init__(self, engine: _HVPEngine, gmap: _GradientMap, sign: float = 1.0,
                 shift: float | torch.Tensor | None = None):
        super().__init__(engine, sign=sign, shift=shift)
        self.gmap = gmap

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        r = self.gmap.sqrt
        return self._signed(r(self._engine.hvp(r(x))), x)

    _rmatvec = _matvec
    _matmat = _matvec
    _rmatmat = _matvec


def _curvature(engine: _HVPEngine, gmap: _GradientMap | None, sign: float,
               shift: float | torch.Tensor | None) -> HessianOperator:
    if gmap is not None:
        return _MappedHessian(engine, gmap, sign=sign, shift=shift)
    return HessianOperator(engine, sign=sign, shift=shift)


@dataclass
class BlockStructure:
    """The structure of an update operator that the fast (structured) solvers use.

    DESIGN.md section 3: an eigenpair ``(s, w)`` of the symmetric ``D^(1/2) Ht D^(1/2)`` gives
    ``u = D^(1/2) w`` with ``D Ht u = s u`` and, for ``order == 2``, the invariant subspace
    ``span{(u, 0), (0, D^-1 u)}`` of ``J`` on which ``J`` acts as
    ``M(s) = [[c - a s, -b], [a2 s, beta]]``; for ``order == 1`` the eigenvalue
    ``z = c - a s`` with eigenvector ``u``. This is exact when ``uniform`` is True.

    All per-entry fields are ``(n,)`` tensors in the operator's dtype; constant ones may be
    expanded views (``stride 0``): read them, do not write into them.

    Attributes:
        hessian: ``Ht = (+-)H + diag(wd_L2)``, symmetric ``n x n``; counts into the update
            operator's ``n_hvp`` (one HVP per column).
        D: the diagonal preconditioner: ``eta`` for SGD, ``eta / (bc1 denom)`` for Adam
            (0 on inactive entries).
        a, a2, b, beta, c: the coefficients of ``M(s)``.
        order: 2 for momentum SGD and Adam (frozen), 1 for SGD without momentum.
        uniform: True when ``a, a2, b, beta, c`` are each constant over the active entries.
        active: None when every entry is active; else a bool ``(n,)`` mask, False on
            parameters the loss does not reach (torch skips them; J is the identity there and
            decoupled from the rest, with eigenvalue 1).
    """

    hessian: HessianOperator
    D: torch.Tensor
    a: torch.Tensor
    a2: torch.Tensor
    b: torch.Tensor
    beta: torch.Tensor
    c: torch.Tensor
    order: int
    uniform: bool
    active: torch.Tensor | None = None


def _factor(coefs: tuple[Coef, ...], X: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """Split a product of coefficients into a float and an (n,) tensor shaped to scale ``X``."""
    val, tens = 1.0, None
    for c in coefs:
        if isinstance(c, torch.Tensor):
            tens = c if tens is None else tens * c
        else:
            val *= c
    if tens is not None and X.ndim == 2:
        tens = tens[:, None]
    return val, tens


def _set(out: torch.Tensor, X: torch.Tensor, *coefs: Coef) -> torch.Tensor:
    """``out = prod(coefs) * X`` (diagonal coefficients), written in place."""
    val, tens = _factor(coefs, X)
    if tens is None:
        return torch.mul(X, val, out=out)
    torch.mul(X, tens, out=out)
    return out if val == 1.0 else out.mul_(val)


def _acc(out: torch.Tensor, X: torch.Tensor, *coefs: Coef) -> torch.Tensor:
    """``out += prod(coefs) * X`` in place: one fused pass (``add_``/``addcmul_``), no temporary
    for float coefficients or a single tensor one."""
    val, tens = _factor(coefs, X)
    if tens is None:
        return out.add_(X, alpha=val) if val != 0.0 else out
    return out.addcmul_(tens, X, value=val)


class UpdateOperator(_EngineAttributes, LinearOperator):
    """The Jacobian ``J`` of one ``optimizer.step()`` with respect to the optimizer state.

    Built by :func:`update_operator`; see the ``kappa_gpu.operators._update`` module docstring
    for the formulas. ``matvec`` and ``rmatvec`` (the exact adjoint, from the same symmetric
    Hessian) each cost one HVP; ``matmat``/``rmatmat`` with ``s`` columns cost ``s`` HVP
    columns, batched with ``vmap``. Everything else is a few elementwise vector operations.

    Attributes:
        n_params: ``n``, the number of trainable scalars; the operator is ``(k n) x (k n)``
            with ``k = len(blocks)``.
        blocks: names of the state blocks, e.g. ``("theta", "momentum_buffer")``.
        kind: ``"sgd"``, ``"adam"`` or ``"adamw"`` (decoupled weight decay).
        variant: ``"frozen"`` or ``"full"`` for Adam(W), None for SGD.
        n_hvp: HVP columns applied so far (shared with ``structure().hessian``).
        hvp_mode: which HVP path is in use (see :mod:`kappa_gpu.operators._hvp`).
        params: the trainable parameters, in state order.
        loss: the loss at the current point (the mean over the ranks under a process group).
        world_size: ranks of the process group the products are averaged over (1: local).
        seed: the RNG seed every product uses.
        backend: ``"cupy"`` (fused CUDA kernels) or ``"torch"``: the path the block arithmetic
            takes. Chosen at build time; it turns to ``"torch"`` (with one ``RuntimeWarning``)
            if, under ``backend="auto"``, the kernels fail to compile at the first product.
        backend_reason: why that backend was chosen (a sentence, also logged at DEBUG on the
            ``kappa_gpu`` logger).
    """

    def __init__(
        self,
        engine: _HVPEngine,
        optimizer: torch.optim.Optimizer,
        *,
        kind: str,
        variant: str | None,
        blocks: tuple[str, ...],
        hessian: HessianOperator,
        coefs: dict[str, Coef],
        order: int,
        uniform: bool,
        active: torch.Tensor | None,
        block_spec: BlockSpec,
        backend: tuple[str, str, str] = ("torch", "torch", "backend='torch' was requested"),
        gmap: _GradientMap | None = None,
    ):
        n = engine.n
        super().__init__((len(blocks) * n, len(blocks) * n), engine.dtype, engine.device)
        self._engine = engine
        self._optimizer = optimizer
        self._hyper = _hyperparameters(optimizer)
        self._marks = _state_marks(optimizer, engine.params, kind)
        engine.fresh_checks.append(self._check_hyperparameters)
        self.n_params = n
        self.blocks = blocks
        self.kind = kind
        self.variant = variant
        #: what the operator leaves out of the real step (hooks, mutated buffers); estimate
        #: puts these into its report's message
        self.notes: list[str] = []
        self.seed = engine.seed
        #: the gradient clipping the step applies (None: none), see :class:`GradientClip`;
        #: set by update_operator
        self.clip: GradientClip | None = None
        #: the nn.Embedding padding rows the step does not take (``"emb.weight[0]"``), if
        #: the batch reaches them; set by update_operator
        self.padding: list[str] = []
        #: those of them whose weight is also used elsewhere (a tied output layer) with the
        #: padding positions scored: the step drops only the lookups' share of their gradient
        self.padding_shared: list[str] = []
        self._gmap = gmap
        self._ht = hessian
        self._coefs = coefs
        self._order = order
        self._uniform = uniform
        self._active = active
        self._block_spec = block_spec
        # backend: (requested, chosen, reason); see update_operator's ``backend`` argument
        requested, chosen, self.backend_reason = backend
        self._blocks: UpdateBlocks | None = None
        self.backend = "torch"
        if chosen == "cupy":
            self._fuse(requested)
            self.backend = "cupy"

    def _check_hyperparameters(self) -> None:
        now = _hyperparameters(self._optimizer)
        if now != self._hyper:
            changed = sorted({k for a, b in zip(now, self._hyper, strict=False)
                              for k in set(a) | set(b) if a.get(k) != b.get(k)})
            raise StaleOperatorError(
                f"the optimizer's hyper-parameters {changed or '(param groups)'} changed since "
                "the operator was built (a scheduler step or an edit): J's coefficients, and "
                "the structure built with them, are the old ones; build a new operator"
            )
        if _state_marks(self._optimizer, self._engine.params, self.kind) != self._marks:
            raise StaleOperatorError(
                "the optimizer's state (momentum buffers, Adam's moments or step count) changed "
                "since the operator was built (an in-place edit or load_state_dict): J's "
                "coefficients are the old ones; build a new operator"
            )

    def __repr__(self) -> str:
        m = self.shape[0]
        v = f" variant={self.variant}" if self.variant else ""
        return (
            f"<{m}x{m} UpdateOperator kind={self.kind}{v} blocks={self.blocks} "
            f"n_params={self.n_params} dtype={self.dtype} device={self.device} "
            f"backend={self.backend}>"
        )

    def _fuse(self, backend: str) -> None:
        """Route the block arithmetic through :class:`UpdateBlocks` with ``backend``.

        ``"auto"``/``"cupy"``: the fused kernels (built when the dispatch chose them).
        ``"torch"``: UpdateBlocks' own torch reference, which lets the CPU tests check the
        coefficient table of the fused path against this module's torch code.
        """
        params, coef = self._block_spec()
        self._blocks = UpdateBlocks(params, coef, backend=backend)

    # -- state -----------------------------------------------------------------------------
    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split a state vector ``(k n,)`` (or ``(k n, s)``) into its ``k`` blocks (views)."""
        n = self.n_params
        if x.shape[0] != len(self.blocks) * n:
            raise ValueError(
                f"split expects a vector of length {len(self.blocks) * n} "
                f"({len(self.blocks)} blocks of n={n}), got shape {tuple(x.shape)}"
            )
        return [x[i * n : (i + 1) * n] for i in range(len(self.blocks))]

    def state_vector(self) -> torch.Tensor:
        """The current optimizer state flattened in the operator's order and dtype.

        Momentum-free groups of an SGD optimizer whose other groups use momentum have no
        buffer: their entries are 0 (and their rows of J in that block are 0), unless one is
        left from earlier steps with momentum, which the step keeps as it is (J is 1 there).
        """
        self._engine.check_fresh()
        parts = []
        for name in self.blocks:
            for p in self._engine.params:
                if name == "theta":
                    t = p.detach()
                else:
                    t = self._optimizer.state.get(p, {}).get(name)
                    if t is None:
                        t = torch.zeros_like(p)
                parts.append(t.reshape(-1).to(device=self.device, dtype=self.dtype))
        return torch.cat(parts)

    def structure(self) -> BlockStructure | None:
        """The :class:`BlockStructure` (DESIGN.md section 3), or None for Adam's full variant
        and where gradient clipping is active (``C H`` is not symmetric)."""
        if self._order == 0 or self._gmap is not None:
            return None
        return self._structure(self._ht)

    def similar_structure(self) -> BlockStructure | None:
        """Under an active clip: the block structure with the symmetrized curvature
        ``C^1/2 Ht C^1/2`` (same coefficients), from whose modes estimate starts Arnoldi
        (mapped by ``P = diag(C^1/2, C^1/2)``). J is exactly similar to it (``J = P J' P^-1``)
        for SGD with one learning rate and weight decay and a norm clip; for Adam (a
        per-entry D) it is a close start. None without an active clip, and for Adam's full
        variant."""
        if self._order == 0 or self._gmap is None:
            return None
        ht = self._ht
        sym = _SymmetrizedMappedHessian(self._engine, self._gmap, sign=ht.sign, shift=ht.shift)
        return self._structure(sym)

    @property
    def maps_gradient(self) -> bool:
        """Whether the step changes the gradient before its update rule here (an active clip,
        padding rows the batch reaches): then ``Ht = sign K G + shift`` is not symmetric
        (``G = H``, or with shared padding rows the masked gradient's Jacobian)."""
        return self._gmap is not None

    def map_start(self, v0: torch.Tensor, v0_left: torch.Tensor) -> None:
        """Map start blocks of :meth:`similar_structure`'s modes to J's (in place): each
        ``n``-row block by ``K^1/2`` (right) and ``C^-1/2`` (left)."""
        assert self._gmap is not None
        n = self.n_params
        for b in range(self.shape[0] // n):
            rows = slice(b * n, (b + 1) * n)
            v0[rows] = self._gmap.sqrt(v0[rows])
            v0_left[rows] = self._gmap.sqrt(v0_left[rows], inverse=True)

    def gradient_map_notes(self) -> list[str]:
        """What the step does to the gradient before the update rule, as report sentences."""
        out = [] if self.clip is None else [self.clip.describe()]
        masked = [r for r in self.padding if r not in self.padding_shared]
        if masked:
            out.append(
                f"nn.Embedding padding_idx row(s) {', '.join(masked)} are reached by the "
                "batch, but the step does not take their gradient (torch zeroes it): J holds "
                "the masked curvature M H, which is not symmetric (estimate runs arnoldi)"
            )
        if self.padding_shared:
            out.append(
                f"nn.Embedding padding_idx row(s) {', '.join(self.padding_shared)} are looked "
                "up by the batch and also used elsewhere (e.g. a tied output layer): the step "
                "drops only the lookups' share of their gradient, so J holds the derivative of "
                "that masked gradient, which is not symmetric (estimate runs arnoldi)"
            )
        return out

    def _structure(self, hessian: HessianOperator) -> BlockStructure:
        n, k = self.n_params, self._coefs

        def vec(c: Coef) -> torch.Tensor:
            if isinstance(c, torch.Tensor):
                return c
            return torch.tensor(c, dtype=self.dtype, device=self.device).expand(n)

        if self._order == 1:
            zero = vec(0.0)
            return BlockStructure(
                hessian=hessian,
                D=vec(k["D"]),
                a=vec(k["a"]),
                a2=zero,
                b=zero,
                beta=zero,
                c=vec(k["c"]),
                order=1,
                uniform=self._uniform,
                active=self._active,
            )
        return BlockStructure(
            hessian=hessian,
            D=vec(k["D"]),
            a=vec(k["a"]),
            a2=vec(k["a2"]),
            b=vec(k["b"]),
            beta=vec(k["beta"]),
            c=vec(k["c"]),
            order=2,
            uniform=self._uniform,
            active=self._active,
        )

    # -- products ----------------------------------------------------------------------------
    # Written into one preallocated output with fused in-place updates: at n ~ 1e6 the
    # temporaries and the final torch.cat of a naive version cost ~15% of an HVP.
    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        if self._blocks is not None:
            return self._fused_matvec(x)
        k, ht = self._coefs, self._ht._matvec
        out = torch.empty_like(x)
        if self._order == 1:  # c x - D a Ht x
            y = ht(x)
            _set(out, x, k["c"])
            return _acc(out, y, k["D"], k["a"], -1.0)
        if self._order == 2:
            x1, x2 = self.split(x)
            o1, o2 = self.split(out)
            y = ht(x1)
            _set(o1, x1, k["c"])  # c x1 - D (a y + b x2)
            _acc(o1, y, k["D"], k["a"], -1.0)
            _acc(o1, x2, k["D"], k["b"], -1.0)
            _set(o2, x2, k["beta"])  # a2 y + beta x2
            _acc(o2, y, k["a2"])
            return out
        x1, x2, x3 = self.split(x)  # Adam full
        o1, dm, dv = self.split(out)
        y = ht(x1)
        _set(dm, x2, k["b1"])  # dm' = b1 dm + (1-b1) Ht dtheta
        _acc(dm, y, k["a"])
        _set(dv, x3, k["b2"])  # dv' = b2 dv + r Ht dtheta
        _acc(dv, y, k["r"])
        _set(o1, x1, k["c"])  # dtheta' = c dtheta - D dm' + q dv'
        _acc(o1, dm, k["D"], -1.0)
        _acc(o1, dv, k["q"])
        return out

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        if self._blocks is not None:
            return self._fused_rmatvec(y)
        k, ht = self._coefs, self._ht._rmatvec  # Ht^T: Ht itself unless a clip is active
        out = torch.empty_like(y)
        if self._order == 1:  # c y - Ht (D a y)
            w = _set(torch.empty_like(y), y, k["D"], k["a"])
            _set(out, y, k["c"])
            return out.sub_(ht(w))
        if self._order == 2:
            y1, y2 = self.split(y)
            o1, o2 = self.split(out)
            w = _set(torch.empty_like(y1), y2, k["a2"])  # Ht (a2 y2 - a D y1)
            _acc(w, y1, k["D"], k["a"], -1.0)
            h = ht(w)
            _set(o1, y1, k["c"])
            o1.add_(h)
            _set(o2, y2, k["beta"])  # beta y2 - b D y1
            _acc(o2, y1, k["D"], k["b"], -1.0)
            return out
        y1, y2, y3 = self.split(y)  # Adam full
        o1, o2, o3 = self.split(out)
        u2 = _acc(y2.clone(), y1, k["D"], -1.0)  # y2 - D y1
        u3 = _acc(y3.clone(), y1, k["q"])  # y3 + q y1
        w = _set(torch.empty_like(y1), u2, k["a"])
        h = ht(_acc(w, u3, k["r"]))  # Ht (a u2 + r u3)
        _set(o1, y1, k["c"])
        o1.add_(h)
        _set(o2, u2, k["b1"])
        _set(o3, u3, k["b2"])
        return out

    _matmat = _matvec
    _rmatmat = _rmatvec

    # The fused path: the HVP takes the bare Hessian (the passes apply sign and L2 decay) and
    # each pass reads its inputs once and writes its outputs once, s columns in one launch.
    def _fused_matvec(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks
        xs = self.split(x)
        out = torch.empty_like(x)
        if self._gmap is not None:  # the passes apply sign and L2 decay to K H x
            hv = self._gmap.curvature(self._engine, xs[0])
        else:
            hv = self._engine.hvp(xs[0])
        blocks.matvec(xs, hv, out=self.split(out))
        self._check_fused(blocks)
        return out

    def _fused_rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks
        ys = self.split(y)
        u = blocks.rmatvec_pre(ys)
        if self._gmap is not None:
            hv = self._gmap.curvature(self._engine, u, adjoint=True)
        else:
            hv = self._engine.hvp(u)
        out = torch.empty_like(y)
        blocks.rmatvec_post(ys, hv, out=self.split(out))
        self._check_fused(blocks)
        return out

    def _check_fused(self, blocks: UpdateBlocks) -> None:
        """After a fused product: if ``auto`` fell back (the kernels failed to compile; the
        product was still computed, by the torch reference), use the torch path from now on."""
        if blocks.backend == "auto" and blocks.last_backend == "torch":
            self._blocks = None
            self.backend, self.backend_reason = "torch", str(blocks.last_reason)
            logger.debug("update operator (%s): torch path: %s", self.kind, self.backend_reason)


#: the param-group entries J's coefficients are built from
_HYPER_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "betas",
               "eps", "amsgrad", "decoupled_weight_decay")


def _hyper_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):  # no device sync: identity and in-place version
        return ("tensor", id(v), v._version)
    if isinstance(v, tuple):
        return tuple(_hyper_value(x) for x in v)
    return v


def _check_finite_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                        names: Sequence[str], kind: str, groups: Sequence[dict]) -> None:
    """NonFiniteError for a NaN/inf momentum buffer or Adam moment the step reads (the next
    real step is not finite there; Adam's D and J would be NaN, and an SGD report would say
    nothing of it). A momentum-free group's stale buffer is not read: not checked. One sum
    per tensor (a finite sum proves every entry finite)."""
    keys = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
    for p, name, group in zip(params, names, groups, strict=True):
        if kind == "sgd" and scalar(group["momentum"]) == 0.0:
            continue
        st = optimizer.state.get(p, {})
        for key in keys:
            t = st.get(key)
            if (isinstance(t, torch.Tensor) and not math.isfinite(float(t.sum()))
                    and not bool(torch.isfinite(t).all())):
                raise NonFiniteError(
                    f"the optimizer's {key} of parameter {name!r} is not finite (NaN or inf): "
                    "the next step is not finite there and the linearized update is undefined; "
                    "has training diverged? Analyse an earlier checkpoint"
                )


def _state_marks(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 kind: str) -> list[tuple]:
    """What J's coefficients read from the optimizer state (staleness check, no device
    sync): SGD, whether each parameter has a momentum buffer; Adam, the identity and in-place
    version of its moments and its step count."""
    if kind == "sgd":
        return [(optimizer.state.get(p, {}).get("momentum_buffer") is not None,) for p in params]
    marks = []
    for p in params:
        st = optimizer.state.get(p, {})
        marks.append(tuple(
            (id(v), v._version) if isinstance(v, torch.Tensor) else v
            for v in (st.get("exp_avg"), st.get("exp_avg_sq"), st.get("step"))
        ))
    return marks


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyper-parameters of each param group that J depends on (staleness check)."""
    return [{k: _hyper_value(g[k]) for k in _HYPER_KEYS if k in g}
            for g in optimizer.param_groups]


# -- building -------------------------------------------------------------------------------
class _PerEntry:
    """Collects per-parameter coefficients and expands them to ``(n,)`` (or a float if uniform)."""

    def __init__(self, numels: Sequence[int], dtype: torch.dtype, device: torch.device):
        self.numels, self.dtype, self.device = list(numels), dtype, device

    def expand(self, values: Sequence[float]) -> Coef:
        if all(v == values[0] for v in values):
            return float(values[0])
        vals = torch.tensor(list(values), dtype=self.dtype, device=self.device)
        counts = torch.tensor(self.numels, device=self.device)
        return torch.repeat_interleave(vals, counts, output_size=sum(self.numels))


def _uniform(per_param: dict[str, list[float]], active: list[bool]) -> bool:
    for values in per_param.values():
        vals = [v for v, a in zip(values, active, strict=True) if a]
        if any(v != vals[0] for v in vals):
            return False
    return True


def update_operator(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Any,
    variant: str | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    process_group: Any = None,
    backend: str = "auto",
    hvp: str = "auto",
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
) -> UpdateOperator:
    """The exact linearized update ``J`` of ``optimizer.step()`` at the current point.

    ``J`` is the Jacobian of the map (state -> state after one step on ``batch``) of the
    optimizer's own update rule (DESIGN.md section 2; formulas in the module docstring), in the
    optimizer's native coordinates. The gradient the step uses is that of
    ``loss_fn(model(inputs), targets)`` (mean over a list of batches).

    Args:
        model: the model the optimizer trains, in the train/eval mode of the training step.
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` that has taken at least one
            step (its state is part of the operator's state). SGD without momentum needs none.
        loss_fn: called as ``loss_fn(model(inputs), targets)``; returns a scalar.
        batch: ``(inputs, targets)`` or a list of such pairs.
        variant: Adam/AdamW only: ``"frozen"`` (default; preconditioner held fixed, state
            ``(theta, exp_avg)``) or ``"full"`` (exact, state ``(theta, exp_avg, exp_avg_sq)``).
        seed: every product runs with the RNG seeded with it (fixed dropout masks).
        dtype: dtype of the vectors (default: the parameters' dtype).
        process_group: the ``torch.distributed`` process group whose ranks' gradients and
            Hessian-vector products are averaged (the map DDP's training step applies).
            Default: the group of a ``DistributedDataParallel``-wrapped ``model``, else no
            communication. Building and applying the operator are then collectives: call
            them on every rank of the group, in the same order, with the same vectors.
        backend: where the block arithmetic around each HVP runs: ``"auto"`` (default) the
            fused CuPy kernels for CUDA tensors of float32/float64/bfloat16 when CuPy
            (``pip install 'kappa-gpu[cuda]'``) imports, sees a device and compiles them, else
            the torch path; ``"torch"`` always the torch path; ``"cupy"`` insists on the
            kernels and raises where they cannot run. The choice and its reason are
            ``op.backend`` / ``op.backend_reason`` (logged at DEBUG on the ``kappa_gpu``
            logger). CuPy installed but unable to run costs one ``RuntimeWarning`` per process
            under ``"auto"``, then the torch path. The two paths agree to float rounding; the
            torch path is the reference.
        hvp: how each Hessian-vector product is computed: ``"auto"`` (default) reverse mode
            through the gradient's graph, built once with the operator and kept while it lives
            (2-3x faster than forward mode on a CPU; memory: about one training step's
            activations, for each batch of a list), falling back to forward mode where the
            model has no double backward; ``"forward"``: ``jvp`` of ``grad``, nothing kept
            between products (a batched product then holds the dual activations of all its
            columns at once). ``op.hvp_mode`` says which is in use; the two agree to float
            rounding (:mod:`kappa_gpu.operators._hvp`), except where torch.func draws another
            dropout mask than eager autograd (dropout on a non-contiguous tensor, e.g. in
            ``nn.MultiheadAttention``): forward mode checks this once and warns.
        clip_grad_norm: the ``max_norm`` of a ``torch.nn.utils.clip_grad_norm_(params,
            max_norm)`` the training step runs before ``optimizer.step()`` (2-norm over the
            optimizer's parameters; the Hugging Face Trainer's ``max_grad_norm``, Lightning's
            ``gradient_clip_val``). J is then the Jacobian of the clipped step: exact, one HVP
            per product as before. ``op.clip`` (:class:`GradientClip`) says whether the clip is
            active at this point; where it is, ``op.structure()`` is None.
        clip_grad_value: the ``clip_value`` of a ``torch.nn.utils.clip_grad_value_`` the step
            runs instead (Lightning's ``gradient_clip_algorithm="value"``). At most one of the
            two.

    Returns:
        An :class:`UpdateOperator`. Building it costs one gradient evaluation; each matvec and
        rmatvec costs one HVP, a matmat with ``s`` columns ``s`` HVP columns.

    Notes:
        What every product sees (details in :mod:`kappa_gpu.operators._hvp`):

        - randomness: the RNG is forked and seeded with ``seed`` at every evaluation of the
          loss (``vmap`` with ``randomness="same"``), so dropout draws one fixed mask for the
          whole operator; the global RNG state is untouched;
        - BatchNorm/InstanceNorm in train mode use the batch statistics (as the step does)
          and never update their running statistics; in eval mode they read them;
        - the model (parameters, ``.grad``, buffers, modes) and the optimizer state are never
          written; after an optimizer step, a train/eval switch or a change of the param
          groups' hyper-parameters (a scheduler step) the operator raises
          :class:`StaleOperatorError`;
        - a parameter the loss does not reach (autograd gradient None) is skipped by
          ``optimizer.step()`` after ``zero_grad()``, so its rows of J are the identity (0 for
          state it never had); ``structure().active`` marks it. One whose ``.grad`` is a tensor
          (``zero_grad(set_to_none=False)`` leaves zeros) is stepped, as ``step()`` does;
        - under ``torch.distributed`` (:mod:`kappa_gpu._distributed`): a DDP model is
          unwrapped to ``model.module`` and each product is the mean over the ranks of the
          products of their own losses on their own batches; with mean-reduced losses on
          equal-size local batches that is the Hessian of the global-batch mean loss. The
          optimizer state must be the same on every rank (it is under DDP training);
        - ``nn.Embedding(padding_idx=p)``: torch zeroes row ``p`` of the weight's gradient, so
          where the batch reaches that row the step's curvature is ``M H`` (``op.padding``
          names the rows; not symmetric: ``structure()`` is None). A weight also used
          elsewhere (a tied output layer) with scored padding positions: the step drops only
          the lookups' share of the row's gradient; the engine reads those lookups through a
          variable of their own, and J is exact (``op.padding_shared``; one more gradient
          evaluation at build). With ``hvp="forward"`` or under a process group that split
          is not made: J takes the loss's full curvature there (approximate, warned);
        - Adam's full variant: where ``v'`` is tiny (e.g. a bias feeding a BatchNorm, whose
          gradient is ~1e-17), ``q ~ m' / (denom^2 sqrt(v'))`` is huge but exact: the real step
          is that sensitive there.

    Raises:
        UnsupportedOptimizerError: not SGD/Adam/AdamW.
        UnsupportedConfigurationError: amsgrad, mixed ``maximize`` across groups, a bad
            ``variant``, parameters on several devices, FSDP/FSDP2/DTensor-sharded models,
            SyncBatchNorm in train mode under a process group, modules with sparse gradients
            (``nn.Embedding(sparse=True)``).

    Warns:
        UserWarning: for what the operator does not model (also in ``op.notes``, and in
            :func:`kappa_gpu.estimate`'s message): gradient hooks on the parameters, optimizer
            step hooks, buffers the forward pass mutates in place.
        MissingOptimizerStateError: no momentum buffer / moments yet: take one step first.
        ParameterMismatchError: the optimizer's parameters are not the model's.
        NoTrainableParametersError: nothing with ``requires_grad=True``.
        BatchError: ``loss_fn(model(inputs), targets)`` fails on the batch.
        NonFiniteError: the loss or the gradient is not finite at the current point.
        ValueError: ``backend`` is not one of ``"auto"``, ``"cupy"``, ``"torch"``, or it is
            ``"cupy"`` for a model that is not on a CUDA device; a clip threshold that is not
            a positive finite number, or both clip thresholds.
        TypeError, RuntimeError: ``backend="cupy"`` with a dtype the kernels do not take, or
            where CuPy cannot run (not installed, no driver, no device).
        DistributedError: the ranks of the process group disagree (parameters, vectors) or
            another rank failed; raised on every rank together.

    Example:
        >>> loss_fn = torch.nn.functional.cross_entropy
        >>> J = update_operator(model, opt, loss_fn, (x, y))  # doctest: +SKIP
        >>> J.matvec(J.state_vector())  # doctest: +SKIP
    """
    kind = check_optimizer_type(optimizer)
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}"
        )
    clip_spec = _clip_spec(clip_grad_norm, clip_grad_value)
    check_not_sharded(model)
    entries = [
        (p, group) for group in optimizer.param_groups for p in group["params"] if p.requires_grad
    ]
    if not entries:
        raise NoTrainableParametersError(
            "the optimizer holds no parameter with requires_grad=True; build it on the "
            "trainable parameters, e.g. torch.optim.SGD([p for p in model.parameters() "
            "if p.requires_grad], ...)"
        )
    if backend == "cupy":  # checked before any gradient is computed
        devices = sorted({str(p.device) for p, _ in entries if p.device.type != "cuda"})
        if devices:
            raise ValueError(
                f"backend='cupy' runs fused CUDA kernels, but the model's parameters are on "
                f"{', '.join(devices)}: move the model (and then build the optimizer) to a CUDA "
                "device, e.g. model.cuda(), or pass backend='auto' (the torch path off CUDA) "
                "or backend='torch'"
            )
    if kind == "sgd" and variant is not None:
        raise UnsupportedConfigurationError(
            f"variant={variant!r} applies to Adam/AdamW only; pass variant=None for SGD"
        )
    if kind == "adam":
        variant = "frozen" if variant is None else variant
        if variant not in ("frozen", "full"):
            raise UnsupportedConfigurationError(
                f"variant must be 'frozen' or 'full' for Adam/AdamW, got {variant!r}"
            )
        for group in optimizer.param_groups:
            if group.get("amsgrad", False):
                raise UnsupportedConfigurationError(
                    "amsgrad=True is not supported: its max(v_max, v) update is piecewise, "
                    "with no Jacobian where the max switches; use amsgrad=False"
                )
    maximizes = {bool(g.get("maximize", False)) for _, g in entries}
    if len(maximizes) > 1:
        raise UnsupportedConfigurationError(
            "param groups disagree on maximize; the operator needs one sign of the Hessian "
            "(Ht would not be symmetric): use the same maximize in every group"
        )
    sign = -1.0 if maximizes.pop() else 1.0

    params = [p for p, _ in entries]
    groups = [g for _, g in entries]
    _check_dense_gradients(model, params)
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    needs_state = kind == "adam" or any(scalar(g["momentum"]) != 0.0 for g in groups)
    # cheap check first: a fresh optimizer fails before any gradient is computed
    if needs_state and not any(optimizer.state.get(p, {}).get(key) is not None for p in params):
        _missing_state(optimizer, kind, params[0], groups[0])

    engine = _HVPEngine(
        model, loss_fn, batch, params, seed=seed, dtype=dtype, process_group=process_group,
        hvp=hvp,
    )
    _check_finite_state(optimizer, params, engine.names, kind, groups)
    engine.agree_fields = dict(kind=kind, variant=variant, clip=clip_spec, backend=backend)
    engine.agree_where = "update_operator"
    g = engine.gradient()
    mask, padding, shared = _padding_mask(engine, g)
    tied: list[str] = []  # shared rows left approximate (no split here)
    # rows of direct F.embedding(padding_idx) calls, split by engine.gradient() already
    direct = list(engine.split)
    split = bool(direct)
    shared_names = [f"{engine.names[i]}[{row}] (F.embedding)" for i, row in direct]
    padding = padding + shared_names
    if shared:
        g_step = engine.split_padding(direct + [key for key, _ in shared])
        names = [n for _, ns in shared for n in ns]
        if g_step is None:
            tied = names
        else:  # the lookups read variables of their own: J exact, not symmetric
            g, split = g_step, True
            padding = padding + names
            shared_names = shared_names + names
    if mask is not None:
        g = g * mask  # torch zeroes the padding rows' gradient
    clip = None
    if clip_spec is not None:
        clip = GradientClip(*clip_spec, g)
        g = clip.clipped(g)  # the gradient the step takes (Adam's moments see it)
    gmap = None
    if mask is not None or split or (clip is not None and clip.active):
        gmap = _GradientMap(clip, mask, split)
    # A parameter the loss does not reach gets grad None, and optimizer.step() skips it; but
    # step() takes every parameter whose .grad is not None: a zero gradient left by
    # zero_grad(set_to_none=False) still gets momentum and weight decay.
    active_list = [not u or p.grad is not None
                   for u, p in zip(engine.unused, params, strict=True)]
    has_state = [optimizer.state.get(p, {}).get(key) is not None for p in params]
    if needs_state:
        for p, group, act, has in zip(params, groups, active_list, has_state, strict=True):
            if act and not has and (kind == "adam" or scalar(group["momentum"]) != 0.0):
                _missing_state(optimizer, kind, p, group)
    pe = _PerEntry(engine.numels, engine.dtype, engine.device)
    active = None
    if not all(active_list):
        active = torch.repeat_interleave(
            torch.tensor(active_list, device=engine.device),
            torch.tensor(engine.numels, device=engine.device),
        )

    chosen, reason = resolve_backend(backend, engine.device, [engine.dtype])
    if chosen == "torch":
        logger.debug("update operator (%s): torch path: %s", kind, reason)
    else:
        logger.debug("update operator (%s): fused CuPy kernels: %s", kind, reason)
    bk = (backend, chosen, reason)
    if kind == "sgd":
        op = _sgd(engine, optimizer, groups, active_list, has_state, active, pe, sign, bk, gmap)
    else:
        op = _adam(
            engine, optimizer, groups, active_list, has_state, active, pe, sign, g, variant, bk,
            gmap,
        )
    op.clip, op.padding = clip, padding
    op.padding_shared = shared_names if split else []
    op.notes = _left_out(params, optimizer, sorted(engine._mutable))
    if tied:
        op.notes.append(
            f"nn.Embedding padding_idx row(s) {', '.join(tied)} belong to a weight also used "
            "elsewhere (e.g. a tied output layer), and the padding positions are scored: the "
            "step zeroes only the embedding's share of their gradient, which the operator "
            "separates only with reverse-mode products on one process (hvp='auto', no process "
            "group), so J's rows there are the loss's full curvature (approximate); hvp='auto' "
            "on one process, an untied embedding, or padding_idx=None gives the exact J"
        )
    if clip is not None and clip.kind == "norm":
        held = {id(p) for p in params}
        outside = sum(p.numel() for p in model.parameters()
                      if p.requires_grad and id(p) not in held)
        if outside:
            op.notes.append(
                f"clip_grad_norm: the norm is taken over the optimizer's parameters, but the "
                f"model has {outside} trainable scalar(s) the optimizer does not hold; a step "
                "that clips over model.parameters() (the Hugging Face Trainer does) counts "
                "their gradient too, so J's clip factor differs from it: set "
                "requires_grad=False on them, or clip over the optimizer's parameters"
            )
    for note in op.notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return op


def _padding_mask(
    engine: _HVPEngine, g: torch.Tensor
) -> tuple[torch.Tensor | None, list[str], list[tuple[tuple[int, int], list[str]]]]:
    """``(M, rows, shared rows)`` for the ``nn.Embedding(padding_idx)`` rows the batch
    looks up (the engine evaluates the loss with ``padding_idx=None``, records the lookups, and
    takes the lookups' share of the row's gradient, what the step drops, as the difference to
    torch's masked gradient):

    - share = the row's whole gradient (the weight is used by the lookups only): the step
      takes none of the row, so it is masked if the loss depends on it (a nonzero gradient,
      or else a nonzero curvature: one HVP on a random vector in the row);
    - share = 0, the gradient from elsewhere (a tied output layer, a weight reused in the
      forward; the padding positions reach no loss term): the step drops nothing, J is the
      loss's own, no mask;
    - both nonzero: the step drops only the lookups' share: no mask, listed as shared
      (``((param index, row), names)``), for the engine to split
      (:meth:`_HVPEngine.split_padding`).

    A zero share here whose derivative is not zero (a weight used elsewhere too) is not
    detected."""
    offsets = [0]
    for k in engine.numels:
        offsets.append(offsets[-1] + k)
    groups: dict[tuple[int, int], list] = {}  # (param, row) -> [reached, share, names]
    for (i, mname, idx), reached, share in zip(engine.padded, engine.padding_reached,
                                              engine.padding_share, strict=True):
        entry = groups.setdefault((i, idx), [False, share, []])  # one share per (param, row)
        entry[0] |= bool(reached)
        entry[2].append(f"{mname + '.' if mname else ''}weight[{idx}]")
    mask, rows, approx = None, [], []
    for (i, idx), (reached, share, names) in groups.items():
        if not reached:
            continue  # not looked up: nothing the step drops
        width = engine.params[i].shape[1]
        lo = offsets[i] + idx * width
        row = g[lo:lo + width].double()
        tol = math.sqrt(float(torch.finfo(g.dtype).eps)) * float(
            max(row.norm(), share.norm()))
        if float((row - share).norm()) > tol:  # the row also has gradient from elsewhere
            if float(share.norm()) > tol:
                approx.append(((i, idx), names))
            continue
        if not bool(row.any()):
            # Looked up with a zero gradient: padded positions whose outputs the loss ignores
            # (a classifier on an attention-masked sequence: M H = H, keep the structure), or
            # a zero row with curvature (a dot product of two padding lookups): one HVP on a
            # random vector in the row tells them apart.
            gen = torch.Generator(device=engine.device).manual_seed(engine.seed)
            v = torch.zeros(engine.n, dtype=engine.dtype, device=engine.device)
            v[lo:lo + width] = torch.randn(width, generator=gen, device=engine.device,
                                           dtype=engine.dtype)
            if not bool(engine.hvp(v).any()):
                continue
        if mask is None:
            mask = torch.ones_like(g)
        mask[lo:lo + width] = 0
        rows.extend(names)
    return mask, rows, approx


def _clip_spec(norm: float | None, value: float | None) -> tuple[str, float] | None:
    """``(kind, threshold)`` of the clipping to model, checked before any gradient is taken."""
    if norm is not None and value is not None:
        raise ValueError(
            "pass at most one of clip_grad_norm and clip_grad_value (the step clips one way)"
        )
    for name, v in (("clip_grad_norm", norm), ("clip_grad_value", value)):
        if v is None:
            continue
        try:
            t = float(v)
        except (TypeError, ValueError, OverflowError):
            t = math.nan
        if isinstance(v, bool) or not (t > 0.0 and math.isfinite(t)):
            raise ValueError(
                f"{name} must be a positive finite number (the clip threshold), got {v!r}; "
                "pass None when the step does not clip"
            )
        return ("norm" if name == "clip_grad_norm" else "value", t)
    return None


def _hook_count(hooks: Any) -> int:
    return len(hooks) if hooks else 0


def _left_out(params: list[torch.Tensor], optimizer, mutated: list[str]) -> list[str]:
    """What of the real ``optimizer.step()`` the operator does not model, as report notes:
    gradient hooks and optimizer step hooks (the operator differentiates the loss itself, so
    hooks that rescale or clip gradients never run in it), and buffers the forward pass
    mutates (held at their current values, while the real step's forward updates them)."""
    notes = []
    tensor_hooks = sum(1 for p in params if _hook_count(getattr(p, "_backward_hooks", None))
                       or _hook_count(getattr(p, "_post_accumulate_grad_hooks", None)))
    if tensor_hooks:
        notes.append(
            f"{tensor_hooks} parameter(s) carry gradient hooks (register_hook / "
            "register_post_accumulate_grad_hook): the operator differentiates the loss itself "
            "and does not run them, so a hook that rescales, clips or edits gradients is not "
            "in J"
        )
    from torch.optim import optimizer as _optim

    pre = _hook_count(getattr(optimizer, "_optimizer_step_pre_hooks", None)) + _hook_count(
        getattr(_optim, "_global_optimizer_pre_hooks", None))
    post = _hook_count(getattr(optimizer, "_optimizer_step_post_hooks", None)) + _hook_count(
        getattr(_optim, "_global_optimizer_post_hooks", None))
    if pre or post:
        notes.append(
            f"the optimizer has {pre} step pre-hook(s) and {post} post-hook(s): J is the "
            "Jacobian of its update rule alone; a hook that changes gradients or parameters "
            "is not in J"
        )
    if mutated:
        notes.append(
            f"the forward pass updates buffer(s) {', '.join(mutated)} in place (e.g. "
            "spectral_norm's power iteration in train mode): J holds them at their current "
            "values, while in the real step they follow the weights; for the exact Jacobian "
            "estimate with those modules in eval mode"
        )
    return notes


def _check_dense_gradients(model: torch.nn.Module, params: list[torch.Tensor]) -> None:
    """Sparse gradients (``nn.Embedding(sparse=True)``, ``EmbeddingBag``) are refused at the
    door: the operator's vectors are dense (the flattening failed with a bare RuntimeError)."""
    ids = {id(p) for p in params}
    for name, mod in model.named_modules():
        if getattr(mod, "sparse", False) is True and any(
                id(p) in ids for p in mod.parameters(recurse=False)):
            raise UnsupportedConfigurationError(
                f"module {name or type(mod).__name__!r} ({type(mod).__name__}) has sparse=True: "
                "its gradients are sparse tensors, which the operator does not take; estimate "
                "on the model with sparse=False (the same loss; a dense gradient)"
            )


def _missing_state(optimizer, kind: str, p: torch.Tensor, group: dict):
    if kind == "sgd":
        raise MissingOptimizerStateError(
            f"SGD(momentum={scalar(group['momentum'])}) has no momentum_buffer for a parameter "
            f"of shape {tuple(p.shape)} yet: take one optimizer step first (loss.backward(); "
            "optimizer.step()). The first step sets buffer = gradient, without dampening: a "
            "different map"
        )
    raise MissingOptimizerStateError(
        f"{type(optimizer).__name__} has no state (exp_avg, exp_avg_sq, step) for a parameter "
        f"of shape {tuple(p.shape)} yet: take one optimizer step first (loss.backward(); "
        "optimizer.step())"
    )


def _sgd(
    engine, optimizer, groups, active_list, has_state, active, pe, sign, backend, gmap
) -> UpdateOperator:
    lr = [scalar(g["lr"]) for g in groups]
    mu = [scalar(g["momentum"]) for g in groups]
    d = [scalar(g["dampening"]) for g in groups]
    wd = [scalar(g["weight_decay"]) for g in groups]
    nesterov = [bool(g["nesterov"]) for g in groups]
    D = [eta if act else 0.0 for eta, act in zip(lr, active_list, strict=True)]
    hessian = _curvature(engine, gmap, sign, pe.expand(wd))
    if all(m == 0.0 for m in mu):
        per = {"a": [1.0] * len(lr), "c": [1.0] * len(lr)}
        coefs = {"D": pe.expand(D), "a": 1.0, "c": 1.0}

        def spec1():  # J = I - D Ht: c = 1, Da = D
            return BlockParams.order1(engine.numels, Da=D, c=1.0, wd=wd, sign=sign), ()

        return UpdateOperator(
            engine,
            optimizer,
            kind="sgd",
            variant=None,
            blocks=("theta",),
            hessian=hessian,
            coefs=coefs,
            order=1,
            uniform=_uniform(per, active_list),
            active=active,
            block_spec=spec1,
            backend=backend,
            gmap=gmap,
        )
    per: dict[str, list[float]] = {k: [] for k in ("a", "a2", "b", "beta", "c")}
    for m, dd, nest, act, has in zip(mu, d, nesterov, active_list, has_state, strict=True):
        if not act:  # torch skips the parameter: theta and buffer (if any) stay
            vals = (0.0, 0.0, 0.0, 1.0 if has else 0.0, 1.0)
        elif m == 0.0:  # a momentum-free group: plain SGD; a buffer left from earlier
            # steps with momentum is not touched by torch (it stays: J is 1 there)
            vals = (1.0, 0.0, 0.0, 1.0 if has else 0.0, 1.0)
        elif nest:
            vals = (1.0 + m * (1.0 - dd), 1.0 - dd, m * m, m, 1.0)
        else:
            vals = (1.0 - dd, 1.0 - dd, m, m, 1.0)
        for key, v in zip(("a", "a2", "b", "beta", "c"), vals, strict=True):
            per[key].append(v)
    coefs = {key: pe.expand(v) for key, v in per.items()}
    coefs["D"] = pe.expand(D)

    def spec2():  # the same per-parameter coefficients; D per segment, no D vector
        return BlockParams.order2(engine.numels, **per, D=D, wd=wd, sign=sign), ()

    return UpdateOperator(
        engine,
        optimizer,
        kind="sgd",
        variant=None,
        blocks=("theta", "momentum_buffer"),
        hessian=hessian,
        coefs=coefs,
        order=2,
        uniform=_uniform(per, active_list),
        active=active,
        block_spec=spec2,
        backend=backend,
        gmap=gmap,
    )


def _adam(
    engine, optimizer, groups, active_list, has_state, active, pe, sign, g, variant, backend, gmap
) -> UpdateOperator:
    dt, dev = engine.dtype, engine.device
    # AdamW's groups carry decoupled_weight_decay=True (torch honours a group's own False);
    # older torch versions have no such key in AdamW's groups: decoupled
    is_adamw = isinstance(optimizer, torch.optim.AdamW)
    decoupled = [bool(gr.get("decoupled_weight_decay", is_adamw)) for gr in groups]
    kind = "adamw" if all(decoupled) else "adam"
    lr = [scalar(gr["lr"]) for gr in groups]
    b1 = [scalar(gr["betas"][0]) for gr in groups]
    b2 = [scalar(gr["betas"][1]) for gr in groups]
    eps = [scalar(gr["eps"]) for gr in groups]
    wd = [scalar(gr["weight_decay"]) for gr in groups]
    wd_l2 = [0.0 if dec else w for w, dec in zip(wd, decoupled, strict=True)]
    c = [
        (1.0 - eta * w if dec else 1.0) if act else 1.0
        for eta, w, dec, act in zip(lr, wd, decoupled, active_list, strict=True)
    ]
    full = variant == "full"
    gs = engine.unflatten(g)
    Ds, qs, rs = [], [], []
    for i, (p, gi) in enumerate(zip(engine.params, gs, strict=True)):
        if not active_list[i]:  # torch skips the parameter: theta, m, v stay
            z = torch.zeros(p.numel(), dtype=dt, device=dev)
            Ds.append(z)
            qs.append(z)
            rs.append(z)
            continue
        st = optimizer.state.get(p, {})  # .get: indexing the defaultdict would add an entry
        t = scalar(st["step"])
        bc1 = 1.0 - b1[i] ** (t + 1.0)
        bc2 = 1.0 - b2[i] ** (t + 1.0)
        theta = p.detach().reshape(-1).to(dt)
        gt = sign * gi.reshape(-1).to(dt)
        if wd_l2[i] != 0.0:
            gt = gt + wd_l2[i] * theta
        m = st["exp_avg"].reshape(-1).to(device=dev, dtype=dt)
        v = st["exp_avg_sq"].reshape(-1).to(device=dev, dtype=dt)
        v_new = b2[i] * v + (1.0 - b2[i]) * gt * gt
        sqrt_v = v_new.sqrt()
        denom = sqrt_v / bc2**0.5 + eps[i]
        Ds.append(lr[i] / (bc1 * denom))
        if full:
            m_new = b1[i] * m + (1.0 - b1[i]) * gt
            # d denom / d v' = 1 / (2 sqrt(v') sqrt(bc2)), taken as 0 where v' = 0
            inv = torch.where(sqrt_v > 0, 1.0 / (2.0 * sqrt_v * bc2**0.5), torch.zeros_like(sqrt_v))
            qs.append((lr[i] / bc1) * m_new * inv / denom**2)
            rs.append(2.0 * (1.0 - b2[i]) * gt)
    D = torch.cat(Ds)
    hessian = _curvature(engine, gmap, sign, pe.expand(wd_l2))
    # inactive parameters (skipped by torch): theta stays, and so does the state if it exists
    stay = [1.0 if h else 0.0 for h in has_state]
    if full:
        per_full = {
            "a": [1.0 - x if a else 0.0 for x, a in zip(b1, active_list, strict=True)],
            "b1": [x if a else s for x, a, s in zip(b1, active_list, stay, strict=True)],
            "b2": [x if a else s for x, a, s in zip(b2, active_list, stay, strict=True)],
            "c": c,
        }
        coefs = {key: pe.expand(v) for key, v in per_full.items()}
        coefs.update(D=D, q=torch.cat(qs), r=torch.cat(rs))

        def spec_full():
            params = BlockParams.adam_full(engine.numels, **per_full, wd=wd_l2, sign=sign)
            return params, (coefs["D"], coefs["q"], coefs["r"])

        return UpdateOperator(
            engine,
            optimizer,
            kind=kind,
            variant="full",
            blocks=("theta", "exp_avg", "exp_avg_sq"),
            hessian=hessian,
            coefs=coefs,
            order=0,
            uniform=False,
            active=active,
            block_spec=spec_full,
            backend=backend,
            gmap=gmap,
        )
    per = {
        "a": [1.0 - x if a else 0.0 for x, a in zip(b1, active_list, strict=True)],
        "a2": [1.0 - x if a else 0.0 for x, a in zip(b1, active_list, strict=True)],
        "b": [x if a else 0.0 for x, a in zip(b1, active_list, strict=True)],
        "beta": [x if a else s for x, a, s in zip(b1, active_list, stay, strict=True)],
        "c": c,
    }
    coefs = {key: pe.expand(v) for key, v in per.items()}
    coefs["D"] = D

    def spec_frozen():  # order2 with the preconditioner as the per-entry D vector
        return BlockParams.order2(engine.numels, **per, D=1.0, wd=wd_l2, sign=sign), (D,)

    return UpdateOperator(
        engine,
        optimizer,
        kind=kind,
        variant="frozen",
        blocks=("theta", "exp_avg"),
        hessian=hessian,
        coefs=coefs,
        order=2,
        uniform=_uniform(per, active_list),
        active=active,
        block_spec=spec_frozen,
        backend=backend,
        gmap=gmap,
    )

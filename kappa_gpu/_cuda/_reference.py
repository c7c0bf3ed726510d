"""Plain-torch block arithmetic of the update operators: the CPU fallback and the test oracle.

Every update operator of DESIGN.md section 2 applies ``J`` (or ``J^T``) with one HVP and a few
elementwise vector operations around it. Those operations are the *block* arithmetic, written
here once in plain torch and once as fused CUDA kernels (``kernels/update_blocks.cu``; same
names, same table columns, same formulas). Three families cover every optimizer:

- ``order1`` (SGD without momentum; state ``theta``)::

      J = c I - Da Ht                         J^T = c I - Ht Da

- ``order2`` (SGD heavy ball and nesterov, momentum-free groups, Adam/AdamW "frozen"; state
  ``(theta, buffer)``)::

      J   = [[c I - D a Ht, -D b], [a2 Ht, beta I]]
      J^T = [[c I - Ht a D, a2 Ht], [-b D, beta I]]

  with ``D`` the column ``D`` times an optional per-entry vector (Adam's preconditioner).
- ``adam_full`` (Adam/AdamW, the exact Jacobian; state ``(theta, m, v)``)::

      dm' = b1 dm + a Ht dth,  dv' = b2 dv + r Ht dth,  dth' = c dth - D dm' + q dv'

  with per-entry ``D``, ``q``, ``r`` (:func:`adam_coefficients`).

``Ht = sign H + diag(wd)``: ``sign`` is -1 for ``maximize=True`` and ``wd`` the L2 weight decay
(0 for decoupled AdamW decay, which enters through ``c = 1 - lr wd``). Coefficients are
per *segment*: a contiguous range of entries (a parameter, or a run of parameters with equal
hyper-parameters), held in a :class:`BlockParams` table.

Each product is split around its one HVP, which the caller computes with the bare Hessian (no
sign, no weight decay: the block functions add those):

- ``matvec``: ``hv = H x1``, then :func:`reference_matvec` (x blocks, hv) -> y blocks;
- ``rmatvec``: :func:`reference_rmatvec_pre` (y blocks) -> ``u``; ``hv = H u``; then
  :func:`reference_rmatvec_post` (y blocks, hv) -> x blocks.

Derivation of the adjoints (``H`` symmetric, all coefficient matrices diagonal, so
``(D a Ht)^T = Ht a D``): ``order2`` ``x1 = c y1 + Ht u``, ``u = a2 y2 - a D y1``,
``x2 = beta y2 - b D y1``; ``adam_full`` ``w = y2 - D y1``, ``z = y3 + q y1``,
``u = a w + r z``, ``x1 = c y1 + Ht u``, ``x2 = b1 w``, ``x3 = b2 z``; ``order1``
``u = Da y1``, ``x1 = c y1 - Ht u``. ``Ht u = sign hv + wd u`` with ``hv = H u``.

Vectors are ``(n,)`` or ``(n, s)`` (``s`` columns, any strides); the arithmetic runs in float32
for float32/bfloat16/float16 storage (float64 for float64) and each output is rounded to its
storage dtype once, as the kernels do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

__all__ = [
    "KINDS",
    "COLUMNS",
    "NBLOCKS",
    "COEFS",
    "BlockParams",
    "sgd_block_params",
    "adam_block_params",
    "adam_coefficients",
    "reference_matvec",
    "reference_rmatvec_pre",
    "reference_rmatvec_post",
]

#: The operator families (see the module docstring).
KINDS = ("order1", "order2", "adam_full")
#: Segment-table columns of each family, in the order the kernels read them.
COLUMNS: dict[str, tuple[str, ...]] = {
    "order1": ("c", "Da", "wd", "sign"),
    "order2": ("a", "a2", "b", "beta", "c", "D", "wd", "sign"),
    "adam_full": ("a", "b1", "b2", "c", "wd", "sign"),
}
#: Number of state blocks (theta first) of each family.
NBLOCKS = {"order1": 1, "order2": 2, "adam_full": 3}
#: Per-entry coefficient vectors of each family (order2's ``D`` vector is optional).
COEFS: dict[str, tuple[str, ...]] = {"order1": (), "order2": ("D",), "adam_full": ("D", "q", "r")}

Scalars = float | Sequence[float]


@dataclass(frozen=True)
class BlockParams:
    """Per-segment coefficients of one operator family, the table the kernels read.

    Build it with :meth:`order1`, :meth:`order2`, :meth:`adam_full`, or from torch.optim
    hyper-parameters with :func:`sgd_block_params` / :func:`adam_block_params`. Adjacent
    segments with equal coefficients are merged and empty ones dropped at construction, so the
    table usually has one row per distinct hyper-parameter setting.

    Attributes:
        kind: ``"order1"``, ``"order2"`` or ``"adam_full"``.
        offsets: segment boundaries, ``len(rows) + 1`` non-decreasing ints from 0 to ``n``.
        rows: one tuple of floats per segment, columns as in ``COLUMNS[kind]``.
    """

    kind: str
    offsets: tuple[int, ...]
    rows: tuple[tuple[float, ...], ...]

    @property
    def n(self) -> int:
        """Length of each state block."""
        return self.offsets[-1]

    @property
    def nblocks(self) -> int:
        """Number of state blocks: 1, 2 or 3."""
        return NBLOCKS[self.kind]

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS[self.kind]

    def column(self, name: str) -> list[float]:
        """The values of one column, one per segment."""
        j = self.columns.index(name)
        return [row[j] for row in self.rows]

    def segments(self):
        """Iterate ``(lo, hi, coefficients)`` with the coefficients as attributes."""
        for g, row in enumerate(self.rows):
            yield (
                self.offsets[g],
                self.offsets[g + 1],
                SimpleNamespace(**dict(zip(self.columns, row, strict=True))),
            )

    @classmethod
    def build(cls, kind: str, sizes: Sequence[int], **columns: Scalars) -> BlockParams:
        """A table from segment sizes and per-segment (or shared) column values.

        Args:
            kind: one of :data:`KINDS`.
            sizes: the number of entries of each segment, in state order (e.g.
                ``[p.numel() for p in params]``); zeros are allowed.
            **columns: every column of ``COLUMNS[kind]``: a float shared by all segments or a
                sequence with one value per segment.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        sizes = [int(s) for s in sizes]
        if not sizes or any(s < 0 for s in sizes):
            raise ValueError(f"sizes must be a non-empty list of non-negative ints, got {sizes}")
        names = COLUMNS[kind]
        missing = [c for c in names if c not in columns]
        extra = [c for c in columns if c not in names]
        if missing or extra:
            raise TypeError(
                f"{kind} needs exactly the columns {names}; missing {missing}, unexpected {extra}"
            )
        cols = []
        for name in names:
            v = columns[name]
            vals = [float(v)] * len(sizes) if isinstance(v, (int, float)) else [float(x) for x in v]
            if len(vals) != len(sizes):
                raise ValueError(
                    f"column {name!r} has {len(vals)} values for {len(sizes)} segments; pass "
                    "one value per segment or a single float"
                )
            if not all(math.isfinite(x) for x in vals):
                raise ValueError(f"column {name!r} has a non-finite value: {vals}")
            cols.append(vals)
        offsets, rows = [0], []
        for g, size in enumerate(sizes):
            row = tuple(col[g] for col in cols)
            if size == 0:
                continue
            if rows and rows[-1] == row:
                offsets[-1] += size
            else:
                rows.append(row)
                offsets.append(offsets[-1] + size)
        if not rows:  # n == 0: keep one row so that the table is well formed
            rows.append(tuple(col[0] for col in cols))
            offsets.append(0)
        return cls(kind, tuple(offsets), tuple(rows))

    @classmethod
    def order1(
        cls,
        sizes: Sequence[int],
        *,
        Da: Scalars,
        c: Scalars = 1.0,
        wd: Scalars = 0.0,
        sign: Scalars = 1.0,
    ) -> BlockParams:
        """``J = c I - Da (sign H + wd I)`` (SGD without momentum: ``c = 1``, ``Da = lr``)."""
        return cls.build("order1", sizes, c=c, Da=Da, wd=wd, sign=sign)

    @classmethod
    def order2(
        cls,
        sizes: Sequence[int],
        *,
        a: Scalars,
        a2: Scalars,
        b: Scalars,
        beta: Scalars,
        c: Scalars = 1.0,
        D: Scalars = 1.0,
        wd: Scalars = 0.0,
        sign: Scalars = 1.0,
    ) -> BlockParams:
        """``J = [[c - D a Ht, -D b], [a2 Ht, beta]]``; ``D`` times the optional D vector."""
        return cls.build("order2", sizes, a=a, a2=a2, b=b, beta=beta, c=c, D=D, wd=wd, sign=sign)

    @classmethod
    def adam_full(
        cls,
        sizes: Sequence[int],
        *,
        a: Scalars,
        b1: Scalars,
        b2: Scalars,
        c: Scalars = 1.0,
        wd: Scalars = 0.0,
        sign: Scalars = 1.0,
    ) -> BlockParams:
        """Adam's exact Jacobian; per-entry ``D, q, r`` come from :func:`adam_coefficients`."""
        return cls.build("adam_full", sizes, a=a, b1=b1, b2=b2, c=c, wd=wd, sign=sign)


def _per_segment(name: str, v, k: int) -> list:
    if isinstance(v, (int, float, bool)):
        return [v] * k
    vals = list(v)
    if len(vals) != k:
        raise ValueError(f"{name} has {len(vals)} values for {k} segments")
    return vals


def sgd_block_params(
    sizes: Sequence[int],
    *,
    lr: Scalars,
    momentum: Scalars = 0.0,
    dampening: Scalars = 0.0,
    weight_decay: Scalars = 0.0,
    nesterov: bool | Sequence[bool] = False,
    maximize: bool = False,
) -> BlockParams:
    """The table of ``torch.optim.SGD`` (DESIGN.md section 2) for the given segments.

    All momenta 0: ``order1`` (state ``theta``). Otherwise ``order2`` (state
    ``(theta, momentum_buffer)``), per segment heavy ball ``a = a2 = 1-d, b = beta = mu``,
    nesterov ``a = 1 + mu (1-d), a2 = 1-d, b = mu^2, beta = mu``, or, for a momentum-free
    segment, plain SGD ``a = 1, a2 = b = beta = 0`` (its buffer entries are not optimizer
    state; J maps them to 0). Always ``c = 1``, ``D = lr``, ``wd = weight_decay``.
    """
    k = len(sizes)
    lr_, mu = _per_segment("lr", lr, k), _per_segment("momentum", momentum, k)
    d, wd = _per_segment("dampening", dampening, k), _per_segment("weight_decay", weight_decay, k)
    nest = _per_segment("nesterov", nesterov, k)
    sign = -1.0 if maximize else 1.0
    if all(float(m) == 0.0 for m in mu):
        return BlockParams.order1(sizes, Da=lr_, wd=wd, sign=sign)
    cols: dict[str, list[float]] = {c: [] for c in ("a", "a2", "b", "beta")}
    for m, dd, ne in zip(mu, d, nest, strict=True):
        m, dd = float(m), float(dd)
        if m == 0.0:
            vals = (1.0, 0.0, 0.0, 0.0)
        elif ne:
            vals = (1.0 + m * (1.0 - dd), 1.0 - dd, m * m, m)
        else:
            vals = (1.0 - dd, 1.0 - dd, m, m)
        for key, v in zip(("a", "a2", "b", "beta"), vals, strict=True):
            cols[key].append(v)
    return BlockParams.order2(sizes, **cols, c=1.0, D=lr_, wd=wd, sign=sign)


def adam_block_params(
    sizes: Sequence[int],
    *,
    lr: Scalars,
    betas: tuple[float, float] | Sequence[tuple[float, float]],
    weight_decay: Scalars = 0.0,
    decoupled: bool | Sequence[bool] = False,
    maximize: bool = False,
    variant: str = "frozen",
) -> BlockParams:
    """The table of ``torch.optim.Adam``/``AdamW`` (``decoupled=True``) for the given segments.

    ``variant="frozen"``: ``order2`` with ``a = a2 = 1-b1``, ``b = beta = b1``, ``D = 1`` (the
    preconditioner is the per-entry D vector). ``variant="full"``: ``adam_full`` with
    ``a = 1-b1``. Decoupled decay gives ``c = 1 - lr wd`` and ``wd = 0``; L2 decay ``c = 1`` and
    ``wd = weight_decay``.
    """
    if variant not in ("frozen", "full"):
        raise ValueError(f"variant must be 'frozen' or 'full', got {variant!r}")
    k = len(sizes)
    lr_ = [float(x) for x in _per_segment("lr", lr, k)]
    if isinstance(betas, tuple) and len(betas) == 2 and isinstance(betas[0], (int, float)):
        betas_ = [tuple(betas)] * k
    else:
        betas_ = [tuple(b) for b in betas]  # type: ignore[union-attr]
        if len(betas_) != k:
            raise ValueError(f"betas has {len(betas_)} pairs for {k} segments")
    wd = [float(x) for x in _per_segment("weight_decay", weight_decay, k)]
    dec = [bool(x) for x in _per_segment("decoupled", decoupled, k)]
    b1 = [float(b[0]) for b in betas_]
    b2 = [float(b[1]) for b in betas_]
    c = [1.0 - e * w if de else 1.0 for e, w, de in zip(lr_, wd, dec, strict=True)]
    wd_l2 = [0.0 if de else w for w, de in zip(wd, dec, strict=True)]
    sign = -1.0 if maximize else 1.0
    a = [1.0 - x for x in b1]
    if variant == "frozen":
        return BlockParams.order2(sizes, a=a, a2=a, b=b1, beta=b1, c=c, D=1.0, wd=wd_l2, sign=sign)
    return BlockParams.adam_full(sizes, a=a, b1=b1, b2=b2, c=c, wd=wd_l2, sign=sign)


def adam_coefficients(
    theta: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    sizes: Sequence[int],
    *,
    lr: Scalars,
    betas,
    eps: Scalars,
    step: Scalars,
    weight_decay: Scalars = 0.0,
    decoupled: bool | Sequence[bool] = False,
    maximize: bool = False,
    variant: str = "full",
) -> tuple[torch.Tensor, ...]:
    """Adam's per-entry coefficients at the current point: ``(D,)`` frozen, ``(D, q, r)`` full.

    From the flattened ``theta``, gradient ``grad``, and state ``exp_avg`` (m), ``exp_avg_sq``
    (v) *before* the step, with ``step`` the optimizer's ``state["step"]`` (the next step is
    ``step + 1``): ``gt = (-1 if maximize) grad + wd theta`` (L2 only), ``m' = b1 m + (1-b1) gt``,
    ``v' = b2 v + (1-b2) gt^2``, ``denom = sqrt(v') / sqrt(bc2) + eps``,
    ``D = lr / (bc1 denom)``, ``q = (lr/bc1) m' / (denom^2 2 sqrt(v') sqrt(bc2))`` (0 where
    ``v' = 0``), ``r = 2 (1-b2) gt``. Computed in the dtype of ``theta`` (float32 at least).
    Costs a dozen elementwise passes, once per operator.
    """
    k = len(sizes)
    dt = torch.promote_types(theta.dtype, torch.float32)
    th, g = theta.to(dt), grad.to(dt)
    m, v = exp_avg.to(dt), exp_avg_sq.to(dt)
    lr_, eps_ = _per_segment("lr", lr, k), _per_segment("eps", eps, k)
    step_, wd = _per_segment("step", step, k), _per_segment("weight_decay", weight_decay, k)
    dec = _per_segment("decoupled", decoupled, k)
    if isinstance(betas, tuple) and len(betas) == 2 and isinstance(betas[0], (int, float)):
        betas = [betas] * k
    D, q, r = torch.empty_like(th), torch.empty_like(th), torch.empty_like(th)
    o = 0
    for i, size in enumerate(sizes):
        sl = slice(o, o + int(size))
        o += int(size)
        b1, b2 = float(betas[i][0]), float(betas[i][1])
        t = float(step_[i]) + 1.0
        bc1, bc2s = 1.0 - b1**t, math.sqrt(1.0 - b2**t)
        gt = -g[sl] if maximize else g[sl].clone()
        if not dec[i] and float(wd[i]) != 0.0:
            gt.add_(th[sl], alpha=float(wd[i]))
        m_new = b1 * m[sl] + (1.0 - b1) * gt
        v_new = b2 * v[sl] + (1.0 - b2) * gt * gt
        sqrt_v = v_new.sqrt()
        denom = sqrt_v / bc2s + float(eps_[i])
        D[sl] = float(lr_[i]) / bc1 / denom
        inv = torch.where(sqrt_v > 0, 1.0 / (2.0 * sqrt_v * bc2s), torch.zeros_like(sqrt_v))
        q[sl] = (float(lr_[i]) / bc1) * m_new * inv / denom**2
        r[sl] = 2.0 * (1.0 - b2) * gt
    if variant == "frozen":
        return (D,)
    if variant != "full":
        raise ValueError(f"variant must be 'frozen' or 'full', got {variant!r}")
    return D, q, r


# -- the block functions, one per (family, pass), on one segment ------------------------------
# ins, cs (coefficient slices or None), p (the segment's columns), outs: all in the arithmetic
# dtype; outs are written, never read before written. Few passes, in place where possible.


def _order1_fwd(ins, cs, p, outs):
    x1, hv = ins
    (y1,) = outs
    # y1 = c x1 - Da (sign hv + wd x1)
    torch.mul(x1, p.c - p.Da * p.wd, out=y1)
    y1.add_(hv, alpha=-p.Da * p.sign)


def _order1_pre(ins, cs, p, outs):
    torch.mul(ins[0], p.Da, out=outs[0])  # u = Da y1


def _order1_post(ins, cs, p, outs):
    y1, hv = ins
    (x1,) = outs
    # x1 = c y1 - (sign hv + wd Da y1)
    torch.mul(y1, p.c - p.wd * p.Da, out=x1)
    x1.add_(hv, alpha=-p.sign)


def _order2_fwd(ins, cs, p, outs):
    x1, x2, hv = ins
    (dv,) = cs
    y1, y2 = outs
    ht = torch.mul(hv, p.sign)  # ht = sign hv + wd x1
    if p.wd != 0.0:
        ht.add_(x1, alpha=p.wd)
    torch.mul(x2, p.beta, out=y2)  # y2 = a2 ht + beta x2
    y2.add_(ht, alpha=p.a2)
    t = ht.mul_(p.a).add_(x2, alpha=p.b)  # t = a ht + b x2
    torch.mul(x1, p.c, out=y1)  # y1 = c x1 - D t
    if dv is None:
        y1.add_(t, alpha=-p.D)
    else:
        y1.addcmul_(dv, t, value=-p.D)


def _dy1(dv, y1):
    return y1 if dv is None else dv * y1


def _order2_pre(ins, cs, p, outs):
    y1, y2 = ins
    (u,) = outs
    torch.mul(y2, p.a2, out=u)  # u = a2 y2 - a D y1
    if cs[0] is None:
        u.add_(y1, alpha=-p.a * p.D)
    else:
        u.addcmul_(cs[0], y1, value=-p.a * p.D)


def _order2_post(ins, cs, p, outs):
    y1, y2, hv = ins
    x1, x2 = outs
    dy1 = _dy1(cs[0], y1)  # (D y1) / D-column
    # x1 = c y1 + sign hv + wd (a2 y2 - a D y1)
    torch.mul(y1, p.c, out=x1)
    x1.add_(hv, alpha=p.sign)
    if p.wd != 0.0:
        x1.add_(y2, alpha=p.wd * p.a2)
        x1.add_(dy1, alpha=-p.wd * p.a * p.D)
    torch.mul(y2, p.beta, out=x2)  # x2 = beta y2 - b D y1
    x2.add_(dy1, alpha=-p.b * p.D)


def _adam_full_fwd(ins, cs, p, outs):
    x1, x2, x3, hv = ins
    D, q, r = cs
    y1, y2, y3 = outs
    ht = torch.mul(hv, p.sign)  # ht = sign hv + wd x1
    if p.wd != 0.0:
        ht.add_(x1, alpha=p.wd)
    torch.mul(x2, p.b1, out=y2)  # dm' = b1 x2 + a ht
    y2.add_(ht, alpha=p.a)
    torch.mul(x3, p.b2, out=y3)  # dv' = b2 x3 + r ht
    y3.addcmul_(r, ht)
    torch.mul(x1, p.c, out=y1)  # dth' = c x1 - D dm' + q dv'
    y1.addcmul_(D, y2, value=-1.0)
    y1.addcmul_(q, y3)


def _adam_full_pre(ins, cs, p, outs):
    y1, y2, y3 = ins
    D, q, r = cs
    (u,) = outs
    w = torch.addcmul(y2, D, y1, value=-1.0)  # w = y2 - D y1
    z = torch.addcmul(y3, q, y1)  # z = y3 + q y1
    torch.mul(w, p.a, out=u)  # u = a w + r z
    u.addcmul_(r, z)


def _adam_full_post(ins, cs, p, outs):
    y1, y2, y3, hv = ins
    D, q, r = cs
    x1, x2, x3 = outs
    torch.addcmul(y2, D, y1, value=-1.0, out=x2)  # w, scaled by b1 below
    torch.addcmul(y3, q, y1, out=x3)  # z, scaled by b2 below
    torch.mul(y1, p.c, out=x1)  # x1 = c y1 + sign hv + wd (a w + r z)
    x1.add_(hv, alpha=p.sign)
    if p.wd != 0.0:
        x1.add_(x2, alpha=p.wd * p.a)
        x1.addcmul_(r, x3, value=p.wd)
    x2.mul_(p.b1)
    x3.mul_(p.b2)


_FUNCS = {
    ("order1", "fwd"): _order1_fwd,
    ("order1", "pre"): _order1_pre,
    ("order1", "post"): _order1_post,
    ("order2", "fwd"): _order2_fwd,
    ("order2", "pre"): _order2_pre,
    ("order2", "post"): _order2_post,
    ("adam_full", "fwd"): _adam_full_fwd,
    ("adam_full", "pre"): _adam_full_pre,
    ("adam_full", "post"): _adam_full_post,
}

#: Number of vector inputs and outputs of each pass, per family (inputs: blocks, then hv).
PASSES = ("fwd", "pre", "post")


def n_inputs(kind: str, direction: str) -> int:
    """Vector inputs of a pass: the blocks, plus ``hv`` for ``fwd`` and ``post``."""
    return NBLOCKS[kind] + (0 if direction == "pre" else 1)


def n_outputs(kind: str, direction: str) -> int:
    """Vector outputs of a pass: ``u`` for ``pre``, the blocks otherwise."""
    return 1 if direction == "pre" else NBLOCKS[kind]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for a storage dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- validation, shared with the dispatching front end ---------------------------------------


def _overlaps_itself(t: torch.Tensor) -> bool:
    """True if two elements of ``t`` (1-D or 2-D) share memory."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1)
    extent = 1
    for st, sz in dims:
        if st < extent:
            return True
        extent = st * sz
    return False


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return True
    sa, sb = a.element_size(), b.element_size()
    a0 = a.data_ptr()
    a1 = a0 + sa * (1 + sum((n - 1) * s for n, s in zip(a.shape, a.stride(), strict=True)))
    b0 = b.data_ptr()
    b1 = b0 + sb * (1 + sum((n - 1) * s for n, s in zip(b.shape, b.stride(), strict=True)))
    return a1 <= b0 or b1 <= a0


def check_call(
    params: BlockParams,
    direction: str,
    ins: Sequence[torch.Tensor],
    coef: Sequence[torch.Tensor | None],
    out: Sequence[torch.Tensor] | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor]]:
    """Validate one pass's operands; allocate the outputs if ``out`` is None.

    Returns ``(ins, coef, outs)``: ``coef`` padded with None to the family's count; ``outs``
    contiguous ``(n,)``/``(n, s)`` views into one new buffer when ``out`` is None.
    """
    kind, n = params.kind, params.n
    what = f"{kind} {direction}"
    nin, nout = n_inputs(kind, direction), n_outputs(kind, direction)
    if len(ins) != nin:
        raise ValueError(f"{what} takes {nin} vectors, got {len(ins)}")
    for i, t in enumerate(ins):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: operand {i} is a {type(t).__name__}, not a torch.Tensor")
    ref = ins[0]
    if ref.ndim not in (1, 2):
        raise ValueError(f"{what}: vectors must be (n,) or (n, s), got shape {tuple(ref.shape)}")
    for i, t in enumerate(ins):
        if t.ndim != ref.ndim or t.shape[0] != n or t.shape != ref.shape:
            raise ValueError(
                f"{what}: every vector must have shape ({n},) or ({n}, s) with one s; operand "
                f"{i} has shape {tuple(t.shape)}, operand 0 {tuple(ref.shape)}"
            )
        if t.device != ref.device:
            raise ValueError(
                f"{what}: operands on several devices ({ref.device} and {t.device}); move "
                f"them to one device with .to({str(ref.device)!r})"
            )
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{what}: operands have several dtypes ({ref.dtype} and {t.dtype}); convert "
                f"them to one, e.g. .to({ref.dtype})"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{what}: vectors must be floating point, got {t.dtype}")
    names = COEFS[kind]
    coef = list(coef)
    if kind == "order2" and len(coef) == 0:
        coef = [None]
    if len(coef) != len(names):
        raise ValueError(
            f"{kind} takes the per-entry coefficients {names} (order2: optional), got {len(coef)}"
        )
    for name, c in zip(names, coef, strict=True):
        if c is None:
            if kind == "adam_full":
                raise ValueError(f"adam_full needs the coefficient vector {name!r}")
            continue
        if not isinstance(c, torch.Tensor) or c.shape != (n,):
            shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"{what}: coefficient {name!r} must be a ({n},) tensor, got {shape}")
        if c.device != ref.device:
            raise ValueError(
                f"{what}: coefficient {name!r} is on {c.device} but the vectors are on "
                f"{ref.device}; build the operator with coefficients on the vectors' device"
            )
        if not c.dtype.is_floating_point:
            raise TypeError(f"{what}: coefficient {name!r} must be floating point, got {c.dtype}")
    if out is None:
        buf = torch.empty((nout * n, *ref.shape[1:]), dtype=ref.dtype, device=ref.device)
        outs = list(buf.split(n)) if n > 0 else [buf] * nout
    else:
        outs = list(out)
        if len(outs) != nout:
            raise ValueError(f"{what} writes {nout} vectors, got out of length {len(outs)}")
        for i, o in enumerate(outs):
            if not isinstance(o, torch.Tensor) or o.shape != ref.shape:
                shape = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                raise ValueError(
                    f"{what}: out[{i}] must have shape {tuple(ref.shape)}, got {shape}"
                )
            if o.device != ref.device or o.dtype != ref.dtype:
                raise ValueError(
                    f"{what}: out[{i}] is {o.dtype} on {o.device}; it must match the inputs "
                    f"({ref.dtype} on {ref.device})"
                )
            if _overlaps_itself(o):
                raise ValueError(
                    f"{what}: out[{i}] has overlapping elements (strides {o.stride()}); pass a "
                    "dense tensor or a view of one"
                )
            for j, t in enumerate(ins):
                if not _disjoint(o, t):
                    raise ValueError(
                        f"{what}: out[{i}] overlaps input {j}; the passes are not in place: "
                        "write into separate memory"
                    )
    return list(ins), coef, outs


def run_reference(
    params: BlockParams,
    direction: str,
    ins: Sequence[torch.Tensor],
    coef: Sequence[torch.Tensor | None],
    outs: Sequence[torch.Tensor],
) -> None:
    """Run one pass with torch ops on validated operands (see :func:`check_call`)."""
    acc = acc_dtype(ins[0].dtype)
    ins_a = [t.to(acc) for t in ins]
    two_d = ins[0].ndim == 2
    coef_a = [None if c is None else (c.to(acc)[:, None] if two_d else c.to(acc)) for c in coef]
    direct = all(o.dtype == acc for o in outs)
    outs_a = (
        list(outs) if direct else [torch.empty(o.shape, dtype=acc, device=o.device) for o in outs]
    )
    fn = _FUNCS[(params.kind, direction)]
    for lo, hi, p in params.segments():
        if hi > lo:
            fn(
                [t[lo:hi] for t in ins_a],
                [None if c is None else c[lo:hi] for c in coef_a],
                p,
                [o[lo:hi] for o in outs_a],
            )
    if not direct:
        for o, oa in zip(outs, outs_a, strict=True):
            o.copy_(oa)


def reference_matvec(
    params: BlockParams,
    x: Sequence[torch.Tensor],
    hv: torch.Tensor,
    coef: Sequence[torch.Tensor] = (),
    *,
    out: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The blocks of ``J x`` from the blocks of ``x`` and ``hv = H x[0]`` (plain torch).

    Args:
        params: the coefficient table.
        x: the ``params.nblocks`` state blocks, each ``(n,)`` or ``(n, s)``.
        hv: the bare-Hessian product ``H x[0]``, same shape.
        coef: the family's per-entry vectors (``()``, ``(D,)`` or ``(D, q, r)``).
        out: optional output blocks (must not overlap the inputs).

    Returns:
        The output blocks. Costs a few elementwise passes per segment.
    """
    ins, cf, outs = check_call(params, "fwd", [*x, hv], coef, out)
    run_reference(params, "fwd", ins, cf, outs)
    return tuple(outs)


def reference_rmatvec_pre(
    params: BlockParams,
    y: Sequence[torch.Tensor],
    coef: Sequence[torch.Tensor] = (),
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The HVP input ``u`` of ``J^T y`` (``order1``: ``Da y1``; ``order2``: ``a2 y2 - a D y1``;
    ``adam_full``: ``a (y2 - D y1) + r (y3 + q y1)``)."""
    ins, cf, outs = check_call(params, "pre", list(y), coef, None if out is None else [out])
    run_reference(params, "pre", ins, cf, outs)
    return outs[0]


def reference_rmatvec_post(
    params: BlockParams,
    y: Sequence[torch.Tensor],
    hv: torch.Tensor,
    coef: Sequence[torch.Tensor] = (),
    *,
    out: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The blocks of ``J^T y`` from the blocks of ``y`` and ``hv = H u`` (``u`` from
    :func:`reference_rmatvec_pre`)."""
    ins, cf, outs = check_call(params, "post", [*y, hv], coef, out)
    run_reference(params, "post", ins, cf, outs)
    return tuple(outs)

"""Random block-pass problems for the kernel tests and benchmarks (factories, not fixtures).

A case is a coefficient table with several segments (hyper-parameters differ per segment,
``maximize`` mixed in), per-entry coefficient vectors, and the vector operands of every pass in
a chosen storage dtype and memory layout. Values are O(1) and coefficients in (0, 1), so an
output's rounding error is bounded by a few ulps of :func:`scale` (see :func:`assert_close`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kappa_gpu._cuda._reference import NBLOCKS, BlockParams, n_inputs

__all__ = ["LAYOUTS", "Case", "make_case", "make_vectors", "assert_close"]

#: Memory layouts of ``(n, s)`` operands: row-major, transposed ``(s, n)`` memory, and column
#: slices of a wider row-major matrix (strided in both directions).
LAYOUTS = ("rows", "cols", "slice")


@dataclass
class Case:
    """One problem: ``params``, per-entry ``coef`` and the operands of each pass.

    ``ins[direction]`` holds the pass's inputs (blocks, then ``hv`` for fwd/post).
    """

    params: BlockParams
    coef: list[torch.Tensor]
    ins: dict[str, list[torch.Tensor]]


def default_sizes(n: int) -> list[int]:
    """Uneven segments, one empty, one of a single entry: boundaries land mid-tile."""
    if n < 8:
        return [n]
    a = n // 3
    return [1, 0, a, 5, n - a - 6]


def make_vectors(
    n: int,
    s: int | None,
    count: int,
    dtype: torch.dtype,
    layout: str,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """``count`` random ``(n,)`` (``s`` None) or ``(n, s)`` tensors in a layout."""
    out = []
    for _ in range(count):
        shape = (n,) if s is None else (n, s)
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        if s is None:
            if layout != "rows":  # a strided 1-D view
                t = torch.stack([t, torch.zeros_like(t)], dim=1)[:, 0]
        elif layout == "cols":
            t = t.T.contiguous().T
        elif layout == "slice":
            z = torch.zeros(n, 3, dtype=dtype, device=device)
            t = torch.cat([z[:, :2], t, z[:, 2:]], dim=1)[:, 2 : 2 + s]
        out.append(t)
    return out


def make_case(
    kind: str,
    n: int,
    s: int | None,
    dtype: torch.dtype,
    gen: torch.Generator,
    *,
    coef_dtype: torch.dtype | None = None,
    layout: str = "rows",
    sizes: Sequence[int] | None = None,
    wd_zero: bool = False,
    d_vector: bool = True,
    device: torch.device | str = "cpu",
) -> Case:
    """A random case of one family (see the module docstring).

    Args:
        kind: ``"order1"``, ``"order2"`` or ``"adam_full"``.
        n, s: entries per block; columns (None for 1-D vectors).
        dtype, coef_dtype: storage of the vectors and of the coefficient vectors.
        layout: one of :data:`LAYOUTS`.
        sizes: segment sizes (default :func:`default_sizes`).
        wd_zero: all ``wd = 0`` (lets adam_full's post pass skip ``r``).
        d_vector: order2 with the per-entry D vector (else ``D`` per segment only).
    """
    sizes = list(sizes) if sizes is not None else default_sizes(n)
    k = len(sizes)
    coef_dtype = coef_dtype or dtype

    def col(lo: float = 0.05, hi: float = 0.95) -> list[float]:
        return (lo + (hi - lo) * torch.rand(k, generator=gen, dtype=torch.float64)).tolist()

    wd = [0.0] * k if wd_zero else col(0.0, 0.2)
    sign = [(-1.0) ** g for g in range(k)]
    if kind == "order1":
        params = BlockParams.order1(sizes, c=col(0.9, 1.0), Da=col(), wd=wd, sign=sign)
        coef: list[torch.Tensor] = []
    elif kind == "order2":
        params = BlockParams.order2(
            sizes,
            a=col(),
            a2=col(),
            b=col(),
            beta=col(),
            c=col(0.9, 1.0),
            D=col(0.5, 1.5),
            wd=wd,
            sign=sign,
        )
        coef = [torch.rand(n, generator=gen, dtype=torch.float64)] if d_vector else []
    elif kind == "adam_full":
        params = BlockParams.adam_full(
            sizes, a=col(), b1=col(), b2=col(), c=col(0.9, 1.0), wd=wd, sign=sign
        )
        coef = [torch.rand(n, generator=gen, dtype=torch.float64) for _ in range(3)]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    coef = [c.to(device=device, dtype=coef_dtype) for c in coef]
    ins = {
        d: make_vectors(n, s, n_inputs(kind, d), dtype, layout, gen, device)
        for d in ("fwd", "pre", "post")
    }
    return Case(params, coef, ins)


def scale(ins: Sequence[torch.Tensor], nblocks: int) -> float:
    """A bound on the size of the terms of any output: coefficients < 1, ~2 nblocks terms."""
    m = max(float(t.abs().max()) if t.numel() else 0.0 for t in ins)
    return max(m, 1.0) * 2.0 * (nblocks + 1)


def assert_close(got: torch.Tensor, want: torch.Tensor, ins, kind: str, what: str = "") -> None:
    """``got`` equals ``want`` up to rounding: a few ulps of the terms' scale in the arithmetic
    dtype, plus one ulp of the storage dtype (float32 results a few ulps apart can round to
    neighbouring bfloat16 values; one bfloat16 ulp is at most 2^-7 of the value)."""
    dtype = want.dtype
    sc = scale(ins, NBLOCKS[kind])
    arith = 1e-13 if dtype == torch.float64 else 4e-6
    store = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0**-7}.get(dtype, 2**-10)
    g, w = got.double(), want.double()
    err = (g - w).abs()
    bound = arith * sc + store * w.abs() * 1.01
    bad = err > bound
    if bad.any():
        idx = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} entries differ beyond rounding; first "
            f"at flat index {idx}: got {g.reshape(-1)[idx]}, want {w.reshape(-1)[idx]}, "
            f"bound {float(bound.reshape(-1)[idx]):.3g}"
        )

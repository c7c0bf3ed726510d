"""Closed-form 2x2 blocks of the optimizer Jacobian J (DESIGN.md section 3).

For every operator of kappa_gpu, an eigenpair ``(s, w)`` of the symmetric matrix
``D^(1/2) Ht D^(1/2)`` gives ``u = D^(1/2) w`` with ``D Ht u = s u`` and a 2-dimensional invariant
subspace ``span{(u, 0), (0, D^-1 u)}`` of ``J``. In that basis ``J`` acts as

    M(s) = [[ c - a s , -b   ],
            [ a2 s    , beta ]]

with characteristic polynomial ``z^2 - (c + beta - a s) z + (c - a s) beta + a2 b s``. This module
evaluates the blocks, their eigenpairs, the exceptional points (EPs, where the discriminant
vanishes and the two eigenvectors coalesce), and the stability edges (where a root reaches
``+-1``), all vectorized over arrays of curvatures ``s``.

The closed form is exact only when the scalar coefficients ``a, a2, b, beta, c`` are the same for
every parameter (``D`` may vary per parameter: it is absorbed into ``s`` and ``u``). When momentum,
betas or decoupled weight decay differ between parameter groups, the blocks do not decouple and the
generic (Arnoldi) path must be used.

All arithmetic is float64 numpy: the quantities of interest live next to exceptional points,
where the eigenvalues depend on ``sqrt(s - s_ep)`` and the eigenvectors on ``1/sqrt(s - s_ep)``;
float32 would lose half of its digits there. The cost is ``O(m)`` flops for ``m`` modes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = [
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


class BlockCoefficients(NamedTuple):
    """The scalar coefficients of the 2x2 block ``M(s) = [[c - a s, -b], [a2 s, beta]]``.

    Unpack them into the block functions: ``block_eigen(s, *coeffs)``.
    """

    a: float
    a2: float
    b: float
    beta: float
    c: float


def sgd_momentum_coefficients(
    momentum: float, dampening: float = 0.0, nesterov: bool = False
) -> BlockCoefficients:
    """Block coefficients of ``torch.optim.SGD`` with momentum (``s`` = eigenvalue of eta Ht).

    Heavy ball: ``a = a2 = 1 - d, b = beta = mu, c = 1``; nesterov: ``a = 1 + mu (1 - d),
    a2 = 1 - d, b = mu^2, beta = mu, c = 1`` (DESIGN.md sections 2 and 3). For ``momentum = 0``
    use :func:`order1_eigen` instead (the state is theta only).
    """
    mu, d = float(momentum), float(dampening)
    if mu <= 0.0:
        raise ValueError(
            f"momentum must be > 0 for the 2x2 blocks, got {momentum}; "
            "for plain SGD use order1_eigen / order1_stability_margin"
        )
    if nesterov:
        return BlockCoefficients(a=1.0 + mu * (1.0 - d), a2=1.0 - d, b=mu * mu, beta=mu, c=1.0)
    return BlockCoefficients(a=1.0 - d, a2=1.0 - d, b=mu, beta=mu, c=1.0)


def adam_frozen_coefficients(
    beta1: float, lr: float = 0.0, weight_decay: float = 0.0, decoupled: bool = False
) -> BlockCoefficients:
    """Block coefficients of frozen-preconditioner Adam/AdamW (``s`` = eigenvalue of ``D Ht``).

    ``a = a2 = 1 - b1, b = beta = b1, c = 1 - lr weight_decay`` for AdamW (``decoupled=True``),
    ``c = 1`` for Adam (its L2 weight decay is inside ``Ht``).
    """
    b1 = float(beta1)
    c = 1.0 - float(lr) * float(weight_decay) if decoupled else 1.0
    return BlockCoefficients(a=1.0 - b1, a2=1.0 - b1, b=b1, beta=b1, c=c)


class EPRatio(NamedTuple):
    """Signed relative distance ``s / s_ep - 1`` to the nearest exceptional point.

    Attributes:
        ratio: ``s / s_ep - 1`` (negative: below that EP, positive: above); NaN where the block
            has no real exceptional point.
        which: ``-1`` where the nearest EP is the lower one ``s_lo``, ``+1`` for the upper one
            ``s_hi``, ``0`` where there is none.
        s_ep: the EP the ratio refers to (NaN where none).
    """

    ratio: np.ndarray
    which: np.ndarray
    s_ep: np.ndarray


class StabilityMargin(NamedTuple):
    """``1 - max|z|`` of each block and the curvatures where the block loses stability.

    Attributes:
        margin: ``1 - max(|z_1|, |z_2|)`` per mode (negative: unstable).
        s_minus_one: ``s`` at which a root equals ``-1`` (``p(-1) = 0``, linear in ``s``): the
            "edge of stability", ``a s = 2 (1 + beta)`` for heavy ball. NaN if none.
        s_plus_one: ``s`` at which a root equals ``+1`` (``p(1) = 0``): ``0`` when ``c = 1``
            (negative curvature beyond it). NaN if none.
        s_unit_circle: ``s`` at which a complex pair reaches ``|z| = 1`` (``det = 1`` while the
            discriminant is negative); NaN if that never happens (e.g. ``det = c beta < 1``
            constant for heavy ball and Adam).
    """

    margin: np.ndarray
    s_minus_one: np.ndarray
    s_plus_one: np.ndarray
    s_unit_circle: np.ndarray


# --------------------------------------------------------------------------------------------
# helpers


def _as_real(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} must be real, got a complex array")
    return arr.astype(np.float64, copy=False)


def _prep(s, a, a2, b, beta, c) -> tuple[np.ndarray, ...]:
    """Broadcast ``s`` (at least 1-D) with the coefficients, all float64."""
    arrs = [
        _as_real(n, v)
        for n, v in zip(("s", "a", "a2", "b", "beta", "c"), (s, a, a2, b, beta, c), strict=True)
    ]
    arrs[0] = np.atleast_1d(arrs[0])
    try:
        return tuple(np.broadcast_arrays(*arrs))
    except ValueError as err:
        shapes = ", ".join(str(np.shape(v)) for v in arrs)
        raise ValueError(
            f"s and the coefficients (a, a2, b, beta, c) must broadcast; got shapes {shapes}"
        ) from err


def _coeffs(a, a2, b, beta, c) -> tuple[np.ndarray, ...]:
    return tuple(
        np.asarray(_as_real(n, v))
        for n, v in zip(("a", "a2", "b", "beta", "c"), (a, a2, b, beta, c), strict=True)
    )


def _ep_quadratic(a, a2, b, beta, c):
    """Coefficients of the discriminant as a quadratic in s: ``A s^2 + B s + C``.

    disc(s) = (c + beta - a s)^2 - 4 (c beta + s (a2 b - a beta))
            = a^2 s^2 - 2 (a (c - beta) + 2 a2 b) s + (c - beta)^2.
    """
    A = a * a
    B = -2.0 * (a * (c - beta) + 2.0 * a2 * b)
    C = (c - beta) ** 2
    return A, B, C


def _ep_roots(a, a2, b, beta, c) -> tuple[np.ndarray, np.ndarray]:
    """Real roots ``s_lo <= s_hi`` of the discriminant (NaN where there is none).

    Stable quadratic formula: q = -(B + sign(B) sqrt(B^2 - 4AC)) / 2, roots q/A and C/q, so the
    small EP (``(sqrt(c) - sqrt(beta))^2 / a``, which is 0.0026 for beta = 0.9) keeps full
    relative accuracy. ``B^2 - 4AC = 16 a2 b (a (c - beta) + a2 b)`` is evaluated in that
    factored form for the same reason.
    """
    a, a2, b, beta, c = np.broadcast_arrays(*_coeffs(a, a2, b, beta, c))
    A, B, C = _ep_quadratic(a, a2, b, beta, c)
    delta = 16.0 * a2 * b * (a * (c - beta) + a2 * b)
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = np.sqrt(np.where(delta >= 0, delta, 0.0))
        sgn = np.where(B >= 0, 1.0, -1.0)
        q = -0.5 * (B + sgn * sq)
        quad = A != 0
        r1 = np.where(quad & (q != 0), q / np.where(A != 0, A, 1.0), np.nan)
        r2 = np.where(q != 0, C / np.where(q != 0, q, 1.0), np.nan)
        # A == q == 0 only if B == 0 and delta == 0: no isolated root. Linear case (a = 0):
        # disc = B s + C has the single root -C / B, reported twice.
        lin = np.where(B != 0, -C / np.where(B != 0, B, 1.0), np.nan)
        r1 = np.where(quad, r1, lin)
        r2 = np.where(quad, r2, lin)
        # q == 0 with A != 0 means B == 0 and C == 0: the double root s = 0.
        both0 = quad & (q == 0)
        r1 = np.where(both0, 0.0, r1)
        r2 = np.where(both0, 0.0, r2)
        none = quad & (delta < 0)
        r1 = np.where(none, np.nan, r1)
        r2 = np.where(none, np.nan, r2)
    return np.fmin(r1, r2), np.fmax(r1, r2)


def _discriminant(s, a, a2, b, beta, c) -> np.ndarray:
    """The discriminant, in the factored form ``a^2 (s - s_lo)(s - s_hi)`` where that exists."""
    s_lo, s_hi = _ep_roots(a, a2, b, beta, c)
    direct = (c + beta - a * s) ** 2 - 4.0 * (c * beta + s * (a2 * b - a * beta))
    with np.errstate(invalid="ignore"):
        factored = (a * a) * (s - s_lo) * (s - s_hi)
        linear = -2.0 * (a * (c - beta) + 2.0 * a2 * b) * (s - s_lo)
    out = np.where(a != 0, factored, linear)
    # Without real EPs the discriminant is bounded away from 0 and the direct form is accurate.
    return np.where(np.isnan(s_lo), direct, out)


# --------------------------------------------------------------------------------------------
# public


def block_matrices(s, a, a2, b, beta, c) -> np.ndarray:
    """The explicit blocks ``M(s) = [[c - a s, -b], [a2 s, beta]]``.

    Args:
        s: curvatures, scalar or array (eigenvalues of ``D^(1/2) Ht D^(1/2)``).
        a, a2, b, beta, c: block coefficients, scalars or arrays broadcastable with ``s``
            (see :class:`BlockCoefficients`).

    Returns:
        float64 array of shape ``broadcast_shape + (2, 2)`` (``(m, 2, 2)`` for ``s`` of shape
        ``(m,)``). Costs ``O(m)``.
    """
    s, a, a2, b, beta, c = _prep(s, a, a2, b, beta, c)
    M = np.empty(s.shape + (2, 2), dtype=np.float64)
    M[..., 0, 0] = c - a * s
    M[..., 0, 1] = -b
    M[..., 1, 0] = a2 * s
    M[..., 1, 1] = beta
    return M


def discriminant(s, a, a2, b, beta, c) -> np.ndarray:
    """``(c + beta - a s)^2 - 4 ((c - a s) beta + a2 b s)``, evaluated without cancellation.

    Evaluated as ``a^2 (s - s_lo)(s - s_hi)`` with the exceptional points of
    :func:`exceptional_points`, so it has full relative accuracy next to an EP and is exactly
    ``0`` at ``s = s_lo`` or ``s = s_hi`` as returned by :func:`exceptional_points`. Positive:
    two real eigenvalues; negative: a complex-conjugate pair; zero: a defective double eigenvalue.
    Costs ``O(m)``.
    """
    s, a, a2, b, beta, c = _prep(s, a, a2, b, beta, c)
    return _discriminant(s, a, a2, b, beta, c)


def exceptional_points(a, a2, b, beta, c) -> tuple[np.ndarray, np.ndarray]:
    """The curvatures ``s_lo <= s_hi`` at which the discriminant vanishes.

    For ``a = a2`` and ``b = beta``: ``a s = (sqrt(c) -+ sqrt(beta))^2`` (heavy ball with
    ``beta = 0.9``: ``0.002633`` and ``3.797``). Otherwise the general quadratic in ``s`` is
    solved (stable formula). Where the discriminant has no real root (the block never becomes
    defective) both are NaN; where it is linear in ``s`` (``a = 0``) the single root is returned
    twice.

    Returns:
        ``(s_lo, s_hi)``: float64 arrays of the broadcast shape of the coefficients (0-d for
        scalars). Costs ``O(1)`` per coefficient set.
    """
    return _ep_roots(a, a2, b, beta, c)


def block_eigen(s, a, a2, b, beta, c) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and unit eigenvectors of every block ``M(s)``, in closed form.

    Ordering: ``z[..., 0] = (tr + sqrt(disc)) / 2`` and ``z[..., 1] = (tr - sqrt(disc)) / 2``
    with ``tr = c + beta - a s`` and the principal square root, so each column is continuous in
    ``s`` across the exceptional points and a complex pair has ``Im z[..., 0] > 0``. Real roots
    use the stable quadratic formula (the larger-magnitude root directly, the other as
    ``det / root``); the discriminant comes from :func:`discriminant`.

    Eigenvectors: of the two kernel vectors ``(b, c - a s - z)`` and ``(z - beta, a2 s)`` of
    ``M - z I``, the one with the larger norm, where ``c - a s - z`` and ``z - beta`` are formed
    as ``(delta -+ r)`` with ``delta = (c - a s - beta)/2``, ``r = sqrt(disc)/2`` and the
    cancelling one of the two recovered from ``(delta - r)(delta + r) = a2 b s``. At an
    exceptional point (``disc == 0`` exactly) the double eigenvalue ``tr/2`` and the single
    eigenvector are returned twice: finite, no NaN, no warning. If ``M`` is a multiple of the
    identity, ``e1`` and ``e2`` are returned.

    Args:
        s: curvatures (eigenvalues of ``D^(1/2) Ht D^(1/2)``), scalar or array.
        a, a2, b, beta, c: block coefficients, broadcastable with ``s``.

    Returns:
        ``(z, P)``: ``z`` complex128 of shape ``(m, 2)``, ``P`` complex128 of shape
        ``(m, 2, 2)`` whose column ``P[i, :, j]`` is the unit eigenvector of ``M(s_i)`` for
        ``z[i, j]`` in the block basis ``{(u, 0), (0, D^-1 u)}`` (turn it into a native vector
        with :func:`native_eigenvectors`). ``m`` stands for the broadcast shape. Costs ``O(m)``.
    """
    s, a, a2, b, beta, c = _prep(s, a, a2, b, beta, c)
    tr = c + beta - a * s
    det = c * beta + s * (a2 * b - a * beta)  # = (c - a s) beta + a2 b s, exact when a=a2, b=beta
    disc = _discriminant(s, a, a2, b, beta, c)
    real = disc >= 0
    sq = np.sqrt(np.abs(disc))

    # Real roots: q has no cancellation; the other root is det / q.
    sgn = np.where(tr >= 0, 1.0, -1.0)
    q = 0.5 * (tr + sgn * sq)
    q_safe = np.where(q != 0, q, 1.0)
    other = np.where(q != 0, det / q_safe, 0.0)
    plus_r = np.where(tr >= 0, q, other)
    minus_r = np.where(tr >= 0, other, q)
    exact_ep = disc == 0
    plus_r = np.where(exact_ep, 0.5 * tr, plus_r)
    minus_r = np.where(exact_ep, 0.5 * tr, minus_r)

    z = np.empty(s.shape + (2,), dtype=np.complex128)
    z[..., 0] = np.where(real, plus_r, 0.5 * tr + 0.5j * sq)
    z[..., 1] = np.where(real, minus_r, 0.5 * tr - 0.5j * sq)

    # Kernel vectors of M - zI. delta -+ r, with r real: form the non-cancelling one directly
    # and the other from the product (delta - r)(delta + r) = delta^2 - r^2 = a2 b s.
    delta = 0.5 * (c - a * s - beta)
    r_half = 0.5 * sq
    dsgn = np.where(delta >= 0, 1.0, -1.0)
    big = delta + dsgn * r_half
    prod = a2 * b * s
    small = np.where(big != 0, prod / np.where(big != 0, big, 1.0), 0.0)
    d_plus_r_real = np.where(delta >= 0, big, small)  # delta + r
    d_minus_r_real = np.where(delta >= 0, small, big)  # delta - r
    d_plus_r = np.where(real, d_plus_r_real, delta + 1j * r_half)
    d_minus_r = np.where(real, d_minus_r_real, delta - 1j * r_half)
    d_plus_r = np.where(exact_ep, delta, d_plus_r)
    d_minus_r = np.where(exact_ep, delta, d_minus_r)

    P = np.empty(s.shape + (2, 2), dtype=np.complex128)
    bz = b.astype(np.complex128)
    a2s = (a2 * s).astype(np.complex128)
    # branch "+" (z = beta + delta + r = (c - a s) - (delta - r)); branch "-" with r -> -r.
    for j, (m11_minus_z, z_minus_m22) in enumerate(((d_minus_r, d_plus_r), (d_plus_r, d_minus_r))):
        va = np.stack([bz, m11_minus_z], axis=-1)  # row 1: (m11 - z) x + (-b) y = 0
        vb = np.stack([z_minus_m22, a2s], axis=-1)  # row 2: a2 s x + (beta - z) y = 0
        na = np.linalg.norm(va, axis=-1)
        nb = np.linalg.norm(vb, axis=-1)
        v = np.where((na >= nb)[..., None], va, vb)
        nv = np.maximum(na, nb)
        # M = (scalar) I: every vector is an eigenvector; return the basis vector e_{j+1}.
        fallback = np.zeros(s.shape + (2,), dtype=np.complex128)
        fallback[..., j] = 1.0
        v = np.where((nv > 0)[..., None], v / np.where(nv > 0, nv, 1.0)[..., None], fallback)
        P[..., :, j] = v
    return z, P


def native_eigenvectors(
    P: np.ndarray | torch.Tensor,
    u: torch.Tensor,
    Dinv_u: torch.Tensor,
    *,
    normalize: bool = False,
) -> torch.Tensor:
    """Native-coordinate vectors ``p (u, 0) + q (0, D^-1 u)`` from block coefficients ``(p, q)``.

    Args:
        P: block-basis coefficients: with ``u`` of shape ``(n, m)``, shape ``(m, 2)`` (one vector
            per mode) or ``(m, 2, r)`` (``r`` vectors per mode, e.g. ``P`` of
            :func:`block_eigen`); with ``u`` of shape ``(n,)``, shape ``(2,)`` or ``(2, r)``.
        u: ``u = D^(1/2) w`` per mode, shape ``(n, m)`` or ``(n,)``, any device.
        Dinv_u: ``D^-1 u``, same shape and device as ``u``.
        normalize: scale every output column to unit 2-norm (the convention of the reported
            Ritz vectors). Off by default: the plain linear combination is returned.

    Returns:
        A tensor on ``u``'s device of shape ``(2n, m * r)`` (columns ordered mode-major: mode 0
        vectors 0..r-1, then mode 1, ...), ``(2n, m)`` for ``P`` of shape ``(m, 2)``, and
        ``(2n,)`` or ``(2n, r)`` for 1-D ``u``. Complex (complex128 for float64 ``u``,
        complex64 for float32) when ``P`` is complex, else ``u``'s dtype. Costs ``O(n m r)``
        flops and memory; the coefficients are cast to ``u``'s precision.
    """
    if not isinstance(u, torch.Tensor) or not isinstance(Dinv_u, torch.Tensor):
        raise TypeError("u and Dinv_u must be torch tensors (they stay on their device)")
    if u.shape != Dinv_u.shape:
        raise ValueError(
            f"u and Dinv_u must have the same shape, got {tuple(u.shape)} and {tuple(Dinv_u.shape)}"
        )
    if u.device != Dinv_u.device:
        raise ValueError(f"u is on {u.device} but Dinv_u is on {Dinv_u.device}")
    if u.ndim not in (1, 2):
        raise ValueError(f"u must be (n,) or (n, m), got shape {tuple(u.shape)}")
    Pn = P.detach().cpu().numpy() if isinstance(P, torch.Tensor) else np.asarray(P)
    single_mode = u.ndim == 1
    U = u[:, None] if single_mode else u
    V = Dinv_u[:, None] if single_mode else Dinv_u
    m = U.shape[1]
    if single_mode:
        if Pn.shape[:1] != (2,) or Pn.ndim not in (1, 2):
            raise ValueError(f"with 1-D u, P must be (2,) or (2, r), got {Pn.shape}")
        Pn = Pn[None]
    if Pn.ndim not in (2, 3) or Pn.shape[:2] != (m, 2):
        raise ValueError(
            f"P must be (m, 2) or (m, 2, r) with m = {m} modes (the columns of u), got {Pn.shape}"
        )
    vec_out = Pn.ndim == 2
    if vec_out:
        Pn = Pn[..., None]
    r = Pn.shape[2]
    complex_out = np.iscomplexobj(Pn) or u.is_complex()
    if complex_out:
        cdtype = {
            torch.float32: torch.complex64,
            torch.float16: torch.complex64,
            torch.bfloat16: torch.complex64,
        }.get(u.dtype, torch.complex128)
        if u.is_complex():
            cdtype = u.dtype
        Pt = torch.as_tensor(np.ascontiguousarray(Pn.astype(np.complex128)))
        Pt = Pt.to(device=u.device, dtype=cdtype)
        U, V = U.to(cdtype), V.to(cdtype)
    else:
        Pt = torch.as_tensor(np.ascontiguousarray(Pn.astype(np.float64)))
        Pt = Pt.to(device=u.device, dtype=u.dtype)
    top = U[:, :, None] * Pt[None, :, 0, :]  # (n, m, r)
    bot = V[:, :, None] * Pt[None, :, 1, :]
    X = torch.cat([top, bot], dim=0).reshape(2 * U.shape[0], m * r)
    if normalize:
        nrm = torch.linalg.vector_norm(X, dim=0)
        X = X / torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    if single_mode:
        return X[:, 0] if vec_out else X
    return X


def ep_ratio(s, a, a2, b, beta, c) -> EPRatio:
    """Signed relative distance of each mode to its nearest exceptional point.

    ``ratio = s / s_ep - 1``, which for ``a = a2, b = beta`` is ``a s / (sqrt(c) +- sqrt(beta))^2
    - 1``; "nearest" is the EP with the smaller ``|ratio|``. ``ratio = 0`` at the EP, ``-0.01``
    means 1 % below it. For ``beta = 0.9`` every ``s`` between about ``0.005`` and the upper EP
    refers to the upper EP (``s_hi = 3.797``), which is the one next to the stability edge.
    Costs ``O(m)``.

    Returns:
        :class:`EPRatio` ``(ratio, which, s_ep)``, arrays of the broadcast shape.
    """
    s, a, a2, b, beta, c = _prep(s, a, a2, b, beta, c)
    s_lo, s_hi = _ep_roots(a, a2, b, beta, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        r_lo = np.where(s_lo != 0, s / np.where(s_lo != 0, s_lo, 1.0) - 1.0, np.inf)
        r_hi = np.where(s_hi != 0, s / np.where(s_hi != 0, s_hi, 1.0) - 1.0, np.inf)
        r_lo = np.where((s_lo == 0) & (s == 0), 0.0, r_lo)
        r_hi = np.where((s_hi == 0) & (s == 0), 0.0, r_hi)
    use_hi = np.abs(r_hi) <= np.abs(r_lo)
    none = np.isnan(s_lo)
    ratio = np.where(none, np.nan, np.where(use_hi, r_hi, r_lo))
    which = np.where(none, 0, np.where(use_hi, 1, -1)).astype(np.int64)
    s_ep = np.where(none, np.nan, np.where(use_hi, s_hi, s_lo))
    return EPRatio(ratio=ratio, which=which, s_ep=s_ep)


def _edges(a, a2, b, beta, c) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Curvatures where a root is -1, +1, or a complex pair has modulus 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        # p(-1) = (1 + c)(1 + beta) - s (a (1 + beta) - a2 b)
        k_m = a * (1.0 + beta) - a2 * b
        s_m = np.where(k_m != 0, (1.0 + c) * (1.0 + beta) / np.where(k_m != 0, k_m, 1.0), np.nan)
        # p(+1) = (1 - c)(1 - beta) + s (a (1 - beta) + a2 b)
        k_p = a * (1.0 - beta) + a2 * b
        s_p = np.where(k_p != 0, -(1.0 - c) * (1.0 - beta) / np.where(k_p != 0, k_p, 1.0), np.nan)
        # det(s) = c beta + s (a2 b - a beta) = 1, valid only where the pair is complex.
        k_d = a2 * b - a * beta
        s_d = np.where(k_d != 0, (1.0 - c * beta) / np.where(k_d != 0, k_d, 1.0), np.nan)
    ok = np.isfinite(s_d)
    disc_d = _discriminant(np.where(ok, s_d, 0.0), a, a2, b, beta, c)
    s_d = np.where(ok & (disc_d < 0), s_d, np.nan)
    return s_m + 0.0, s_p + 0.0, s_d + 0.0  # + 0.0 turns -0.0 into 0.0


def stability_margin(s, a, a2, b, beta, c) -> StabilityMargin:
    """``1 - max|z|`` of each block, plus the curvatures of the stability edges.

    The edges solve ``p(-1) = 0`` and ``p(+1) = 0``, both linear in ``s``:
    ``s_-1 = (1 + c)(1 + beta) / (a (1 + beta) - a2 b)`` (heavy ball, ``c = 1``:
    ``a s = 2 (1 + beta)``, i.e. 3.8 for ``beta = 0.9``; Adam: ``lambda_max(P^-1 H) =
    (2 + 2 b1) / ((1 - b1) eta)``) and ``s_+1 = -(1 - c)(1 - beta) / (a (1 - beta) + a2 b)``
    (0 for ``c = 1``); plus the ``s`` where a complex pair crosses the unit circle, if any.
    Costs ``O(m)``.

    Returns:
        :class:`StabilityMargin`; ``margin`` has the broadcast shape of ``s`` and the
        coefficients, the edges the shape of the coefficients.
    """
    s_b, a_b, a2_b, b_b, beta_b, c_b = _prep(s, a, a2, b, beta, c)
    z, _ = block_eigen(s_b, a_b, a2_b, b_b, beta_b, c_b)
    margin = 1.0 - np.max(np.abs(z), axis=-1)
    s_m, s_p, s_d = _edges(*_coeffs(a, a2, b, beta, c))
    return StabilityMargin(margin=margin, s_minus_one=s_m, s_plus_one=s_p, s_unit_circle=s_d)


def order1_eigen(s, a=1.0, c=1.0) -> np.ndarray:
    """Eigenvalues ``z = c - a s`` of the order-1 update (SGD without momentum: ``J = I - eta Ht``).

    With ``s`` the eigenvalues of ``eta Ht`` (``a = c = 1``), the eigenvector of ``z`` is ``u``
    itself (state theta only); ``J`` is symmetric here, so there is no exceptional point and
    ``kappa(V) = 1``. Returns float64 of the broadcast shape (at least 1-D). Costs ``O(m)``.
    """
    s_, a_, c_ = np.broadcast_arrays(
        np.atleast_1d(_as_real("s", s)), _as_real("a", a), _as_real("c", c)
    )
    return c_ - a_ * s_


def order1_stability_margin(s, a=1.0, c=1.0) -> StabilityMargin:
    """``1 - |c - a s|`` and the edges ``s_-1 = (c + 1)/a``, ``s_+1 = (c - 1)/a`` (order 1).

    For plain SGD (``a = c = 1``): ``eta lambda_max(Ht) = 2`` and ``s = 0``. ``s_unit_circle`` is
    NaN (real roots only). Costs ``O(m)``.
    """
    z = order1_eigen(s, a, c)
    a_, c_ = _as_real("a", a), _as_real("c", c)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_m = np.where(a_ != 0, (c_ + 1.0) / np.where(a_ != 0, a_, 1.0), np.nan)
        s_p = np.where(a_ != 0, (c_ - 1.0) / np.where(a_ != 0, a_, 1.0), np.nan)
    return StabilityMargin(
        margin=1.0 - np.abs(z),
        s_minus_one=s_m,
        s_plus_one=s_p,
        s_unit_circle=np.full_like(s_m, np.nan),
    )

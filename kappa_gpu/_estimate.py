"""``estimate``: kappa(V), exceptional points and transient growth of the optimizer's update.

Two ways to the same modes (DESIGN.md section 3), which cross-check each other:

* ``structured`` -- thick-restart Lanczos on the symmetric ``S = D^1/2 Ht D^1/2`` (n-dimensional,
  one HVP per matvec), then the closed-form 2x2 blocks give eigenvalues and native-coordinate
  right and left eigenvectors of J for those modes. Needs uniform block coefficients (SGD
  momentum/dampening/nesterov, Adam betas the same in every parameter group).
* ``arnoldi`` -- Krylov-Schur directly on J (2n or 3n dimensional; any variant, Adam's full one
  included), targeted by curvature, not by |z| (DESIGN.md section 3). No ordering of z alone
  does it: sharp complex pairs have |z| = sqrt(c beta) like the bulk, "SR" and "LM" around
  (c + beta)/2 are beaten by strong negative curvature (whose small root lies below beta), "LI"
  ranks pairs by Im z, which falls again past a s = c + beta. But the 2x2 block's
  characteristic polynomial is linear in s, so every Ritz value z names its curvature
  ``s(z) = -(z - c)(z - beta) / (a (z - beta) + a2 b)``; Krylov-Schur keeps the Ritz values of
  largest Re s(z) (sharp) or smallest (negative), both roots of a mode alike. Without uniform
  block coefficients it falls back to ``"SR"`` (sharp) / ``"LR"`` (negative). Where the
  structure exists the start block is the structured modes' invariant subspace, so Arnoldi
  refines instead of searching.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import scipy.linalg
import torch

from kappa_gpu._distributed import broadcast_generator, communicator_of
from kappa_gpu._linop import aslinearoperator
from kappa_gpu._report import KappaReport
from kappa_gpu.diagnostics import _blocks
from kappa_gpu.diagnostics._conditioning import eigenvalue_condition_numbers, kappa_V
from kappa_gpu.diagnostics._transient import (
    kreiss_lower_bound,
    orthonormal_basis,
    transient_growth,
)
from kappa_gpu.operators import update_operator
from kappa_gpu.solvers import eigs, eigsh

__all__ = ["estimate"]

_METHODS = ("auto", "structured", "arnoldi")
_MODES = ("sharp", "negative", "both")


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-4


def estimate(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn,
    batch,
    k: int = 8,
    *,
    method: str = "auto",
    modes: str = "sharp",
    variant: str | None = None,
    tol: float | None = None,
    warm_start: KappaReport | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    horizon: int | None = None,
    ncv: int | None = None,
    maxiter: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    process_group: Any = None,
) -> KappaReport:
    """How non-normal is the optimizer's update right now, and can the number be trusted?

    Builds the exact linearized update J of one ``optimizer.step()`` at the current state
    (:func:`kappa_gpu.update_operator`), computes ``k`` curvature modes and reports their
    eigenvalues, kappa(V) (native coordinates), eigenvalue condition numbers, distances to the
    exceptional points and the stability edge, the transient growth of J on their invariant
    subspace, a Kreiss lower bound and residual certificates. Model, gradients, buffers,
    optimizer state, RNG state and train/eval mode are left bitwise unchanged.

    Args:
        model, optimizer, loss_fn, batch: as for :func:`kappa_gpu.update_operator`
            (``loss_fn(model(inputs), targets)``, ``batch = (inputs, targets)`` or a list of
            such batches). The optimizer must have taken at least one step.
        k: number of curvature modes per side (each gives two eigenvalues of J in the
            structured path; ``2 k`` Ritz values are computed in the arnoldi path).
        method: ``"structured"``, ``"arnoldi"`` or ``"auto"`` (structured where it applies:
            SGD with uniform momentum, Adam/AdamW frozen with uniform betas; else arnoldi).
        modes: ``"sharp"`` (largest curvatures, the ones that reach the exceptional point and
            the stability edge), ``"negative"`` (smallest curvatures; real z > 1) or ``"both"``.
        variant: ``"frozen"`` (default) or ``"full"`` for Adam/AdamW; ``"full"`` forces arnoldi.
        tol: relative residual tolerance of the eigen-solver (default 1e-8 in float64, 1e-4 in
            float32).
        warm_start: a previous report (or its ``warm_vectors``) to start the solver from; cuts
            the cost of estimates that follow each other closely in training.
        generator: the random start vector's generator (default: a private one seeded with
            ``seed``; the global RNG is never used).
        horizon: steps of the transient-growth curve (default: chosen from kappa_V and rho).
        ncv, maxiter: passed to the eigen-solver.
        seed: RNG seed of dropout inside the HVPs (same mask in every HVP) and of the start
            vector when no ``generator`` is given.
        dtype: the dtype of the Krylov vectors (default: the parameters' dtype).
        process_group: ``torch.distributed`` group whose ranks' gradients and HVPs are
            averaged (default: the group of a ``DistributedDataParallel`` model, else none).
            Under a group ``estimate`` is a collective: call it on every rank of the group with
            the same arguments (each with its own batch); every rank returns the same report.
            The generator's state is broadcast from the group's first rank. See
            ``docs/multi_gpu.md``; FSDP/FSDP2 models raise ``UnsupportedConfigurationError``.

    Returns:
        A :class:`KappaReport`. It never raises for non-convergence: ``converged`` and
        ``message`` say what happened and what to raise (``k``, ``ncv``, ``maxiter``, ``tol``).

    Cost:
        structured: about one HVP per Lanczos step (typically 3-6 k) plus ``2 k`` (``4 k`` for
        ``modes="both"``) HVPs for the certificates. arnoldi: one HVP per Arnoldi step on the
        2n/3n-dimensional J, usually several times more.
    """
    t0 = time.perf_counter()
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if modes not in _MODES:
        raise ValueError(f"modes must be one of {_MODES}, got {modes!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")

    op = update_operator(model, optimizer, loss_fn, batch, variant=variant, seed=seed, dtype=dtype,
                         process_group=process_group)
    tol = _default_tol(op.dtype) if tol is None else float(tol)
    if generator is None:
        # Never draw from the global RNG (the user's training run owns it): a private,
        # seeded generator makes the estimate reproducible on the same device.
        generator = torch.Generator(device=op.device).manual_seed(seed)
    broadcast_generator(generator, communicator_of(op))  # same start vectors on every rank
    structure = op.structure()
    frozen_structure = structure
    if structure is None and op.kind in ("adam", "adamw"):
        # Adam full: the frozen operator's blocks are the starting guess and the EP yardstick.
        frozen_structure = update_operator(
            model, optimizer, loss_fn, batch, variant="frozen", seed=seed, dtype=dtype,
            process_group=process_group,
        ).structure()
    if frozen_structure is not None and not bool(torch.any(frozen_structure.D > 0)):
        raise ValueError(
            "the learning rate is 0 in every parameter group (or no parameter is reached by the "
            "loss): the update does not move theta and J has no curvature modes to estimate; "
            "estimate at a step with lr > 0"
        )
    usable = structure is not None and structure.uniform
    if method == "structured" and not usable:
        why = (
            "the full Adam variant has no 2x2 block structure"
            if structure is None
            else "block coefficients differ between parameter groups"
        )
        raise ValueError(f"method='structured' does not apply here: {why}; use method='arnoldi'")
    structured = method == "structured" or (method == "auto" and usable)
    chosen = "structured" if structured else "arnoldi"

    warm = warm_start.warm_vectors if isinstance(warm_start, KappaReport) else warm_start
    sides = ["sharp", "negative"] if modes == "both" else [modes]
    n_hvp0 = op.n_hvp

    if chosen == "structured":
        parts = [
            _structured_side(op, structure, k, side, tol, warm, generator, ncv, maxiter)
            for side in sides
        ]
        out = _merge(parts)
        target = ", ".join(
            f"{p['target']}" for p in parts
        )
    else:
        parts = []
        for side in sides:
            parts.append(
                _arnoldi_side(op, frozen_structure, k, side, tol, warm, generator, ncv, maxiter)
            )
        out = _merge(parts)
        target = ", ".join(p["target"] for p in parts)

    z = out["z"]
    cond = out["cond"]
    rho = float(np.max(np.abs(z))) if len(z) else float("nan")
    # Everything below is small dense algebra on the real basis B of the computed invariant
    # subspace (2n x p, p = 2k or 4k), its image J B and the coefficients C of the unit
    # eigenvectors X = B C: never a complex 2n-row matrix. In float64, because kappa_V near an
    # exceptional point is the conditioning of nearly parallel columns.
    R, T = _basis_geometry(out["B"], out["JB"])
    kv = float(kappa_V(torch.from_numpy(R @ out["C"])))

    # Transient growth on the computed invariant subspace: T = Q^T J Q with Q = B R^-1.
    tg = transient_growth(T, horizon=horizon)
    # Amplification beyond the spectral radius: max_t ||(T / rho)^t||, finite even when rho >= 1
    # (where max_t ||T^t|| is infinite and only the first `horizon` steps are shown).
    rho_T = float(np.max(np.abs(np.linalg.eigvals(T)))) if T.size else 0.0
    normalized = transient_growth(T / rho_T, horizon=horizon) if rho_T > 0 else tg
    kreiss = kreiss_lower_bound(T)
    curve = np.asarray(tg.curve, dtype=np.float64)
    tgrid = np.arange(len(curve))
    with np.errstate(over="ignore", invalid="ignore"):
        bound_curve = kv * rho**tgrid if math.isfinite(kv) else np.full(len(curve), np.inf)

    # Per-mode exceptional-point quantities from the block coefficients.
    s = out["s"]
    coeffs = _coeffs(frozen_structure)
    if coeffs is not None and len(s):
        epr = _blocks.ep_ratio(s, *coeffs)
        disc = _blocks.discriminant(s, *coeffs)
        margin = _blocks.stability_margin(s, *coeffs).margin
        ep_which = ["upper" if w > 0 else ("lower" if w < 0 else "none") for w in epr.which]
        ratio = epr.ratio
        scale = np.maximum(np.abs(np.asarray(coeffs.c + coeffs.beta)) ** 2, 1e-300)
        at_ep = np.abs(disc) <= 1e3 * np.finfo(np.float64).eps * scale
    else:
        nanv = np.full(len(s), np.nan)
        ratio, disc, margin, at_ep = nanv, nanv, 1.0 - np.abs(out["z_mode"]), np.zeros(len(s), bool)
        ep_which = ["none"] * len(s)

    residuals = out["residuals"]
    converged = out["converged"]
    msgs = [m for m in out["messages"] if m]
    if np.any(at_ep):
        msgs.append(
            f"mode(s) {np.flatnonzero(at_ep).tolist()} at an exceptional point: eigenvectors "
            "coalesce, kappa_V is infinite"
        )
    if not np.all(converged):
        msgs.append(
            f"{int(np.sum(~converged))} of {len(converged)} eigenvalues not converged to "
            f"tol={tol:g}: raise ncv or maxiter, or loosen tol; their numbers are estimates"
        )
    return KappaReport(
        eigenvalues=z,
        kappa_V=kv,
        condition_numbers=cond,
        spectral_radius=rho,
        curvatures=np.asarray(s, dtype=np.float64),
        mode_of=out["mode_of"],
        ep_ratio=np.asarray(ratio, dtype=np.float64),
        ep_which=ep_which,
        discriminant=np.asarray(disc, dtype=np.float64),
        stability_margin=np.asarray(margin, dtype=np.float64),
        at_ep=np.asarray(at_ep, dtype=bool),
        transient_growth=float(tg.max_growth) if tg.bounded else float("inf"),
        normalized_growth=float(normalized.max_growth),
        growth_argmax=int(tg.argmax_t),
        growth_curve=curve,
        growth_bounded=bool(tg.bounded),
        kappa_bound_curve=np.asarray(bound_curve, dtype=np.float64),
        kreiss_lower=float(kreiss.value),
        residuals=np.asarray(residuals, dtype=np.float64),
        converged=np.asarray(converged, dtype=bool),
        n_hvp=int(op.n_hvp - n_hvp0),
        seconds=time.perf_counter() - t0,
        method=chosen,
        variant=op.variant,
        optimizer=op.kind,
        modes=modes,
        target=target,
        n_params=int(op.n_params),
        state_dim=int(op.shape[0]),
        tol=tol,
        message="; ".join(msgs) if msgs else "ok",
        hessenberg=out.get("hessenberg"),
        warm_vectors=out["warm"],
    )


# ---------------------------------------------------------------------------------------------


def _coeffs(structure) -> _blocks.BlockCoefficients | None:
    """Scalar block coefficients when uniform (the EP yardstick), else None."""
    if structure is None or not structure.uniform or structure.order != 2:
        return None
    return _blocks.BlockCoefficients(
        *(float(getattr(structure, f).reshape(-1)[0]) for f in ("a", "a2", "b", "beta", "c"))
    )


def _sym_operator(structure):
    """S = D^1/2 Ht D^1/2 as a LinearOperator (self-adjoint; one HVP per column)."""
    H = structure.hessian
    sq = structure.D.to(H.dtype).sqrt()

    def mv(x):
        return sq * H.matvec(sq * x)

    def mm(X):
        return sq[:, None] * H.matmat(sq[:, None] * X)

    return aslinearoperator(mv, shape=H.shape, dtype=H.dtype, device=H.device, rmatvec=mv,
                            matmat=mm, rmatmat=mm), sq


def _structured_side(op, st, k, side, tol, warm, generator, ncv, maxiter) -> dict[str, Any]:
    S, sq = _sym_operator(st)
    n = S.shape[0]
    which = "LA" if side == "sharp" else "SA"
    v0 = warm if warm is not None and warm.shape[0] == n else None
    res = eigsh(S, k=min(k, max(1, n - 2)), which=which, v0=v0, tol=tol, ncv=ncv,
                maxiter=maxiter, generator=generator)
    s = np.real(res.eigenvalues.detach().cpu().numpy()).astype(np.float64)
    W = res.eigenvectors.real if res.eigenvectors.is_complex() else res.eigenvectors
    W = W.to(op.dtype)
    m = W.shape[1]
    U = sq[:, None] * W  # u = D^1/2 w
    # D^-1 u = D^-1/2 w; entries the loss does not reach have D = 0 and w = 0 there.
    DinvU = torch.where(sq[:, None] > 0, W / torch.where(sq > 0, sq, 1)[:, None], 0)
    lanczos_ok = np.asarray(res.converged, dtype=bool)
    if st.order == 1:
        c, a = (float(t.reshape(-1)[0]) for t in (st.c, st.a))
        z = (c - a * s).astype(np.complex128)
        B = U
        JB = op.matmat(B)
        C = np.eye(m, dtype=np.complex128)
        # Left eigenvectors of c - a D Ht are D^-1 u: y^T x = w^T w = 1.
        Cl = np.eye(m, dtype=np.complex128)
        Bl_gram, cross = _gram(DinvU, DinvU), _gram(DinvU, U)
        z2, mode_of = z, np.arange(m)
        z_mode, target = np.abs(z), f"{which} of D^1/2 Ht D^1/2 (eigsh)"
        conv_solver = lanczos_ok
    else:
        a, a2, b, beta, c = (float(t.reshape(-1)[0]) for t in (st.a, st.a2, st.b, st.beta, st.c))
        zb, P = _blocks.block_eigen(s, a, a2, b, beta, c)  # (m, 2), (m, 2, 2)
        # Basis (u_i, 0) for i < m, then (0, D^-1 u_i); eigenvector (i, r) = P[i,0,r] (u_i, 0) +
        # P[i,1,r] (0, D^-1 u_i).
        zero = torch.zeros_like(U)
        B = torch.cat([torch.cat([U, zero], 0), torch.cat([zero, DinvU], 0)], 1)
        # Certificates with the real operator: J(u,0) and J(0, D^-1 u) for every mode (2m
        # matvecs); every eigenvector of the modes is a combination of them.
        JB = op.matmat(B)
        C = _block_coefficients(P)
        # Left eigenvectors: J^T carries M^T on span{(D^-1 u, 0), (0, u)}.
        Mt = np.swapaxes(_blocks.block_matrices(s, a, a2, b, beta, c), -1, -2)
        Pl = np.empty_like(P)
        for i in range(m):
            for j in range(2):
                Pl[i, :, j] = _null_vector(Mt[i] - np.conj(zb[i, j]) * np.eye(2))
        Cl = _block_coefficients(Pl)
        # Gram matrices of the left basis and of left-vs-right basis (block diagonal).
        Bl_gram = _blockdiag(_gram(DinvU, DinvU), _gram(U, U))
        cross = _blockdiag(_gram(DinvU, U), _gram(U, DinvU))
        z2, mode_of = zb.reshape(-1), np.repeat(np.arange(m), 2)
        z_mode, target = np.max(np.abs(zb), axis=1), (
            f"{which} of D^1/2 Ht D^1/2 (eigsh) + 2x2 blocks")
        conv_solver = np.repeat(lanczos_ok, 2)
    G = _gram(B, B)
    C = C / np.sqrt(np.real(np.einsum("ij,ik,kj->j", C.conj(), G, C)))[None, :]
    Cl = Cl / np.sqrt(np.real(np.einsum("ij,ik,kj->j", Cl.conj(), Bl_gram, Cl)))[None, :]
    cond = 1.0 / np.abs(np.einsum("ij,ik,kj->j", Cl.conj(), cross, C))
    resid = _residuals(B, JB, C, z2)
    return dict(z=z2, z_mode=z_mode, s=s, mode_of=mode_of, cond=cond, B=B, JB=JB, C=C,
                residuals=resid, converged=_conv(resid, z2, tol, conv_solver), warm=W,
                target=target, messages=[_msg(res)])


def _arnoldi_side(op, st, k, side, tol, warm, generator, ncv, maxiter) -> dict[str, Any]:
    N = op.shape[0]
    coeffs = _coeffs(st)
    if coeffs is not None:
        # Rank Ritz values by the curvature they stand for (both roots of a mode alike).
        sign = 1.0 if side == "sharp" else -1.0

        def curvature_key(z: np.ndarray) -> np.ndarray:
            return sign * np.real(_curvature_of(z, coeffs))

        curvature_key.__name__ = "largest curvature" if side == "sharp" else "smallest curvature"
        which = curvature_key
    else:
        which = "SR" if side == "sharp" else "LR"
    v0 = None
    if warm is not None and warm.shape[0] == N:
        v0 = warm
    elif st is not None and st.uniform:
        # Start from the structured modes' invariant subspace (of the frozen operator):
        # Arnoldi then refines instead of searching.
        S, sq = _sym_operator(st)
        pre = eigsh(S, k=min(k, max(1, S.shape[0] - 2)), which="LA" if side == "sharp" else "SA",
                    tol=max(tol, 1e-6), generator=generator)
        W = (pre.eigenvectors.real if pre.eigenvectors.is_complex() else pre.eigenvectors)
        W = W.to(op.dtype)
        U, DinvU = sq[:, None] * W, W / sq[:, None]
        zero = torch.zeros_like(U)
        blocks = [torch.cat([U, zero], 0), torch.cat([zero, DinvU], 0)]
        if N > 2 * st.D.shape[0]:  # Adam full: the v block starts at zero
            blocks = [torch.cat([B, torch.zeros(N - B.shape[0], B.shape[1], dtype=B.dtype,
                                                device=B.device)], 0) for B in blocks]
        v0 = torch.cat(blocks, dim=1)
    kk = min(2 * k, N - 2)
    res = eigs(op, k=kk, which=which, v0=v0, tol=tol, ncv=ncv, maxiter=maxiter,
               left=True, generator=generator)
    z = res.eigenvalues.detach().cpu().numpy().astype(np.complex128)
    X = res.eigenvectors
    Y = res.left_eigenvectors
    # Curvature of each Ritz value from the block's characteristic polynomial (uniform case):
    # s = -(z - c)(z - beta) / (a (z - beta) + a2 b).
    if coeffs is not None:
        s_all = np.real(_curvature_of(z, coeffs))
        # A complex pair is one mode; a real eigenvalue its own.
        keys = np.round(s_all, 10)
        uniq, mode_of = np.unique(keys, return_inverse=True)
        s = np.array([np.mean(s_all[mode_of == i]) for i in range(len(uniq))])
    else:
        mode_of = np.arange(len(z))
        s = np.full(len(z), np.nan)
    cond = eigenvalue_condition_numbers(X, Y).detach().cpu().numpy().astype(np.float64)
    B = orthonormal_basis(X)
    JB = op.matmat(B)
    C = (B.to(X.dtype).mT @ X).detach().cpu().numpy().astype(np.complex128)
    conv = np.asarray(res.converged, dtype=bool)
    resid = np.asarray(res.residuals.detach().cpu() if torch.is_tensor(res.residuals)
                       else res.residuals, dtype=np.float64)
    return dict(z=z, z_mode=np.abs(z), s=s, mode_of=np.asarray(mode_of), cond=cond, B=B, JB=JB,
                C=C, residuals=resid, converged=conv, warm=B,
                target=f"which={getattr(which, '__name__', which)} on J (Krylov-Schur"
                f"{', started from the structured subspace' if v0 is not None else ''})",
                hessenberg=getattr(res, "hessenberg", None), messages=[_msg(res)])


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the sharp and negative sides: bases side by side, coefficients block-diagonal."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for key in ("z", "z_mode", "s", "residuals", "converged", "cond"):
        out[key] = np.concatenate([p[key] for p in parts])
    mo, shift = [], 0  # mode numbers unique across sides
    for p in parts:
        mo.append(p["mode_of"] + shift)
        shift += len(p["s"])
    out["mode_of"] = np.concatenate(mo)
    for key in ("B", "JB", "warm"):
        out[key] = torch.cat([p[key] for p in parts], dim=1)
    out["C"] = scipy.linalg.block_diag(*(p["C"] for p in parts))
    out["messages"] = sum((p["messages"] for p in parts), [])
    out["hessenberg"] = parts[0].get("hessenberg")
    return out


def _gram(A: torch.Tensor, B: torch.Tensor, chunk: int = 1 << 18) -> np.ndarray:
    """A^T B in float64 (numpy), accumulated over row chunks: no full float64 copy of A or B."""
    acc = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    for i in range(0, A.shape[0], chunk):
        acc += A[i : i + chunk].double().mT @ B[i : i + chunk].double()
    return acc.cpu().numpy()


def _basis_geometry(B: torch.Tensor, JB: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """R with B = Q R (Q orthonormal) and T = Q^T J Q = R^-T (B^T J B) R^-1, in float64.

    R comes from the Cholesky factor of the Gram matrix B^T B (p x p), which is accurate while
    the basis is well conditioned -- it is by construction: (u, 0) and (0, D^-1 u) have
    disjoint supports, and the u are D-orthogonal Lanczos vectors. Falls back to a Householder
    QR of B if the Gram matrix is not numerically positive definite.
    """
    G = _gram(B, B)
    try:
        R = np.linalg.cholesky(G).T
    except np.linalg.LinAlgError:
        R = torch.linalg.qr(B.double(), mode="r")[1].cpu().numpy()
    BtJB = _gram(B, JB)
    Rinv_BtJB = scipy.linalg.solve_triangular(R, BtJB.T, trans="T").T  # (B^T J B) R^-1
    T = scipy.linalg.solve_triangular(R, Rinv_BtJB, trans="T")  # R^-T (...)
    return R, T


def _block_coefficients(P: np.ndarray) -> np.ndarray:
    """(m, 2, r) block-basis coefficients -> (2m, m r) coefficients in the basis
    [(u_1,0) .. (u_m,0), (0,D^-1 u_1) .. (0,D^-1 u_m)], columns mode-major."""
    m, _, r = P.shape
    C = np.zeros((2 * m, m * r), dtype=np.complex128)
    for i in range(m):
        C[i, i * r : (i + 1) * r] = P[i, 0, :]
        C[m + i, i * r : (i + 1) * r] = P[i, 1, :]
    return C


def _blockdiag(*blocks: np.ndarray) -> np.ndarray:
    return scipy.linalg.block_diag(*blocks)


def _residuals(B: torch.Tensor, JB: torch.Tensor, C: np.ndarray, z: np.ndarray) -> np.ndarray:
    """||J x - z x|| for x = B c (C's columns), in real arithmetic on B's device."""
    dt, dev = B.dtype, B.device
    Cz = C * np.asarray(z)[None, :]

    def t(M):
        return torch.from_numpy(np.ascontiguousarray(M)).to(device=dev, dtype=dt)

    r_re = JB @ t(C.real) - B @ t(Cz.real)
    r_im = JB @ t(C.imag) - B @ t(Cz.imag)
    r = torch.sqrt(torch.linalg.vector_norm(r_re.double(), dim=0) ** 2
                   + torch.linalg.vector_norm(r_im.double(), dim=0) ** 2)
    return r.cpu().numpy()


def _curvature_of(z: np.ndarray, coeffs) -> np.ndarray:
    """The curvature s whose 2x2 block has the eigenvalue z (its characteristic polynomial is
    linear in s): s = -(z - c)(z - beta) / (a (z - beta) + a2 b). inf at the pole."""
    a, a2, b, beta, c = coeffs
    z = np.asarray(z, dtype=np.complex128)
    den = a * (z - beta) + a2 * b
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, -(z - c) * (z - beta) / np.where(den != 0, den, 1), np.inf)


def _cdtype(dt: torch.dtype) -> torch.dtype:
    return torch.complex128 if dt == torch.float64 else torch.complex64


def _null_vector(M: np.ndarray) -> np.ndarray:
    """Unit null vector of a (numerically) singular 2x2 matrix (float64/complex128)."""
    r0 = np.array([-M[0, 1], M[0, 0]])
    r1 = np.array([-M[1, 1], M[1, 0]])
    v = r0 if np.linalg.norm(r0) >= np.linalg.norm(r1) else r1
    nv = np.linalg.norm(v)
    return v / nv if nv > 0 else np.array([1.0, 0.0], dtype=M.dtype)


def _conv(resid: np.ndarray, z: np.ndarray, tol: float, solver_ok) -> np.ndarray:
    r = np.asarray(resid, dtype=np.float64)
    ok = r <= np.sqrt(tol) * np.maximum(np.abs(z), 1.0)
    return ok & np.asarray(solver_ok, dtype=bool)


def _msg(res) -> str:
    for name in ("message", "status"):
        v = getattr(res, name, None)
        if isinstance(v, str) and v and v.lower() not in ("ok", "converged"):
            return v
    return ""

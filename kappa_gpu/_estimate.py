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
import torch

from kappa_gpu._distributed import broadcast_generator, communicator_of
from kappa_gpu._linop import aslinearoperator
from kappa_gpu._report import KappaReport
from kappa_gpu.diagnostics import _blocks
from kappa_gpu.diagnostics._conditioning import eigenvalue_condition_numbers, kappa_V
from kappa_gpu.diagnostics._transient import (
    kreiss_lower_bound,
    orthonormal_basis,
    projected_operator,
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

    X = out["X"]
    z = out["z"]
    kv = float(kappa_V(X))
    Y = out.get("Y")
    cond = (
        eigenvalue_condition_numbers(X, Y).detach().cpu().numpy().astype(np.float64)
        if Y is not None
        else np.full(len(z), np.nan)
    )
    rho = float(np.max(np.abs(z))) if len(z) else float("nan")

    # Transient growth on the computed invariant subspace: T = Q^T J Q, Q orthonormal (real).
    Q, JQ = out["Q"], out["JQ"]
    T = projected_operator(JQ, Q)
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
    v0 = None
    if warm is not None and warm.shape[0] == n:
        v0 = warm
    res = eigsh(S, k=min(k, max(1, n - 2)), which=which, v0=v0, tol=tol, ncv=ncv,
                maxiter=maxiter, generator=generator)
    s = res.eigenvalues.real.double().cpu().numpy() if torch.is_tensor(res.eigenvalues) else (
        np.real(np.asarray(res.eigenvalues)))
    W = res.eigenvectors.real if res.eigenvectors.is_complex() else res.eigenvectors
    W = W.to(op.dtype)
    U = sq[:, None] * W  # u = D^1/2 w
    DinvU = W / sq[:, None]  # D^-1 u = D^-1/2 w
    m = U.shape[1]
    dev = U.device
    if st.order == 1:
        c = float(st.c.reshape(-1)[0])
        a = float(st.a.reshape(-1)[0])
        z = (c - a * s).astype(np.complex128)
        X = U / torch.linalg.vector_norm(U, dim=0)
        JX = op.matmat(X)
        resid = torch.linalg.vector_norm(JX - X * torch.as_tensor(z.real, device=dev,
                                                                  dtype=X.dtype), dim=0)
        Q, JQ = X, JX
        Y = X / st.D.to(X.dtype)[:, None]  # left eigenvectors of D Ht: D^-1 u
        Y = Y / torch.linalg.vector_norm(Y, dim=0)
        return dict(z=z, z_mode=z, s=s, mode_of=np.arange(m), X=X.to(_cdtype(X.dtype)),
                    Y=Y.to(_cdtype(X.dtype)), residuals=resid.double().cpu().numpy(),
                    converged=_conv(resid, z, tol, res.converged), Q=Q, JQ=JQ,
                    warm=W, target=f"{which} of D^1/2 Ht D^1/2 (eigsh)",
                    messages=[_msg(res)])
    coeffs = [st.a, st.a2, st.b, st.beta, st.c]
    a, a2, b, beta, c = (float(t.reshape(-1)[0]) for t in coeffs)
    z, P = _blocks.block_eigen(s, a, a2, b, beta, c)  # (m, 2), (m, 2, 2)
    X = _blocks.native_eigenvectors(P, U, DinvU, normalize=True)  # (2n, 2m) complex
    # Left eigenvectors: J^T has the invariant subspace span{(D^-1 u, 0), (0, u)} carrying M^T.
    Mt = np.swapaxes(_blocks.block_matrices(s, a, a2, b, beta, c), -1, -2)
    Pl = np.empty_like(P)
    for i in range(m):
        for j in range(2):
            Pl[i, :, j] = _null_vector(Mt[i] - np.conj(z[i, j]) * np.eye(2))
    Y = _blocks.native_eigenvectors(Pl, DinvU, U, normalize=True)
    # Certificates with the real operator: J(u,0) and J(0, D^-1 u) for every mode (2m matvecs,
    # m of them with an HVP); every eigenvector is a combination of the two.
    B0 = torch.cat([U, torch.zeros_like(U)], dim=0)
    B1 = torch.cat([torch.zeros_like(U), DinvU], dim=0)
    JB = op.matmat(torch.cat([B0, B1], dim=1))
    J0, J1 = JB[:, :m], JB[:, m:]
    Pc = torch.as_tensor(P, device=dev).to(_cdtype(op.dtype))  # (m, 2, 2)
    # X columns are normalized: recover the normalization from the unnormalized combination.
    Xraw = _blocks.native_eigenvectors(P, U, DinvU, normalize=False)
    nrm = torch.linalg.vector_norm(Xraw, dim=0)
    JX = (J0.to(Pc.dtype)[:, :, None] * Pc[None, :, 0, :]
          + J1.to(Pc.dtype)[:, :, None] * Pc[None, :, 1, :]).reshape(JB.shape[0], 2 * m) / nrm
    zf = torch.as_tensor(z.reshape(-1), device=dev).to(Pc.dtype)
    resid = torch.linalg.vector_norm(JX - X * zf, dim=0)
    Bq = torch.cat([B0, B1], dim=1)
    Q, R = torch.linalg.qr(Bq)
    JQ = torch.linalg.solve_triangular(R.mT, JB.mT, upper=False).mT  # JB R^-1
    lanczos_ok = np.repeat(np.asarray(res.converged, dtype=bool), 2)
    return dict(z=z.reshape(-1), z_mode=np.max(np.abs(z), axis=1), s=s,
                mode_of=np.repeat(np.arange(m), 2), X=X, Y=Y,
                residuals=resid.double().cpu().numpy(),
                converged=_conv(resid, z.reshape(-1), tol, lanczos_ok), Q=Q, JQ=JQ, warm=W,
                target=f"{which} of D^1/2 Ht D^1/2 (eigsh) + 2x2 blocks", messages=[_msg(res)])


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
    Qr = orthonormal_basis(X)
    JQ = op.matmat(Qr)
    conv = np.asarray(res.converged, dtype=bool)
    warm_vecs = Qr
    return dict(z=z, z_mode=np.abs(z), s=s, mode_of=np.asarray(mode_of), X=X, Y=Y,
                residuals=np.asarray(res.residuals.detach().cpu() if torch.is_tensor(
                    res.residuals) else res.residuals, dtype=np.float64),
                converged=conv, Q=Qr, JQ=JQ, warm=warm_vecs,
                target=f"which={getattr(which, '__name__', which)} on J (Krylov-Schur"
                f"{', started from the structured subspace' if v0 is not None else ''})",
                hessenberg=getattr(res, "hessenberg", None), messages=[_msg(res)])


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for key in ("z", "z_mode", "s", "residuals", "converged"):
        out[key] = np.concatenate([p[key] for p in parts])
    # Renumber modes so they are unique across sides.
    mo, shift = [], 0
    for p in parts:
        mo.append(p["mode_of"] + shift)
        shift += len(p["s"])
    out["mode_of"] = np.concatenate(mo)
    out["X"] = torch.cat([p["X"] for p in parts], dim=1)
    out["Y"] = (torch.cat([p["Y"] for p in parts], dim=1)
                if all(p.get("Y") is not None for p in parts) else None)
    Qs = torch.cat([p["Q"] for p in parts], dim=1)
    JQs = torch.cat([p["JQ"] for p in parts], dim=1)
    # Re-orthonormalize the union (Q R = [Q1 Q2]; J Q = J [Q1 Q2] R^-1).
    Q, R = torch.linalg.qr(Qs)
    out["Q"] = Q
    out["JQ"] = torch.linalg.solve_triangular(R.mT, JQs.mT, upper=False).mT
    out["warm"] = torch.cat([p["warm"] for p in parts], dim=1)
    out["messages"] = sum((p["messages"] for p in parts), [])
    out["hessenberg"] = parts[0].get("hessenberg")
    return out


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


def _conv(resid: torch.Tensor, z: np.ndarray, tol: float, solver_ok) -> np.ndarray:
    r = resid.double().cpu().numpy()
    ok = r <= np.sqrt(tol) * np.maximum(np.abs(z), 1.0)
    return ok & np.asarray(solver_ok, dtype=bool)


def _msg(res) -> str:
    for name in ("message", "status"):
        v = getattr(res, name, None)
        if isinstance(v, str) and v and v.lower() not in ("ok", "converged"):
            return v
    return ""

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
  refines instead of searching: one block column per mode when the subspace is this
  operator's own (a block step then spans all of it), a single folded vector otherwise.

Both paths certify with true residuals and hold them to the same test, ``tol`` relative to |z|
on J (native coordinates, unit eigenvectors). The structured certificates cost no HVP of their
own: J (u, 0) = (c u - D a Ht u, a2 Ht u) needs Ht u, which Lanczos' certificate S w =
D^1/2 Ht u already computed (``EigResult.images``), and J (0, v) needs none.
Cost figures: ``docs/estimate_cost.md``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch

from kappa_gpu._autocast import without_autocast
from kappa_gpu._distributed import (
    agree_arguments,
    broadcast_generator,
    call_communicator,
    communicator_of,
)
from kappa_gpu._linop import aslinearoperator
from kappa_gpu._report import KappaReport
from kappa_gpu.diagnostics import _blocks
from kappa_gpu.diagnostics._conditioning import kappa_V
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


def check_arguments(method: str, modes: str, tol: Any) -> float | None:
    """``estimate``'s choices checked (also by :class:`~kappa_gpu.KappaMonitor` when it is
    built); returns ``tol`` as :func:`check_tol` does."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if modes not in _MODES:
        raise ValueError(f"modes must be one of {_MODES}, got {modes!r}")
    return check_tol(tol)


def check_tol(tol: Any) -> float | None:
    """``tol`` as a float: ``None`` (the default) or a finite number >= 0 (numpy and 0-d torch
    scalars too; not a bool)."""
    if tol is None:
        return None
    try:
        if isinstance(tol, (bool, np.bool_)):
            raise TypeError
        value = float(tol)
    except (TypeError, ValueError, RuntimeError):
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"tol must be a finite number >= 0 (or None for the default), got "
                         f"{tol!r}")
    return value


def _coarsest(dtypes) -> torch.dtype | None:
    """The floating dtype of the largest machine epsilon among ``dtypes`` (None if none)."""
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=None)


def _default_tol(dtype: torch.dtype, model: torch.nn.Module | None = None) -> float:
    """1e-8 when the Krylov vectors and every parameter are float64, 1e-4 when the coarsest of
    them is float32, 1e-2 below (the products carry the parameters' rounding whatever the
    Krylov dtype: float64 vectors over a float32 model cannot reach 1e-8)."""
    dts = {dtype} | ({p.dtype for p in model.parameters() if p.is_floating_point()}
                     if model is not None else set())
    eps = float(torch.finfo(_coarsest(dts)).eps)
    if eps <= float(torch.finfo(torch.float64).eps):
        return 1e-8
    return 1e-4 if eps <= float(torch.finfo(torch.float32).eps) else 1e-2


@without_autocast
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
    backend: str = "auto",
    hvp: str = "auto",
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
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
        tol: relative residual tolerance on J, the same for both methods (default 1e-8 when
            the Krylov vectors and all parameters are float64, 1e-4 when the coarsest is
            float32, 1e-2 for 16-bit parameters): a mode is ``converged`` when
            ``||J x - z x|| <= tol * max(|z|, eps**(2/3))`` for its unit eigenvectors in native
            coordinates (true residuals; arnoldi also needs its Ritz estimate to pass, as the
            solver's). The structured path runs Lanczos on S at the tighter tolerance this
            needs (the J residual of a block eigenvector is its S residual times a closed-form
            factor, about 3 for sharp heavy-ball modes at lr ~ 5).
        warm_start: a previous report (or its ``warm_vectors``) to start the solver from; cuts
            the cost of estimates that follow each other closely in training.
        generator: the random start vector's generator (default: a private one seeded with
            ``seed``; the global RNG is never used).
        horizon: steps of the transient-growth curve (default: chosen from kappa_V and rho).
        ncv, maxiter: passed to the eigen-solver. Default ``ncv``: 3x the wanted count, at
            least 20 (k = 8: 24 Lanczos vectors of n entries, or 48 Krylov-Schur vectors of
            2n/3n entries for the 2 k eigenvalues of the arnoldi path); pass 20 to save
            memory at the largest scales (about 3 % more HVPs).
        seed: RNG seed of dropout inside the HVPs (same mask in every HVP) and of the start
            vector when no ``generator`` is given.
        dtype: the dtype of the Krylov vectors (default: the parameters' dtype; pass
            ``torch.float32`` for a bfloat16/float16 model).
        process_group: ``torch.distributed`` group whose ranks' gradients and HVPs are
            averaged (default: the group of a ``DistributedDataParallel`` model, else none).
            Under a group ``estimate`` is a collective: call it on every rank of the group with
            the same arguments (each with its own batch); every rank returns the same report.
            The generator's state is broadcast from the group's first rank. See
            ``docs/multi_gpu.md``; FSDP/FSDP2 models raise ``UnsupportedConfigurationError``.
        backend: ``"auto"`` | ``"cupy"`` | ``"torch"``: where the block arithmetic of ``J``
            runs (fused CuPy kernels on CUDA, see :func:`~kappa_gpu.update_operator`).
        hvp: ``"auto"`` (reverse mode through the gradient's graph, kept for the estimate;
            2-3x faster on a CPU, and the lower peak memory in ``bench/bench_scaling.py``) or
            ``"forward"`` (``jvp`` of ``grad``, nothing kept between products); see
            :func:`~kappa_gpu.update_operator`.
        clip_grad_norm, clip_grad_value: the threshold of the gradient clipping the training
            step runs before ``optimizer.step()`` (``torch.nn.utils.clip_grad_norm_`` /
            ``clip_grad_value_``; at most one), so that J is the clipped step's Jacobian (see
            :func:`~kappa_gpu.update_operator`). Where the clip is active at this point the
            structured path does not apply (``auto`` runs arnoldi) and the message says so.

    Returns:
        A :class:`KappaReport`. It never raises for non-convergence: ``converged`` and
        ``message`` say what happened and what to raise (``k``, ``ncv``, ``maxiter``, ``tol``).

    Cost:
        structured: one HVP per Lanczos step (typically 3-20 k on a network's clustered top
        curvatures) plus ``k`` for the certificates (``2 k`` for ``modes="both"``); the J
        certificates reuse those HVPs. If a mode's J residual still misses ``tol``, a
        block-Lanczos refinement from the Ritz vectors adds ``3 k`` a round (at most 3).
        arnoldi: one HVP per Arnoldi step on the 2n/3n-dimensional J (about twice the Lanczos
        count: a degree-m polynomial in z filters the curvatures like one of degree m/2 in s),
        the same again for the left eigenvectors, ``4 k`` certificates and ``2 k`` for the
        projected operator; started from a structured report of the same point
        (``warm_start``) the refinement takes about ``3 k`` matvecs per side. Figures:
        ``docs/estimate_cost.md``.
    """
    t0 = time.perf_counter()
    comm = call_communicator(model, process_group)
    local_error: BaseException | None = None
    try:
        tol = check_arguments(method, modes, tol)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        if ncv is not None and (isinstance(ncv, bool) or not isinstance(ncv, numbers.Integral)
                                or ncv <= k):
            raise ValueError(
                f"ncv={ncv!r} is too small for k={k}: the structured path needs ncv > k, the "
                f"arnoldi path, which computes 2 k eigenvalues of J, ncv > 2 k + 1; default: "
                f"max(3 k, 20)"
            )
    except Exception as err:
        if comm is None:
            raise
        local_error = err
    if comm is not None:  # one fixed-size agreement before any other collective
        agree_arguments(comm, dict(
            k=k, method=method, modes=modes, tol=tol, ncv=ncv, maxiter=maxiter,
            variant=variant, dtype=dtype, backend=backend, hvp=hvp,
            clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
            horizon=horizon, warm_start=warm_start is not None,
        ), "estimate", local_error)

    op = update_operator(model, optimizer, loss_fn, batch, variant=variant, seed=seed, dtype=dtype,
                         process_group=process_group, backend=backend, hvp=hvp,
                         clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value)
    mapped = op.maps_gradient
    if op.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"estimate: the parameters are {op.dtype}; the Krylov vectors need float32 or "
            "float64: pass dtype=torch.float32 (the products keep the model's precision; the "
            "default tol is then 1e-2)"
        )
    tol = _default_tol(op.dtype, model) if tol is None else float(tol)
    if generator is None:
        # Never draw from the global RNG (the user's training run owns it): a private,
        # seeded generator makes the estimate reproducible on the same device.
        generator = torch.Generator(device=op.device).manual_seed(seed)
    broadcast_generator(generator, communicator_of(op))  # same start vectors on every rank
    structure = op.structure()
    frozen_structure = structure
    helper_ops = []  # operators whose products count in the report's n_hvp too
    similar = op.similar_structure() if mapped else None
    if structure is None:
        # Adam full, or a gradient map (an active clip, padding rows): the blocks of the
        # frozen operator, with the symmetrized curvature K^1/2 Ht K^1/2 under a map (a map
        # changes the curvature, not the block coefficients), are the starting guess and the
        # EP yardstick.
        frozen_op = op
        if op.variant == "full":
            # its notes are the main operator's (warned once, above), or about itself only
            # (forward mode does not split a tied padding row: a start, not the answer)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                frozen_op = update_operator(
                    model, optimizer, loss_fn, batch, variant="frozen", seed=seed,
                    dtype=dtype, process_group=process_group, clip_grad_norm=clip_grad_norm,
                    clip_grad_value=clip_grad_value,
                    hvp="forward",  # a few products for the start: keep no graph
                )
            frozen_op._engine.quiet_fallback = True
            helper_ops.append((frozen_op, frozen_op.n_hvp))
        frozen_structure = (similar if frozen_op is op and similar is not None
                            else frozen_op.structure() or frozen_op.similar_structure())
    if frozen_structure is not None and not bool(torch.any(frozen_structure.D > 0)):
        raise ValueError(
            "the learning rate is 0 in every parameter group (or no parameter is reached by the "
            "loss): the update does not move theta and J has no curvature modes to estimate; "
            "estimate at a step with lr > 0"
        )
    frozen_lr = _frozen_lr_buffers(structure)
    usable = structure is not None and structure.uniform and not frozen_lr
    if method == "structured" and not usable:
        if mapped:
            why = "; ".join(op.gradient_map_notes())
        elif structure is None:
            why = "the full Adam variant has no 2x2 block structure"
        elif frozen_lr:
            why = (
                "a parameter group with lr = 0 that the loss reaches: its parameters stay while "
                "they feed the other groups' update (and its momentum buffers or Adam's "
                "exp_avg follow the curvature), which the blocks' eigenvectors do not represent"
            )
        else:
            why = "block coefficients differ between parameter groups"
        raise ValueError(f"method='structured' does not apply here: {why}; use method='arnoldi'")
    structured = method == "structured" or (method == "auto" and usable)
    chosen = "structured" if structured else "arnoldi"

    warm = warm_start.warm_vectors if isinstance(warm_start, KappaReport) else warm_start
    point = _fingerprint(op, optimizer)
    # Ritz vectors of this very operator (e.g. a structured report refined by arnoldi): their
    # subspace is invariant, and a block start refines it in a few block steps.
    # ... for the same modes and k only: a report's vectors for other modes (modes='both' then
    # 'sharp', k=2 then 3) are invariant too, and a test from the first step returned the best
    # of them, flagged converged (a negative mode as the third sharp one; review case)
    warm_here = (isinstance(warm_start, KappaReport) and warm_start.point == point
                 and warm_start.request == (modes, k))
    sides = ["sharp", "negative"] if modes == "both" else [modes]
    n_modes = op.n_params  # curvature modes: one per parameter entry the step takes
    if frozen_structure is not None and frozen_structure.active is not None:
        n_modes = int(frozen_structure.active.sum())
    if modes == "both" and 2 * k > n_modes:
        raise ValueError(
            f"modes='both' with k={k} asks for {2 * k} curvature modes, but the model has only "
            f"n = {n_modes} (parameter entries the step takes; the sharp and the negative modes "
            f"would be the same ones): use k <= {n_modes // 2}, or one side (modes='sharp' or "
            "'negative'); for a model this small the dense eigendecomposition of "
            "update_operator(...).to_dense() is exact"
        )
    n_hvp0 = op.n_hvp

    if chosen == "structured":
        parts = [
            _structured_side(op, structure, k, side, tol, warm, generator, ncv, maxiter,
                             warm_here)
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
                _arnoldi_side(op, frozen_structure, k, side, tol, warm, generator, ncv, maxiter,
                              warm_here, similar)
            )
        out = _merge(parts)
        target = ", ".join(p["target"] for p in parts)
        near = (frozen_structure is not None and not frozen_structure.uniform
                and _coeffs(frozen_structure, near=True))
        if near:
            which_differ = _nonuniform_hyperparameters(frozen_structure, op.kind)
            out["messages"] = [*out.get("messages", []), (
                f"block coefficients differ slightly between parameter groups ({which_differ}; "
                f"relative spread <= {_NEAR_UNIFORM:g}): the modes are ranked, and their "
                "curvatures and exceptional-point distances inferred, with the coefficients "
                f"most entries have ({', '.join(f'{k}={v:.6g}' for k, v in near._asdict().items())}"
                "); the eigenpairs are exact"
            )]
        elif frozen_structure is not None and not frozen_structure.uniform:
            # Silent otherwise: "SR" can pick a group's bulk modes (z near its momentum, Re z
            # below the sharp pairs' (1 + beta - a s) / 2) and report them as the sharp modes.
            which_differ = _nonuniform_hyperparameters(frozen_structure, op.kind)
            out["messages"] = [*out.get("messages", []), (
                f"block coefficients differ between parameter groups ({which_differ}): J's "
                "eigenvalues name no single curvature, so the modes are those of smallest Re z "
                "(largest for modes='negative'), not the sharpest curvatures; they can be one "
                f"group's bulk modes (z near its {'momentum' if op.kind == 'sgd' else 'beta1'}). "
                "For curvature-targeted modes make those the same in every group"
            )]
        if frozen_lr and method == "auto":
            out["messages"] = [*out.get("messages", []), (
                "a parameter group with lr = 0 is reached by the loss (its parameters stay while "
                "they feed the other groups' update): the blocks' eigenvectors miss those "
                "entries, so the arnoldi path was taken"
            )]

    z = out["z"]
    cond = out["cond"]
    rho = float(np.max(np.abs(z))) if len(z) else float("nan")
    # Everything below is small dense algebra on the real basis B of the computed invariant
    # subspace (2n x p, p = 2k or 4k), its image J B and the coefficients C of the unit
    # eigenvectors X = B C: never a complex 2n-row matrix. In float64, because kappa_V near an
    # exceptional point is the conditioning of nearly parallel columns.
    R, T = _basis_geometry(out["bases"], out.get("geometry"))
    kv = float(kappa_V(torch.from_numpy(R @ out["C"])))
    missing = int(out.get("missing_directions", 0))

    # Transient growth on the computed invariant subspace: T = Q^T J Q with Q = B R^-1.
    tg = transient_growth(T, horizon=horizon)
    # Amplification beyond the spectral radius: max_t ||(T / rho)^t||, finite even when rho >= 1
    # (where max_t ||T^t|| is infinite and only the first `horizon` steps are shown).
    rho_T = float(np.max(np.abs(np.linalg.eigvals(T)))) if T.size else 0.0
    # rho = 1 exactly: the computed spectral radius of T / rho_T is 1 - O(eps), which would
    # read as a decay so slow that the default horizon runs to its 10,000-step cap.
    normalized = transient_growth(T / rho_T, horizon=horizon, rho=1.0) if rho_T > 0 else tg
    kreiss = kreiss_lower_bound(T)
    curve = np.asarray(tg.curve, dtype=np.float64)

    # Per-mode exceptional-point quantities from the block coefficients.
    s = out["s"]
    coeffs = _coeffs(frozen_structure, near=True)
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
    msgs = [m for m in out["messages"] if m] + list(getattr(op, "notes", []))
    msgs += [m for m in getattr(op._engine, "notes", []) if m not in msgs]
    msgs += op.gradient_map_notes()
    if k > op.n_params - 2:  # the solvers' cap (structured: n - 2 modes; arnoldi: N - 2 values)
        msgs.append(
            f"k={k} modes per side asked, {len(out['s'])} computed: a Krylov solver finds at "
            f"most n - 2 of the n = {op.n_params} parameters' modes; for a model this small the "
            "dense eigendecomposition of update_operator(...).to_dense() is exact and faster"
        )
    if np.any(at_ep):
        # The eigenvectors of such a mode are parallel in exact arithmetic; what the rounding
        # leaves between them (kappa_V of 1e7-1e8 in float64) is not a property of J.
        kv = math.inf
        msgs.append(
            f"mode(s) {np.flatnonzero(at_ep).tolist()} at an exceptional point: eigenvectors "
            "coalesce, kappa_V is infinite"
        )
    tgrid = np.arange(len(curve))
    with np.errstate(over="ignore", invalid="ignore"):
        bound_curve = kv * rho**tgrid if math.isfinite(kv) else np.full(len(curve), np.inf)
    growth_known, nan = missing == 0, float("nan")
    if not growth_known:
        msgs.append(
            f"{missing} eigenvector(s) parallel to others to rounding (a defective eigenvalue: "
            "an exceptional point or a Jordan block), so their span misses the Jordan "
            "direction(s) of the invariant subspace and the transient growth and Kreiss bound "
            "on it would be too small: not reported (nan)"
            + ("; method='structured' computes the modes' exact 2x2 blocks"
               if coeffs is not None else "")
        )
    if not np.all(converged) and op.variant == "full":
        floor = _adam_full_floor(op, z, tol)
        if floor:
            msgs.append(floor)
            out["precision_limited"] = True
    tiny = None
    if not np.all(converged) and op.kind in ("adam", "adamw"):
        tiny = _adam_tiny_v_note(op)
        if tiny:
            msgs.append(tiny)
    if not np.all(converged):
        if out.get("precision_limited"):
            fix = "not a matter of ncv or maxiter (the cause is named above)"
        elif tiny:
            fix = "most likely the preconditioner named above (float64 or freezing it)"
        elif any(m.startswith("left eigenvectors of") for m in msgs):
            fix = "the left-eigenvector note above names the cause"
        elif np.any(at_ep) or not growth_known:
            fix = ("eigenvalues at an exceptional point are defective, and an iterative "
                   "solver's residuals stall there at about sqrt(eps) |z|: not a matter of ncv "
                   "or maxiter")
        else:
            fix = "raise ncv or maxiter, or loosen tol"
        msgs.append(
            f"{int(np.sum(~converged))} of {len(converged)} eigenvalues not converged to "
            f"tol={tol:g}: {fix}; their numbers are estimates"
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
        transient_growth=(float(tg.max_growth) if tg.bounded else float("inf"))
        if growth_known else nan,
        normalized_growth=float(normalized.max_growth) if growth_known else nan,
        growth_argmax=int(tg.argmax_t) if growth_known else -1,
        growth_curve=curve if growth_known else np.full(len(curve), nan),
        growth_bounded=bool(tg.bounded),
        kappa_bound_curve=np.asarray(bound_curve, dtype=np.float64),
        kreiss_lower=float(kreiss.value) if growth_known else nan,
        residuals=np.asarray(residuals, dtype=np.float64),
        converged=np.asarray(converged, dtype=bool),
        n_hvp=int(op.n_hvp - n_hvp0) + sum(int(h.n_hvp - n0) for h, n0 in helper_ops),
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
        point=point,
        request=(modes, k),
    )


# ---------------------------------------------------------------------------------------------


def _fingerprint(op, optimizer) -> tuple:
    """Identifies the point J was built at: loss, sums of the state vector, hyper-parameters.

    A report's ``point``; a later estimate with an equal fingerprint treats the report's Ritz
    vectors as this operator's own (:func:`_arnoldi_side` then refines them with a block start).
    A fingerprint, not a proof: a false match costs HVPs (a block run from a stale subspace
    converges slowly), never accuracy. O(n), no HVP.
    """
    x = op.state_vector().double()

    def scalar(v):
        if isinstance(v, (bool, int, float)):
            return True
        return isinstance(v, tuple) and all(isinstance(t, (bool, int, float)) for t in v)

    hyper = tuple(tuple(sorted((key, v) for key, v in g.items() if scalar(v)))
                  for g in optimizer.param_groups)
    loss = op.loss
    clip = None if op.clip is None else (op.clip.kind, op.clip.threshold, op.clip.active)
    return (op.kind, op.variant, op.shape[0], None if loss is None else float(loss),
            float(x.sum()), float((x * x).sum()), hyper, clip)


def _param_name_at(engine, i: int) -> str:
    """The name of the parameter holding entry ``i`` of the flattened vector."""
    offsets = np.cumsum([0, *engine.numels])
    return engine.names[int(np.searchsorted(offsets, i, side="right")) - 1]


def _adam_full_floor(op, z: np.ndarray, tol: float) -> str | None:
    """The message when Adam's full J is too badly scaled for ``tol``: its coupling ``q`` of
    theta to exp_avg_sq (``~ lr m / (denom^2 sqrt(v))``) is huge where exp_avg_sq is tiny, and
    the products' rounding ``eps ||J|| >= eps max q`` then exceeds ``tol |z|``."""
    q = op._coefs.get("q")
    if not isinstance(q, torch.Tensor) or q.numel() == 0 or not len(z):
        return None
    qa = q.abs()
    i = int(torch.argmax(qa))
    qmax = float(qa[i])
    eps = float(torch.finfo(op.dtype).eps)
    zmin = max(float(np.min(np.abs(z))), eps ** (2.0 / 3.0))
    if not eps * qmax > tol * zmin:
        return None
    name = _param_name_at(op._engine, i)
    reachable = 10 * eps * qmax < 0.1 * zmin
    return (
        f"Adam's full variant: J's coupling of theta to exp_avg_sq reaches q = {qmax:.1e} (in "
        f"{name}; q ~ lr m' / (denom^2 sqrt(v')) is large where exp_avg_sq is small, and "
        "astronomical where the gradient is zero in exact arithmetic, e.g. an attention key "
        f"bias), so the products' rounding eps ||J|| >= {eps * qmax:.1e} is above tol |z| = "
        f"{tol * zmin:.1e}: the certificates (the left eigenvectors' first) cannot pass at this "
        "tol, and the eigenvalue condition numbers are of that size too. "
        + (f"Loosen tol to about {10 * eps * qmax / zmin:.0e}, or use variant='frozen'"
           if reachable else
           "Use variant='frozen', or set requires_grad=False on such parameters")
    )


def _adam_tiny_v_note(op) -> str | None:
    """Where exp_avg_sq is ~0 (a gradient that is zero up to rounding: a bias before a
    BatchNorm, an attention key bias), Adam's preconditioner D = lr / (bc1 (sqrt(v') + eps))
    reaches lr / eps, orders of magnitude above the rest, and multiplies the rounding of the
    Hessian products there: in float32 the true residuals can stay above tol. Names the
    parameter when its largest D is over 1e3 times the median (on a strided sample)."""
    D = op._coefs.get("D")
    if not isinstance(D, torch.Tensor) or D.numel() < 2:
        return None
    Dabs = D.abs()
    i = int(torch.argmax(Dabs))
    dmax = float(Dabs[i])
    sample = Dabs[:: max(1, Dabs.numel() // 4096)]
    sample = sample[sample > 0]
    if sample.numel() == 0:
        return None
    med = float(torch.median(sample.double()))
    if not dmax > 1e3 * med:
        return None
    name = _param_name_at(op._engine, i)
    return (
        f"Adam's preconditioner reaches D = {dmax:.1e} in {name} ({dmax / med:.0e} times its "
        "median): exp_avg_sq is about 0 there (a gradient that is zero up to rounding, e.g. a "
        "bias before a BatchNorm or an attention key bias), and D multiplies the rounding of "
        "the Hessian products on those entries, which can keep the certificates above tol in "
        f"{str(op.dtype).replace('torch.', '')}; estimate with dtype=torch.float64, or set "
        "requires_grad=False on such parameters (their step is rounding noise)"
    )


def _scalar_coefficients(st) -> tuple[float, float, float, float, float]:
    """``(a, a2, b, beta, c)`` as floats, read at an active entry.

    They are constant over the active entries when the structure is uniform; the entries of
    parameters the loss does not reach are inactive and carry values of their own (plain SGD:
    ``a = 0``, ``c = 1``), so entry 0 would be wrong when such a parameter comes first."""
    i = 0
    if st.active is not None:  # the first active entry (argmax of the mask: no index list)
        i = int(torch.argmax(st.active.reshape(-1).view(torch.uint8)))
    out = []
    for f in ("a", "a2", "b", "beta", "c"):
        v = getattr(st, f)
        if isinstance(v, torch.Tensor):
            v = v.reshape(-1)[i if v.numel() > 1 else 0]
        out.append(float(v))
    return tuple(out)  # type: ignore[return-value]


def _coeffs(structure, near: bool = False) -> _blocks.BlockCoefficients | None:
    """Scalar block coefficients when uniform (the EP yardstick), else None; ``near``: also
    those of :func:`_near_coefficients` for a nearly uniform structure."""
    if structure is None or structure.order != 2:
        return None
    if structure.uniform:
        return _blocks.BlockCoefficients(*_scalar_coefficients(structure))
    return _near_coefficients(structure) if near else None


#: relative spread over the groups below which the block coefficients are one yardstick: AdamW
#: with decay on the weights only (Hugging Face's default grouping) has c = 1 - lr wd and 1,
#: a spread of lr wd (1e-5 .. 1e-3)
_NEAR_UNIFORM = 2e-3


def _near_coefficients(st) -> _blocks.BlockCoefficients | None:
    """The block coefficients most active entries have, when every coefficient's spread over
    the active entries is at most ``_NEAR_UNIFORM`` (relative); else None. A ranking key and
    an EP yardstick (the eigenpairs stay exact; curvatures inferred from z carry an error of
    about the spread / a). The majority is read on a strided sample of 4096 active entries."""
    vals = []
    for f in ("a", "a2", "b", "beta", "c"):
        v = getattr(st, f)
        if not torch.is_tensor(v) or v.numel() == 1:
            vals.append(float(v))
            continue
        v = v.reshape(-1)
        if st.active is not None:
            v = v[st.active.reshape(-1).to(v.device)]
        if v.numel() == 0:
            return None
        lo, hi = (float(t) for t in torch.aminmax(v.double()))
        sample = v[:: max(1, v.numel() // 4096)].double().cpu()
        uniq, counts = torch.unique(sample, return_counts=True)
        ref = float(uniq[torch.argmax(counts)])
        if hi - lo > _NEAR_UNIFORM * max(abs(ref), 1e-12):
            return None
        vals.append(ref)
    return _blocks.BlockCoefficients(*vals)


def _sym_operator(structure):
    """S = D^1/2 Ht D^1/2 as a LinearOperator (self-adjoint; one HVP per column)."""
    H = structure.hessian
    sq = structure.D.to(H.dtype).sqrt()

    def mv(x):
        return H.matvec(sq * x).mul_(sq)  # Hessian products are fresh tensors

    def mm(X):
        return H.matmat(sq[:, None] * X).mul_(sq[:, None])  # the product is a fresh tensor

    S = aslinearoperator(mv, shape=H.shape, dtype=H.dtype, device=H.device, rmatvec=mv,
                         matmat=mm, rmatmat=mm)
    S._strided_ok = H._strided_ok
    return S, sq


class _Restricted:
    """An operator restricted to the coordinates ``mask`` (``None``: all), for coordinates that
    are decoupled constants of the step and no modes of it: rows and columns of the operator
    are 0 (``S`` on entries with ``D = 0``) or the identity (``J`` on parameters the loss does
    not reach; a momentum buffer the step neither reads nor writes) there. Solved on all of
    it, they came back as modes: the "negative" modes of a convex loss (``s = 0`` of ``S``),
    the "sharp" ones of ``J`` with a momentum-free group (``z = 0``, a multiple eigenvalue
    with arbitrary left/right pairing), and a breakdown's random vector brings them into any
    run. The solvers run on the live coordinates; their results are lifted back to full rows
    (zeros elsewhere: exact, the coordinates being decoupled both ways)."""

    def __init__(self, A, mask: torch.Tensor | None):
        self.full = A
        self.idx = None
        if mask is not None and not bool(mask.all()):
            self.idx = torch.nonzero(mask.to(A.device), as_tuple=True)[0]
        if self.idx is None:
            self.op = A
            return
        n, idx = A.shape[0], self.idx

        def restrict(product):
            def f(X):
                full = torch.zeros((n, *X.shape[1:]), dtype=X.dtype, device=X.device)
                full[idx] = X
                return product(full)[idx]
            return f

        mv, rmv = restrict(A.matvec), restrict(A.rmatvec)
        mm, rmm = restrict(A.matmat), restrict(A.rmatmat)
        na = int(idx.numel())
        self.op = aslinearoperator(mv, shape=(na, na), dtype=A.dtype, device=A.device,
                                   rmatvec=rmv, matmat=mm, rmatmat=rmm)

    @property
    def n_left_out(self) -> int:
        return 0 if self.idx is None else self.full.shape[0] - int(self.idx.numel())

    def compress(self, X: torch.Tensor | None) -> torch.Tensor | None:
        if X is None or self.idx is None:
            return X
        return X[self.idx]

    def lift(self, res):
        """``res`` with full-row eigenvectors, left eigenvectors and images."""
        if self.idx is None:
            return res

        def up(X):
            if X is None:
                return None
            rows = X.ndim == 2 and X.T.is_contiguous() and not X.is_contiguous()
            shape = (X.shape[1], self.full.shape[0]) if rows else (self.full.shape[0],
                                                                    *X.shape[1:])
            out = torch.zeros(shape, dtype=X.dtype, device=X.device)
            out = out.T if rows else out
            out[self.idx] = X
            return out

        return dataclasses.replace(res, eigenvectors=up(res.eigenvectors),
                                   left_eigenvectors=up(res.left_eigenvectors),
                                   images=up(res.images))


def _live_coordinates(op, st) -> torch.Tensor | None:
    """The coordinates of J that are not decoupled constants (see :class:`_Restricted`), from
    the frozen structure's coefficients: a parameter the step takes, and its momentum buffer
    where the step reads it (``b != 0``) or writes it from the curvature (``a2 != 0``); Adam's
    moments where the parameter is taken. None: all of them."""
    if st is None:
        return None
    n = op.n_params
    nb = op.shape[0] // n
    theta = (torch.ones(n, dtype=torch.bool, device=st.D.device) if st.active is None
             else st.active.to(torch.bool))
    if nb == 1:
        live = theta
    else:
        buf = theta & ((st.b != 0) | (st.a2 != 0)) if st.order == 2 else theta
        live = torch.cat([theta, buf] + [theta] * (nb - 2))
    return None if bool(live.all()) else live


def _hessian_of_modes(st, sq: torch.Tensor, res, W: torch.Tensor) -> torch.Tensor | None:
    """Ht U for U = D^1/2 W when eigsh's certificate products S W = D^1/2 Ht U cannot give it:
    ``None`` when they can (no HVP; :class:`_Subspace` forms Ht U = D^-1/2 S W row by row).

    Where D = 0 the products lose Ht U: there it is 0 on entries the loss does not reach (their
    Hessian rows are 0, and u = 0), but not on reached entries with lr = 0 -- then (and if the
    solver kept no products) it costs one HVP per mode, so the certificates stay exact.
    """
    SW = getattr(res, "images", None)
    zero = sq == 0
    reached_zero = zero if st.active is None else zero & st.active.to(zero.device)
    if SW is None or tuple(SW.shape) != tuple(W.shape) or bool(reached_zero.any()):
        return st.hessian.matmat(sq[:, None] * W)
    return None


def _eigsh_ncv(k: int, n: int) -> int:
    """estimate's Lanczos basis size: ``min(max(3 k, 20), n)``.

    The top curvatures of a network's Hessian are clustered (a few percent apart): a basis of
    3 k keeps more unconverged Ritz vectors over a restart than SciPy's 2 k + 1 and saved 3-4 %
    of the HVPs on 165k- and 397k-parameter MLPs (k = 8: 24 instead of 20; measured in
    ``docs/estimate_cost.md``). Memory: ``ncv + 1`` vectors of n entries.
    """
    return min(max(3 * k, 20), n)


def _eigs_ncv(k: int, N: int, block_size: int = 1) -> int:
    """estimate's Krylov-Schur basis size for ``k`` wanted eigenvalues of J: the same policy as
    :func:`_eigsh_ncv`, ``min(max(3 k, 20, k + block_size + 1), N)`` (k = 16: 48 instead of
    33; 7 % fewer matvecs for a cold run on the 165k-parameter MLP)."""
    return min(max(3 * k, 20, k + block_size + 1), N)


def _tolerance_factor(st, side: str) -> float:
    """How much tighter than ``tol`` Lanczos on S must converge for the J residuals to meet it.

    A Ritz pair (s, w) of S with residual r = S w - s w gives block eigenvectors
    x = p0 (u, 0) + p1 (0, D^-1 u) whose J residual is p0 (-a D^1/2 r, a2 D^-1/2 r) (order 2;
    -a D^1/2 r for order 1): the relative J residual is the relative S residual times
    |s| |p0| ||(a D^1/2 r, a2 D^-1/2 r)|| / (||r|| ||x|| |z|), which exceeds 1 for the sharp
    modes (about 3 at the stability edge of heavy ball with lr ~ 5). Evaluated at the stability
    edge (mirrored for the negative side), with ||D^+-1/2 v||^2 taken as mean(D^+-1) ||v||^2
    over the active entries (exact for one learning rate); the certificates check every mode
    after the solve and :func:`_structured_side` refines the ones that miss. Never above 1.
    """
    coeffs = _coeffs(st)
    if coeffs is None:
        return 1.0
    D = st.D.double()
    D = D[D > 0]
    if D.numel() == 0:
        return 1.0
    d1, dm1 = float(D.mean()), float((1.0 / D).mean())
    a, a2, b, beta, c = coeffs
    if st.order == 1:
        edge = float(_blocks.order1_stability_margin(0.0, a, c).s_minus_one)
    else:
        edge = float(_blocks.stability_margin(0.0, *coeffs).s_minus_one)
    if not math.isfinite(edge) or edge <= 0:
        return 1.0
    s = edge if side == "sharp" else -edge
    amp = _amplification(np.array([s]), coeffs, st.order, d1, dm1)[0]
    return float(min(1.0, 1.0 / amp)) if amp > 0 else 1.0


def _amplification(s: np.ndarray, coeffs, order: int, d1: float, dm1: float) -> np.ndarray:
    """Relative J residual / relative S residual of each mode (the worse of its two roots),
    with ||D^1/2 v||^2 = d1 ||v||^2 and ||D^-1/2 v||^2 = dm1 ||v||^2 (exact for D = d I)."""
    a, a2, b, beta, c = coeffs
    s = np.asarray(s, dtype=np.float64)
    if order == 1:
        z = np.abs(c - a * s)
        return np.abs(a * s) / np.maximum(z, 1e-300)
    zb, P = _blocks.block_eigen(s, a, a2, b, beta, c)
    p0, p1 = np.abs(P[:, 0, :]), np.abs(P[:, 1, :])
    nx = np.sqrt(p0**2 * d1 + p1**2 * dm1)
    G = p0 * math.sqrt(a * a * d1 + a2 * a2 * dm1) / np.maximum(nx, 1e-300)
    amp = np.abs(s)[:, None] * G / np.maximum(np.abs(zb), 1e-300)
    return amp.max(axis=1)


def _apply_J(st, U: torch.Tensor, HtU: torch.Tensor, DinvU: torch.Tensor,
             rows: slice = slice(None)) -> torch.Tensor:
    """J [(U, 0) | (0, D^-1 U)] (order 2) or J U (order 1) from Ht U: no HVP.

    The update operator's own formulas (``UpdateOperator._matvec``) with the Hessian products
    given: J (x1, 0) = (c x1 - D a Ht x1, a2 Ht x1) and J (0, x2) = (-D b x2, beta x2), whose
    Hessian product is that of 0. ``U``, ``HtU`` and ``DinvU`` may be the parameter entries
    ``rows`` only (a row chunk); the result then has the rows ``rows`` of each n-row block
    (top block first). Computed in ``U``'s dtype (the coefficients are cast to it).
    """
    D, a, a2, b, beta, c = (getattr(st, f)[rows, None].to(U.dtype)
                            for f in ("D", "a", "a2", "b", "beta", "c"))
    top = c * U - (D * a) * HtU
    if st.order == 1:
        return top
    return torch.cat([torch.cat([top, a2 * HtU], 0),
                      torch.cat([-(D * b) * DinvU, beta * DinvU], 0)], 1)


def _structured_side(op, st, k, side, tol, warm, generator, ncv, maxiter,
                     warm_here=False) -> dict[str, Any]:
    """Lanczos on S, then the closed-form blocks; certificates from the Lanczos certificate's
    HVPs. The Lanczos tolerance is ``tol`` times :func:`_tolerance_factor`, so that the J
    residuals meet ``tol`` (relative to |z|, as the arnoldi path); modes that still miss it are
    refined by block Lanczos from the Ritz vectors (2 k HVPs plus k certificates a round, at most
    three rounds)."""
    S_full, sq = _sym_operator(st)
    part = _Restricted(S_full, st.active)
    S = part.op
    n = S.shape[0]
    which = "LA" if side == "sharp" else "SA"
    m = min(k, max(1, n - 2))
    v0 = warm if warm is not None and warm.shape[0] == S_full.shape[0] else None
    tol_s = tol * _tolerance_factor(st, side)
    res = part.lift(eigsh(S, k=m, which=which, v0=part.compress(v0), tol=tol_s,
                          ncv=_eigsh_ncv(m, n) if ncv is None else ncv, maxiter=maxiter,
                          generator=generator, trust_v0=warm_here))
    out = _structured_modes(op, st, sq, res, which, tol)
    bs = m if 3 * m <= n else 1  # the whole Ritz block in the first Krylov block
    for _ in range(3):
        miss = out["residuals"] / out["allowed"]  # > 1: the J certificate misses tol
        if not (res.converged_all and np.any(miss > 1)):
            break
        # The amplification guess was short for some mode. A mode's J residual is its S
        # residual times a fixed factor, so the S tolerance that meets its allowance follows
        # (with a margin: block Lanczos' Ritz estimates can undershoot its true residuals, so
        # the true certificates decide, and at most three rounds are spent).
        r_s = np.asarray(res.residuals, dtype=np.float64)[out["mode_of"]]
        rel_s = r_s / np.maximum(np.abs(out["s"][out["mode_of"]]), 1e-300)
        tol_r = float(np.min(rel_s[miss > 1] / miss[miss > 1])) / 4
        if tol_r <= 4 * float(torch.finfo(op.dtype).eps):
            # Not the Lanczos residual's doing (rounding, or a structure that is not exact
            # here): refining cannot help; the converged flags say so.
            break
        res = part.lift(eigsh(S, k=m, which=which, v0=part.compress(out["warm"]), tol=tol_r,
                              block_size=bs, ncv=min(max(3 * m, 20), n), maxiter=maxiter,
                              generator=generator,
                              trust_v0=True))  # this operator's Ritz vectors, refined
        out = _structured_modes(op, st, sq, res, which, tol)
    n_miss = int(np.sum(out["residuals"] > out["allowed"]))
    if not (n_miss and res.converged_all):
        return out
    # Lanczos converged and refining did not help: not a matter of ncv or maxiter.
    out["precision_limited"] = True
    asym = _asymmetry(res)  # only here, where something is to be explained: n x k x k
    if asym > 1e-3:
        # Not rounding: the Hessian products are not symmetric (second derivatives broken).
        out["messages"] = [*out["messages"], (
            f"{n_miss} J residual(s) stay above tol although Lanczos converged, and the "
            f"Hessian products are not symmetric (W^T H W of the Ritz vectors is asymmetric by "
            f"{asym:.2g}, relative): second derivatives are broken somewhere in the model or "
            "the loss, typically a custom autograd.Function whose backward leaves autograd "
            "(numpy, .detach()); the eigenvalues are not those of the true update. Check "
            "kg.hessian_operator(...).to_dense() for symmetry on a small copy"
        )]
    else:
        # The products' rounding is the floor.
        D = st.D[st.D > 0]
        spread = float(D.max() / D.min()) if D.numel() else 1.0
        worst = float(np.max(out["residuals"] / out["allowed"]))
        params = getattr(getattr(op, "_engine", None), "params", None) or []
        prec = _coarsest({p.dtype for p in params if p.is_floating_point()}) or op.dtype
        out["messages"] = [*out["messages"], (
            f"{n_miss} J residual(s) stay above tol (up to {worst:.3g}x) although Lanczos "
            f"converged: the products' rounding ({prec}) is the floor here (the preconditioner "
            f"D spans a factor {spread:.1e} over the reached entries, which amplifies it); "
            f"tol={tol * worst * 1.5:.1g} would pass, or estimate a float64 copy of the model "
            "and optimizer (dtype= sets only the Krylov vectors; more ncv or maxiter does not "
            "help)"
        )]
    return out


#: which hyper-parameters set each block coefficient (DESIGN.md section 3), per optimizer kind
_COEFFICIENT_SOURCES = {
    "sgd": {"beta": "momentum", "b": "momentum", "a": "dampening or nesterov",
            "a2": "dampening", "c": "weight decay"},
    "adam": {"beta": "beta1", "b": "beta1", "a": "beta1", "a2": "beta1",
             "c": "lr * weight_decay (decoupled decay: c = 1 - lr * weight_decay)"},
}


def _frozen_lr_buffers(st) -> bool:
    """Whether a reached entry has lr = 0 (D = 0) where the blocks miss J's eigenvectors:
    with momentum, its buffer is fed by the curvature (``a2 != 0``) and reads theta elsewhere
    (``b' = mu b + a2 (Ht theta)_i``) while ``u = D^1/2 w`` is 0 there, so the right vectors
    ``p0 (u, 0) + p1 (0, D^-1 u)`` miss those entries (kappa_V 1.26 where J's is 1.83); without
    momentum (``J = I - D Ht``) the right vectors are exact but the left ones ``D^-1 u`` are 0
    there while J's are not (those parameters feed the other groups' update; condition numbers
    1 where J's are up to 1.9). Review cases: the arnoldi path takes both."""
    if st is None or st.order not in (1, 2):
        return False
    reached = (st.D == 0) if st.order == 1 else (st.D == 0) & (st.a2 != 0)
    if st.active is not None:
        reached &= st.active.to(reached.device)
    return bool(reached.any())


def _nonuniform_hyperparameters(st, kind: str = "sgd") -> str:
    """The hyper-parameters behind the block coefficients that vary over the active entries
    (``kind``: the operator's, ``"sgd"``, ``"adam"`` or ``"adamw"``)."""
    sources = _COEFFICIENT_SOURCES["sgd" if kind == "sgd" else "adam"]
    names = []
    for key in ("beta", "b", "a", "a2", "c"):
        v = getattr(st, key)
        if not torch.is_tensor(v) or v.ndim == 0:
            continue
        v = v[st.active] if st.active is not None else v
        if v.numel() and bool(v.max() != v.min()):
            src = sources[key]
            if src not in names:
                names.append(src)
    if names:
        return "; ".join(names)
    return ("momentum, dampening, nesterov or weight decay" if kind == "sgd"
            else "betas or weight decay")


def _asymmetry(res) -> float:
    """``||G - G^T|| / ||G||`` for ``G = W^T (S W)`` from eigsh's Ritz vectors and certificate
    products (0 when those are not kept): rounding-level for a symmetric ``S``."""
    SW = res.images
    if SW is None or SW.shape[1] < 1:
        return 0.0
    W = res.eigenvectors.real if res.eigenvectors.is_complex() else res.eigenvectors
    # in the vectors' dtype (float32 GEMM sums carry ~1e-6 relative error, far below the 1e-3
    # this is compared with); no float64 copies of two n x k matrices
    G = (W.T @ SW.to(W.dtype)).to(torch.float64).cpu().numpy()
    nrm = float(np.linalg.norm(G))
    return float(np.linalg.norm(G - G.T)) / nrm if nrm > 0 else 0.0


def _structured_modes(op, st, sq, res, which, tol) -> dict[str, Any]:
    s = np.real(res.eigenvalues.detach().cpu().numpy()).astype(np.float64)
    W = res.eigenvectors.real if res.eigenvectors.is_complex() else res.eigenvectors
    W = W.to(op.dtype)
    m = W.shape[1]
    HtU = _hessian_of_modes(st, sq, res, W)
    # Certificates with the real operator: J(u, 0) and J(0, D^-1 u) for every mode (u = D^1/2 w),
    # by the operator's formulas from the true Hessian products; every eigenvector of the modes
    # is a combination of them. The basis B = [(U, 0) | (0, D^-1 U)] and J B are never stored:
    # they are formed row chunk by row chunk from W, D and S W (or Ht U).
    basis = _Subspace(st=st, W=W, sq=sq, SW=res.images if HtU is None else None, HtU=HtU)
    lanczos_ok = np.asarray(res.converged, dtype=bool)
    if st.order == 1:
        a, _, _, _, c = _scalar_coefficients(st)
        z = (c - a * s).astype(np.complex128)
        C = np.eye(m, dtype=np.complex128)
        # Left eigenvectors of c - a D Ht are D^-1 u: y^T x = w^T w = 1.
        Cl = np.eye(m, dtype=np.complex128)
        z2, mode_of = z, np.arange(m)
        z_mode, target = np.abs(z), f"{which} of D^1/2 Ht D^1/2 (eigsh)"
        conv_solver = lanczos_ok
    else:
        a, a2, b, beta, c = _scalar_coefficients(st)
        zb, P = _blocks.block_eigen(s, a, a2, b, beta, c)  # (m, 2), (m, 2, 2)
        # Basis (u_i, 0) for i < m, then (0, D^-1 u_i); eigenvector (i, r) = P[i,0,r] (u_i, 0) +
        # P[i,1,r] (0, D^-1 u_i).
        C = _block_coefficients(P)
        # Left eigenvectors: J^T carries M^T on span{(D^-1 u, 0), (0, u)}.
        Mt = np.swapaxes(_blocks.block_matrices(s, a, a2, b, beta, c), -1, -2)
        Pl = np.empty_like(P)
        for i in range(m):
            for j in range(2):
                Pl[i, :, j] = _null_vector(Mt[i] - np.conj(zb[i, j]) * np.eye(2))
        Cl = _block_coefficients(Pl)
        z2, mode_of = zb.reshape(-1), np.repeat(np.arange(m), 2)
        z_mode, target = np.max(np.abs(zb), axis=1), (
            f"{which} of D^1/2 Ht D^1/2 (eigsh) + 2x2 blocks")
        conv_solver = np.repeat(lanczos_ok, 2)
    # One float64 pass over the rows: the Gram matrices of B and of the left basis, B^T J B
    # (kept for the geometry) and the residuals of B C, scaled below (they are linear in C).
    mom = _structured_moments(basis, C, z2, s, mode_of)
    if mom is None:  # Ht U from HVPs (no certificate products to use), or a general C
        mom = _moments([basis], C, z2)
    norm = np.sqrt(np.real(np.einsum("ij,ik,kj->j", C.conj(), mom.G, C)))
    C = C / norm[None, :]
    Cl = Cl / np.sqrt(np.real(np.einsum("ij,ik,kj->j", Cl.conj(), mom.GL, Cl)))[None, :]
    cond = 1.0 / np.abs(np.einsum("ij,ik,kj->j", Cl.conj(), mom.cross, C))
    resid = mom.residuals / norm
    allowed = _allowed(z2, tol, op.dtype)
    return dict(z=z2, z_mode=z_mode, s=s, mode_of=mode_of, cond=cond, bases=[basis],
                geometry=(mom.G, mom.BtJB), C=C, residuals=resid, allowed=allowed,
                converged=(resid <= allowed) & np.asarray(conv_solver, dtype=bool), warm=W,
                target=target, messages=[_msg(res)])


def _arnoldi_side(op, st, k, side, tol, warm, generator, ncv, maxiter,
                  warm_here=False, similar=None) -> dict[str, Any]:
    N = op.shape[0]
    part = _Restricted(op, _live_coordinates(op, st))
    J, Nr = part.op, part.op.shape[0]
    # Two eigenvalues per mode (a 2x2 block), one for plain SGD (order 1).
    kk = min((1 if st is not None and st.order == 1 else 2) * k, Nr - 2)
    if ncv is not None and not kk + 1 < ncv <= Nr:  # before any HVP is spent
        raise ValueError(
            f"ncv={ncv} does not fit the arnoldi path: it computes {kk} eigenvalues of J for "
            f"k={k} modes, so it needs {kk + 1} < ncv <= {Nr} (default: max(3 * {kk}, 20))"
        )
    coeffs = _coeffs(st, near=True)
    if coeffs is not None:
        # Rank Ritz values by the curvature they stand for (both roots of a mode alike).
        sign = 1.0 if side == "sharp" else -1.0

        def curvature_key(z: np.ndarray) -> np.ndarray:
            return sign * np.real(_curvature_of(z, coeffs))

        curvature_key.__name__ = "largest curvature" if side == "sharp" else "smallest curvature"
        which = curvature_key
    else:
        which = "SR" if side == "sharp" else "LR"
    v0 = v0_left = None
    s_blk = 1
    # a start that spans this operator's wanted vectors already (eigs' trust_v0): a report's
    # Ritz vectors at this point, or the structured modes' subspace; a previous point's
    # vectors are not (they can miss a new wanted mode while passing the test)
    trusted = False
    n = None if st is None else st.D.shape[0]
    if warm is not None and warm.shape[0] == N:
        v0 = warm
        trusted = warm_here
    elif st is not None and (st.uniform or coeffs is not None):
        # Start from the structured modes' invariant subspace (of the frozen operator):
        # Arnoldi then refines instead of searching. Nearly uniform coefficients (AdamW with
        # decay on the weights only): the subspace of the majority's blocks, a close start.
        # An active clip: the modes of the symmetrized clipped curvature C^1/2 Ht C^1/2 (same
        # coefficients), mapped by P = diag(C^1/2, ...) (left: P^-T); J = P J' P^-1 exactly
        # for SGD with one lr, a close start for Adam (95,770-parameter MLP, k = 8: 485 -> 238
        # HVPs with SGD, 423 -> 256 with AdamW, against a folded start from the unclipped modes).
        sst = st if similar is None else similar
        if warm is not None and warm.shape[0] == n and warm_here:
            W = warm.to(op.dtype)  # a structured report's Ritz vectors of S, at this point
        else:
            S, _ = _sym_operator(sst)
            m = min(k, max(1, n - 2))
            v0s = warm if warm is not None and warm.shape[0] == n else None  # an older point's
            pre = eigsh(S, k=m, which="LA" if side == "sharp" else "SA", v0=v0s,
                        tol=max(tol * _tolerance_factor(sst, side), 1e-6),
                        ncv=_eigsh_ncv(m, n), generator=generator)
            W = (pre.eigenvectors.real if pre.eigenvectors.is_complex() else pre.eigenvectors)
            W = W.to(op.dtype)
        v0, v0_left = _start_blocks(sst, W, N)
        if similar is not None:
            op.map_start(v0, v0_left)
            if not bool(v0.any()):  # a value clip that cuts every entry: C = 0, no curvature
                v0 = v0_left = None
        if v0 is not None and (op.structure() is not None or similar is not None):
            # The subspace is invariant up to the structured tolerance: one block of W.shape[1]
            # columns (a mode's two directions folded into one) spans all of it after one block
            # step, where a single folded start vector needs 2 k steps and, with clustered
            # modes, restarts (bench/bench_estimate.py). Not for Adam's full variant, whose
            # modes leave the frozen subspace: there a block run searches, and searches slowly.
            s_blk = W.shape[1]
            trusted = st.uniform  # nearly uniform: close, not invariant (explore one cycle)
    if ncv is None:
        ncv = _eigs_ncv(kk, Nr, s_blk)
    if not kk + s_blk < ncv <= Nr:
        s_blk = 1
    v0, v0_left = part.compress(v0), part.compress(v0_left)
    if s_blk == 1:
        res = part.lift(eigs(J, k=kk, which=which, v0=v0, tol=tol, ncv=ncv, maxiter=maxiter,
                             left=True, generator=generator, trust_v0=trusted))
        Y, y_cols = res.left_eigenvectors, None
        left_ok = np.ones(len(res.eigenvalues), dtype=bool)
        resl = left_dist = None
    else:
        # Right and left runs each from their own structured subspace (eigs(left=True) would
        # start the adjoint from the right one, which J^T does not leave invariant when D varies).
        res = part.lift(eigs(J, k=kk, which=which, v0=v0, tol=tol, ncv=ncv, maxiter=maxiter,
                             block_size=s_blk, generator=generator, trust_v0=trusted))
        kl = len(res.eigenvalues)
        resl = part.lift(eigs(J.T, k=kl, which=which, v0=v0_left, tol=tol, ncv=ncv,
                              maxiter=maxiter, block_size=s_blk if kl + s_blk < ncv else 1,
                              generator=generator, trust_v0=trusted))
        y_cols, left_ok, left_dist = _left_match(res, resl, tol, op.dtype)
        Y = resl.eigenvectors
    z = res.eigenvalues.detach().cpu().numpy().astype(np.complex128)
    X = res.eigenvectors
    # Curvature of each Ritz value from the block's characteristic polynomial (uniform case):
    # s = -(z - c)(z - beta) / (a (z - beta) + a2 b).
    if coeffs is not None:
        s_all = np.real(_curvature_of(z, coeffs))
        # A complex pair is one mode; a real eigenvalue its own.
        keys = np.round(s_all, 10)
        uniq, mode_of = np.unique(keys, return_inverse=True)
        s = np.array([np.mean(s_all[mode_of == i]) for i in range(len(uniq))])
    elif st is not None and st.order == 1 and st.uniform:
        # plain SGD: z = c - a s, one real eigenvalue per mode
        a, _, _, _, c = _scalar_coefficients(st)
        mode_of = np.arange(len(z))
        s = np.real((c - z) / a) if a != 0 else np.full(len(z), np.nan)
    else:
        mode_of = np.arange(len(z))
        s = np.full(len(z), np.nan)
    cond = _condition_numbers(X, Y, y_cols)
    B = orthonormal_basis(X)  # rank at the rounding level of X's entries
    # Each real eigenvalue spans one real direction, each conjugate pair two: fewer columns
    # means computed eigenvectors parallel to rounding (an exceptional point, a Jordan block),
    # whose span misses the Jordan direction of the invariant subspace.
    missing = len(res.eigenvalues) - B.shape[1]
    basis = _Subspace(B=B, JB=op.matmat(B))
    mom = _moments([basis], X=X)  # B^T B and B^T J B for the geometry, C = B^T X
    C = mom.BtX
    resid = np.asarray(res.residuals.detach().cpu() if torch.is_tensor(res.residuals)
                       else res.residuals, dtype=np.float64)
    # The solver's Ritz-estimate test, the matched left eigenvector, and the true residual
    # against the structured path's test: both methods certify alike.
    conv = (np.asarray(res.converged, dtype=bool) & left_ok
            & (resid <= _allowed(z, tol, op.dtype)))
    return dict(z=z, z_mode=np.abs(z), s=s, mode_of=np.asarray(mode_of), cond=cond,
                bases=[basis], geometry=(mom.G, mom.BtJB), C=C, residuals=resid,
                converged=conv, warm=B,
                target=f"which={getattr(which, '__name__', which)} on J (Krylov-Schur"
                f"{', started from the structured subspace' if v0 is not None else ''}"
                f"{f', block size {s_blk}' if s_blk > 1 else ''})",
                hessenberg=getattr(res, "hessenberg", None),
                messages=[_msg(res), *_left_note(left_ok, left_dist, resl),
                          *_left_out_note(part.n_left_out, N)],
                missing_directions=max(missing, 0))


def _left_out_note(n_out: int, N: int) -> list[str]:
    if not n_out:
        return []
    return [
        f"{n_out} of the {N} state entries are constants of this step (parameters the loss does "
        "not reach, and momentum buffers the step neither reads nor writes): J is 1 or 0 "
        "there, decoupled from the rest, and they are left out of the modes"
    ]


def _start_blocks(st, W: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The structured modes' right and left invariant subspaces of J, from S's Ritz vectors W.

    Right: [(U, 0) | (0, D^-1 U)] with U = D^1/2 W (both directions of every mode's 2x2 block);
    left: [(D^-1 U, 0) | (0, U)]. A third block (Adam's full variant, ``N = 3 n``) starts at 0.
    """
    sq = st.D.to(W.dtype).sqrt()
    U = sq[:, None] * W
    # D^-1 u = D^-1/2 w; entries the loss does not reach have D = 0 and w = 0 there.
    DinvU = torch.where(sq[:, None] > 0, W / torch.where(sq > 0, sq, 1)[:, None], 0)
    if st.order == 1:  # plain SGD: J = c - a D Ht, one direction per mode (u; left D^-1 u)
        pad = torch.zeros(N - U.shape[0], U.shape[1], dtype=U.dtype, device=U.device)
        return torch.cat([U, pad], 0), torch.cat([DinvU, pad], 0)
    zero = torch.zeros_like(U)
    pad = torch.zeros(N - 2 * U.shape[0], U.shape[1], dtype=U.dtype, device=U.device)

    def stack(top, bottom):
        return torch.cat([top, bottom, pad], 0)

    right = torch.cat([stack(U, zero), stack(zero, DinvU)], 1)
    left = torch.cat([stack(DinvU, zero), stack(zero, U)], 1)
    return right, left


def _left_note(left_ok: np.ndarray, dist: np.ndarray | None, resl) -> list[str]:
    """The message when the separate adjoint run converged but some of its eigenvalues miss the
    right run's by more than sqrt(tol) |z| (so those pairs have no left eigenvector)."""
    if resl is None or dist is None or left_ok.all() or not bool(
            np.all(np.asarray(resl.converged, dtype=bool))):
        return []
    return [
        f"left eigenvectors of {int(np.sum(~left_ok))} eigenvalue(s) not matched: the adjoint "
        f"run converged, but its nearest eigenvalues are up to {float(np.max(dist[~left_ok])):.1e}"
        " from these: ill-conditioned eigenvalues, whose two computed copies differ by more "
        "than sqrt(tol) |z| (loosen tol or use float64; more ncv or maxiter does not help), or "
        "another pick within a cluster (then raise ncv)"
    ]


def _left_match(
    res, resl, tol: float, dtype: torch.dtype
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Which of ``resl``'s eigenvectors (a run on J^T, eigenvalues conj(z)) is the left
    eigenvector of each of ``res``'s eigenvalues z -- matched by assignment as
    ``eigs(left=True)`` does -- and whether each match is converged. Column indices, not a
    gathered copy of the 2n-row vectors."""
    from scipy.optimize import linear_sum_assignment

    z = res.eigenvalues.detach().cpu().numpy().astype(np.complex128)
    w = resl.eigenvalues.detach().cpu().numpy().astype(np.complex128)
    cost = np.abs(np.conj(z)[:, None] - w[None, :])
    idx = np.argmin(cost, axis=1)
    dist = np.full(len(z), np.inf)
    rows, cols = linear_sum_assignment(cost)
    idx[rows], dist[rows] = cols, cost[rows, cols]
    eps = float(torch.finfo(dtype).eps)
    scale = np.maximum(np.abs(z), eps ** (2.0 / 3.0))
    ok = (dist <= np.sqrt(max(tol, eps)) * scale) & np.asarray(resl.converged, dtype=bool)[idx]
    return torch.as_tensor(idx), ok, dist


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
    out["bases"] = sum((p["bases"] for p in parts), [])  # their Gram: one pass in estimate
    out["warm"] = torch.cat([p["warm"] for p in parts], dim=1)
    out["C"] = scipy.linalg.block_diag(*(p["C"] for p in parts))
    out["messages"] = sum((p["messages"] for p in parts), [])
    out["precision_limited"] = any(p.get("precision_limited") for p in parts)
    out["hessenberg"] = parts[0].get("hessenberg")
    out["missing_directions"] = sum(p.get("missing_directions", 0) for p in parts)
    return out


#: float64 bytes per row chunk of the passes over 2n-row matrices on a CPU: small enough to stay
#: in cache (1M-parameter MLP, k = 8, one core: 2-16 MiB chunks ran the structured pass in
#: 0.49-0.53 s, 64 MiB in 0.70 s, 0.25 MiB in 0.84 s); on a GPU a chunk is a few kernel
#: launches, so chunks are large.
_CHUNK_BYTES_CPU = 1 << 22
_CHUNK_ROWS_GPU = 1 << 18


def _chunk_rows(device: torch.device, width: int) -> int:
    """Rows per chunk of a float64 pass whose chunk holds ``width`` float64 columns."""
    if device.type == "cpu":
        return max(256, _CHUNK_BYTES_CPU // (8 * max(width, 1)))
    return _CHUNK_ROWS_GPU


def _hcat(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)


class _Subspace:
    """A real basis B (N x p) of a computed invariant subspace with its image J B, read row
    chunk by row chunk (:meth:`rows`); :func:`_moments` never holds a float64 copy of either.

    Structured (``st``, ``W``, ``sq`` and ``SW`` or ``HtU`` given): B = [(U, 0) | (0, D^-1 U)]
    (order 2) or B = U (order 1), with U = D^1/2 W for S's Ritz vectors W and sq = D^1/2. Only
    W and the Hessian products are kept -- S W from eigsh's certificates (Ht U = D^-1/2 S W) or
    Ht U itself -- and U, D^-1 U, Ht U and J B are formed row chunk by row chunk by the
    operator's formulas (:func:`_apply_J`, in float64): 2 n m stored entries where a dense B and
    J B take 8 n m. The left basis Bl = [(D^-1 U, 0) | (0, U)] (order 1: D^-1 U) comes along.
    Entries with D = 0 are 0 in U, D^-1 U and Ht U (the loss does not reach them, or the
    Hessian products came from ``HtU``). Dense (``B``, ``JB`` given; arnoldi): B and J B as
    computed.
    """

    def __init__(self, *, B=None, JB=None, st=None, W=None, sq=None, SW=None, HtU=None):
        self.B, self.JB = B, JB
        self.st, self.W, self.sq, self.SW, self._HtU = st, W, sq, SW, HtU
        ref = W if B is None else B
        self.nrows, self.device = ref.shape[0], ref.device
        self.p = B.shape[1] if B is not None else W.shape[1] * (1 if st.order == 1 else 2)
        self.has_left = B is None

    def _parts(self, r: slice, dtype: torch.dtype | None = None):
        """U, D^-1 U and Ht U on the rows ``r`` (in ``dtype``, default W's)."""
        dt = self.W.dtype if dtype is None else dtype
        w, sq = self.W[r].to(dt), self.sq[r].to(dt)[:, None]
        pos = sq > 0
        inv = torch.where(pos, 1.0 / torch.where(pos, sq, 1), 0)
        H = self._HtU[r].to(dt) if self._HtU is not None else self.SW[r].to(dt) * inv
        return sq * w, w * inv, H

    def rows(self, lo: int, hi: int) -> list[tuple]:
        """Rows ``lo:hi`` in float64 as row blocks ``(cols, B, Bl, J B)``: B and Bl (None for a
        dense basis) on their nonzero columns ``cols`` only, J B on all p. Structured: the rows
        ``lo:hi`` of each n-row block of the state (two blocks for order 2, one for order 1)."""
        if self.B is not None:
            return [(slice(0, self.p), self.B[lo:hi].double(), None, self.JB[lo:hi].double())]
        r = slice(lo, hi)
        U, V, H = self._parts(r, torch.float64)
        JB = _apply_J(self.st, U, H, V, rows=r)
        m = U.shape[1]
        if self.st.order == 1:
            return [(slice(0, m), U, V, JB)]
        return [(slice(0, m), U, V, JB[: hi - lo]), (slice(m, 2 * m), V, U, JB[hi - lo :])]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """B and J B as dense float64 matrices: the plain reference (small sizes and tests)."""
        if self.B is not None:
            return self.B.double(), self.JB.double()
        U, V, H = self._parts(slice(None), torch.float64)
        JB = _apply_J(self.st, U, H, V)
        if self.st.order == 1:
            return U, JB
        zero = torch.zeros_like(U)
        return torch.cat([torch.cat([U, zero], 0), torch.cat([zero, V], 0)], 1), JB


@dataclass
class _Moments:
    """What :func:`_moments` accumulates, in float64 (numpy)."""

    G: np.ndarray  # B^T B
    BtJB: np.ndarray  # B^T J B
    GL: np.ndarray | None = None  # Bl^T Bl (structured bases only)
    cross: np.ndarray | None = None  # Bl^T B
    BtX: np.ndarray | None = None  # B^T X (complex)
    residuals: np.ndarray | None = None  # ||J B c - z B c|| for C's columns


def _moments(parts: list[_Subspace], C: np.ndarray | None = None, z: np.ndarray | None = None,
             X: torch.Tensor | None = None) -> _Moments:
    """One pass over the rows of B = [B_1 | B_2 | ...] (the parts' bases side by side) and J B.

    Returns B^T B and B^T J B; the left basis' Bl^T Bl and Bl^T B when every part is
    structured; B^T X for the (N x q) ``X`` (dense parts only); and with coefficients ``C``
    (p x q, complex) and eigenvalues ``z`` the residual norms ``||J B c - z B c||`` of C's
    columns. Each row chunk is converted to float64 once and every product is accumulated in
    float64: no float64 copy of a 2n-row matrix is made (at 10^7 parameters one of the
    2n x 2k basis is 2.6 GB), and structured bases are never formed densely. The residuals are
    true residuals, the norms of the vectors J B c - z B c formed row by row (a quadratic
    form c^H (J B - z B)^T (J B - z B) c in a Gram matrix would lose every digit below
    sqrt(eps)); real and imaginary parts go through one GEMM per operand.

    Cost: reads each part's stored columns (and X) once; O(N p (p + q)) flops, no HVP.
    """
    dev, nrows = parts[0].device, parts[0].nrows
    if X is not None and not all(sub.B is not None for sub in parts):
        raise ValueError("_moments: X (N rows) needs dense bases; structured ones have n rows")
    offs = np.cumsum([0] + [sub.p for sub in parts])
    p = int(offs[-1])
    left = all(sub.has_left for sub in parts)
    f64 = dict(dtype=torch.float64, device=dev)
    q = 0
    if C is not None:
        Cz = C * np.asarray(z)[None, :]
        Cri = torch.from_numpy(np.concatenate([C.real, C.imag], 1)).to(**f64)
        Czri = torch.from_numpy(np.concatenate([Cz.real, Cz.imag], 1)).to(**f64)
        rsq = torch.zeros(Cri.shape[1], **f64)
        q = C.shape[1]
    if X is not None:
        q = max(q, X.shape[1])
    step = _chunk_rows(dev, 4 * p + 4 * q)
    acc: list[dict[str, Any]] = []  # per row block: its B columns and float64 accumulators
    for lo in range(0, nrows, step):
        hi = min(nrows, lo + step)
        for k, blk in enumerate(zip(*(sub.rows(lo, hi) for sub in parts), strict=True)):
            if len(acc) <= k:  # the k-th row block's columns, the same in every chunk
                idx = np.concatenate([o + np.arange(t[0].start, t[0].stop)
                                      for o, t in zip(offs[:-1], blk, strict=True)])
                nb = len(idx)
                acc.append(dict(
                    idx=idx, A=torch.zeros(nb, nb * (2 if left else 1) + p, **f64),
                    LL=torch.zeros(nb, nb, **f64) if left else None,
                    AX=None if X is None else torch.zeros(nb, 2 * X.shape[1], **f64),
                    Cz=None if C is None else Czri[torch.as_tensor(idx, device=dev)]))
            a = acc[k]
            A, JB = _hcat([t[1] for t in blk]), _hcat([t[3] for t in blk])
            if left:
                L = _hcat([t[2] for t in blk])
                a["A"].addmm_(A.mT, torch.cat([A, L, JB], 1))  # B^T [B | Bl | J B] rows
                a["LL"].addmm_(L.mT, L)
            else:
                a["A"].addmm_(A.mT, torch.cat([A, JB], 1))
            if X is not None:
                # B^T X for complex X: real and imaginary parts interleaved, one GEMM.
                Xr = torch.view_as_real(X[lo:hi].to(torch.complex128)).reshape(hi - lo, -1)
                a["AX"].addmm_(A.mT, Xr)
            if C is not None:
                R = JB @ Cri  # [Re | Im] of J B c - z B c on these rows
                R.addmm_(A, a["Cz"], alpha=-1.0)
                rsq += (R * R).sum(0)
    G, BtJB = np.zeros((p, p)), np.zeros((p, p))
    GL, cross = (np.zeros((p, p)), np.zeros((p, p))) if left else (None, None)
    BtX = None if X is None else np.zeros((p, X.shape[1]), dtype=np.complex128)
    for a in acc:
        idx, nb = a["idx"], len(a["idx"])
        M = a["A"].cpu().numpy()
        ix = np.ix_(idx, idx)
        G[ix] += M[:, :nb]
        BtJB[idx] += M[:, -p:]
        if left:
            GL[ix] += a["LL"].cpu().numpy()
            cross[ix] += M[:, nb : 2 * nb].T  # Bl^T B = (B^T Bl)^T
        if X is not None:
            AX = a["AX"].cpu().numpy().reshape(nb, -1, 2)
            BtX[idx] += AX[..., 0] + 1j * AX[..., 1]
    resid = None
    if C is not None:
        rsq = rsq.cpu().numpy()
        resid = np.sqrt(rsq[:q] + rsq[q:])
    return _Moments(G=G, BtJB=BtJB, GL=GL, cross=cross, BtX=BtX, residuals=resid)


def _structured_moments(subs: _Subspace | list[_Subspace], C: np.ndarray | None = None,
                        z: np.ndarray | None = None, s: np.ndarray | None = None,
                        mode_of: np.ndarray | None = None) -> _Moments | None:
    """What :func:`_moments` returns for structured bases whose Hessian products are eigsh's
    certificate products S W, from weighted sums over W and S W: no rows of B or J B.

    ``subs``: one basis, with ``C``, ``z``, ``s`` (its curvatures) and ``mode_of`` for the
    residuals; or several of the same operator side by side (``modes="both"``), for the
    Gram matrices only (B = [B_1 | B_2 | ...], each B_i in its own column order).

    With sq = D^1/2 as S uses it, U = sq W, D^-1 U = W / sq and Ht U = S W / sq, every block of
    B^T B, B^T J B, Bl^T Bl and Bl^T B is a Gram matrix of W against W or S W with weight 1,
    sq^2, D or 1/sq^2 (the operator's formulas of :func:`_apply_J`; sums over D > 0). The
    residual of an eigenvector x = p0 (u, 0) + p1 (0, D^-1 u) of a mode (s, w) follows from
    r = S w - s w, formed explicitly in float64 from the true products (no cancellation between
    S w and s w): with e = M(s) p - z p (M: the 2x2 block), beta_ = a s p0 + b p1, t = D / sq
    and delta = t - sq (sqrt(D) rounded),
    J x - z x = ((sq e0 - delta beta_) w - a p0 t r, (e1 w + a2 p0 r) / sq) (order 1: the top
    part with p1 = 0), whose squared norm is a combination of the weighted sums of w^2, w r and
    r^2 accumulated here. Equal to :func:`_moments` to float64 rounding, in one pass over W,
    S W and D: 3 n m reads and O(n m^2) flops where :func:`_moments` forms the 2n x 2m rows of
    B and J B (1M-parameter MLP, k = 8: measured in ``docs/benchmarks.md``).

    Returns ``None`` when it does not apply (Ht U from HVPs, a dense basis, or ``C`` with more
    than one mode in a column): the caller uses :func:`_moments`.
    """
    subs = [subs] if isinstance(subs, _Subspace) else list(subs)
    st, sq = subs[0].st, subs[0].sq
    if any(b.B is not None or b.SW is None or b.st is not st for b in subs) or (
        C is not None and len(subs) > 1
    ):
        return None
    ms = [b.W.shape[1] for b in subs]
    m = sum(ms)
    order = st.order
    nrows = subs[0].W.shape[0]
    p_of = None
    if C is not None:
        p_of = np.zeros((C.shape[1], 2), dtype=np.complex128)
        for j, i in enumerate(np.asarray(mode_of)):
            idx = [int(i)] if order == 1 else [int(i), m + int(i)]
            if np.any(np.delete(C[:, j], idx) != 0):
                return None
            p_of[j, : len(idx)] = C[idx, j]
    dev = subs[0].W.device
    f64 = dict(dtype=torch.float64, device=dev)
    sv = torch.as_tensor(np.asarray(s if s is not None else np.zeros(m), dtype=np.float64), **f64)
    cols = np.cumsum([0] + ms)
    gram = torch.zeros(3 * m, 2 * m, **f64)  # [sq^2 w | D w | w / sq^2]^T [w | S w]
    G1 = torch.zeros(m, m, **f64)  # W^T W (entries with D > 0)
    # [sq delta, delta^2, sq t, delta t, t^2, 1 / sq^2]^T [w^2 | w r | r^2]: the per-mode sums
    sums = torch.zeros(6, 3 * m, **f64)
    masked = not bool((sq > 0).all())  # entries with D = 0 (not reached, or lr = 0)
    step = min(_chunk_rows(dev, 12 * m), nrows)
    # Chunk buffers, written in place (no concatenations): the float64 columns [w | S w],
    # [sq^2 w | D w | w / sq^2], [w^2 | w r | r^2] and the six per-row weights.
    WY, L, Q = (torch.empty(step, q * m, **f64) for q in (2, 3, 3))
    wts = torch.empty(step, 6, **f64)
    for lo in range(0, nrows, step):
        hi = min(lo + step, nrows)
        k_ = hi - lo
        wy, lft, quad, wt = WY[:k_], L[:k_], Q[:k_], wts[:k_]
        w, y = wy[:, :m], wy[:, m:]
        for b, c0, c1 in zip(subs, cols[:-1], cols[1:], strict=True):
            w[:, c0:c1].copy_(b.W[lo:hi])
            y[:, c0:c1].copy_(b.SW[lo:hi])
        sqc = sq[lo:hi].to(**f64)[:, None]
        Dm = st.D[lo:hi].to(**f64)[:, None]
        if masked:
            pos = sqc > 0
            wy.masked_fill_(~pos, 0)
            Dm = torch.where(pos, Dm, 0)
            sqs = torch.where(pos, sqc, 1)
            inv2 = torch.where(pos, 1.0 / (sqs * sqs), 0)
            t = Dm / sqs  # D / sq: the operator's D Ht u is t (S w)
        else:
            inv2 = 1.0 / (sqc * sqc)
            t = Dm / sqc
        dl = t - sqc  # sqrt(D) rounding; 0 where D = 0
        torch.mul(w, sqc * sqc, out=lft[:, :m])
        torch.mul(w, Dm, out=lft[:, m : 2 * m])
        torch.mul(w, inv2, out=lft[:, 2 * m :])
        gram.addmm_(lft.mT, wy)
        G1.addmm_(w.mT, w)
        if p_of is None:
            continue
        r = quad[:, 2 * m :]
        torch.addcmul(y, w, sv, value=-1.0, out=r)  # S w - s w
        torch.mul(w, w, out=quad[:, :m])
        torch.mul(w, r, out=quad[:, m : 2 * m])
        r.mul_(r)
        for q, col in enumerate((sqc * dl, dl * dl, sqc * t, dl * t, t * t, inv2)):
            wt[:, q : q + 1].copy_(col)
        sums.addmm_(wt.mT, quad)
    gram, G1, sums = (x.cpu().numpy() for x in (gram, G1, sums))
    Ad, Dw, Dy, Iw, Iy = (gram[:m, :m], gram[m : 2 * m, :m], gram[m : 2 * m, m:],
                          gram[2 * m :, :m], gram[2 * m :, m:])
    a, a2, b, beta, c = _scalar_coefficients(st)
    zero = np.zeros((m, m))
    if order == 1:
        G, BtJB, GL, cross = Ad, c * Ad - a * Dy, Iw, G1
    else:
        G, GL = np.block([[Ad, zero], [zero, Iw]]), np.block([[Iw, zero], [zero, Ad]])
        cross = np.block([[G1, zero], [zero, G1]])
        BtJB = np.block([[c * Ad - a * Dy, -b * Dw], [a2 * Iy, beta * Iw]])
        if len(subs) > 1:  # [(U_1..U_k, 0) | (0, D^-1 U_1..)] -> [B_1 | B_2 | ...]
            perm = np.concatenate([np.r_[c0:c1, m + c0 : m + c1]
                                   for c0, c1 in zip(cols[:-1], cols[1:], strict=True)])
            G, BtJB, GL, cross = (M[np.ix_(perm, perm)] for M in (G, BtJB, GL, cross))
    if p_of is None:
        return _Moments(G=G, BtJB=BtJB, GL=GL, cross=cross)
    i = np.asarray(mode_of)
    p0, p1, zz = p_of[:, 0], p_of[:, 1], np.asarray(z, dtype=np.complex128)
    si = np.asarray(s, dtype=np.float64)[i]
    w2, wr, r2 = (sums[:, q * m : (q + 1) * m][:, i] for q in range(3))
    sqd_w2, d2_w2, sqt_wr, dt_wr, t2_r2, i_wr, i_r2 = (w2[0], w2[1], wr[2], wr[3], r2[4],
                                                       wr[5], r2[5])
    e0 = (c - a * si - zz) * p0 - b * p1
    e1 = a2 * si * p0 + (beta - zz) * p1
    bt = a * si * p0 + b * p1
    re = lambda u, v: np.real(np.conj(u) * v)  # noqa: E731
    rsq = (np.abs(e0) ** 2 * np.diagonal(Ad)[i] - 2 * re(e0, bt) * sqd_w2
           + np.abs(bt) ** 2 * d2_w2 - 2 * a * (re(e0, p0) * sqt_wr - re(bt, p0) * dt_wr)
           + a * a * np.abs(p0) ** 2 * t2_r2)
    if order != 1:
        rsq += (np.abs(e1) ** 2 * np.diagonal(Iw)[i] + 2 * a2 * re(e1, p0) * i_wr
                + a2 * a2 * np.abs(p0) ** 2 * i_r2)
    return _Moments(G=G, BtJB=BtJB, GL=GL, cross=cross,
                    residuals=np.sqrt(np.maximum(rsq, 0.0)))


def _condition_numbers(X: torch.Tensor, Y: torch.Tensor,
                       y_cols: torch.Tensor | None = None) -> np.ndarray:
    """``eigenvalue_condition_numbers(X, Y[:, y_cols])`` (its reference) in one pass over row
    chunks in complex128: ``1 / |y^H x|`` for unit x, y, without complex128 copies of the
    2n-row X and Y or a gathered copy of Y (the reference's took 7 s of a 30 s arnoldi estimate
    on a 1M-parameter MLP, two CPU cores; this pass 0.3 s). inf for a zero column or
    ``y^H x = 0``, NaN where the vectors hold NaN."""
    q, nrows = X.shape[1], X.shape[0]
    acc = torch.zeros(3, q, dtype=torch.complex128, device=X.device)
    step = _chunk_rows(X.device, 8 * q)
    for lo in range(0, nrows, step):
        x = X[lo : lo + step].to(torch.complex128)
        y = Y[lo : lo + step]
        y = (y if y_cols is None else y[:, y_cols.to(y.device)]).to(x.device, torch.complex128)
        acc[0] += torch.linalg.vecdot(y, x, dim=0)  # y^H x
        acc[1] += torch.linalg.vecdot(x, x, dim=0)
        acc[2] += torch.linalg.vecdot(y, y, dim=0)
    a = acc.cpu().numpy()
    nx, ny = np.sqrt(np.real(a[1])), np.sqrt(np.real(a[2]))
    bad = ~(np.isfinite(nx) & (nx > 0) & np.isfinite(ny) & (ny > 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.abs(a[0]) / np.where(bad, 1.0, nx * ny)
        out = np.where(bad | (d == 0), np.inf, 1.0 / d)
    out[np.isnan(d)] = np.nan
    return out


def _basis_geometry(bases: list[_Subspace], geometry: tuple | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """R with B = Q R (Q orthonormal) and T = Q^T J Q = R^-T (B^T J B) R^-1, in float64.

    B = [B_1 | B_2 | ...] are the bases side by side; ``geometry`` = (B^T B, B^T J B) when
    already known (one side: from its :func:`_structured_moments` or :func:`_moments` pass), else
    one pass computes them (:func:`_structured_moments` for structured bases of one operator).
    R comes from the Cholesky factor of the Gram matrix B^T B (p x p), which is accurate while
    the basis is well conditioned -- it is by construction: (u, 0) and (0, D^-1 u) have
    disjoint supports, and the u are D-orthogonal Lanczos vectors. Falls back to a Householder
    QR of B if the Gram matrix is not numerically positive definite.
    """
    if geometry is None:
        mom = _structured_moments(bases) or _moments(bases)
        geometry = (mom.G, mom.BtJB)
    G, BtJB = geometry
    try:
        R = np.linalg.cholesky(G).T
    except np.linalg.LinAlgError:
        B = torch.cat([sub.dense()[0] for sub in bases], 1)
        R = torch.linalg.qr(B, mode="r")[1].cpu().numpy()
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


def _allowed(z: np.ndarray, tol: float, dtype: torch.dtype) -> np.ndarray:
    """The largest J residual (unit eigenvector) that counts as converged: ``tol`` relative to
    |z| with ARPACK's floor, ``tol * max(|z|, eps**(2/3))`` -- the test the arnoldi path applies
    to its Ritz estimates -- or the rounding level ``64 eps max(|z|, 1)`` of the certificate
    itself when that is larger (``tol`` near machine epsilon)."""
    eps = float(torch.finfo(dtype).eps)
    az = np.abs(np.asarray(z))
    return np.maximum(tol * np.maximum(az, eps ** (2.0 / 3.0)), 64 * eps * np.maximum(az, 1.0))


def _msg(res) -> str:
    for name in ("message", "status"):
        v = getattr(res, name, None)
        if isinstance(v, str) and v and v.lower() not in ("ok", "converged"):
            return v
    return ""

"""The Krylov basis on the operator's device and its expansion (block Arnoldi with CGS2).

One preallocated ``(ncv + s, n)`` tensor ``V`` (``s`` = block size; row ``j`` is basis vector
``v_j``, contiguous, so the operator gets contiguous vectors and Gram-Schmidt reads contiguous
memory, about 2x faster on a CPU than column storage) holds the orthonormal basis on
``A.device`` in ``A.dtype``; all ``O(n)`` work (operator applications, Gram-Schmidt as two
matrix-vector products ``V w`` and ``V^T h`` per pass, done in place in the new vector's row;
restarts as one ``Z^T V`` product, in place over column panels) stays there. The projected
matrix ``H`` (``(ncv + s) x ncv``) lives in float64 numpy on the host; per Krylov step only the
Gram-Schmidt coefficients and two or three squared norms cross the bus, in one copy while the DGKS
refinement keeps being needed (see :meth:`KrylovBasis._orthogonalize`).

Invariant maintained (the Krylov decomposition, with ``V_m = V[:m].T`` the ``n x m`` basis)::

    A V_m = V_{m+s} H[:m + s, :m],    V_{m+s} orthonormal.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kappa_gpu._linop import LinearOperator

__all__ = ["KrylovBasis", "random_block"]

#: DGKS threshold (Daniel, Gragg, Kaufman & Stewart 1976): reorthogonalize when the Gram-Schmidt
#: step cancelled more than this fraction of the norm. ARPACK uses 0.717.
_ETA = 1.0 / np.sqrt(2.0)


def random_block(
    n: int, s: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """``(n, s)`` standard normal entries, drawn on ``generator``'s device, moved to ``device``."""
    if generator is None:
        return torch.randn(n, s, dtype=dtype, device=device)
    X = torch.randn(n, s, dtype=dtype, device=generator.device, generator=generator)
    return X.to(device)


class KrylovBasis:
    """Orthonormal Krylov basis with its projected matrix.

    Args:
        A: the (square) operator.
        ncv: the largest basis size ``m``.
        s: block size (columns applied per ``matmat``).
        generator: for the random vectors that replace a breakdown.
        name: the solver's name, for messages.
        reorth: ``"full"`` (classical Gram-Schmidt against the whole basis with DGKS
            refinement) or ``"selective"`` (symmetric operators only: local three-term / arrow
            recurrence plus Parlett-Scott orthogonalization against converged Ritz vectors).
        symmetric: the operator is self-adjoint (thick-restart Lanczos). With ``"full"`` and
            ``s == 1`` each step first removes the two previous vectors (the three-term
            recurrence, where nearly all of ``A v_j`` lies), then runs Gram-Schmidt against the
            whole basis on what is left (:meth:`_local_first_step`): two sweeps over the
            basis per step instead of four.
    """

    def __init__(
        self,
        A: LinearOperator,
        ncv: int,
        s: int,
        generator: torch.Generator | None,
        name: str,
        reorth: str = "full",
        symmetric: bool = False,
    ):
        self.A, self.n, self.ncv, self.s = A, A.shape[0], ncv, s
        self.symmetric = symmetric
        # cleared by start(), which every solver calls first (one pass over the basis, not two)
        self.V = torch.empty(ncv + s, self.n, dtype=A.dtype, device=A.device)
        self.H = np.zeros((ncv + s, ncv))
        self.generator, self.name, self.reorth = generator, name, reorth
        self.n_matvec = 0
        self.n_restarts = 0
        self.n_breakdowns = 0
        self.p = 0  # columns [0, p) are the kept part after the last restart
        self._cycle_start = 0
        self.eps = float(torch.finfo(A.dtype).eps)
        self._refine_next = False  # whether _orthogonalize refines without waiting for its test

    # -- operator application -----------------------------------------------------------------
    def _apply(self, j: int) -> torch.Tensor:
        """``A [v_j .. v_{j+s-1}]`` as an ``(n, s)`` tensor (one matvec or one batched matmat)."""
        if self.s == 1:
            X = self.V[j]
            W = self.A.matvec(X)
            want = (self.n,)
        else:
            # (n, s) columns, contiguous: what a batched HVP expects.
            X = self.V[j : j + self.s].T.contiguous()
            W = self.A.matmat(X)
            want = (self.n, self.s)
        self.n_matvec += self.s
        if not isinstance(W, torch.Tensor) or tuple(W.shape) != want:
            got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
            raise ValueError(
                f"{self.name}: the operator's {'matvec' if self.s == 1 else 'matmat'} returned "
                f"{got} for an input of shape {tuple(X.shape) if self.s > 1 else (self.n,)}; "
                f"expected {want}"
            )
        if W.device != self.V.device:
            raise ValueError(
                f"{self.name}: the operator returned a tensor on {W.device}, but it declares "
                f"device {self.V.device}"
            )
        W = W.to(self.V.dtype)
        return W.reshape(self.n, self.s)

    def _nonfinite(self, j: int) -> FloatingPointError:
        return FloatingPointError(
            f"{self.name}: the operator returned NaN or inf from matvec number {self.n_matvec} "
            f"(restart {self.n_restarts}, Krylov column {j}); the operator is not finite at this "
            "vector (check the model/HVP for overflow or NaN parameters); the iteration stopped"
        )

    # -- orthogonalization ----------------------------------------------------------------------
    def _to_host(self, *ts: torch.Tensor) -> np.ndarray:
        # One device->host copy per call: a handful of float64 numbers.
        return torch.cat([t.reshape(-1) for t in ts]).to("cpu", torch.float64).numpy()

    def _random_orthogonal(self, col: int) -> torch.Tensor | None:
        """A random unit vector orthogonal to ``v_0 .. v_{col-1}``, or ``None`` if they span R^n."""
        Vk = self.V[:col]
        for _ in range(3):
            w = random_block(self.n, 1, self.V.dtype, self.V.device, self.generator)[:, 0]
            for _ in range(2):
                w = w - Vk.T @ (Vk @ w)
            nrm = float(torch.linalg.vector_norm(w))
            if nrm > 100 * self.eps * np.sqrt(self.n):
                return w / nrm
        return None

    def _orthogonalize(
        self, w: torch.Tensor, lo: int, col: int, j: int
    ) -> tuple[np.ndarray, float, torch.Tensor | None]:
        """Classical Gram-Schmidt of ``w`` against ``v_lo .. v_{col-1}`` with DGKS refinement.

        Up to two extra passes, each when the previous one cancelled more than
        ``1 - 1/sqrt(2)`` of the norm (Daniel, Gragg, Kaufman & Stewart 1976; ARPACK's
        ``dnaitr`` rule). If the norm keeps collapsing, ``w`` is numerically in the span: a
        breakdown, reported as ``beta = 0`` with a fresh random vector orthogonal to the whole
        basis (or ``None`` when the basis spans R^n).

        Done in place in ``V[col]``, which the first update writes from ``w``: no allocation.
        The first pass's test needs no extra product: ``||w - V^T h||^2 = w.w - h.h`` to
        rounding, enough to decide a threshold at half the norm squared. A refinement pass's
        product ``V[lo:col + 1] @ x`` (contiguous rows) gives its coefficients and ``x . x``
        together. The new norm comes from a dot product: MKL's ``sdot`` sums with more partial
        sums than its ``sgemv`` or torch's ``vector_norm`` (float32, n = 2e5: 6e-7 relative error
        in ``x . x`` against 2e-6), and the norm's error is the diagonal of ``||V^T V - I||``.

        Deciding the first refinement costs a device->host round trip between the passes (and,
        on a CPU, lets the basis fall out of cache between its product and its update). When
        the previous call needed it, it is made without waiting; its test is still evaluated,
        on the same host copy, for the next call. Once a Krylov-Schur run starts to converge
        ``A v`` lies mostly in the basis and every step needs the refinement (322 of 322 on
        ``bench/bench_arpack.py``'s problem; about half of the steps of thick-restart Lanczos on
        a Hessian).

        Returns:
            ``(h, beta, v)``: coefficients on ``v_lo .. v_{col-1}``, the new norm, the new unit
            vector (a view of ``V[col]``, or a fresh tensor after a breakdown).

        Cost: two sweeps over ``V[lo:col]`` per Gram-Schmidt pass (one product, one update),
        one device->host copy per step when the refinement is needed on consecutive steps.
        """
        x = self.V[col]
        Vk, Vx = self.V[lo:col], self.V[lo : col + 1]
        c = col - lo
        h_dev = torch.mv(Vk, w)
        ww_dev = torch.dot(w, w)
        eager = self._refine_next
        if not eager:
            host = self._to_host(h_dev, ww_dev)
            if not np.isfinite(host).all():
                raise self._nonfinite(j)
        if w.data_ptr() == x.data_ptr():
            x.addmv_(Vk.T, h_dev, alpha=-1.0)
        else:
            torch.addmv(w, Vk.T, h_dev, alpha=-1.0, out=x)
        if eager:
            r = torch.mv(Vx, x)  # (g, x.x)
            x.addmv_(Vk.T, r[:c], alpha=-1.0)
            host = self._to_host(h_dev, ww_dev, r, torch.dot(x, x))
            if not np.isfinite(host).all():
                raise self._nonfinite(j)
            h, ww = host[:c] + host[c + 1 : 2 * c + 1], float(host[c])
            needed = ww > 0.0 and host[:c] @ host[:c] >= (1.0 - _ETA**2) * ww
            xx, nn, passes = float(host[-2]), float(host[-1]), 1
        else:
            h, ww = host[:c].copy(), float(host[c])
            needed = ww > 0.0 and h @ h >= (1.0 - _ETA**2) * ww
            xx, nn, passes = 0.0, float(self._to_host(torch.dot(x, x))[0]), 0
            if needed:
                nn = -1.0  # force the first refinement below
        breakdown = ww == 0.0
        while not breakdown and nn <= _ETA**2 * xx:
            if passes == 2:  # cancelled three times in a row: in the span
                breakdown = True
                break
            r = torch.mv(Vx, x)
            x.addmv_(Vk.T, r[:c], alpha=-1.0)
            g = self._to_host(r, torch.dot(x, x))
            h += g[:c]
            xx, nn = float(g[c]), float(g[-1])
            passes += 1
        self._refine_next = bool(needed)
        norm = float(np.sqrt(max(nn, 0.0)))
        if breakdown or norm == 0.0:
            self.n_breakdowns += 1
            return h, 0.0, self._random_orthogonal(col)
        x.mul_(1.0 / norm)
        return h, norm, x

    def _project_block(
        self, W: torch.Tensor, hi: int, j: int
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Block classical Gram-Schmidt of the ``s`` columns of ``W`` against ``v_0 .. v_{hi-1}``.

        DGKS per column, as :meth:`_orthogonalize`: a refinement pass for the columns whose
        norm the previous pass cut by more than ``1 - 1/sqrt(2)``, at most two; a column still
        collapsing after them (or zero) lies in the span of the basis and is flagged. Each pass
        is one ``(hi x n) @ (n x s)`` product and one ``(n x hi) @ (hi x s)`` update for the
        whole block. In exact arithmetic the result is the per-column projection.

        Returns:
            ``(Wt, C, collapsed)``: the projected columns as the rows of an ``(s, n)`` tensor,
            the ``(hi, s)`` float64 coefficients, and the per-column breakdown flags.
        """
        Vk = self.V[:hi]
        # Rows, not columns: (s x n) row-major keeps both products on contiguous memory (an
        # (n x s) row-major operand makes MKL's GEMM 3-4x slower at n ~ 2e5).
        Wt = W.T.contiguous()
        Ct_dev = Wt @ Vk.T  # (s, hi)
        norm0 = torch.linalg.vector_norm(Wt, dim=1)
        Wt = torch.addmm(Wt, Ct_dev, Vk, alpha=-1.0)
        host = self._to_host(Ct_dev, norm0, torch.linalg.vector_norm(Wt, dim=1))
        if not np.isfinite(host).all():
            raise self._nonfinite(j)
        s = Wt.shape[0]
        C = host[: hi * s].reshape(s, hi).T.copy()
        prev, cur = host[hi * s : hi * s + s].copy(), host[hi * s + s :].copy()
        collapsed = prev == 0.0
        need = ~collapsed & (cur <= _ETA * prev)
        passes = 0
        while need.any():
            if passes == 2:
                collapsed |= need
                break
            mask = torch.as_tensor(need, device=Wt.device).to(Wt.dtype)
            Gt_dev = (Wt @ Vk.T) * mask[:, None]  # only the rows that need it change
            Wt = torch.addmm(Wt, Gt_dev, Vk, alpha=-1.0)
            g = self._to_host(Gt_dev, torch.linalg.vector_norm(Wt, dim=1))
            C += g[: hi * s].reshape(s, hi).T
            prev = np.where(need, cur, prev)
            cur = np.where(need, g[hi * s :], cur)
            need &= cur <= _ETA * prev
            passes += 1
        collapsed |= cur == 0.0
        return Wt, C, collapsed

    # -- expansion ------------------------------------------------------------------------------
    def start(self, X: torch.Tensor) -> None:
        """Put the orthonormal ``(n, s)`` start block into ``V[:s]`` and clear ``H``."""
        self.V.zero_()
        self.V[: self.s] = X.T
        self.H[:] = 0.0
        self.p = 0

    def expand(self, m: int, stop: Callable[[int], bool] | None = None) -> int:
        """Extend the decomposition from ``p`` to ``m`` columns (``m - p`` a multiple of ``s``).

        Costs ``m - p`` operator applications, ``(m - p) / s`` calls of ``matvec``/``matmat``.
        ``stop(j)``, called after each block step with the current size ``j``, may end the
        expansion early (all wanted pairs converged). Returns the size reached.
        """
        s = self.s
        self._cycle_start = self.p  # the arrow column of thick restart (selective mode)
        for j in range(self.p, m, s):
            W = self._apply(j)
            blocked = s > 1 and self.reorth == "full"
            if blocked:
                # The old basis v_0 .. v_{j+s-1} once for the whole block (two matrix products
                # per pass instead of 2 s matrix-vector products: the basis is read s times less),
                # then each column against the new columns of its own block.
                W, C, collapsed = self._project_block(W, j + s, j)
            for i in range(s):
                col = j + s + i
                if self.reorth == "selective":
                    h, lo, beta, v = self._selective_step(W[:, i], j + i, col)
                elif not blocked:
                    lo = 0
                    h, beta, v = self._local_first_step(W[:, i], j + i, col)
                else:
                    lo = 0
                    if collapsed[i]:  # in the span of the old basis: a breakdown
                        self.n_breakdowns += 1
                        hn, beta, v = np.zeros(i), 0.0, self._random_orthogonal(col)
                    else:
                        norm_in = float(torch.linalg.vector_norm(W[i])) if i else 0.0
                        hn, beta, v = self._orthogonalize(W[i], j + s, col, j + i)
                    h = np.concatenate([C[:, i], hn])
                    if not collapsed[i] and v is not None and 0.0 < beta < _ETA * norm_in:
                        # The projection on the block's own new columns cancelled most of the
                        # column: what the old-basis pass left at the rounding level of the
                        # larger norm is now that much larger relative to this one (it broke
                        # the basis's orthogonality to 1e-7 in float64 for a warm start from
                        # nearly invariant vectors). One more pass against the whole basis.
                        h2, beta, v = self._orthogonalize(v * beta, 0, col, j + i)
                        h = h + h2
                self.H[lo:col, j + i] = h
                self.H[col, j + i] = beta
                if v is None:  # the basis spans R^n: the residual is exactly zero
                    self.V[col] = 0.0
                elif v.data_ptr() != self.V[col].data_ptr():  # not written in place
                    self.V[col] = v
            self.p = j + s
            if stop is not None and j + s < m and stop(j + s):
                break
        return self.p

    def _local_first_step(
        self, w: torch.Tensor, j: int, col: int
    ) -> tuple[np.ndarray, float, torch.Tensor | None]:
        """Full reorthogonalization of one (block size 1) step, the latest vectors first.

        Classical Gram-Schmidt of ``A v_j`` against the whole basis cancels most of its norm
        when ``A v_j`` lies mostly along the latest vectors, and then the DGKS test asks for the
        second pass: four sweeps over the basis. For a self-adjoint ``A`` (``symmetric``) that
        is the rule: ``A v_j`` lies in the span of ``v_{j-1}, v_j, v_{j+1}`` (after a thick
        restart, of the kept block on the first step of a cycle). So the projection on
        ``v_{j-1}, v_j`` is removed first, two small products written into ``V[col]``, and the
        Gram-Schmidt pass against the whole basis (:meth:`_orthogonalize`, with its DGKS test
        and breakdown handling) runs on what is left, where it removes only rounding and needs
        its second pass far less often (3 of 46 steps instead of 45 on a 1M-parameter Hessian).
        The coefficients of both passes are added, so ``H`` is the same projection. On a step
        whose local part is the whole basis (the first steps, the arrow of a thick restart),
        and for a general ``A``, it is plain :meth:`_orthogonalize`: for the update operator of
        ``bench/bench_arpack.py`` (``J = I - small``, 94-98% of ``||A v_j||^2`` along ``v_j``)
        removing ``v_j`` first left the second pass on 85% of the steps and saved no time.
        """
        lo = self._recurrence_start(j) if self.symmetric else 0
        if lo == 0:
            return self._orthogonalize(w, 0, col, j)
        x, Vl = self.V[col], self.V[lo : j + 1]
        g = torch.mv(Vl, w)
        torch.addmv(w, Vl.T, g, alpha=-1.0, out=x)
        # (A non-finite w makes the pass below raise.) g is copied after that pass's own
        # device->host copy has drained the queue: no extra wait on a GPU.
        h, beta, v = self._orthogonalize(x, 0, col, j)  # h: a fresh host array
        h[lo : j + 1] += self._to_host(g)
        return h, beta, v

    def _recurrence_start(self, j: int) -> int:
        """The first basis vector a symmetric step's local recurrence involves: the whole kept
        block on the first step of a cycle (the arrow of thick restart), else ``v_{j-1}``."""
        return 0 if j == self._cycle_start else max(0, j - 1)

    def _selective_step(
        self, w: torch.Tensor, j: int, col: int
    ) -> tuple[np.ndarray, int, float, torch.Tensor | None]:
        """One Lanczos step with selective orthogonalization (``s == 1``, symmetric ``A``).

        Local recurrence: orthogonalize against ``v_{j-1}, v_j``, or against the whole kept part
        (the "arrow" of thick restart) on the first step after a restart. Then Parlett & Scott's
        selective orthogonalization: against the Ritz vectors of the current tridiagonal-plus-arrow
        matrix whose error bound ``beta |s_ji|`` is below ``sqrt(eps) ||T||`` (the converged ones,
        the only directions in which Lanczos vectors lose orthogonality, Paige 1971). Their
        coefficients are not added to ``H`` (they are rounding noise by construction).
        """
        c0 = self._cycle_start
        lo = self._recurrence_start(j)
        if 0 < c0 < lo:
            # Thick restart keeps unconverged Ritz vectors too; the recurrence leaks rounding
            # into them at a rate that grows with each restart, so new vectors are always
            # orthogonalized against the kept block (one (n x p) GEMV pair; coefficients are
            # rounding noise and are not put into H).
            Vk = self.V[:c0]
            w = w - Vk.T @ (Vk @ w)
        h, beta, v = self._orthogonalize(w, lo, col, j)
        if beta == 0.0 or j == 0:
            return h, lo, beta, v
        w = v * beta
        Hj = self.H[: j + 1, : j + 1].copy()
        Hj[lo : j + 1, j] = h
        Ts = np.triu(Hj) + np.triu(Hj, 1).T  # symmetric, from the upper part just computed
        theta, S = np.linalg.eigh(Ts)
        bounds = beta * np.abs(S[j, :])
        good = bounds <= np.sqrt(self.eps) * max(np.abs(theta).max(), np.finfo(float).tiny)
        if good.any():
            Sg = torch.as_tensor(S[:, good].T, dtype=self.V.dtype, device=self.V.device)
            Y = Sg @ self.V[: j + 1]  # the good Ritz vectors, one per row
            w = w - Y.T @ (Y @ w)
            nrm = float(torch.linalg.vector_norm(w))
            if nrm <= _ETA * beta * 1e-8 or nrm == 0.0:
                self.n_breakdowns += 1
                return h, lo, 0.0, self._random_orthogonal(col)
            beta, v = nrm, w / nrm
        return h, lo, beta, v

    def columns(self, m: int) -> torch.Tensor:
        """The ``n x m`` basis ``V_m`` as a (transposed) view."""
        return self.V[:m].T

    # -- restart --------------------------------------------------------------------------------
    def _rotate(self, Z1: np.ndarray, m: int) -> None:
        """``V[:p] = Z1^T V[:m]`` in place, over column panels of the ``(m, n)`` basis.

        Each panel's product goes to a small scratch block and is copied back: no ``p x n``
        temporary (it would add ``p / (ncv + s)`` of the basis to the peak memory, and on a CPU a
        fresh multi-megabyte allocation per restart costs page faults), and the copy back reads
        the block from cache. Panels of ``2^14`` columns on a CPU (the block fits in L2 next to
        its inputs), ``2^22`` on other devices (a few kernel launches per restart).
        """
        p, n = Z1.shape[1], self.n
        V = self.V
        Zt = torch.as_tensor(np.ascontiguousarray(Z1.T), dtype=V.dtype).to(V.device)
        width = 1 << (14 if V.device.type == "cpu" else 22)
        panels = -(-n // width)
        width = -(-n // panels)  # equal panels
        buf = torch.empty(p * width, dtype=V.dtype, device=V.device)
        for c0 in range(0, n, width):
            c1 = min(n, c0 + width)
            blk = buf[: p * (c1 - c0)].view(p, c1 - c0)
            torch.mm(Zt, V[:m, c0:c1], out=blk)
            V[:p, c0:c1] = blk

    def restart(
        self,
        m: int,
        Z1: np.ndarray,
        T11: np.ndarray,
        scale: np.ndarray | None = None,
        partner: np.ndarray | None = None,
    ) -> None:
        """Krylov-Schur / thick restart: keep ``V_m Z1`` (``Z1`` orthonormal, ``m x p``).

        New decomposition: ``A (V_m Z1) = (V_m Z1) T11 + [v_m .. v_{m+s-1}] (B Z1)`` with ``B`` the
        residual rows of ``H``. Costs one ``(n x m) @ (m x p)`` product on the device, done in
        place (:meth:`_rotate`).

        Deflation (ARPACK's ``dnapps`` rule): a kept column whose coupling ``||(B Z1)[:, j]||`` is
        below ``eps * scale[j]`` (``scale`` = ``|theta_j|``; a conjugate pair, ``partner``, only
        together) has converged to working precision; its coupling is set to exactly zero, a
        perturbation at the rounding level of the basis. Without it such a pair's Ritz estimate
        stays at the rounding noise and ``tol`` near machine epsilon is never met.
        """
        s, p = self.s, Z1.shape[1]
        B = self.H[m : m + s, :m].copy()
        self._rotate(Z1, m)
        resid = self.V[m : m + s]
        if p < m < p + s:  # the residual rows would overlap their new place (blocks only)
            resid = resid.clone()
        if p != m:
            self.V[p : p + s] = resid
        # Rows p + s .. are not cleared: the next expansion writes each before it is read.
        Bz = B @ Z1
        if scale is not None:
            small = np.linalg.norm(Bz, axis=0) <= self.eps * scale
            if partner is not None:
                small &= np.where(partner >= 0, small[np.maximum(partner, 0)], True)
            Bz[:, small] = 0.0
        self.H[:] = 0.0
        self.H[:p, :p] = T11
        self.H[p : p + s, :p] = Bz
        self.p = p
        self.n_restarts += 1

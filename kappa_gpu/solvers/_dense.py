"""Small dense float64 kernels on the host: Schur forms, reordering, Ritz vectors.

Everything here acts on the ``m x m`` projected matrix (``m = ncv``, tens to a few hundred), never
on ``n``-vectors. It runs in float64 numpy on the host whatever the operator's dtype and device:
the reordering of a real Schur form swaps 2x2 blocks with orthogonal transforms whose error is
``eps * ||T||`` per swap, and over hundreds of restarts float32 would lose the orthogonality of
the Schur vectors (and with it the Krylov relation); the arrays are tiny, so the copy costs
nothing next to one matvec.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
from scipy.linalg import lapack

__all__ = ["SchurRitz", "schur_ritz", "reorder_schur", "sym_ritz"]

_EPS = np.finfo(np.float64).eps


class SchurRitz:
    """Real Schur form ``S = Z T Z^T`` of a projected matrix, with its Ritz values.

    Attributes:
        T, Z: the real Schur form (quasi-triangular ``T``, orthogonal ``Z``).
        theta: ``(m,)`` complex128, the eigenvalue at each diagonal position of ``T``; a 2x2
            block at ``(i, i+1)`` holds ``a + bi`` at ``i`` and its exact conjugate at ``i+1``.
        partner: ``(m,)`` int, the position of the conjugate partner, ``-1`` for a real value.
    """

    def __init__(self, T: np.ndarray, Z: np.ndarray):
        self.T, self.Z = T, Z
        m = T.shape[0]
        self.theta = np.zeros(m, dtype=np.complex128)
        self.partner = -np.ones(m, dtype=np.int64)
        i = 0
        while i < m:
            if i + 1 < m and T[i + 1, i] != 0.0:
                a, b, c, d = T[i, i], T[i, i + 1], T[i + 1, i], T[i + 1, i + 1]
                half = 0.5 * (a - d)
                disc = half * half + b * c
                re = 0.5 * (a + d)
                im = np.sqrt(-disc) if disc < 0 else 0.0
                self.theta[i], self.theta[i + 1] = complex(re, im), complex(re, -im)
                self.partner[i], self.partner[i + 1] = i + 1, i
                i += 2
            else:
                self.theta[i] = T[i, i]
                i += 1
        self._csf: tuple[np.ndarray, np.ndarray] | None = None

    def closure(self, positions: np.ndarray) -> np.ndarray:
        """``positions`` with the missing conjugate partners appended (never split a 2x2 block)."""
        chosen = list(int(q) for q in positions)
        have = set(chosen)
        for q in list(chosen):
            r = int(self.partner[q])
            if r >= 0 and r not in have:
                chosen.append(r)
                have.add(r)
        return np.asarray(chosen, dtype=np.int64)

    def eigvecs(self, positions: np.ndarray) -> np.ndarray:
        """Unit-norm eigenvectors ``s_i`` of ``S`` (``S s_i = theta_i s_i``), one column each.

        Computed by back substitution in the complex Schur form (``scipy.linalg.rsf2csf``) with
        tiny pivots lifted to ``eps ||T||`` as LAPACK's ``trevc`` does; a conjugate pair gets exact
        conjugate columns.
        """
        if self._csf is None:
            self._csf = sla.rsf2csf(self.T, self.Z)
        Tc, Zc = self._csf
        m = Tc.shape[0]
        smin = max(_EPS * np.linalg.norm(self.T), np.finfo(np.float64).tiny / _EPS)
        out = np.zeros((m, len(positions)), dtype=np.complex128)
        done: dict[int, np.ndarray] = {}
        for col, q in enumerate(int(x) for x in positions):
            r = int(self.partner[q])
            if r >= 0 and r in done:
                out[:, col] = np.conj(done[r])
                continue
            if r >= 0:
                # In Tc the pair occupies (min, min+1) in some order: take the entry whose sign of
                # the imaginary part matches theta[q].
                i0 = min(q, r)
                cand = [i0, i0 + 1]
                sign = np.sign(self.theta[q].imag)
                qc = cand[0] if np.sign(Tc[i0, i0].imag) == sign else cand[1]
            else:
                qc = q
            y = np.zeros(m, dtype=np.complex128)
            y[qc] = 1.0
            if qc > 0:
                M = Tc[:qc, :qc] - Tc[qc, qc] * np.eye(qc)
                d = np.diagonal(M).copy()
                small = np.abs(d) < smin
                d[small] = smin
                M[np.diag_indices(qc)] = d
                y[:qc] = sla.solve_triangular(M, -Tc[:qc, qc], check_finite=False)
            v = Zc @ y
            v /= np.linalg.norm(v)
            if r < 0:
                # A real eigenvalue has a real eigenvector: remove the phase, keep the real part.
                j = int(np.argmax(np.abs(v)))
                v = (v * (abs(v[j]) / v[j])).real.astype(np.complex128)
                v /= np.linalg.norm(v)
            done[q] = v
            out[:, col] = v
        return out


def schur_ritz(S: np.ndarray) -> SchurRitz:
    """Real Schur form and Ritz values of the (square, float64) projected matrix ``S``."""
    T, Z = sla.schur(S, output="real", check_finite=False)
    return SchurRitz(T, Z)


def reorder_schur(sr: SchurRitz, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Move the eigenvalues at ``positions`` (closed under conjugation) to the top-left of ``T``.

    Uses LAPACK ``dtrsen`` (orthogonal swaps of 1x1/2x2 blocks). Returns ``(T, Z, p)`` with the
    wanted invariant subspace in ``Z[:, :p]``. If a swap is refused (two blocks too close to
    separate, ``info = 1``), the partially reordered form is kept: the Krylov-Schur relation stays
    exact, only a different, nearly equal Ritz value is kept; ``p`` is then moved off a 2x2
    block boundary.
    """
    m = sr.T.shape[0]
    select = np.zeros(m, dtype=np.int32)
    select[positions] = 1
    ts, qs, _, _, mm, _, _, info = lapack.dtrsen(select, sr.T, sr.Z, job="N")
    p = int(mm) if info == 0 else int(select.sum())
    if 0 < p < m and ts[p, p - 1] != 0.0:
        p += 1
    return ts, qs, p


def sym_ritz(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the symmetric part of ``T`` (float64, ``scipy.linalg.eigh``)."""
    Ts = 0.5 * (T + T.T)
    return sla.eigh(Ts, check_finite=False)

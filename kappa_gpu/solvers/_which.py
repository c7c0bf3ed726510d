"""Which eigenvalues are wanted: orderings of Ritz values and ARPACK's kept-count heuristic.

All functions work on small float64/complex128 numpy arrays (the Ritz values of the projected
matrix) and return index orders, most wanted first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EIGS_WHICH", "EIGSH_WHICH", "order_complex", "order_real", "kept_count"]

#: ``which`` accepted by :func:`eigs`: largest/smallest magnitude of ``z - sigma``, largest/smallest
#: real part, largest magnitude of the imaginary part (ARPACK's meaning of "LI").
EIGS_WHICH = ("LM", "SM", "LR", "SR", "LI")
#: ``which`` accepted by :func:`eigsh`: largest/smallest algebraic, largest/smallest magnitude,
#: both ends (half from each end, the odd one from the top, as ARPACK).
EIGSH_WHICH = ("LA", "SA", "LM", "SM", "BE")


def order_complex(theta: np.ndarray, which, sigma: float | None) -> np.ndarray:
    """Indices of complex Ritz values ``theta``, most wanted first.

    Ties (a conjugate pair has equal keys for every ``which`` with a real ``sigma``) are broken
    by larger real part, then positive imaginary part first, so that the two members of a pair
    are adjacent with ``+`` first.
    """
    s = 0.0 if sigma is None else float(sigma)
    d = theta - s
    if callable(which):
        # A user key (SLEPc's EPS_WHICH_USER): larger means more wanted.
        key = -np.real(np.asarray(which(theta), dtype=np.complex128))
        if key.shape != theta.shape or not np.isfinite(key).any():
            raise ValueError(
                f"which={getattr(which, '__name__', which)!r} must return one finite real key "
                f"per eigenvalue (larger = more wanted); for {theta.size} Ritz values it "
                f"returned {key.shape[0] if key.ndim else 'a scalar'} key(s), none finite"
                if key.shape == theta.shape else
                f"which={getattr(which, '__name__', which)!r} must return one key per "
                f"eigenvalue: shape {key.shape} for {theta.size} Ritz values"
            )
        key = np.where(np.isfinite(key), key, np.inf)  # non-finite: least wanted
    elif which == "LM":
        key = -np.abs(d)
    elif which == "SM":
        key = np.abs(d)
    elif which == "LR":
        key = -d.real
    elif which == "SR":
        key = d.real
    elif which == "LI":
        key = -np.abs(d.imag)
    else:  # pragma: no cover - validated at the door
        raise ValueError(which)
    # np.lexsort sorts by the last key first.
    return np.lexsort((-theta.imag, -theta.real, key))


def order_real(theta: np.ndarray, which: str, sigma: float | None = None) -> np.ndarray:
    """Indices of real Ritz values ``theta``, most wanted first.

    For ``"BE"`` the order alternates largest, smallest, second largest, ... so that any prefix
    of length ``p`` holds the ``ceil(p/2)`` largest and ``floor(p/2)`` smallest values (ARPACK's
    ``dsgets``).
    """
    s = 0.0 if sigma is None else float(sigma)
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    if which == "LM":
        return np.lexsort((-theta, -np.abs(theta - s)))
    if which == "SM":
        return np.lexsort((-theta, np.abs(theta - s)))
    if which == "BE":
        asc = np.argsort(theta, kind="stable")
        out = np.empty_like(asc)
        hi, lo = len(asc) - 1, 0
        for i in range(len(asc)):
            if i % 2 == 0:
                out[i], hi = asc[hi], hi - 1
            else:
                out[i], lo = asc[lo], lo + 1
        return out
    raise ValueError(which)  # pragma: no cover - validated at the door


def kept_count(nev: int, nconv: int, m: int, cap: int, symmetric: bool) -> int:
    """How many Ritz vectors to keep at a restart (ARPACK's ``dnaup2``/``dsaup2`` heuristic).

    Keeping more than ``nev`` vectors, namely ``nev + min(nconv, (m - nev) // 2)``, prevents
    stagnation once some pairs have converged; a single wanted pair keeps ``m // 2``. This is
    what makes the matvec counts match ARPACK's (Krylov-Schur with exact shifts and the same
    kept count spans the same subspace as implicitly restarted Arnoldi).

    Args:
        nev: the number of wanted Ritz values (``k``, plus one when a pair straddles ``k``).
        nconv: how many of them have converged.
        m: the size of the basis at the restart (``ncv``).
        cap: the largest allowed result (room for at least one expansion step).
        symmetric: ``dsaup2`` (True) or ``dnaup2`` (False) special cases for ``nev == 1``.
    """
    p = nev + min(nconv, (m - nev) // 2)
    if p == 1 and m >= 6:
        p = m // 2
    elif p == 1 and m > (2 if symmetric else 3):
        p = 2
    return max(1, min(p, cap))

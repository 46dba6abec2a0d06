"""Closed-form weight-update solves shared by ROME, MEMIT and AlphaEdit.

Why one module: the three methods differ only in which linear system they solve for
the update of one linear map ``W`` (``[d_out, d_in]``, the ``nn.Linear`` convention,
mapping keys ``k`` to values ``v = W k``).  Solving them in one place means one
float64 code path, one set of checks and one set of error messages.

Conventions used throughout:

- keys are *columns*: ``K`` is ``[d_in, n]``, residuals ``R = V* − W K`` are ``[d_out, n]``;
- ``C`` is the *uncentred* second moment of keys, ``E[k kᵀ]`` (``[d_in, d_in]``), as
  ROME/MEMIT/AlphaEdit use it;
- all arithmetic is float64 (the updates are differences of nearly equal large
  quantities; float32 loses the edit); results come back in the caller's dtype;
- systems are solved with a factorisation, never an explicit inverse.

GPT-2 style ``Conv1D`` weights are stored ``[d_in, d_out]``: compute the update in the
convention above and convert with :func:`dlmedit.edit.delta.to_param_layout`.
"""

from __future__ import annotations

import math
import warnings

import torch

from dlmedit.edit.errors import StatisticsError

__all__ = [
    "StatisticsError",
    "alphaedit_update",
    "check_finite",
    "check_well_conditioned",
    "memit_update",
    "null_space_projector",
    "rank_one_update",
    "spread_residual",
]

_STATS_REMEDY = (
    "Collect the statistics from more samples (well above the key dimension), "
    "or increase the regularisation (MEMIT's λ / mom2_update_weight, AlphaEdit's L2)."
)


# --------------------------------------------------------------------------- helpers
def _work_device(t: torch.Tensor) -> torch.device:
    # MPS has no float64; everything else computes where the data already lives.
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _f64(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float64)


def _require_matrix(name: str, t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows} (shape {tuple(t.shape)})")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {cols} (shape {tuple(t.shape)})")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _require_vector(name: str, t: torch.Tensor, size: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 1 or t.shape[0] != size:
        raise ValueError(f"{name} must be a vector of length {size}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`StatisticsError` if ``tensor`` holds NaN or Inf.

    Non-finite keys or statistics almost always come from a half-precision forward
    that overflowed, or from dividing by a zero sample count; a solve would silently
    turn them into a NaN weight update that corrupts the whole model.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point() and not tensor.is_complex():
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise StatisticsError(
        f"{name} contains {n_nan} NaN and {n_inf} Inf values (of {tensor.numel()}, shape "
        f"{tuple(tensor.shape)}). This usually means the model overflowed in half precision "
        "while collecting activations, or statistics were normalised by a zero sample count: "
        "recollect in float32/bfloat16 and check the number of samples."
    )


def check_well_conditioned(
    C: torch.Tensor, name: str = "second-moment matrix", *, max_condition: float = 1e12
) -> float:
    """Check that a symmetric statistics matrix is finite, symmetric and invertible.

    Returns the 2-norm condition number.  Uses a float64 eigen-decomposition, which
    costs O(d³) — fine for d ≤ a few thousand; the solves themselves detect
    singularity more cheaply through a failed Cholesky factorisation.
    """
    _require_matrix(name, C)
    if C.shape[0] != C.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(C.shape)}")
    check_finite(name, C)
    A = _f64(C, _work_device(C))
    scale = float(A.abs().max())
    if scale == 0.0:
        raise StatisticsError(f"{name} is all zeros: no samples were accumulated. {_STATS_REMEDY}")
    asym = float((A - A.T).abs().max())
    if asym > 1e-6 * scale:
        raise StatisticsError(
            f"{name} is not symmetric (max |C − Cᵀ| = {asym:.3g} vs max |C| = {scale:.3g}); "
            "a second moment E[k kᵀ] is always symmetric, so the statistics are corrupt."
        )
    eig = torch.linalg.eigvalsh((A + A.T) / 2)
    lo, hi = float(eig[0]), float(eig[-1])
    cond = math.inf if lo <= 0 else hi / lo
    if hi <= 0 or cond > max_condition:
        raise StatisticsError(
            f"{name} is singular or ill-conditioned: condition number {cond:.3g} "
            f"(smallest eigenvalue {lo:.3g}, largest {hi:.3g}, dimension {A.shape[0]}; "
            f"limit {max_condition:.3g}). Statistics from fewer samples than the dimension "
            f"are always singular. {_STATS_REMEDY}"
        )
    return cond


def _cholesky_solve(A: torch.Tensor, B: torch.Tensor, what: str) -> torch.Tensor:
    """Solve A X = B for symmetric positive-definite A (float64), with a clear error."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise StatisticsError(
            f"{what} is not positive definite (Cholesky failed at leading minor {int(info)} of "
            f"{A.shape[0]}), so the edit has no unique solution. {_STATS_REMEDY}"
        )
    X = torch.cholesky_solve(B, L)
    check_finite(f"solution of {what}", X)
    return X


# --------------------------------------------------------------------------- ROME
def rank_one_update(
    W: torch.Tensor,
    k: torch.Tensor,
    v_star: torch.Tensor,
    C: torch.Tensor | None = None,
    *,
    C_inv: torch.Tensor | None = None,
    rtol: float = 1e-10,
) -> torch.Tensor:
    """ROME's rank-one update ΔW = (v* − W k) uᵀ / (uᵀ k) with u = C⁻¹ k.

    ``W`` is ``[d_out, d_in]``, ``k`` ``[d_in]``, ``v_star`` ``[d_out]``.  Pass the key
    second moment as ``C`` (solved by Cholesky) *or* its precomputed inverse as
    ``C_inv`` (cheaper when many edits share one layer); with neither, u = k (plain
    minimum-norm rank-one update).  The result satisfies (W + ΔW) k = v* exactly in
    exact arithmetic and keeps W unchanged on keys C⁻¹-orthogonal to k.
    Returned in ``W``'s dtype and device.
    """
    _require_matrix("W", W)
    d_out, d_in = W.shape
    _require_vector("k", k, d_in)
    _require_vector("v_star", v_star, d_out)
    if C is not None and C_inv is not None:
        raise ValueError("pass either C (the key second moment) or C_inv (its inverse), not both")
    dev = _work_device(W)
    k64 = _f64(k, dev)
    check_finite("key k", k64)
    check_finite("target value v_star", v_star)
    if C is not None:
        _require_matrix("C", C, d_in, d_in)
        check_finite("key second moment C", C)
        u = _cholesky_solve(_f64(C, dev), k64[:, None], "key second moment C")[:, 0]
    elif C_inv is not None:
        _require_matrix("C_inv", C_inv, d_in, d_in)
        check_finite("inverse key second moment C_inv", C_inv)
        u = _f64(C_inv, dev) @ k64
    else:
        u = k64
    denom = float(u @ k64)
    if not math.isfinite(denom) or abs(denom) <= rtol * float(u.norm()) * float(k64.norm()) or denom == 0.0:
        raise StatisticsError(
            f"rank-one update is undefined: uᵀk = {denom:.3g} ≈ 0 (‖k‖ = {float(k64.norm()):.3g}). "
            "The key is zero, or C is not positive definite along it. Check that the key was read "
            "at the right site and that C is the key second moment of that site."
        )
    W64 = _f64(W, dev)
    residual = _f64(v_star, dev) - W64 @ k64
    delta = torch.outer(residual, u) / denom
    return delta.to(device=W.device, dtype=W.dtype)


# --------------------------------------------------------------------------- MEMIT
def memit_update(
    K: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor | None,
    lam: float,
) -> torch.Tensor:
    """MEMIT's batched ridge update Δ = R Kᵀ (λC + K Kᵀ)⁻¹, solved in float64.

    ``K`` ``[d_in, n]`` keys of the n edits at this layer, ``R`` ``[d_out, n]`` the
    residuals this layer must absorb (already spread, see :func:`spread_residual`),
    ``C`` the key second moment (``None`` = identity, i.e. plain ridge) and ``lam`` the
    statistics weight (MEMIT's ``mom2_update_weight``, ≈1.5e4–2e4 on GPT-J/GPT2-XL).
    The result satisfies Δ (λC + K Kᵀ) = R Kᵀ.  Returned in ``R``'s dtype and device.
    """
    _require_matrix("K", K)
    d_in, n = K.shape
    _require_matrix("R", R, cols=n)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number ≥ 0, got {lam!r}")
    dev = _work_device(R)
    K64 = _f64(K, dev)
    R64 = _f64(R, dev)
    check_finite("keys K", K64)
    check_finite("residuals R", R64)
    if C is None:
        reg = torch.eye(d_in, dtype=torch.float64, device=dev)
    else:
        _require_matrix("C", C, d_in, d_in)
        check_finite("key second moment C", C)
        reg = _f64(C, dev)
    A = lam * reg + K64 @ K64.T
    # Solve for A⁻¹K (n right-hand sides) rather than A⁻¹KRᵀ (d_out of them): A is
    # symmetric, so Δ = R (A⁻¹K)ᵀ, and n ≪ d_out makes this the cheap order.
    Y = _cholesky_solve(A, K64, "λC + K Kᵀ")  # [d_in, n]
    return (R64 @ Y.T).to(device=R.device, dtype=R.dtype)


def spread_residual(target_minus_current: torch.Tensor, layers_remaining: int) -> torch.Tensor:
    """Share of the residual the current layer absorbs in MEMIT: divide by layers left.

    MEMIT edits layers in order and, before each, re-measures how far the final edited
    layer's output is from the target; splitting that gap evenly over the layers still
    to be edited (this one included) spreads the change instead of loading the first.
    """
    if isinstance(layers_remaining, bool) or not isinstance(layers_remaining, int) or layers_remaining < 1:
        raise ValueError(f"layers_remaining must be an int ≥ 1, got {layers_remaining!r}")
    return target_minus_current / layers_remaining


# --------------------------------------------------------------------------- AlphaEdit
def null_space_projector(C: torch.Tensor, threshold: float = 2e-2) -> torch.Tensor:
    """AlphaEdit's projector P = Û Ûᵀ onto the (approximate) null space of ``C``.

    Û are the eigenvectors of the key second moment ``C`` whose eigenvalue is below
    ``threshold`` (AlphaEdit's published 2e-2; note it is absolute, so it assumes C is
    the *normalised* second moment E[k kᵀ], not a raw sum).  Updates of the form Δ = Δ P
    leave every key that lies in the span of the large-eigenvalue directions — the
    preserved knowledge — unchanged.  Returned in ``C``'s dtype.
    """
    _require_matrix("C", C)
    if C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square, got shape {tuple(C.shape)}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    check_finite("key second moment C", C)
    dev = _work_device(C)
    A = _f64(C, dev)
    eigval, eigvec = torch.linalg.eigh((A + A.T) / 2)
    keep = eigval < threshold
    n_keep = int(keep.sum())
    d = A.shape[0]
    if n_keep == 0:
        raise StatisticsError(
            f"no eigenvalue of C is below the null-space threshold {threshold:g} (smallest is "
            f"{float(eigval[0]):.3g}, dimension {d}): the projector would be zero and every "
            "AlphaEdit update would vanish. Use the normalised second moment E[k kᵀ] (not a raw "
            "sum) or raise the threshold."
        )
    if n_keep == d:
        warnings.warn(
            f"every eigenvalue of C is below the null-space threshold {threshold:g} (largest is "
            f"{float(eigval[-1]):.3g}): the projector is the identity and AlphaEdit will not "
            "protect any preserved keys. Check the scale of C or lower the threshold.",
            stacklevel=2,
        )
    U = eigvec[:, keep]
    return (U @ U.T).to(device=C.device, dtype=C.dtype)


def alphaedit_update(
    K: torch.Tensor,
    R: torch.Tensor,
    P: torch.Tensor,
    K_prev: torch.Tensor | None = None,
    *,
    prev_key_moment: torch.Tensor | None = None,
    lam: float = 10.0,
) -> torch.Tensor:
    """AlphaEdit's null-space-constrained update (Fang et al., ICLR 2025).

    Minimises ‖(W + ΔP) K − V*‖² + ‖ΔP K_p‖² + λ‖ΔP‖², whose solution in the
    ``[d_out, d_in]`` convention is

        Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + λ I)⁻¹,

    i.e. Δ = Xᵀ with X solving (P (K Kᵀ + K_p K_pᵀ) + λ I) X = P K Rᵀ (AlphaEdit's code).
    Every solution satisfies Δ = Δ P, so keys in the null space of P (the preserved
    knowledge) are untouched.  ``K_prev`` ``[d_in, m]`` are the keys of earlier edits in
    sequential editing; alternatively pass their accumulated ``prev_key_moment`` =
    Σ K_p K_pᵀ (``[d_in, d_in]``), which is what AlphaEdit stores between rounds.
    ``lam`` is AlphaEdit's ``L2`` (10 in its published configs) and must be > 0.
    Returned in ``R``'s dtype and device.
    """
    _require_matrix("K", K)
    d_in, n = K.shape
    _require_matrix("R", R, cols=n)
    _require_matrix("P", P, d_in, d_in)
    if K_prev is not None and prev_key_moment is not None:
        raise ValueError("pass either K_prev (earlier edit keys) or prev_key_moment (Σ K_p K_pᵀ), not both")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(
            f"lam must be a finite number > 0, got {lam!r}: with λ = 0 the system P M is singular "
            "whenever P projects out any direction"
        )
    dev = _work_device(R)
    K64, R64, P64 = _f64(K, dev), _f64(R, dev), _f64(P, dev)
    check_finite("keys K", K64)
    check_finite("residuals R", R64)
    check_finite("null-space projector P", P64)
    M = K64 @ K64.T
    if K_prev is not None:
        _require_matrix("K_prev", K_prev, rows=d_in)
        Kp = _f64(K_prev, dev)
        check_finite("previous keys K_prev", Kp)
        M = M + Kp @ Kp.T
    elif prev_key_moment is not None:
        _require_matrix("prev_key_moment", prev_key_moment, d_in, d_in)
        check_finite("prev_key_moment", prev_key_moment)
        M = M + _f64(prev_key_moment, dev)
    A = P64 @ M + lam * torch.eye(d_in, dtype=torch.float64, device=dev)
    # X = A⁻¹ P K Rᵀ and Δ = Xᵀ; solving for A⁻¹ P K first needs only n right-hand sides.
    Y, info = torch.linalg.solve_ex(A, P64 @ K64)  # [d_in, n]
    if int(info) != 0:
        raise StatisticsError(
            f"AlphaEdit system P(KKᵀ + K_pK_pᵀ) + λI is singular (LU pivot {int(info)}); "
            f"P is probably not a projector. {_STATS_REMEDY}"
        )
    check_finite("AlphaEdit update", Y)
    return (R64 @ Y.T).to(device=R.device, dtype=R.dtype)

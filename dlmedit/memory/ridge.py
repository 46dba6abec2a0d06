"""The ridge map W = D Kᵀ (K Kᵀ + λ I)⁻¹, kept up to date as facts are inserted and removed.

Why incremental: the edit memory grows one fact (or one batch) at a time — sequential
unlearning inserts facts as requests arrive and may retract them later.  Re-solving
from scratch costs O(d³ + n d²) per change and needs every key kept; maintaining the
inverse A⁻¹ = (K Kᵀ + λI)⁻¹ with Woodbury updates costs O(d² m + m³) for a change of
m facts, independent of how many facts are already stored.

Conventions: keys and deltas are *rows* here (``K`` ``[n, d_in]``, ``D`` ``[n, d_out]``,
one row per fact); the map is ``W`` ``[d_out, d_in]`` with ``W k ≈ d``.  Everything is
float64.  With m new rows (keys ``K_m``, deltas ``D_m``)::

    U  = A⁻¹ K_mᵀ                     [d_in, m]
    S  = I_m ± K_m U                   (+ insert, − remove; m×m, SPD for a valid change)
    A⁻¹ ← A⁻¹ ∓ U S⁻¹ Uᵀ
    W  ← W + (D_mᵀ − W K_mᵀ) S⁻¹ Uᵀ   (insert)
    W  ← W + (W K_mᵀ − D_mᵀ) S⁻¹ Uᵀ   (remove)

(the recursive-least-squares identities; derivation: W = B A⁻¹ with B = D Kᵀ).  When a
batch is larger than half the key width the update refactorises A from the running
sufficient statistics G = K Kᵀ and B = D Kᵀ instead — O(d³), still independent of n
and never touching old keys.  λ = 0 is allowed only while K Kᵀ is non-singular (at
least d_in independent keys); otherwise :class:`SingularKeysError` says to use λ > 0.
"""

from __future__ import annotations

import math

import torch

from dlmedit.edit.errors import StatisticsError
from dlmedit.edit.solves import memit_update
from dlmedit.errors import InvalidSettingError

__all__ = ["IncrementalRidge", "SingularKeysError", "ridge_solve"]


class SingularKeysError(StatisticsError):
    """K Kᵀ is singular and λ = 0: the ridge map is undefined."""


def _singular_message(n: int, d: int) -> str:
    return (
        f"K Kᵀ of the {n} stored keys (width {d}) is singular and λ = 0, so the memory map "
        f"W = D Kᵀ(K Kᵀ)⁻¹ is undefined (it needs at least {d} linearly independent keys). "
        "Use λ > 0 (ridge regularisation), e.g. --lambda 1."
    )


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise InvalidSettingError(f"λ (--lambda) must be a finite number ≥ 0 (the ridge regulariser), got {lam!r}")
    return float(lam)


def ridge_solve(K: torch.Tensor, D: torch.Tensor, lam: float) -> torch.Tensor:
    """W = D Kᵀ (K Kᵀ + λI)⁻¹ from scratch (rows = facts), via the shared MEMIT solve with C = I."""
    lam = _check_lam(lam)
    if K.ndim != 2 or D.ndim != 2 or K.shape[0] != D.shape[0]:
        raise ValueError(f"K [n, d_in] and D [n, d_out] must have the same number of rows, got {tuple(K.shape)}, {tuple(D.shape)}")
    try:
        return memit_update(K.T.double(), D.T.double(), None, lam)
    except StatisticsError as exc:
        if lam == 0:
            raise SingularKeysError(_singular_message(K.shape[0], K.shape[1])) from exc
        raise


class IncrementalRidge:
    """Maintains ``W``, ``A⁻¹`` and the sufficient statistics ``G = KKᵀ``, ``B = DKᵀ`` under row changes."""

    def __init__(self, d_in: int, d_out: int, lam: float, *, device: torch.device | str = "cpu") -> None:
        if d_in < 1 or d_out < 1:
            raise ValueError(f"widths must be positive, got d_in={d_in}, d_out={d_out}")
        self.lam = _check_lam(lam)
        self.d_in, self.d_out = int(d_in), int(d_out)
        f64 = {"dtype": torch.float64, "device": device}
        self.G = torch.zeros(d_in, d_in, **f64)
        self.B = torch.zeros(d_out, d_in, **f64)
        self.W = torch.zeros(d_out, d_in, **f64)
        self.A_inv: torch.Tensor | None = torch.eye(d_in, **f64) / self.lam if self.lam > 0 else None
        self.n = 0
        self.updates_since_refactor = 0

    # -- checks ------------------------------------------------------------------
    def _rows(self, K: torch.Tensor, D: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if K.ndim != 2 or K.shape[1] != self.d_in:
            raise ValueError(f"keys must be [m, {self.d_in}], got {tuple(K.shape)}")
        K = K.to(device=self.G.device, dtype=torch.float64)
        if not bool(torch.isfinite(K).all()):
            raise StatisticsError("keys contain NaN/Inf values; check the forward pass that produced them")
        if D is not None:
            if D.ndim != 2 or D.shape != (K.shape[0], self.d_out):
                raise ValueError(f"deltas must be [{K.shape[0]}, {self.d_out}], got {tuple(D.shape)}")
            D = D.to(device=self.G.device, dtype=torch.float64)
            if not bool(torch.isfinite(D).all()):
                raise StatisticsError("target deltas contain NaN/Inf values")
        return K, D

    # -- updates -----------------------------------------------------------------
    def insert(self, K: torch.Tensor, D: torch.Tensor) -> None:
        """Add m facts (rows of K, D).  On a singular λ = 0 system the state is left unchanged."""
        K, D = self._rows(K, D)
        assert D is not None
        m = K.shape[0]
        if m == 0:
            return
        G_new = self.G + K.T @ K
        B_new = self.B + D.T @ K
        if self.A_inv is None or 2 * m > self.d_in:
            self._refactor(G_new, B_new, self.n + m)
        else:
            U = self.A_inv @ K.T
            S = torch.eye(m, dtype=torch.float64, device=K.device) + K @ U
            S_inv_Ut = self._spd_solve(S, U.T, "I + K A⁻¹ Kᵀ")
            self.W = self.W + (D.T - self.W @ K.T) @ S_inv_Ut
            self.A_inv = self.A_inv - U @ S_inv_Ut
            self.A_inv = (self.A_inv + self.A_inv.T) / 2
            self.G, self.B, self.n = G_new, B_new, self.n + m
            self.updates_since_refactor += 1

    def remove(self, K: torch.Tensor, D: torch.Tensor) -> None:
        """Remove m facts previously inserted with exactly these rows (downdate)."""
        K, D = self._rows(K, D)
        assert D is not None
        m = K.shape[0]
        if m == 0:
            return
        if m > self.n:
            raise ValueError(f"cannot remove {m} facts from a memory holding {self.n}")
        G_new = self.G - K.T @ K
        B_new = self.B - D.T @ K
        n_new = self.n - m
        if n_new == 0:
            self.G = torch.zeros_like(self.G)
            self.B = torch.zeros_like(self.B)
            self.W = torch.zeros_like(self.W)
            self.A_inv = torch.eye(self.d_in, dtype=torch.float64, device=self.G.device) / self.lam if self.lam > 0 else None
            self.n = 0
            self.updates_since_refactor = 0
            return
        if self.A_inv is None or self.lam == 0 or 2 * m > self.d_in:
            self._refactor(G_new, B_new, n_new)
            return
        U = self.A_inv @ K.T
        S = torch.eye(m, dtype=torch.float64, device=K.device) - K @ U
        S_inv_Ut = self._spd_solve(S, U.T, "I − K A⁻¹ Kᵀ (were these rows inserted?)")
        self.W = self.W + (self.W @ K.T - D.T) @ S_inv_Ut
        self.A_inv = self.A_inv + U @ S_inv_Ut
        self.A_inv = (self.A_inv + self.A_inv.T) / 2
        self.G, self.B, self.n = G_new, B_new, n_new
        self.updates_since_refactor += 1

    def refactor(self) -> None:
        """Recompute A⁻¹ and W from G, B (clears floating-point drift of many Woodbury steps)."""
        if self.n == 0:
            return
        self._refactor(self.G, self.B, self.n)

    def _refactor(self, G: torch.Tensor, B: torch.Tensor, n: int) -> None:
        A = G + self.lam * torch.eye(self.d_in, dtype=torch.float64, device=G.device)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            if self.lam == 0:
                raise SingularKeysError(_singular_message(n, self.d_in))
            raise StatisticsError(f"K Kᵀ + λI is not positive definite (λ = {self.lam}); keys are corrupt")
        A_inv = torch.cholesky_inverse(L)
        self.A_inv = (A_inv + A_inv.T) / 2
        self.W = B @ self.A_inv
        self.G, self.B, self.n = G, B, n
        self.updates_since_refactor = 0

    @staticmethod
    def _spd_solve(S: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
        L, info = torch.linalg.cholesky_ex((S + S.T) / 2)
        if int(info) != 0:
            raise StatisticsError(f"{what} is not positive definite; the update is invalid")
        return torch.cholesky_solve(rhs, L)

    # -- diagnostics -----------------------------------------------------------------
    def drift(self) -> float:
        """max |A⁻¹ (G + λI) − I|: how far the maintained inverse has drifted (0 = exact)."""
        if self.A_inv is None:
            return math.nan
        A = self.G + self.lam * torch.eye(self.d_in, dtype=torch.float64, device=self.G.device)
        return float((self.A_inv @ A - torch.eye(self.d_in, dtype=torch.float64, device=A.device)).abs().max())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"G": self.G, "B": self.B, "W": self.W}
        if self.A_inv is not None:
            out["A_inv"] = self.A_inv
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], lam: float, n: int) -> IncrementalRidge:
        G, B = tensors["G"], tensors["B"]
        obj = cls(G.shape[0], B.shape[0], lam, device=G.device)
        obj.G, obj.B, obj.W = G.double(), B.double(), tensors["W"].double()
        obj.A_inv = tensors["A_inv"].double() if "A_inv" in tensors else (None if lam == 0 else obj.A_inv)
        obj.n = int(n)
        return obj

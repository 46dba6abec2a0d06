"""Tests for the closed-form edit solves (ROME rank-one, MEMIT ridge, AlphaEdit null space)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dlmedit.edit.errors import StatisticsError
from dlmedit.edit.solves import (
    alphaedit_update,
    check_finite,
    check_well_conditioned,
    memit_update,
    null_space_projector,
    rank_one_update,
    spread_residual,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, n: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Second moment of n random keys (SPD when n ≥ d)."""
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (keys.T @ keys / n).to(dtype)


# --------------------------------------------------------------------------- checks
def test_check_finite_reports_counts() -> None:
    t = torch.tensor([1.0, float("nan"), float("inf"), float("-inf")])
    with pytest.raises(StatisticsError, match=r"1 NaN and 2 Inf"):
        check_finite("keys", t)
    check_finite("ok", torch.ones(3))
    check_finite("ints are always finite", torch.arange(3))


def test_check_well_conditioned() -> None:
    g = _gen(0)
    C = _spd(6, 200, g)
    cond = check_well_conditioned(C, "C")
    assert 1.0 <= cond < 100.0
    assert check_well_conditioned(torch.eye(4)) == pytest.approx(1.0)
    # Fewer samples than dimensions: singular, and the message says what to do.
    with pytest.raises(StatisticsError, match="more samples"):
        check_well_conditioned(_spd(8, 3, g), "C")
    with pytest.raises(StatisticsError, match="all zeros"):
        check_well_conditioned(torch.zeros(3, 3))
    with pytest.raises(StatisticsError, match="not symmetric"):
        check_well_conditioned(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(StatisticsError, match="NaN"):
        check_well_conditioned(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="square"):
        check_well_conditioned(torch.ones(2, 3))


# --------------------------------------------------------------------------- ROME
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_rank_one_hits_target(dtype: torch.dtype, tol: float) -> None:
    g = _gen(1)
    d_out, d_in = 12, 9
    W = torch.randn(d_out, d_in, generator=g).to(dtype)
    k = torch.randn(d_in, generator=g).to(dtype)
    v_star = torch.randn(d_out, generator=g).to(dtype) * 3
    C = _spd(d_in, 500, g)
    delta = rank_one_update(W, k, v_star, C)
    assert delta.dtype == dtype and delta.shape == W.shape
    out = (W + delta) @ k
    assert torch.allclose(out.double(), v_star.double(), atol=tol * 10, rtol=tol)
    # Rank one.
    assert torch.linalg.matrix_rank(delta.double(), rtol=tol).item() == 1


def test_rank_one_preserves_c_orthogonal_keys_and_inverse_path() -> None:
    g = _gen(2)
    d_out, d_in = 7, 6
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    k = torch.randn(d_in, generator=g, dtype=torch.float64)
    v_star = torch.randn(d_out, generator=g, dtype=torch.float64)
    C = _spd(d_in, 300, g)
    delta = rank_one_update(W, k, v_star, C)
    # Same answer from the precomputed inverse.
    delta_inv = rank_one_update(W, k, v_star, C_inv=torch.linalg.inv(C))
    assert torch.allclose(delta, delta_inv, atol=1e-10)
    # Any key j with kᵀ C⁻¹ j = 0 is mapped exactly as before.
    u = torch.linalg.solve(C, k)
    j = torch.randn(d_in, generator=g, dtype=torch.float64)
    j = j - (u @ j) / (u @ k) * k
    assert abs(float(u @ j)) < 1e-12
    assert torch.allclose(delta @ j, torch.zeros(d_out, dtype=torch.float64), atol=1e-10)
    # Without C, u = k: keys orthogonal to k are untouched.
    delta_id = rank_one_update(W, k, v_star)
    j2 = torch.randn(d_in, generator=g, dtype=torch.float64)
    j2 = j2 - (k @ j2) / (k @ k) * k
    assert torch.allclose(delta_id @ j2, torch.zeros(d_out, dtype=torch.float64), atol=1e-10)


def test_rank_one_errors() -> None:
    W = torch.randn(4, 3)
    v = torch.randn(4)
    with pytest.raises(StatisticsError, match="uᵀk"):
        rank_one_update(W, torch.zeros(3), v)
    with pytest.raises(ValueError, match="not both"):
        rank_one_update(W, torch.ones(3), v, torch.eye(3), C_inv=torch.eye(3))
    with pytest.raises(ValueError, match="length 3"):
        rank_one_update(W, torch.ones(4), v)
    with pytest.raises(StatisticsError, match="not positive definite"):
        rank_one_update(W, torch.ones(3), v, -torch.eye(3))
    with pytest.raises(StatisticsError, match="NaN"):
        rank_one_update(W, torch.tensor([1.0, float("nan"), 0.0]), v)


# --------------------------------------------------------------------------- MEMIT
def test_memit_normal_equations() -> None:
    g = _gen(3)
    d_in, d_out, n = 16, 12, 5
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    C = _spd(d_in, 400, g)
    lam = 3.0
    delta = memit_update(K, R, C, lam)
    A = lam * C + K @ K.T
    assert torch.allclose(delta @ A, R @ K.T, atol=1e-10)
    assert torch.allclose(delta, R @ K.T @ torch.linalg.inv(A), atol=1e-10)
    # float32 in → float32 out, same solution.
    delta32 = memit_update(K.float(), R.float(), C.float(), lam)
    assert delta32.dtype == torch.float32
    assert torch.allclose(delta32.double(), delta, atol=1e-4)
    # Heavier regularisation → smaller update; tiny λ with n < d still well-posed via C.
    assert memit_update(K, R, C, 1e4).norm() < delta.norm() / 100


def test_memit_fits_targets_when_lambda_small() -> None:
    g = _gen(4)
    d_in, d_out, n = 10, 6, 4
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    delta = memit_update(K, R, torch.eye(d_in, dtype=torch.float64), 1e-8)
    assert torch.allclose(delta @ K, R, atol=1e-6)
    # C=None means identity.
    assert torch.allclose(memit_update(K, R, None, 1e-8), delta)


def test_memit_errors() -> None:
    g = _gen(5)
    K = torch.randn(8, 3, generator=g)
    R = torch.randn(4, 3, generator=g)
    with pytest.raises(StatisticsError, match="more samples"):
        memit_update(K, R, torch.zeros(8, 8), 1.0)  # λC + KKᵀ has rank 3 < 8
    with pytest.raises(ValueError, match="columns"):
        memit_update(K, torch.randn(4, 2), None, 1.0)
    with pytest.raises(ValueError, match="lam"):
        memit_update(K, R, None, -1.0)
    bad = K.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(StatisticsError, match="Inf"):
        memit_update(bad, R, None, 1.0)


def test_spread_residual() -> None:
    r = torch.tensor([[3.0, 6.0]])
    assert torch.equal(spread_residual(r, 3), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(spread_residual(r, 1), r)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="layers_remaining"):
            spread_residual(r, bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- AlphaEdit
def test_null_space_projector_known_spectrum() -> None:
    g = _gen(6)
    d = 10
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eig = torch.tensor([1e-4, 5e-3, 1.9e-2, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    C = Q @ torch.diag(eig) @ Q.T
    P = null_space_projector(C, threshold=2e-2)
    expected = Q[:, :3] @ Q[:, :3].T
    assert torch.allclose(P, expected, atol=1e-10)
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T)
    assert float(torch.trace(P)) == pytest.approx(3.0)
    assert null_space_projector(C.float()).dtype == torch.float32
    with pytest.raises(StatisticsError, match="no eigenvalue"):
        null_space_projector(C, threshold=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P_all = null_space_projector(C, threshold=100.0)
    assert any("identity" in str(w.message) for w in caught)
    assert torch.allclose(P_all, torch.eye(d, dtype=torch.float64), atol=1e-10)


def _alphaedit_setup(seed: int):
    g = _gen(seed)
    d_in, d_out, rank = 24, 10, 8
    # Preserved keys live (up to tiny noise) in an 8-dim subspace: C has 16 null directions.
    basis = torch.randn(d_in, rank, generator=g, dtype=torch.float64)
    K0 = basis @ torch.randn(rank, 3000, generator=g, dtype=torch.float64)
    K0 = K0 + 1e-3 * torch.randn(K0.shape, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / K0.shape[1]
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return g, d_in, d_out, K0, C, W


def test_alphaedit_preserves_keys_and_hits_targets() -> None:
    g, d_in, d_out, K0, C, W = _alphaedit_setup(7)
    P = null_space_projector(C, threshold=2e-2)
    assert round(float(torch.trace(P))) == d_in - 8
    n = 4
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    V_star = torch.randn(d_out, n, generator=g, dtype=torch.float64) * 2
    R = V_star - W @ K
    lam = 1e-3
    delta = alphaedit_update(K, R, P, lam=lam)
    # Closed form from the paper: Δ = R Kᵀ P (K Kᵀ P + λ I)⁻¹.
    paper = R @ K.T @ P @ torch.linalg.inv(K @ K.T @ P + lam * torch.eye(d_in, dtype=torch.float64))
    assert torch.allclose(delta, paper, atol=1e-8)
    # Δ = Δ P: the update only reads the null-space component of a key.
    assert torch.allclose(delta, delta @ P, atol=1e-10)
    preserved_change = (delta @ K0).norm() / (W @ K0).norm()
    assert preserved_change < 1e-3, preserved_change
    fit_error = ((W + delta) @ K - V_star).norm() / R.norm()
    assert fit_error < 1e-2, fit_error
    # An unconstrained MEMIT-style update of the same edits disturbs the preserved keys.
    memit = memit_update(K, R, None, lam)
    assert (memit @ K0).norm() / (W @ K0).norm() > 100 * preserved_change
    # float32 in, float32 out.
    assert alphaedit_update(K.float(), R.float(), P.float(), lam=lam).dtype == torch.float32


def test_alphaedit_sequential_protects_previous_edits() -> None:
    g, d_in, d_out, K0, C, W = _alphaedit_setup(8)
    P = null_space_projector(C)
    lam = 1e-3
    K1 = torch.randn(d_in, 4, generator=g, dtype=torch.float64)
    V1 = torch.randn(d_out, 4, generator=g, dtype=torch.float64)
    W1 = W + alphaedit_update(K1, V1 - W @ K1, P, lam=lam)
    K2 = torch.randn(d_in, 4, generator=g, dtype=torch.float64)
    V2 = torch.randn(d_out, 4, generator=g, dtype=torch.float64)
    delta2 = alphaedit_update(K2, V2 - W1 @ K2, P, K1, lam=lam)
    same = alphaedit_update(K2, V2 - W1 @ K2, P, prev_key_moment=K1 @ K1.T, lam=lam)
    assert torch.allclose(delta2, same, atol=1e-10)
    paper = (
        (V2 - W1 @ K2)
        @ K2.T
        @ P
        @ torch.linalg.inv(K1 @ K1.T @ P + K2 @ K2.T @ P + lam * torch.eye(d_in, dtype=torch.float64))
    )
    assert torch.allclose(delta2, paper, atol=1e-8)
    W2 = W1 + delta2
    # The second round keeps the first round's facts (and the preserved keys).
    assert ((W2 @ K1) - V1).norm() / V1.norm() < 1e-2
    assert ((W2 @ K2) - V2).norm() / V2.norm() < 1e-2
    assert (delta2 @ K0).norm() / (W @ K0).norm() < 1e-3
    # Without K_prev the second round overwrites the first.
    naive = W1 + alphaedit_update(K2, V2 - W1 @ K2, P, lam=lam)
    assert ((naive @ K1) - V1).norm() / V1.norm() > 0.1


def test_alphaedit_errors() -> None:
    K = torch.randn(5, 2)
    R = torch.randn(3, 2)
    P = torch.eye(5)
    with pytest.raises(ValueError, match="lam"):
        alphaedit_update(K, R, P, lam=0.0)
    with pytest.raises(ValueError, match="not both"):
        alphaedit_update(K, R, P, K, prev_key_moment=torch.eye(5))
    with pytest.raises(ValueError, match="rows"):
        alphaedit_update(K, R, torch.eye(4))

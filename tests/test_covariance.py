"""Tests for second-moment accumulation, the statistics cache and atomic writes."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from dlmedit import cache as cache_mod
from dlmedit.cache import (
    atomic_path,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    cache_dir,
)
from dlmedit.edit.covariance import (
    SecondMomentAccumulator,
    corpus_hash,
    load_or_compute_stats,
    stats_cache_paths,
)
from dlmedit.edit.errors import StatisticsError


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DLMEDIT_CACHE", str(root))
    return root


# --------------------------------------------------------------------------- accumulator
def test_accumulator_matches_batch_second_moment() -> None:
    g = torch.Generator().manual_seed(0)
    ka = torch.randn(1000, 12, generator=g) * 3 + 1
    kb = torch.randn(300, 5, generator=g, dtype=torch.float64)
    acc = SecondMomentAccumulator({"a": 12, "b": 5})
    start = 0
    for size in (1, 17, 250, 332, 400):  # uneven chunks, some 3-D
        chunk = ka[start : start + size]
        acc.update("a", chunk.reshape(-1, 1, 12) if size % 2 == 0 else chunk)
        start += size
    assert start == 1000
    acc.update("a", torch.empty(0, 12))  # empty batches are ignored
    acc.update("b", kb.half().float())
    K = ka.double().T  # [d, N] keys as columns
    assert acc.count("a") == 1000 and acc.counts == {"a": 1000, "b": 300}
    C = acc.result("a")
    assert C.dtype == torch.float64 and C.shape == (12, 12)
    assert torch.allclose(C, K @ K.T / 1000, rtol=1e-12, atol=1e-12)
    assert torch.allclose(acc.mean("a"), ka.double().mean(0), atol=1e-12)
    kb16 = kb.half().double()
    assert torch.allclose(acc.results()["b"], kb16.T @ kb16 / 300, atol=1e-12)

    # Merging two partial accumulators equals one pass.
    p1, p2 = SecondMomentAccumulator({"a": 12, "b": 5}), SecondMomentAccumulator({"a": 12, "b": 5})
    p1.update("a", ka[:600])
    p2.update("a", ka[600:])
    p2.update("b", kb)
    p1.merge(p2)
    assert torch.allclose(p1.result("a"), C, atol=1e-12) and p1.count("b") == 300

    # float32 batch products into a float64 running sum: close to exact, still float64.
    fast = SecondMomentAccumulator({"a": 12}, product_dtype=torch.float32)
    for chunk in ka.split(128):
        fast.update("a", chunk)
    assert fast.result("a").dtype == torch.float64
    assert torch.allclose(fast.result("a"), C, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fast.mean("a"), acc.mean("a"), atol=1e-5)


def test_accumulator_errors() -> None:
    acc = SecondMomentAccumulator({"a": 3})
    with pytest.raises(KeyError, match="unknown site 'b'"):
        acc.update("b", torch.ones(2, 3))
    with pytest.raises(ValueError, match="last dimension 3"):
        acc.update("a", torch.ones(2, 4))
    with pytest.raises(StatisticsError, match="NaN"):
        acc.update("a", torch.tensor([[1.0, float("nan"), 0.0]]))
    assert acc.count("a") == 0  # the bad batch was not half-added
    with pytest.raises(StatisticsError, match="no keys"):
        acc.result("a")
    with pytest.raises(ValueError, match="positive ints"):
        SecondMomentAccumulator({"a": 0})
    with pytest.raises(ValueError, match="different sites"):
        acc.merge(SecondMomentAccumulator({"a": 4}))


# --------------------------------------------------------------------------- corpus hash
def test_corpus_hash(tmp_path) -> None:
    assert corpus_hash(["ab", "c"]) == corpus_hash(iter(["ab", "c"]))
    assert corpus_hash(["ab", "c"]) != corpus_hash(["a", "bc"])
    assert corpus_hash(["x"]) != corpus_hash(["x", ""])
    f = tmp_path / "corpus.txt"
    f.write_text("hello\nworld\n")
    h1 = corpus_hash(f)
    assert h1 == corpus_hash(str(f))
    f.write_text("hello\nworld!\n")
    assert corpus_hash(f) != h1
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("A")
    (d / "sub" / "b.txt").write_text("B")
    hd = corpus_hash(d)
    (d / "sub" / "b.txt").rename(d / "b.txt")  # same bytes, different layout
    assert corpus_hash(d) != hd
    with pytest.raises(ValueError, match="pass a list"):
        corpus_hash("just some text, not a path")
    with pytest.raises(TypeError, match="strings"):
        corpus_hash(["a", 3])  # type: ignore[list-item]


# --------------------------------------------------------------------------- stats cache
class _Counter:
    def __init__(self, stats: dict[str, torch.Tensor]) -> None:
        self.calls = 0
        self.stats = stats

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {k: v.clone() for k, v in self.stats.items()}


def _stats() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    k = torch.randn(50, 4, generator=g, dtype=torch.float64)
    return {"layer.3": k.T @ k / 50, "layer.4": torch.eye(6, dtype=torch.float64)}


KEY = {"model": "abc123", "layers": [3, 4], "corpus": "deadbeef", "n_samples": 50, "dtype": "float64"}
SHAPES = {"layer.3": (4, 4), "layer.4": (6, 6)}


def test_cache_roundtrip(_isolated_cache) -> None:
    fn = _Counter(_stats())
    first = load_or_compute_stats(KEY, fn, expected_shapes=SHAPES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid cache hit must not warn
        second = load_or_compute_stats(dict(reversed(KEY.items())), fn, expected_shapes=SHAPES)
    assert fn.calls == 1
    for name, t in _stats().items():
        assert torch.equal(first[name], t) and torch.equal(second[name], t)
        assert second[name].dtype == torch.float64
    tensor_path, json_path = stats_cache_paths(KEY)
    assert tensor_path.parent == _isolated_cache / "stats" and tensor_path.is_file()
    assert json.loads(json_path.read_text())["key"]["n_samples"] == 50
    # Different key fields → a different entry.
    load_or_compute_stats({**KEY, "n_samples": 51}, fn)
    assert fn.calls == 2
    # refresh forces recomputation.
    load_or_compute_stats(KEY, fn, refresh=True)
    assert fn.calls == 3
    # No stray temporary files.
    assert not [p for p in tensor_path.parent.iterdir() if p.name.endswith(".tmp")]


def _corrupt_truncate(t: Path, j: Path) -> None:
    data = t.read_bytes()
    t.write_bytes(data[: len(data) - 17])


def _corrupt_garbage(t: Path, j: Path) -> None:
    t.write_bytes(os.urandom(t.stat().st_size))


def _corrupt_garbage_unchecked(t: Path, j: Path) -> None:
    """Garbage that also passes the checksum: the safetensors parser must catch it."""
    t.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64))
    _rehash(t, j)


def _corrupt_json(t: Path, j: Path) -> None:
    j.write_text('{"format": "dlmedit.stats", "key": ')


def _corrupt_missing_json(t: Path, j: Path) -> None:
    j.unlink()


def _rehash(t: Path, j: Path) -> None:
    import hashlib

    meta = json.loads(j.read_text())
    meta["sha256"] = hashlib.sha256(t.read_bytes()).hexdigest()
    j.write_text(json.dumps(meta))


def _corrupt_nan(t: Path, j: Path) -> None:
    from safetensors.torch import load_file, save_file

    stats = load_file(str(t))
    stats["layer.3"][0, 0] = float("nan")
    save_file(stats, str(t))
    _rehash(t, j)


def _corrupt_shape(t: Path, j: Path) -> None:
    from safetensors.torch import save_file

    stats = _stats()
    stats["layer.3"] = torch.eye(5, dtype=torch.float64)
    save_file(stats, str(t))
    meta = json.loads(j.read_text())
    meta["tensors"]["layer.3"]["shape"] = [5, 5]
    j.write_text(json.dumps(meta))
    _rehash(t, j)


def _corrupt_wrong_key(t: Path, j: Path) -> None:
    meta = json.loads(j.read_text())
    meta["key"]["n_samples"] = 7
    j.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_corrupt_truncate, "checksum"),
        (_corrupt_garbage, "checksum"),
        (_corrupt_garbage_unchecked, "cannot read"),
        (_corrupt_json, "not valid JSON"),
        (_corrupt_missing_json, "interrupted"),
        (_corrupt_nan, "NaN"),
        (_corrupt_shape, "expected"),
        (_corrupt_wrong_key, "different key"),
    ],
)
def test_corrupt_cache_is_recomputed(corrupt, reason: str) -> None:
    fn = _Counter(_stats())
    load_or_compute_stats(KEY, fn, expected_shapes=SHAPES)
    tensor_path, json_path = stats_cache_paths(KEY)
    corrupt(tensor_path, json_path)
    with pytest.warns(UserWarning, match=reason):
        again = load_or_compute_stats(KEY, fn, expected_shapes=SHAPES)
    assert fn.calls == 2
    for name, t in _stats().items():
        assert torch.equal(again[name], t)
    # The recomputed entry replaced the bad one and is served from cache next time.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_or_compute_stats(KEY, fn, expected_shapes=SHAPES)
    assert fn.calls == 2


def test_non_finite_computation_is_not_cached() -> None:
    bad = _Counter({"layer.3": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])})
    with pytest.raises(StatisticsError, match="Inf"):
        load_or_compute_stats(KEY, bad)
    tensor_path, json_path = stats_cache_paths(KEY)
    assert not tensor_path.exists() and not json_path.exists()
    with pytest.raises(ValueError, match="JSON-serialisable"):
        load_or_compute_stats({"model": object()}, bad)
    with pytest.raises(ValueError, match="unexpected statistics"):
        load_or_compute_stats(KEY, _Counter(_stats()), expected_shapes={"layer.3": (4, 4)})


def test_unwritable_cache_still_returns(tmp_path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dlmedit.edit.covariance.atomic_save_safetensors", fail)
    fn = _Counter(_stats())
    with pytest.warns(UserWarning, match="disk full"):
        out = load_or_compute_stats(KEY, fn)
    assert torch.equal(out["layer.4"], _stats()["layer.4"])


# --------------------------------------------------------------------------- cache.py
def test_cache_dir_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DLMEDIT_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a" and (tmp_path / "a").is_dir()
    assert cache_dir("stats") == tmp_path / "a" / "stats"
    monkeypatch.delenv("DLMEDIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(create=False) == tmp_path / "xdg" / "dlmedit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir(create=False) == tmp_path / "home" / ".cache" / "dlmedit"


def _no_tmp(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writes_leave_no_partial_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old contents")
    # An exception after half the data was written: destination keeps the old bytes.
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"new but incomp")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old contents" and _no_tmp(tmp_path)

    # A safetensors writer dying midway.
    from safetensors import torch as st_torch

    def dying_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError("no space left on device")

    monkeypatch.setattr(st_torch, "save_file", dying_save_file)
    st = tmp_path / "t.safetensors"
    with pytest.raises(OSError, match="no space"):
        atomic_save_safetensors(st, {"a": torch.ones(3)})
    assert not st.exists() and _no_tmp(tmp_path)
    monkeypatch.undo()

    # JSON that cannot be serialised never touches the file.
    js = tmp_path / "r.json"
    atomic_write_json(js, {"ok": 1})
    with pytest.raises(ValueError, match="cannot write"):
        atomic_write_json(js, {"score": float("nan")})
    assert json.loads(js.read_text()) == {"ok": 1} and _no_tmp(tmp_path)
    with pytest.raises(TypeError, match="bytes"):
        atomic_write_bytes(tmp_path / "x", "text")  # type: ignore[arg-type]


def test_atomic_save_safetensors_roundtrip(tmp_path) -> None:
    from safetensors import safe_open

    w = torch.randn(4, 3)
    path = atomic_save_safetensors(
        tmp_path / "sub" / "w.safetensors",
        {"w": w.T, "w_again": w, "view": w[1:]},  # non-contiguous and shared storage
        metadata={"kind": "test"},
    )
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"kind": "test"}
        assert torch.equal(f.get_tensor("w"), w.T) and torch.equal(f.get_tensor("view"), w[1:])
    with pytest.raises(ValueError, match="str to str"):
        atomic_save_safetensors(tmp_path / "m.safetensors", {"w": w}, metadata={"n": 1})  # type: ignore[dict-item]
    assert cache_mod.CACHE_ENV_VAR == "DLMEDIT_CACHE"

"""Tests for EditDelta: bit-exact apply/revert, composition, persistence, fingerprints."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from dlmedit.edit.delta import (
    DELTA_JSON,
    DELTA_TENSORS,
    EditDelta,
    model_fingerprint,
    to_param_layout,
    weight_matrix_view,
)
from dlmedit.edit.errors import DeltaFormatError, ModelMismatchError, RevertError
from dlmedit.edit.solves import rank_one_update


class TinyNet(nn.Module):
    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(11, 8)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 5)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many LMs
        self.to(dtype)


class Conv1D(nn.Module):
    """GPT-2 style: weight stored [d_in, d_out], y = x W + b."""

    def __init__(self, d_in: int, d_out: int, g: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out, generator=g))
        self.bias = nn.Parameter(torch.randn(d_out, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_bit_equal(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), f"{n} differs"


def _random_delta(model: nn.Module, g: torch.Generator, scale: float = 1.0) -> EditDelta:
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if torch.rand(1, generator=g).item() < 0.6] or names[:1]
    deltas = {}
    for n in chosen:
        p = model.get_parameter(n)
        mag = scale * 10 ** float(torch.empty(1).uniform_(-6, 1, generator=g))
        deltas[n] = (torch.randn(p.shape, generator=g) * mag).to(p.dtype)
    return EditDelta(deltas, method="random")


def test_apply_and_revert_single() -> None:
    model = TinyNet()
    snap = _snapshot(model)
    W = model.fc1.weight.detach().clone()
    d = torch.full_like(W, 0.1)
    handle = EditDelta({"fc1.weight": d}, method="test").apply(model)
    assert torch.equal(model.fc1.weight, W + d)
    assert torch.equal(model.fc2.weight, snap["fc2.weight"])
    handle.revert()
    _assert_bit_equal(model, snap)
    with pytest.raises(RevertError, match="already"):
        handle.revert()


def test_hundred_sequential_edits_revert_bit_exact() -> None:
    model = TinyNet(seed=1)
    snap = _snapshot(model)
    g = torch.Generator().manual_seed(0)
    deltas = [_random_delta(model, g) for _ in range(100)]
    handles = [d.apply(model) for d in deltas]
    # The weights really moved (and not back by accident).
    assert not torch.equal(model.fc1.weight, snap["fc1.weight"])
    for h in reversed(handles):
        h.revert()
    _assert_bit_equal(model, snap)

    # Same through the composed delta; it matches the sequential result up to rounding.
    composed = sum(deltas)
    assert isinstance(composed, EditDelta)
    assert len(composed.extra["composed_from"]) == 100
    handles = [d.apply(model) for d in deltas]
    sequential = _snapshot(model)
    for h in reversed(handles):
        h.revert()
    with composed.apply(model):
        for n, p in model.named_parameters():
            assert torch.allclose(p, sequential[n], rtol=1e-5, atol=1e-5), n
    _assert_bit_equal(model, snap)


def test_out_of_order_revert_is_refused_then_allowed_in_order() -> None:
    model = TinyNet()
    snap = _snapshot(model)
    a = EditDelta({"fc1.weight": torch.ones(6, 8) * 0.5}).apply(model)
    after_a = _snapshot(model)
    b = EditDelta({"fc1.weight": torch.ones(6, 8) * 0.25, "fc2.bias": torch.ones(5)}).apply(model)
    with pytest.raises(RevertError, match="Revert later edits first"):
        a.revert()
    b.revert()
    _assert_bit_equal(model, after_a)
    a.revert()  # now allowed: the weight is exactly what `a` left behind
    _assert_bit_equal(model, snap)


def test_revert_detects_foreign_in_place_change_and_force() -> None:
    model = TinyNet()
    snap = _snapshot(model)
    h = EditDelta({"fc2.weight": torch.ones(5, 6)}).apply(model)
    with torch.no_grad():
        model.fc2.weight.mul_(2.0)
    with pytest.raises(RevertError, match="modified after"):
        h.revert()
    h.revert(force=True)
    _assert_bit_equal(model, snap)


def test_context_manager_and_delta_revert() -> None:
    model = TinyNet()
    snap = _snapshot(model)
    delta = EditDelta({"fc1.bias": torch.ones(6)})
    with pytest.raises(RuntimeError, match="boom"), delta.apply(model):
        assert not torch.equal(model.fc1.bias, snap["fc1.bias"])
        raise RuntimeError("boom")
    _assert_bit_equal(model, snap)
    delta.apply(model)
    delta.revert(model)
    _assert_bit_equal(model, snap)
    with pytest.raises(RevertError, match="not currently applied"):
        delta.revert(model)


def test_low_precision_apply_revert() -> None:
    model = TinyNet(dtype=torch.bfloat16)
    snap = _snapshot(model)
    delta = EditDelta({"fc1.weight": torch.full((6, 8), 1e-3, dtype=torch.float32)})
    with delta.apply(model):
        expected = (snap["fc1.weight"].float() + 1e-3).to(torch.bfloat16)
        assert model.fc1.weight.dtype == torch.bfloat16
        assert torch.equal(model.fc1.weight, expected)
    _assert_bit_equal(model, snap)


def test_apply_validation() -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match=r"no parameter named 'fc9\.weight'"):
        EditDelta({"fc9.weight": torch.ones(2)}).apply(model)
    with pytest.raises(ValueError, match="transposed"):
        EditDelta({"fc1.weight": torch.ones(8, 6)}).apply(model)
    with pytest.raises(ValueError, match="same \\(tied\\) parameter"):
        EditDelta({"embed.weight": torch.ones(11, 8), "head.weight": torch.ones(11, 8)}).apply(model)
    with pytest.raises(TypeError, match="floating-point"):
        EditDelta({"fc1.bias": torch.ones(6, dtype=torch.long)})
    with pytest.raises(ValueError, match="JSON"):
        EditDelta({}, hparams={"f": object()})
    # A tied alias name resolves to the shared parameter.
    snap = _snapshot(model)
    with EditDelta({"head.weight": torch.ones(11, 8)}).apply(model):
        assert torch.equal(model.embed.weight, snap["embed.weight"] + 1)
    _assert_bit_equal(model, snap)


def test_compose_union_and_sum() -> None:
    a = EditDelta({"x": torch.ones(2), "y": torch.ones(3)}, method="rome", requests=[{"s": "a"}])
    b = EditDelta({"y": torch.full((3,), 2.0), "z": torch.zeros(1)}, method="memit", requests=[{"s": "b"}])
    c = a.compose(b)
    assert set(c.deltas) == {"x", "y", "z"}
    assert torch.equal(c.deltas["y"], torch.full((3,), 3.0))
    assert torch.equal(c.deltas["x"], torch.ones(2))
    assert c.method == "rome+memit"
    assert c.requests == [{"s": "a"}, {"s": "b"}]
    assert [comp["method"] for comp in c.extra["composed_from"]] == ["rome", "memit"]
    # Composition does not alias the inputs.
    c.deltas["x"].add_(1)
    assert torch.equal(a.deltas["x"], torch.ones(2))
    with pytest.raises(ValueError, match="shapes"):
        a.compose(EditDelta({"x": torch.ones(3)}))
    assert torch.equal(EditDelta.compose_all([a, a, a]).deltas["x"], torch.full((2,), 3.0))


def test_save_load_roundtrip_and_model_check(tmp_path) -> None:
    model = TinyNet(seed=3)
    delta = EditDelta.for_model(
        model,
        {"fc1.weight": torch.randn(6, 8), "fc2.bias": torch.randn(5, dtype=torch.float64)},
        method="rome",
        hparams={"layers": (1, 2), "lr": 0.5},
        requests=[{"subject": "Paris", "target_new": "Rome", "ids": (1, 2)}],
    )
    assert delta.hparams == {"layers": [1, 2], "lr": 0.5}  # canonical JSON form
    out = delta.save(tmp_path / "d")
    assert (out / DELTA_TENSORS).is_file() and (out / DELTA_JSON).is_file()
    loaded = EditDelta.load(out)
    assert loaded.metadata() == delta.metadata()
    for n, t in delta.deltas.items():
        assert torch.equal(loaded.deltas[n], t) and loaded.deltas[n].dtype == t.dtype
    snap = _snapshot(model)
    with loaded.apply(model):
        assert not torch.equal(model.fc1.weight, snap["fc1.weight"])
    _assert_bit_equal(model, snap)

    other = TinyNet(seed=4)
    with pytest.raises(ModelMismatchError) as info:
        loaded.apply(other)
    message = str(info.value)
    assert delta.model_hash in message and model_fingerprint(other) in message
    other_snap = _snapshot(other)
    with loaded.apply(other, check_model=False):
        pass
    _assert_bit_equal(other, other_snap)


def test_load_rejects_corrupt_or_partial(tmp_path) -> None:
    delta = EditDelta({"fc1.weight": torch.randn(6, 8)}, method="rome")
    d = delta.save(tmp_path / "d")
    # Truncated tensor file.
    data = (d / DELTA_TENSORS).read_bytes()
    (d / DELTA_TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(DeltaFormatError, match="checksum"):
        EditDelta.load(d)
    # Without the checksum, the safetensors parser still rejects it.
    meta = json.loads((d / DELTA_JSON).read_text())
    del meta["tensors_sha256"]
    (d / DELTA_JSON).write_text(json.dumps(meta))
    with pytest.raises(DeltaFormatError, match="cannot read"):
        EditDelta.load(d)
    # Garbage JSON, missing JSON.
    (d / DELTA_JSON).write_text("{not json")
    with pytest.raises(DeltaFormatError, match="not valid JSON"):
        EditDelta.load(d)
    (d / DELTA_JSON).unlink()
    with pytest.raises(DeltaFormatError, match="not a saved EditDelta"):
        EditDelta.load(d)


def test_conv1d_layout_with_rank_one_update() -> None:
    g = torch.Generator().manual_seed(5)
    d_in, d_out = 7, 4
    layer = nn.Sequential()
    layer.add_module("c_proj", Conv1D(d_in, d_out, g))
    k = torch.randn(d_in, generator=g)
    v_star = torch.randn(d_out, generator=g)
    W = weight_matrix_view(layer.c_proj.weight.detach(), transposed=True)  # [d_out, d_in] view
    assert W.shape == (d_out, d_in)
    assert W.data_ptr() == layer.c_proj.weight.data_ptr()
    # The solve works on the linear map x ↦ W x, so the bias is part of the target.
    target = v_star - layer.c_proj.bias.detach()
    delta = EditDelta({}, method="rome")
    delta.add_matrix("c_proj.weight", rank_one_update(W, k, target), transposed=True)
    assert delta.deltas["c_proj.weight"].shape == (d_in, d_out)
    with delta.apply(layer):
        assert torch.allclose(layer.c_proj(k), v_star, atol=1e-5)
    # add_matrix accumulates; to_param_layout is the plain transpose.
    m = torch.randn(d_out, d_in, generator=g)
    delta.add_matrix("c_proj.weight", m, transposed=True)
    assert torch.equal(to_param_layout(m, transposed=True), m.T.contiguous())
    with pytest.raises(ValueError, match="2-D"):
        weight_matrix_view(torch.ones(3), transposed=False)


def test_fingerprint_stable_sensitive_and_fast() -> None:
    a, b = TinyNet(seed=0), TinyNet(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(TinyNet(seed=1))
    assert model_fingerprint(a) != model_fingerprint(TinyNet(seed=0, dtype=torch.float64))
    with EditDelta({"fc2.weight": torch.full((5, 6), 1e-3)}).apply(a):
        assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(b)
    # ~30M parameters: reading samples, not all values.  One tensor exceeds 2**24
    # elements, where float index arithmetic would run past the end.
    big = nn.ModuleList([nn.Linear(4200, 4200, bias=False)] + [nn.Linear(2500, 2500, bias=False) for _ in range(2)])
    for m in big:
        nn.init.zeros_(m.weight)
    start = time.perf_counter()
    h_big = model_fingerprint(big)
    assert time.perf_counter() - start < 0.5
    with torch.no_grad():
        big[0].weight[-1, -1] = 1.0  # the last element is always sampled
    assert model_fingerprint(big) != h_big


def test_failed_apply_leaves_no_partial_edit(monkeypatch) -> None:
    import dlmedit.edit.delta as delta_mod

    model = TinyNet()
    snap = _snapshot(model)
    real_add = delta_mod._add
    calls = {"n": 0}

    def flaky_add(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated out of memory")
        return real_add(*args, **kwargs)

    monkeypatch.setattr(delta_mod, "_add", flaky_add)
    delta = EditDelta({"fc1.weight": torch.ones(6, 8), "fc2.weight": torch.ones(5, 6)})
    with pytest.raises(MemoryError):
        delta.apply(model)
    _assert_bit_equal(model, snap)
    with pytest.raises(RevertError, match="not currently applied"):
        delta.revert(model)

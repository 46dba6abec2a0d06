"""Twin training: tiny runs produce loadable checkpoints, resume exactly, and the
ARM and MDM configs differ only in the paradigm fields."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dlmedit.data.world import build_world
from dlmedit.train.twins import (
    PARADIGM_FIELDS,
    TwinRecipe,
    load_twin,
    recall,
    recall_items,
    train_twin,
)

TINY = TwinRecipe(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, batch_size=8,
                  lr=3e-3, warmup_steps=2)
ROWS = 16


def _losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("paradigm", ["arm", "mdm"])
def test_few_steps_learn_and_load(tmp_path, paradigm) -> None:
    out = train_twin(paradigm, tmp_path / paradigm, steps=40, seed=0, recipe=TINY, save_every=10,
                     max_rows=ROWS, progress=False, n_threads=1)
    losses = _losses(out)
    assert losses[-1] < losses[0] * 0.8, losses
    model, tok = load_twin(out)
    cfg = model.config
    assert cfg.dlmedit_paradigm == ("arm" if paradigm == "arm" else "mdm")
    assert cfg.mask_token_id == tok.mask_token_id
    assert cfg.logit_shift == (1 if paradigm == "arm" else 0)
    assert cfg.is_causal == (paradigm == "arm")
    assert cfg.dlmedit_twin["role"] == paradigm and cfg.dlmedit_twin["steps"] == 40
    # the MDM twin really attends bidirectionally: an early logit depends on a later token
    ids = torch.tensor([[tok.bos_token_id, 10, 11, 12, 13]])
    changed = ids.clone()
    changed[0, 4] = 14
    diff = (model(input_ids=ids).logits[0, 1] - model(input_ids=changed).logits[0, 1]).abs().max()
    assert (diff > 0) == (paradigm == "mdm")
    # recall runs end to end by generation
    items = recall_items(build_world(0), max_facts=3)
    res = recall(model, tok, items, paradigm=cfg.dlmedit_paradigm, window=7, logit_shift=cfg.logit_shift)
    assert res["n"] == len(items) and 0.0 <= res["acc"] <= 1.0


def test_resume_continues_exactly(tmp_path) -> None:
    kw = dict(steps=6, seed=1, recipe=TINY, save_every=100, max_rows=ROWS, progress=False, n_threads=1)
    straight = train_twin("mdm", tmp_path / "straight", **kw)
    train_twin("mdm", tmp_path / "resumed", stop_after=3, **kw)
    state = json.loads((tmp_path / "resumed" / "state" / "state.json").read_text())
    assert state["step"] == 3
    resumed = train_twin("mdm", tmp_path / "resumed", **kw)
    assert json.loads((resumed / "state" / "state.json").read_text())["step"] == 6
    a = load_file(str(straight / "state" / "model.safetensors"))
    b = load_file(str(resumed / "state" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_arm_and_mdm_configs_differ_only_in_paradigm_fields(tmp_path) -> None:
    kw = dict(steps=2, seed=0, recipe=TINY, save_every=100, max_rows=ROWS, progress=False, n_threads=1)
    arm = json.loads((train_twin("arm", tmp_path / "a", **kw) / "config.json").read_text())
    mdm = json.loads((train_twin("mdm", tmp_path / "m", **kw) / "config.json").read_text())
    differing = {k for k in set(arm) | set(mdm) if arm.get(k) != mdm.get(k)}
    assert differing <= set(PARADIGM_FIELDS), differing
    assert {"dlmedit_paradigm", "logit_shift", "is_causal"} <= differing


def test_dream_needs_an_arm_and_keeps_the_shift(tmp_path) -> None:
    with pytest.raises(ValueError, match="init_from"):
        train_twin("dream", tmp_path / "d", steps=1)
    kw = dict(seed=0, recipe=TINY, save_every=100, max_rows=ROWS, progress=False, n_threads=1)
    arm = train_twin("arm", tmp_path / "a", steps=2, **kw)
    dream = train_twin("dream", tmp_path / "d", steps=2, init_from=arm, **kw)
    model, _ = load_twin(dream)
    assert model.config.logit_shift == 1 and model.config.is_causal is False
    assert model.config.dlmedit_paradigm == "mdm" and model.config.dlmedit_twin["role"] == "dream"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        train_twin("gpt", "/tmp/never", steps=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        train_twin("arm", "/tmp/never", steps=0)


class _Recorder(torch.nn.Module):
    """Stands in for a model: records the noisy input, returns uniform logits."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.seen: torch.Tensor | None = None

    def forward(self, input_ids, attention_mask):
        self.seen = input_ids.clone()
        logits = torch.zeros(*input_ids.shape, self.vocab, requires_grad=True)
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("sampling", ["count", "bernoulli"])
def test_mdm_masking_rules(sampling) -> None:
    from dlmedit.train.twins import _mdm_loss

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 20, (64, 12))
    attn = torch.ones_like(ids)
    attn[:8, 10:] = 0
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 6:] = attn[:, 6:].bool()
    model = _Recorder(20)
    batch = {"input_ids": ids, "attention_mask": attn, "answer_mask": answer}
    loss = _mdm_loss(model, batch, g, 3, 0, answer_only_share=1.0, eps=1e-3, mask_sampling=sampling)
    masked = model.seen == 3
    assert not masked[:, 0].any() and not masked[:, :6].any()  # BOS and prompt never masked
    assert not masked[attn == 0].any()
    if sampling == "count":  # per row: mean CE over the masked tokens, here log(vocab) exactly
        assert torch.isclose(loss, torch.log(torch.tensor(20.0)), rtol=1e-5)
    # full_answer_share=1 on answer-only rows masks the whole answer window
    _mdm_loss(model, batch, g, 3, 0, answer_only_share=1.0, eps=1e-3, full_answer_share=1.0)
    assert torch.equal(model.seen == 3, answer)
    # without answer-only rows the prompt gets masked too (never BOS)
    _mdm_loss(model, batch, g, 3, 0, answer_only_share=0.0, eps=1e-3, mask_sampling=sampling)
    assert (model.seen[:, 1:6] == 3).any() and not (model.seen[:, 0] == 3).any()
    with pytest.raises(ValueError):
        _mdm_loss(model, batch, g, 3, 0, 0.5, 1e-3, mask_sampling="nope")

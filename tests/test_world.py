"""The built-in fact world: determinism, length buckets, templates, splits, exports."""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache

import pytest

from dlmedit.data.tokenizer import SPECIAL_TOKENS, build_world_tokenizer, save_tokenizer
from dlmedit.data.world import (
    World,
    build_world,
    counterfact_records,
    export_world,
    length_bucket,
    tofu_rows,
)


@lru_cache(maxsize=1)
def _world() -> World:
    return build_world(0)


@lru_cache(maxsize=1)
def _tok():
    return build_world_tokenizer(0)


def test_same_seed_same_world_and_other_seed_differs() -> None:
    a, b = build_world(0), build_world(0)
    assert a.facts == b.facts and a.subjects == b.subjects and a.splits == b.splits
    assert [(r.prompt, r.target) for r in a.training_rows()] == [(r.prompt, r.target) for r in b.training_rows()]
    assert a.data_hash() == b.data_hash()
    c = build_world(1)
    assert c.subjects != a.subjects
    assert c.data_hash() != a.data_hash()


def test_world_size_and_multi_token_subjects() -> None:
    w = _world()
    tok = _tok()
    assert len(w.subjects) >= 200 and len(set(w.subjects)) == len(w.subjects)
    assert len(w.relations) >= 5
    for rel in w.relations.values():
        assert len(rel.train_templates) >= 4 and len(rel.heldout_templates) >= 2
    assert all(len(tok(" " + s)["input_ids"]) >= 2 for s in w.subjects)


def test_target_length_buckets_under_trained_tokenizer() -> None:
    """Each of 1/2/3/4+ tokens holds ≥15 % of facts; nominal length = real token length."""
    w, tok = _world(), _tok()
    for rel in w.relations.values():
        for obj in rel.objects:
            assert len(tok(" " + obj)["input_ids"]) == len(obj.split()), obj
    shares = Counter(length_bucket(len(tok(" " + f.target_true)["input_ids"])) for f in w.facts)
    for bucket in ("1", "2", "3", "4+"):
        assert shares[bucket] / len(w.facts) >= 0.15, (bucket, shares)
    # counterfactual targets: same length bucket always, same token length almost always
    same = 0
    for f in w.facts:
        assert f.target_new != f.target_true
        assert f.target_new in w.relations[f.relation_id].objects
        n_new = len(tok(" " + f.target_new)["input_ids"])
        n_true = len(tok(" " + f.target_true)["input_ids"])
        assert length_bucket(n_new) == length_bucket(n_true)
        same += n_new == n_true
    assert same / len(w.facts) >= 0.95


def test_heldout_templates_never_trained() -> None:
    w = _world()
    trained = {r.prompt for r in w.training_rows()}
    for f in w.facts[:200]:
        for tpl in w.relations[f.relation_id].heldout_templates:
            assert tpl.format(f.subject) not in trained
    for rel in w.relations.values():
        assert not set(rel.train_templates) & set(rel.heldout_templates)


def test_neighbourhood_prompts_use_other_subjects_with_same_object() -> None:
    w = _world()
    recs = counterfact_records(w)
    subj_of_prompt = {}
    for f in w.facts:
        tpl = w.relations[f.relation_id].train_templates[0]
        subj_of_prompt[(f.relation_id, tpl.format(f.subject))] = f
    for rec in recs[:300]:
        rw = rec["requested_rewrite"]
        assert rec["neighborhood_prompts"], rec["case_id"]
        for p in rec["neighborhood_prompts"]:
            other = subj_of_prompt[(rw["relation_id"], p)]
            assert other.subject != rw["subject"]
            assert other.target_true == rw["target_true"]["str"]


def test_splits_nested_and_disjoint_from_retain() -> None:
    w = _world()
    s = w.splits
    n = len(w.subjects)
    assert len(s["forget01"]) == round(0.01 * n) and len(s["forget10"]) == round(0.10 * n)
    assert set(s["forget01"]) <= set(s["forget05"]) <= set(s["forget10"])
    assert not set(s["forget10"]) & set(s["retain"])
    assert set(s["forget10"]) | set(s["retain"]) == set(w.subjects)
    excluded = w.training_rows(exclude_subjects=set(s["forget10"]))
    assert not {r.subject for r in excluded} & set(s["forget10"])


def test_exports_parse(tmp_path) -> None:
    w = _world()
    paths = export_world(w, tmp_path)
    cf = json.loads(paths["counterfact.json"].read_text())
    assert len(cf) == len(w.facts)
    rec = cf[0]
    rw = rec["requested_rewrite"]
    assert "{}" in rw["prompt"] and rw["subject"] and rw["relation_id"]
    assert set(rw["target_new"]) == {"str", "id"} and set(rw["target_true"]) == {"str", "id"}
    assert rec["paraphrase_prompts"] and rec["generation_prompts"]
    for split in ("forget01", "forget05", "forget10", "retain", "utility"):
        rows = [json.loads(x) for x in (tmp_path / "tofu" / f"{split}.jsonl").read_text().splitlines()]
        assert rows and all({"question", "answer", "subject"} <= set(r) for r in rows)
    assert len(tofu_rows(w)["forget01"]) == len(w.splits["forget01"]) * len(w.relations)
    tpl = json.loads(paths["templates.json"].read_text())
    assert set(tpl) == set(w.relations) and all(v["heldout"] for v in tpl.values())


def test_tokenizer_saves_with_special_tokens(tmp_path) -> None:
    from transformers import PreTrainedTokenizerFast

    save_tokenizer(_tok(), tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for name, text in SPECIAL_TOKENS.items():
        assert getattr(tok, name) == text
    assert tok.mask_token_id is not None and tok.bos_token_id != tok.eos_token_id
    assert tok.decode(tok(" Tesk Harbor")["input_ids"]) == " Tesk Harbor"
    assert 1000 <= len(tok) <= 4096


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError):
        build_world(0, n_subjects=5)
    with pytest.raises(ValueError):
        length_bucket(0)

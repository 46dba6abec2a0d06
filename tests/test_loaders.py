"""Loaders: every published format on its sample file, the spec parser, and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlmedit.data.loaders import (
    DatasetError,
    DatasetNotFoundError,
    load_counterfact,
    load_dataset,
    load_kamel,
    load_tofu,
    load_zsre,
    split_from_filename,
)
from dlmedit.data.records import EditRecord, EditRequest, ForgetRecord, InvalidRecordError, Probe
from dlmedit.errors import DlmeditError

SAMPLES = Path(__file__).resolve().parents[1] / "dlmedit" / "data" / "samples"
CF = SAMPLES / "counterfact_sample.json"
ZSRE = SAMPLES / "zsre_sample.json"
KAMEL = SAMPLES / "kamel_sample.jsonl"
TOFU = SAMPLES / "tofu_forget_sample.json"


def _write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- records


def test_edit_request_fills_template_and_validates():
    req = EditRequest("The capital of {} is", "France", "Rome", "Paris", case_id=3, relation_id="P36")
    assert req.prompt == "The capital of France is"
    with pytest.raises(InvalidRecordError, match="exactly once"):
        EditRequest("The capital of France is", "France", "Rome", "Paris")
    with pytest.raises(InvalidRecordError, match="exactly once"):
        EditRequest("{} and {}", "France", "Rome", "Paris")
    with pytest.raises(InvalidRecordError, match="subject is empty"):
        EditRequest("The capital of {} is", " ", "Rome", "Paris")
    with pytest.raises(InvalidRecordError, match="target_new is empty"):
        EditRequest("The capital of {} is", "France", "  ", "Paris")
    with pytest.raises(InvalidRecordError, match="target_new equals target_true"):
        EditRequest("The capital of {} is", "France", " Paris", "Paris")
    # Braces elsewhere in the prompt are text, not format fields.
    assert EditRequest("{} said {x}", "Ann", "yes").prompt == "Ann said {x}"


def test_record_errors_are_dlmedit_value_errors():
    with pytest.raises(DlmeditError):
        Probe("", "x")
    with pytest.raises(ValueError, match="tuple"):
        EditRecord(EditRequest("{} is", "A", "b"), paraphrase_prompts=["not a tuple"])  # type: ignore[arg-type]
    with pytest.raises(InvalidRecordError, match="question is empty"):
        ForgetRecord(question="", answer="a", split="forget01")


# ----------------------------------------------------------------------------- CounterFact


def test_counterfact_sample():
    records = load_counterfact(CF)
    assert len(records) == 4
    first = records[0]
    assert first.source == "counterfact"
    assert first.request.prompt == "The Eiffel Tower is located in the city of"
    assert (first.request.target_new, first.request.target_true) == ("Rome", "Paris")
    assert first.request.relation_id == "P131" and first.case_id == 0
    assert len(first.paraphrase_prompts) == 2
    assert first.neighborhood[0] == Probe("The Louvre is located in the city of", "Paris")
    assert all(p.answer == "Paris" for p in first.neighborhood)
    assert len(first.attribute_prompts) == 2 and len(first.generation_prompts) == 3
    assert first.meta == {"pararel_idx": 101, "target_new_id": "Q220", "target_true_id": "Q90"}
    # multi-token targets survive untouched
    assert records[2].request.target_new == "Dennis MacAlistair Ritchie"
    assert records[3].request.target_true == "Toyota City"


def test_counterfact_via_spec_and_limit():
    assert [r.case_id for r in load_dataset(f"counterfact:{CF}", limit=2)] == [0, 1]
    assert len(load_dataset(f"counterfact:{CF}", limit=100)) == 4
    mcf = load_dataset(f"mcf:{CF}")
    assert all(r.source == "mcf" for r in mcf)


def test_counterfact_jsonl_is_accepted(tmp_path):
    rows = json.loads(CF.read_text(encoding="utf-8"))
    path = _write_jsonl(tmp_path / "cf.jsonl", rows)
    assert [r.request for r in load_counterfact(path)] == [r.request for r in load_counterfact(CF)]


def test_counterfact_malformed_record_names_file_and_index(tmp_path):
    rows = json.loads(CF.read_text(encoding="utf-8"))
    del rows[2]["requested_rewrite"]["subject"]
    path = _write_json(tmp_path / "bad.json", rows)
    with pytest.raises(DatasetError, match=r"bad\.json: record 2: missing key 'subject'"):
        load_counterfact(path)
    rows = json.loads(CF.read_text(encoding="utf-8"))
    rows[1]["requested_rewrite"]["target_new"] = "English"  # a string, not {"str": ...}
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError, match=r"bad\.jsonl: line 2: 'target_new' must be an object"):
        load_counterfact(path)
    rows = json.loads(CF.read_text(encoding="utf-8"))
    rows[3]["requested_rewrite"]["prompt"] = "The headquarters of Toyota are in"
    path = _write_json(tmp_path / "noslot.json", rows)
    with pytest.raises(DatasetError, match=r"noslot\.json: record 3: prompt template must contain"):
        load_counterfact(path)


def test_format_mismatch_is_detected_by_keys():
    with pytest.raises(DatasetError, match=r"looks like a zsre file, not counterfact.*'zsre:"):
        load_dataset(f"counterfact:{ZSRE}")
    with pytest.raises(DatasetError, match="looks like a counterfact file, not zsre"):
        load_dataset(f"zsre:{CF}")
    with pytest.raises(DatasetError, match="looks like a tofu file, not kamel"):
        load_dataset(f"kamel:{TOFU}")
    with pytest.raises(DatasetError, match="looks like a kamel file, not tofu"):
        load_dataset(f"tofu:{KAMEL}")


# ----------------------------------------------------------------------------- zsRE


def test_zsre_sample():
    records = load_zsre(ZSRE)
    assert len(records) == 3
    r0 = records[0]
    assert r0.source == "zsre"
    assert r0.request.template == "Which university did {} attend?"
    assert r0.request.prompt == "Which university did Marie Curie attend?"
    assert r0.request.target_new == "University of Bologna" and r0.request.target_true is None
    assert r0.true_answers == ("University of Paris", "Sorbonne")
    assert r0.paraphrase_prompts == ("At which university did Marie Curie study?",)
    assert r0.locality == (Probe("nq question: who wrote the novel the old man and the sea", "Ernest Hemingway"),)
    assert r0.meta["pred"] == "University of Paris"
    # subject matched case-insensitively; the prompt equals src exactly
    r1 = records[1]
    assert r1.request.subject == "River Danube"
    assert r1.request.prompt == "Which sea does the River Danube flow into?"
    assert r1.meta["subject_as_given"] == "river Danube"
    assert r1.portability[0].prompt.startswith("Which countries border")
    assert records[2].portability == ()


def test_zsre_subject_absent_is_an_error(tmp_path):
    rows = json.loads(ZSRE.read_text(encoding="utf-8"))
    rows[1]["subject"] = "Rhine"
    path = _write_json(tmp_path / "z.json", rows)
    with pytest.raises(DatasetError, match=r"z\.json: record 1: subject 'Rhine' does not occur in src"):
        load_zsre(path)


# ----------------------------------------------------------------------------- KAMEL


def test_kamel_sample():
    records = load_kamel(KAMEL)
    assert len(records) == 7 and all(r.source == "kamel" for r in records)
    eiffel = records[0]
    assert eiffel.request.template == "{} was born in"  # "[S] was born in [Y]." normalised
    assert eiffel.request.target_true == "Dijon"
    assert eiffel.paraphrase_prompts == ("The birthplace of Gustave Eiffel is",)
    assert eiffel.neighborhood == (Probe("Jean-Philippe Rameau was born in", "Dijon"),)
    assert eiffel.case_id == "P19_0" and eiffel.request.relation_id == "P19"
    assert eiffel.meta["rel_label"] == "place of birth"
    # explicit target_new kept; drawn ones come from the same relation and differ from the truth
    saint_saens = records[3]
    assert saint_saens.request.target_new == "Marseille" and saint_saens.meta["target_new_drawn"] is False
    assert saint_saens.true_answers == ("Paris", "City of Light")
    for r in records:
        assert r.request.target_new not in r.true_answers
    pools = {
        "P19": {"Dijon", "La Côte-Saint-André", "Paris", "Marseille"},
        "P36": {"Ulaanbaatar", "Ouagadougou", "Sri Jayawardenepura Kotte"},
    }
    for r in records:
        assert r.request.target_new in pools[r.request.relation_id]
    assert any(len(r.request.target_new.split()) > 1 for r in records)  # multi-token objects
    rameau = records[2]
    assert rameau.true_answers == ("Dijon", "Divio")


def test_kamel_draws_are_seeded():
    a = [r.request.target_new for r in load_dataset(f"kamel:{KAMEL}", seed=0)]
    b = [r.request.target_new for r in load_dataset(f"kamel:{KAMEL}", seed=0)]
    assert a == b
    # `limit` keeps the first records without changing their draws
    assert [r.request.target_new for r in load_dataset(f"kamel:{KAMEL}", limit=3, seed=0)] == a[:3]
    others = {tuple(r.request.target_new for r in load_kamel(KAMEL, seed=s)) for s in range(1, 12)}
    assert len(others | {tuple(a)}) > 1


def test_kamel_templates_sidecar_and_errors(tmp_path):
    rows = [
        {"sub_label": "Mali", "rel_uri": "P36", "obj_labels": ["Bamako"]},
        {"sub_label": "Chad", "rel_uri": "P36", "obj_labels": ["N'Djamena"]},
    ]
    path = _write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(DatasetError, match=r"test\.jsonl: line 1: no template for relation 'P36'"):
        load_kamel(path)
    _write_json(tmp_path / "templates.json", {"P36": ["The capital of [S] is [Y] .", "[S]'s capital is"]})
    records = load_kamel(path)
    assert records[0].request.prompt == "The capital of Mali is"
    assert records[0].paraphrase_prompts == ("Mali's capital is",)
    assert records[0].request.target_new == "N'Djamena" and records[1].request.target_new == "Bamako"
    bad = _write_jsonl(tmp_path / "mid.jsonl", [{**rows[0], "template": "[Y] is the capital of [S]"}])
    with pytest.raises(DatasetError, match=r"mid\.jsonl: line 1: object slot \[Y\] must end"):
        load_kamel(bad)
    lonely = _write_jsonl(tmp_path / "one.jsonl", [{**rows[0], "template": "The capital of {} is"}])
    with pytest.raises(DatasetError, match="no other object of relation 'P36'"):
        load_kamel(lonely)


# ----------------------------------------------------------------------------- TOFU


def test_tofu_sample():
    records = load_tofu(TOFU, split="forget01")
    assert len(records) == 4 and all(r.split == "forget01" for r in records)
    r0 = records[0]
    assert r0.subject == "Oriel Vantassen"
    assert r0.paraphrased_answer.startswith("The writer Oriel Vantassen")
    assert len(r0.perturbed_answers) == 3
    assert r0.paraphrased_question is not None
    assert records[3].perturbed_answers == () and records[3].paraphrased_answer is None
    # split taken from the spec suffix or from the file name
    assert load_dataset(f"tofu:{TOFU}#forget05")[0].split == "forget05"
    assert load_dataset(f"tofu:{TOFU}")[0].split == "tofu_forget_sample"


def test_tofu_split_from_filename_and_json_list(tmp_path):
    assert split_from_filename("data/forget10_perturbed.json") == "forget10"
    assert split_from_filename("retain90.jsonl") == "retain90"
    path = _write_json(tmp_path / "forget05_perturbed.json", [{"question": "Q?", "answer": "A."}])
    (record,) = load_dataset(f"tofu:{path}")
    assert record.split == "forget05" and record.subject is None
    bad = _write_json(tmp_path / "forget01.json", [{"question": "Q?", "answer": "A."}, {"question": "Q2?"}])
    with pytest.raises(DatasetError, match=r"forget01\.json: record 1: missing key 'answer'"):
        load_tofu(bad)


# ----------------------------------------------------------------------------- world


def test_world_specs():
    edits = load_dataset("world", limit=5)
    assert len(edits) == 5 and all(isinstance(r, EditRecord) and r.source == "world" for r in edits)
    assert all(r.neighborhood and r.paraphrase_prompts for r in edits)
    forget = load_dataset("world:forget01")
    assert forget and all(isinstance(r, ForgetRecord) and r.split == "forget01" for r in forget)
    assert any(r.perturbed_answers for r in forget)
    assert load_dataset("world:utility")[0].split == "utility"
    assert [r.request for r in load_dataset("world", limit=5, seed=0)] == [r.request for r in edits]
    with pytest.raises(DatasetError, match="unknown world part 'forget99'"):
        load_dataset("world:forget99")


def test_world_exports_load_as_ordinary_files(tmp_path):
    from dlmedit.data import world

    paths = world.export_world(world.build_world(0), tmp_path)
    cf = load_dataset(f"counterfact:{paths['counterfact.json']}")
    assert [r.request for r in cf] == [r.request for r in load_dataset("world")]
    tofu = load_dataset(f"tofu:{paths['tofu/forget05.jsonl']}")
    assert [r.question for r in tofu] == [r.question for r in load_dataset("world:forget05")]
    assert all(r.split == "forget05" for r in tofu)


# ----------------------------------------------------------------------------- spec and file errors


def test_spec_and_file_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found"):
        load_dataset(f"counterfact:{tmp_path / 'nope.json'}")
    with pytest.raises(FileNotFoundError):
        load_dataset(f"zsre:{tmp_path / 'nope.json'}")
    with pytest.raises(DatasetError, match="unknown dataset kind 'lama'"):
        load_dataset(f"lama:{CF}")
    with pytest.raises(DatasetError, match="names no file"):
        load_dataset("counterfact")
    with pytest.raises(DatasetError, match="spec is empty"):
        load_dataset("  ")
    for bad_limit in (0, -3):
        with pytest.raises(DatasetError, match="limit must be a positive integer"):
            load_dataset(f"counterfact:{CF}", limit=bad_limit)
    with pytest.raises(DatasetError, match="limit"):
        load_counterfact(CF, limit=0)
    empty = _write_json(tmp_path / "empty.json", [])
    with pytest.raises(DatasetError, match=r"empty\.json: dataset is empty"):
        load_dataset(f"counterfact:{empty}")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="dataset is empty"):
        load_dataset(f"tofu:{blank}")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Q", "answer": "A"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_dataset(f"tofu:{broken}")
    scalars = _write_json(tmp_path / "scalars.json", [1, 2])
    with pytest.raises(DatasetError, match=r"scalars\.json: record 0: expected a JSON object"):
        load_dataset(f"tofu:{scalars}")
    with pytest.raises(DatasetError, match="not a file"):
        load_dataset(f"tofu:{tmp_path}")

"""Capital-city facts from countryinfo: filtering, record shape and the "known by the model" selection."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from dlmedit.data import capitals
from dlmedit.data.capitals import PARAPHRASES, TEMPLATE, capital_pairs, capital_records, known_pairs
from dlmedit.data.records import EditRecord


def test_pairs_are_filtered_deduplicated_and_seeded() -> None:
    pairs = capital_pairs(seed=0)
    assert len(pairs) > 150
    assert capital_pairs(seed=0) == pairs
    other = capital_pairs(seed=1)
    assert sorted(other) == sorted(pairs) and other != pairs
    names = [n for n, _ in pairs]
    caps = [c.lower() for _, c in pairs]
    assert len(set(names)) == len(names) and len(set(caps)) == len(caps)
    for name, cap in pairs:
        assert isinstance(cap, str) and cap and len(name) <= 20 and len(cap) <= 20
        assert name.lower() not in cap.lower() and cap.lower() not in name.lower()
        assert not any(ch in name + cap for ch in ",()/")
    assert ("France", "Paris") in pairs and ("Japan", "Tokyo") in pairs
    for copyable in ("Monaco", "Mexico", "Singapore", "Guatemala"):  # the answer is in the prompt
        assert copyable not in names
    assert "the Bahamas" in names  # leading "The" lower-cased for mid-sentence use


def test_records_rotate_targets_and_draw_disjoint_neighbours() -> None:
    pairs = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Chile", "Santiago"), ("Egypt", "Cairo"), ("Nepal", "Kathmandu")]
    records = capital_records(pairs, 3, seed=0, n_neighbours=2)
    assert len(records) == 3 and all(isinstance(r, EditRecord) for r in records)
    assert [r.request.subject for r in records] == ["France", "Japan", "Kenya"]
    assert [r.request.target_true for r in records] == ["Paris", "Tokyo", "Nairobi"]
    assert [r.request.target_new for r in records] == ["Tokyo", "Nairobi", "Paris"]
    assert [r.case_id for r in records] == [0, 1, 2]
    pool = {TEMPLATE.format(n): c for n, c in pairs[3:7]}
    for r in records:
        assert r.request.prompt == f"The capital of {r.request.subject} is"
        assert r.paraphrase_prompts == tuple(p.format(r.request.subject) for p in PARAPHRASES)
        assert len(r.neighborhood) == 2 and len({p.prompt for p in r.neighborhood}) == 2
        for probe in r.neighborhood:  # a neighbour is never an edited country, and keeps its own capital
            assert pool[probe.prompt] == probe.answer
    assert capital_records(pairs, 3, seed=0, n_neighbours=2) == records
    assert [r.neighborhood for r in capital_records(pairs, 3, seed=5, n_neighbours=2)] != [r.neighborhood for r in records]


def test_record_errors_name_the_problem() -> None:
    pairs = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi")]
    with pytest.raises(ValueError, match="n must be ≥ 2"):
        capital_records(pairs, 1)
    with pytest.raises(ValueError, match=r"need 7 distinct countries, but only 3 are given"):
        capital_records(pairs, 3, n_neighbours=2)


class FakeLM:
    """Answers with the capital for the countries it 'knows' and with filler otherwise; records its calls."""

    def __init__(self, knows: set[str]) -> None:
        self.knows = knows
        self.calls: list[tuple[int, int]] = []

    def encode_target(self, prompt: str, target: str) -> list[int]:
        return list(range(len(target.split())))

    def generate(self, prompts, max_new_tokens):
        self.calls.append((len(prompts), max_new_tokens))
        texts = []
        for p in prompts:
            country = p.removeprefix("The capital of ").removesuffix(" is")
            texts.append(f" {CAPS[country]}, a city" if country in self.knows else " a large city in")
        return SimpleNamespace(texts=texts)


CAPS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
        "Egypt": "Cairo", "Nepal": "Kathmandu", "Laos": "Vientiane", "Fiji": "Suva", "Guatemala": "Guatemala City"}


def test_known_by_keeps_only_facts_the_model_generates() -> None:
    pairs = list(CAPS.items())
    lm = FakeLM({"Japan", "Peru", "Egypt", "Laos", "Fiji", "Guatemala"})
    assert known_pairs(lm, pairs, batch_size=4) == [("Japan", "Tokyo"), ("Peru", "Lima"), ("Egypt", "Cairo"),
                                                    ("Laos", "Vientiane"), ("Fiji", "Suva"),
                                                    ("Guatemala", "Guatemala City")]
    assert [n for n, _ in lm.calls] == [4, 4, 2] and all(t >= 4 for _, t in lm.calls)
    lm.calls.clear()
    records = capital_records(pairs, 2, seed=0, known_by=lm, n_neighbours=1, batch_size=3)
    assert [r.request.subject for r in records] == ["Japan", "Peru"]
    assert {p.prompt for r in records for p in r.neighborhood} <= {TEMPLATE.format(c) for c in ("Egypt", "Laos")}
    assert len(lm.calls) == 3  # stops once 2 records + a pool of 2 are known (the 4th batch is never generated)
    with pytest.raises(ValueError, match=r"only 6 are known to the model \(of 10 tried\)"):
        capital_records(pairs, 5, known_by=FakeLM(lm.knows), n_neighbours=1)


def test_long_capitals_get_enough_generation_room() -> None:
    class Long(FakeLM):
        def encode_target(self, prompt: str, target: str) -> list[int]:
            return [0] * 9 if target == "Kathmandu" else [0]

    lm = Long({"Nepal"})
    assert known_pairs(lm, [("Nepal", "Kathmandu"), ("Peru", "Lima")]) == [("Nepal", "Kathmandu")]
    assert lm.calls == [(2, 9)]


def test_missing_countryinfo_names_the_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "countryinfo", None)
    with pytest.raises(ImportError, match="countryinfo"):
        capitals.capital_pairs()

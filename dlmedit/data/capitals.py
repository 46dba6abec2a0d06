"""Real-world capital-city facts (from the ``countryinfo`` package) as CounterFact-style edit records.

Why one module: the editing benchmark, the tracing benchmark and the study's real-model
section all need the same real facts a pretrained model may know ("The capital of
France is" → "Paris"), and copies of the filtering drifted apart.  The facts come from
``countryinfo`` (offline, MIT) rather than CounterFact because no dataset download is
possible here; the records follow CounterFact's shape so every evaluation path
(``run_evaluation``, tracing) reads them unchanged.

Filtering (:func:`capital_pairs`) keeps facts a model can only answer by recall:

* the capital is one non-empty string (no lists, no "A / B / C" alternatives);
* names without commas or parentheses ("Virgin Islands, British", "Cocos (Keeling)
  Islands"): they are catalogue names no text uses;
* country and capital of at most ``max_chars`` characters (long official names are rare
  in text, and long capitals are many tokens);
* the capital does not contain the country's name nor the other way round (Monaco,
  Mexico City, Guinea-Bissau): those can be copied from the prompt;
* a leading "The" of a name is lower-cased ("The capital of the Gambia is");
* one country per capital (Serbia / Serbia and Montenegro both list Belgrade): a
  capital shared by two subjects would make a neighbourhood probe's true answer equal
  some record's new target.

Facts "the model knows" (ROME's selection): :func:`known_pairs` keeps the pairs whose
greedy generation after the prompt starts with the capital.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dlmedit.data.records import EditRecord, EditRequest, Probe

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = ["PARAPHRASES", "TEMPLATE", "capital_pairs", "capital_records", "known_pairs"]

TEMPLATE = "The capital of {} is"
PARAPHRASES = ("{}'s capital city is", "The capital city of {} is")
RELATION_ID = "P36"  # Wikidata "capital"
MAX_CHARS = 20


def _raw_pairs() -> list[tuple[Any, Any]]:
    try:
        from countryinfo import all_countries
    except ImportError as exc:
        raise ImportError(
            "capital-city facts need the 'countryinfo' package (pip install countryinfo==1.0.1)"
        ) from exc
    pairs = []
    for country in all_countries():
        try:
            pairs.append((country.name(), country.capital()))
        except Exception:  # countryinfo raises assorted errors on incomplete entries
            continue
    return pairs


def _clean_pair(name: Any, capital: Any, max_chars: int) -> tuple[str, str] | None:
    if not isinstance(name, str) or not isinstance(capital, str):
        return None
    name, capital = name.strip(), capital.strip()
    if not name or not capital or len(name) > max_chars or len(capital) > max_chars:
        return None
    if any(ch in text for text in (name, capital) for ch in ",()/"):
        return None
    if name.islower():
        name = name.title()
    if not name[0].isupper():
        return None
    if name.startswith("The "):  # "The capital of the Bahamas is", as text writes it
        name = "the " + name[4:]
    if name.lower() in capital.lower() or capital.lower() in name.lower():
        return None
    return name, capital


def capital_pairs(seed: int = 0, max_chars: int = MAX_CHARS) -> list[tuple[str, str]]:
    """Filtered (country, capital) pairs in a seeded random order (see the module docstring for the rules)."""
    cleaned = {}
    for name, capital in _raw_pairs():
        pair = _clean_pair(name, capital, max_chars)
        if pair is not None:
            cleaned.setdefault(pair[0], pair[1])
    seen_capitals: set[str] = set()
    pairs = []
    for name in sorted(cleaned):  # sorted first: the result must not depend on the package's file order
        capital = cleaned[name]
        if capital.lower() in seen_capitals:
            continue
        seen_capitals.add(capital.lower())
        pairs.append((name, capital))
    random.Random(seed).shuffle(pairs)
    return pairs


def known_pairs(lm: LanguageModel, pairs: Sequence[tuple[str, str]], limit: int | None = None, *,
                max_new_tokens: int = 4, batch_size: int = 16, template: str = TEMPLATE) -> list[tuple[str, str]]:
    """The pairs whose generation after ``template`` (default :data:`TEMPLATE`) starts with the object (in input order).

    ``template`` lets other relations of a country (``dlmedit.data.countries.RELATIONS``)
    use the same known-fact rule as capitals.

    Generation is batched (``batch_size`` prompts per call) and stops once ``limit``
    pairs are known.  Each batch generates ``max_new_tokens`` tokens, or as many as the
    batch's longest capital needs, so a long capital is not rejected for lack of room.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    known: list[tuple[str, str]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = list(pairs[start : start + batch_size])
        prompts = [template.format(name) for name, _ in chunk]
        n_tokens = max(max_new_tokens, *(len(lm.encode_target(p, c)) for p, (_, c) in zip(prompts, chunk, strict=True)))
        texts = lm.generate(prompts, n_tokens).texts
        for (name, capital), text in zip(chunk, texts, strict=True):
            if text.strip().startswith(capital):
                known.append((name, capital))
                if limit is not None and len(known) >= limit:
                    return known
    return known


def capital_records(
    pairs: Sequence[tuple[str, str]],
    n: int,
    seed: int = 0,
    known_by: LanguageModel | None = None,
    *,
    n_neighbours: int = 8,
    batch_size: int = 16,
    template: str = TEMPLATE,
    paraphrases: Sequence[str] = PARAPHRASES,
    relation_id: str = RELATION_ID,
) -> list[EditRecord]:
    """``n`` CounterFact-style records rewriting a country's capital to another selected country's capital.

    ``template`` / ``paraphrases`` / ``relation_id`` build the same records for another
    relation of (country, object) pairs (e.g. demonyms), with the same rotation and
    neighbourhood rules.

    The first ``n`` pairs (the first ``n`` known to ``known_by`` when given) are edited;
    ``target_new`` of record ``i`` is the true capital of record ``i + 1`` (rotating), so
    every new target is a real capital of the same kind.  The next ``2 × n_neighbours``
    pairs (also known to ``known_by`` when given) form a neighbourhood pool *disjoint from
    the edited countries* — in a batch edit an edited country cannot serve as another
    edit's neighbour — from which each record draws ``n_neighbours`` probes (seeded):
    the pool country's capital prompt with its own capital, which must keep beating the
    new target after the edit.
    """
    if n < 2:
        raise ValueError(f"capital records rotate capitals among the edited countries, so n must be ≥ 2, got {n}")
    if n_neighbours < 0:
        raise ValueError(f"n_neighbours must be ≥ 0, got {n_neighbours}")
    n_pool = 2 * n_neighbours
    needed = n + n_pool
    chosen = (list(pairs) if known_by is None
              else known_pairs(known_by, pairs, needed, batch_size=batch_size, template=template))
    if len(chosen) < needed:
        which = f"known to the model (of {len(pairs)} tried)" if known_by is not None else "given"
        raise ValueError(
            f"{n} capital records with a neighbourhood pool of {n_pool} need {needed} distinct countries, but only "
            f"{len(chosen)} are {which}; ask for fewer records or neighbours"
        )
    edited, pool = chosen[:n], chosen[n:needed]
    new_targets = [c for _, c in edited[1:]] + [edited[0][1]]
    rng = random.Random(seed)
    records = []
    for i, ((name, capital), new) in enumerate(zip(edited, new_targets, strict=True)):
        neighbours = rng.sample(pool, n_neighbours)
        records.append(EditRecord(
            request=EditRequest(template, name, new, capital, case_id=i, relation_id=relation_id),
            paraphrase_prompts=tuple(p.format(name) for p in paraphrases),
            neighborhood=tuple(Probe(template.format(m), c) for m, c in neighbours),
            true_answers=(capital,),
            source="countryinfo",
        ))
    return records

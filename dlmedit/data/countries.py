"""Real facts about countries from ``countryinfo``, in several relations, for recall and editing on real models.

Why: the real-pair study (SmolLM2 vs SmolLM2 adapted to masked diffusion) must check
that the adapted model still knows what the base model knew, on more than one relation
and on multi-token objects.  Capitals come from :mod:`dlmedit.data.capitals` (its
filtering rules apply); two more relations are read from the same package:

* ``demonym`` — "Chile" → "Chilean" (countryinfo's ``demonym``; entries listing two
  demonyms, e.g. "Antiguan,Barbudan", are dropped);
* ``language`` — the first listed official language, named in English from its
  ISO 639-1 code with the table below (codes outside the table are dropped).

Each fact is a ``CountryFact`` (relation, country, object, prompt).  The prompts are
plain sentence starts a pretrained model continues with the object.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dlmedit.data.capitals import _clean_pair, _raw_pairs, capital_pairs

__all__ = ["RELATIONS", "CountryFact", "country_facts", "mentions_fact"]

RELATIONS: dict[str, str] = {
    "capital": "The capital of {} is",
    "demonym": "A person from {} is called",
    "language": "The official language of {} is",
}

# ISO 639-1 → English name, for the languages countryinfo lists first for some country.
_LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "es": "Spanish", "ar": "Arabic", "pt": "Portuguese", "nl": "Dutch",
    "de": "German", "zh": "Chinese", "it": "Italian", "el": "Greek", "ko": "Korean", "ro": "Romanian",
    "no": "Norwegian", "sq": "Albanian", "ca": "Catalan", "hy": "Armenian", "az": "Azerbaijani",
    "bn": "Bengali", "be": "Belarusian", "bs": "Bosnian", "ms": "Malay", "bg": "Bulgarian", "km": "Khmer",
    "hr": "Croatian", "cs": "Czech", "da": "Danish", "et": "Estonian", "am": "Amharic", "fi": "Finnish",
    "ka": "Georgian", "hu": "Hungarian", "is": "Icelandic", "hi": "Hindi", "id": "Indonesian",
    "fa": "Persian", "ga": "Irish", "he": "Hebrew", "ja": "Japanese", "kk": "Kazakh", "lo": "Lao",
    "lv": "Latvian", "lt": "Lithuanian", "mk": "Macedonian", "mt": "Maltese", "mn": "Mongolian",
    "ne": "Nepali", "pl": "Polish", "ru": "Russian", "sk": "Slovak", "sl": "Slovene", "so": "Somali",
    "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "tk": "Turkmen", "tg": "Tajik", "ky": "Kyrgyz",
    "ps": "Pashto", "my": "Burmese", "dz": "Dzongkha", "ti": "Tigrinya", "la": "Latin", "dv": "Dhivehi",
    "rw": "Kinyarwanda", "sm": "Samoan",
}


@dataclass(frozen=True)
class CountryFact:
    """One (relation, country, object) fact with the prompt that asks for the object."""

    relation: str
    country: str
    object: str

    @property
    def prompt(self) -> str:
        return RELATIONS[self.relation].format(self.country)


def _other_relation(relation: str) -> list[tuple[str, str]]:
    from countryinfo import all_countries

    pairs: dict[str, str] = {}
    for country in all_countries():
        try:
            name = country.name()
            value = country.demonym() if relation == "demonym" else country.languages()[0]
        except Exception:  # countryinfo raises assorted errors on incomplete entries
            continue
        if relation == "language":
            value = _LANGUAGE_NAMES.get(str(value))
        if not isinstance(value, str) or "," in value:
            continue
        pair = _clean_pair(name, value, 24)
        if pair is not None:
            pairs.setdefault(pair[0], pair[1])
    return sorted(pairs.items())


def country_facts(relations: Sequence[str] = tuple(RELATIONS), seed: int = 0) -> list[CountryFact]:
    """Facts of the given relations, each relation's facts in a seeded order (capitals as :func:`capital_pairs`)."""
    unknown = [r for r in relations if r not in RELATIONS]
    if unknown:
        raise ValueError(f"unknown relation(s) {unknown}; known: {', '.join(RELATIONS)}")
    import random

    _raw_pairs()  # raises a clear ImportError when countryinfo is missing
    facts: list[CountryFact] = []
    for relation in relations:
        if relation == "capital":
            pairs = capital_pairs(seed)
        else:
            pairs = _other_relation(relation)
            random.Random(seed).shuffle(pairs)
        facts.extend(CountryFact(relation, country, obj) for country, obj in pairs)
    return facts


def mentions_fact(text: str, facts: Iterable[CountryFact]) -> bool:
    """True when ``text`` names a fact's country together with its object (a training-text exclusion rule)."""
    return any(f.country in text and f.object in text for f in facts)

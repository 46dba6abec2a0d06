"""Locate a subject's tokens inside a tokenised prompt.

Why a module of its own: causal tracing corrupts the subject's tokens and ROME-style
editors read their key at the *last* subject token, so both need the same answer to
"which prompt tokens spell the subject?".  The answer is tokenizer-dependent: a BPE
tokenizer spells " Paris" (after a space) differently from "Paris" (at the start of
the text), and a model may prepend BOS.  We therefore prefer character offsets (exact
for any fast tokenizer, whatever the word-boundary convention) and fall back to
searching the subject's token sequences with and without a leading space.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dlmedit.errors import SubjectNotFoundError

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = ["find_subject_tokens", "subject_span"]


def subject_span(prompt: str, subject: str) -> tuple[int, int] | None:
    """Character span of the first occurrence of ``subject`` in ``prompt`` (exact, then case-insensitive)."""
    start = prompt.find(subject)
    if start < 0:
        start = prompt.lower().find(subject.lower())
    if start < 0:
        return None
    return start, start + len(subject)


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def _by_offsets(lm: LanguageModel, prompt: str, ids: list[int], span: tuple[int, int]) -> list[int] | None:
    """Tokens whose character range overlaps the subject's, via the fast tokenizer's offset mapping."""
    tokenizer = lm.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    enc_ids = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    if not offsets or len(enc_ids) > len(ids) or ids[len(ids) - len(enc_ids):] != enc_ids:
        return None  # encode_prompt changed the ids in a way we cannot align (e.g. an unusual BOS rule)
    shift = len(ids) - len(enc_ids)
    start, end = span
    hits = [i + shift for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits or hits != list(range(hits[0], hits[-1] + 1)):
        return None
    return hits


def _find_sublist(haystack: list[int], needle: list[int]) -> int:
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return -1


def find_subject_tokens(lm: LanguageModel, prompt: str, subject: str) -> list[int]:
    """Prompt-relative indices (into ``lm.encode_prompt(prompt)``) of the subject's tokens.

    Order of attempts: (1) character offsets of a fast tokenizer — tokens overlapping
    the subject's characters (first occurrence; case-insensitive if the exact spelling
    is absent); (2) the token sequences of ``" " + subject`` and ``subject`` searched in
    the prompt's ids.  Raises `SubjectNotFoundError` naming the prompt's tokens and the
    sequences searched.
    """
    if not isinstance(subject, str) or not subject.strip():
        raise SubjectNotFoundError(f"subject {subject!r} is empty")
    ids = lm.encode_prompt(prompt)
    span = subject_span(prompt, subject)
    if span is not None:
        hits = _by_offsets(lm, prompt, ids, span)
        if hits is not None:
            return hits
    tokenizer = lm.tokenizer
    tried: list[list[int]] = []
    variants = [" " + subject.strip(), subject.strip(), subject]
    if span is not None:
        variants.insert(0, prompt[span[0] : span[1]])
        variants.insert(0, " " + prompt[span[0] : span[1]].strip())
    for text in dict.fromkeys(variants):
        sub_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not sub_ids or sub_ids in tried:
            continue
        tried.append(sub_ids)
        at = _find_sublist(ids, sub_ids)
        if at >= 0:
            return list(range(at, at + len(sub_ids)))
    where = "does not occur in the prompt text" if span is None else "occurs in the text but not as whole tokens"
    searched = "; ".join(str(_token_strings(tokenizer, t)) for t in tried) or "(subject tokenises to nothing)"
    raise SubjectNotFoundError(
        f"subject {subject!r} {where}: prompt {prompt!r} tokenises to {_token_strings(tokenizer, ids)}; "
        f"searched for the token sequences {searched}"
    )

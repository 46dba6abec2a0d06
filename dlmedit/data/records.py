"""The record types every layer speaks: one edit request, one evaluation record, one unlearning row.

Why a single set of types: CounterFact, zsRE, KAMEL, TOFU and the built-in world differ
only in which fields they fill.  Editors read `EditRequest`; evaluation reads the probes of
an `EditRecord`; unlearning reads `ForgetRecord`.  Nothing above the data layer ever
looks at a raw JSON dict, so a new dataset format is one loader, not a change everywhere.

Records are frozen: a request that was validated once cannot be mutated into an invalid
one halfway through a sequential-editing run.  Sequences are stored as tuples for the
same reason.  `meta` keeps whatever a source format carries that no metric uses
(Wikidata ids, `pararel_idx`, ...) so that loading is lossless; it is excluded from
hashing and equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from dlmedit.errors import DlmeditError

LENGTH_BUCKETS = ("1", "2", "3", "4+")


def length_bucket(n_tokens: int) -> str:
    """Target-length bucket "1", "2", "3" or "4+" (tokens), the by-length reporting unit.

    It lives with the record types because both the world generator (which balances
    counterfactual targets per bucket) and the metrics layer (which reports per bucket)
    must agree on the same boundaries.  Numpy integers are accepted (they are
    `numbers.Integral`); bools and floats are rejected so a length is never guessed.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, Integral):
        raise TypeError(f"n_tokens must be an integer, got {type(n_tokens).__name__}")
    if n_tokens < 1:
        raise ValueError(f"a target has at least one token, got {n_tokens}")
    return str(int(n_tokens)) if n_tokens < 4 else "4+"


class InvalidRecordError(DlmeditError, ValueError):
    """A record's fields are inconsistent (e.g. a template without "{}")."""


def _require_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRecordError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRecordError(f"{what} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: non-UTF-8 bytes on a command line, or "\ud800" in JSON
        raise InvalidRecordError(
            f"{what} is not valid Unicode text (unpaired surrogate at character {exc.start}: "
            f"{value[max(0, exc.start - 10):exc.start + 10]!r}); give it as UTF-8"
        ) from None
    return value


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected after it (a neighbourhood, locality or portability probe)."""

    prompt: str
    answer: str

    def __post_init__(self) -> None:
        _require_text(self.prompt, "probe prompt")
        _require_text(self.answer, "probe answer")


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: `template.format(subject)` should be completed by `target_new`.

    The template keeps the subject slot (rather than storing only the filled prompt)
    because editors need to find the subject's tokens, and causal tracing corrupts them.
    `target_true` is None when the source does not say what the model believed
    (zsRE's `alt` is a new answer; its `answers` are kept on `EditRecord.true_answers`).
    Targets are stored as written (no leading space added): spacing is a tokenisation
    concern of the paradigm layer.
    """

    template: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str = 0
    relation_id: str | None = None

    def __post_init__(self) -> None:
        _require_text(self.template, "prompt template")
        n_slots = self.template.count("{}")
        if n_slots != 1:
            raise InvalidRecordError(
                f'prompt template must contain "{{}}" exactly once (found {n_slots}): {self.template!r}'
            )
        _require_text(self.subject, "subject")
        _require_text(self.target_new, "target_new")
        if self.target_true is not None:
            _require_text(self.target_true, "target_true")
            if self.target_true.strip() == self.target_new.strip():
                raise InvalidRecordError(f"target_new equals target_true ({self.target_new!r}): nothing to edit")

    @property
    def prompt(self) -> str:
        """The template with the subject filled in."""
        return self.template.replace("{}", self.subject)


@dataclass(frozen=True)
class EditRecord:
    """An edit request plus every probe used to evaluate it.

    Field meanings (each dataset fills a subset; empty tuple = the source has none):
    - `paraphrase_prompts`: other wordings of the rewritten fact; answer is `target_new`
      after the edit (CounterFact `paraphrase_prompts`, zsRE `rephrase`, extra KAMEL templates).
    - `neighborhood`: prompts about *other* subjects whose true answer is the request's
      `target_true`; the edit must not move them to `target_new` (CounterFact NS/NM).
    - `attribute_prompts`: prompts about other subjects whose true answer is `target_new`
      (CounterFact; kept so nothing is lost, used by consistency analyses).
    - `generation_prompts`: open-ended prompts for fluency / reference-score generation.
    - `locality`: unrelated prompts with their own answers, whose output must not change
      (zsRE `loc` / `loc_ans`).
    - `portability`: multi-hop questions whose answer follows from the edit (EasyEdit).
    - `true_answers`: every accepted answer of the original fact (zsRE `answers`, KAMEL
      object labels); `request.target_true`, when set, is the first of them.
    - `source`: dataset name ("counterfact", "zsre", "kamel", "world", ...).
    """

    request: EditRequest
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    true_answers: tuple[str, ...] = ()
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("paraphrase_prompts", "attribute_prompts", "generation_prompts", "true_answers"):
            values = getattr(self, name)
            if not isinstance(values, tuple):
                raise InvalidRecordError(f"{name} must be a tuple, got {type(values).__name__}")
            for i, value in enumerate(values):
                _require_text(value, f"{name}[{i}]")
        for name in ("neighborhood", "locality", "portability"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not all(isinstance(v, Probe) for v in values):
                raise InvalidRecordError(f"{name} must be a tuple of Probe")

    @property
    def case_id(self) -> int | str:
        return self.request.case_id


@dataclass(frozen=True)
class ForgetRecord:
    """One TOFU-style question/answer row of an unlearning split.

    `paraphrased_answer` and `perturbed_answers` are what the truth ratio needs; they are
    optional because TOFU's plain split files (e.g. `forget01.json`) lack them and only the
    `*_perturbed.json` files carry them.  `subject` (the fictitious author) is optional too:
    TOFU does not store it, the built-in world does.
    """

    question: str
    answer: str
    split: str
    subject: str | None = None
    paraphrased_question: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        _require_text(self.question, "question")
        _require_text(self.answer, "answer")
        _require_text(self.split, "split")
        for name in ("subject", "paraphrased_question", "paraphrased_answer"):
            value = getattr(self, name)
            if value is not None:
                _require_text(value, name)
        if not isinstance(self.perturbed_answers, tuple):
            raise InvalidRecordError("perturbed_answers must be a tuple")
        for i, value in enumerate(self.perturbed_answers):
            _require_text(value, f"perturbed_answers[{i}]")

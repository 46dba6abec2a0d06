"""Facts to trace: from the built-in world, any dataset spec, or a plain JSON/JSONL file.

Why not only the dataset loaders: tracing needs just (prompt, subject, target) and
users often write such files by hand, so besides every format `dlmedit.data.loaders`
reads (CounterFact, zsRE, KAMEL, TOFU, the world) a file of rows
``{"prompt": "The capital of {} is" | "The capital of France is", "subject": "France",
"target": "Paris"?}`` is accepted.  ROME traces the *true* fact, so edit records give
their ``target_true``; without a target the model's own prediction is traced.
Errors name the file and the record (``line 4`` of a JSONL file, ``record 3`` of a
JSON list).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlmedit.data.loaders import DATASET_KINDS, DatasetError, load_dataset, parse_counterfact, read_rows
from dlmedit.data.records import EditRecord, ForgetRecord

__all__ = ["TraceFact", "facts_from_records", "load_trace_facts", "parse_trace_rows"]


@dataclass(frozen=True)
class TraceFact:
    """One fact to trace; ``target=None`` means "trace what the model predicts"."""

    prompt: str
    subject: str
    target: str | None = None
    case_id: int | str | None = None

    def as_tuple(self) -> tuple[str, str, str | None]:
        return self.prompt, self.subject, self.target


def facts_from_records(records: Sequence[EditRecord | ForgetRecord]) -> list[TraceFact]:
    """Edit records → (filled prompt, subject, true target); forget records → (question, subject, answer)."""
    out = []
    for rec in records:
        if isinstance(rec, EditRecord):
            req = rec.request
            out.append(TraceFact(req.prompt, req.subject, req.target_true, req.case_id))
        elif rec.subject:
            out.append(TraceFact(rec.question, rec.subject, rec.answer, rec.meta.get("case_id")))
    return out


def _text(row: Mapping[str, Any], key: str, required: bool) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        what = "missing" if value is None else f"not a non-empty string ({value!r})"
        raise ValueError(f"field {key!r} is {what}")
    return value


def parse_trace_rows(rows: Sequence[tuple[str, Mapping[str, Any]]], origin: str) -> list[TraceFact]:
    """Plain trace rows (see module docstring) → facts; errors cite ``origin`` and the row's location."""
    facts = []
    for i, (where, row) in enumerate(rows):
        try:
            prompt = _text(row, "prompt", False) or _text(row, "template", True)
            subject = _text(row, "subject", True)
            target = _text(row, "target", False)
            assert prompt is not None and subject is not None
            if "{}" in prompt:
                prompt = prompt.replace("{}", subject)
            elif subject not in prompt and subject.lower() not in prompt.lower():
                raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        except ValueError as exc:
            raise DatasetError(f"{origin}: {where}: {exc}") from None
        facts.append(TraceFact(prompt, subject, target, row.get("case_id", i)))
    return facts


def load_trace_facts(spec: str, limit: int | None = None, seed: int = 0) -> list[TraceFact]:
    """``world`` / ``world:PART`` / ``KIND:FILE`` (any dataset spec) / a path to a CounterFact or plain file."""
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of facts, got {limit}")
    kind = spec.split(":", 1)[0].lower()
    if kind in DATASET_KINDS and not Path(spec).exists():
        return facts_from_records(load_dataset(spec, limit=limit, seed=seed))
    rows = read_rows(spec)
    if "requested_rewrite" in rows[0][1]:
        facts = facts_from_records(parse_counterfact(rows, spec))
    else:
        facts = parse_trace_rows(rows, spec)
    return facts[:limit] if limit is not None else facts

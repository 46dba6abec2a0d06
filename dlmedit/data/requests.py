"""Edit requests from what users type: prompt lists (EasyEdit), request dicts (CounterFact / ROME) or a dataset spec.

Why here and not in the CLI: ``dlmedit edit --prompt … --subject …`` and the Python API
``dlmedit.edit(lm, prompts=[…], subject=[…], target_new=[…])`` must turn the same input
into the same `EditRecord`s and fail with the same messages, so both call
:func:`edit_records`.

Accepted shapes (each becomes one `EditRecord`):

* EasyEdit lists — ``prompts=["Varo Kelmin was born in"], subject=["Varo Kelmin"],
  target_new=["Xanthe"], ground_truth=["Pelmora"]`` (``ground_truth`` optional): the
  prompt contains the subject, which is cut out into a ``{}`` template;
* CounterFact dicts — ``{"case_id", "requested_rewrite": {"prompt": "{} was born in",
  "subject", "target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts",
  "neighborhood_prompts", …}`` (parsed by :func:`dlmedit.data.loaders.parse_counterfact`);
* flat dicts — ``{"prompt": "{} was born in" | "Varo Kelmin was born in", "subject",
  "target_new": "Xanthe" | {"str": "Xanthe"}, "target_true" | "ground_truth": …}``
  (ROME's request dict, EasyEdit's JSON rows);
* `EditRequest` / `EditRecord` objects, used as they are;
* a dataset spec string (``"world"``, ``"counterfact:FILE"``, …; see
  :func:`dlmedit.data.loaders.load_dataset`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from dlmedit.data.loaders import DatasetError, load_dataset, parse_counterfact
from dlmedit.data.records import EditRecord, EditRequest, InvalidRecordError
from dlmedit.errors import SubjectNotFoundError, UsageError

__all__ = ["RequestsInput", "edit_records", "record_from_dict", "record_from_prompt", "records_from_lists",
           "template_from_prompt"]

#: what :func:`edit_records` accepts as ``requests``
RequestsInput = str | EditRequest | EditRecord | Mapping[str, Any] | Sequence[EditRequest | EditRecord | Mapping[str, Any]]


def template_from_prompt(prompt: str, subject: str) -> str:
    """``"Varo Kelmin was born in"``, ``"Varo Kelmin"`` → ``"{} was born in"`` (a ``{}`` template is kept).

    The first occurrence of the subject is the slot, as EasyEdit does; a subject that
    does not occur raises `SubjectNotFoundError` naming both strings.
    """
    if "{}" in prompt:
        return prompt
    at = prompt.find(subject)
    if at < 0:
        raise SubjectNotFoundError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    return prompt[:at] + "{}" + prompt[at + len(subject):]


def record_from_prompt(prompt: str, subject: str, target_new: str, target_true: str | None = None,
                       case_id: int | str = 0) -> EditRecord:
    """One request from a prompt that contains the subject (or a ``{}`` template)."""
    return EditRecord(EditRequest(template_from_prompt(prompt, subject), subject, target_new, target_true,
                                  case_id=case_id), source="request")


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    return list(value)


def records_from_lists(prompts: str | Sequence[str] | None, subject: str | Sequence[str] | None,
                       target_new: str | Sequence[str] | None,
                       ground_truth: str | Sequence[str] | None = None) -> list[EditRecord]:
    """EasyEdit's ``editor.edit(prompts=…, subject=…, target_new=…, ground_truth=…)`` lists → records.

    A single string stands for a list of one; a missing list is a `UsageError` naming it.  The lists must have the same length; the
    i-th record gets ``case_id`` i.
    """
    lists = {"prompts": _as_list(prompts, "prompts"), "subject": _as_list(subject, "subject"),
             "target_new": _as_list(target_new, "target_new")}
    missing = [name for name, items in lists.items() if items is None]
    if missing:
        raise UsageError(f"give all of prompts, subject and target_new (missing: {', '.join(missing)})")
    truths = _as_list(ground_truth, "ground_truth")
    if truths is not None:
        lists["ground_truth"] = truths
    lengths = {name: len(items or ()) for name, items in lists.items()}
    if len(set(lengths.values())) != 1:
        raise UsageError("prompts, subject, target_new (and ground_truth) must have the same length, got "
                         + ", ".join(f"{name}: {n}" for name, n in lengths.items()))
    out = []
    for i, (p, s, t) in enumerate(zip(lists["prompts"] or (), lists["subject"] or (), lists["target_new"] or (),
                                      strict=True)):
        try:
            out.append(record_from_prompt(p, s, t, truths[i] if truths is not None else None, case_id=i))
        except (SubjectNotFoundError, InvalidRecordError) as exc:
            raise type(exc)(f"request {i}: {exc}") from None
    return out


def _target(row: Mapping[str, Any], keys: Sequence[str], where: str, required: bool) -> str | None:
    key = next((k for k in keys if row.get(k) is not None), None)
    if key is None:
        if required:
            raise DatasetError(f"{where}: missing key {keys[0]!r}")
        return None
    value = row[key]
    if isinstance(value, Mapping):
        value = value.get("str")
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {key!r} must be a string or {{\"str\": string}}, got {type(row[key]).__name__}")
    return value


def record_from_dict(row: Mapping[str, Any], where: str = "request", index: int = 0) -> EditRecord:
    """A CounterFact-shaped or flat request dict → `EditRecord`; errors say ``where`` and the missing field.

    ``index`` is the ``case_id`` when the dict has none.
    """
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where}: expected a dict, got {type(row).__name__}")
    if "requested_rewrite" in row:
        origin, _, place = where.rpartition(": ")
        record = parse_counterfact([(place or where, dict(row))], origin or "requests")[0]
        if "case_id" not in row:
            record = dataclasses.replace(record, request=dataclasses.replace(record.request, case_id=index))
        return record
    for key in ("prompt", "subject"):
        if not isinstance(row.get(key), str):
            raise DatasetError(f"{where}: missing key {key!r} (a request dict is CounterFact-shaped, with "
                               "'requested_rewrite', or flat: prompt, subject, target_new, target_true)"
                               if key not in row else f"{where}: {key!r} must be a string")
    target_new = _target(row, ("target_new",), where, required=True)
    target_true = _target(row, ("target_true", "ground_truth"), where, required=False)
    case_id = row.get("case_id", index)
    try:
        assert target_new is not None
        return record_from_prompt(row["prompt"], row["subject"], target_new, target_true, case_id=case_id)
    except (SubjectNotFoundError, InvalidRecordError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _one(item: Any, index: int) -> EditRecord:
    if isinstance(item, EditRecord):
        return item
    if isinstance(item, EditRequest):
        return EditRecord(item, source="request")
    if isinstance(item, Mapping):
        return record_from_dict(item, f"requests: record {index}", index)
    raise UsageError(f"requests: record {index} is a {type(item).__name__}; give a dict (CounterFact or flat "
                     "shape), an EditRequest, an EditRecord, or a dataset spec string")


def edit_records(
    requests: RequestsInput | None = None,
    *,
    prompts: str | Sequence[str] | None = None,
    subject: str | Sequence[str] | None = None,
    target_new: str | Sequence[str] | None = None,
    ground_truth: str | Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[EditRecord]:
    """The records to edit, from ``requests`` (any shape above) *or* the EasyEdit lists.

    ``limit`` keeps the first N; ``seed`` only matters for dataset specs whose loader
    draws (KAMEL's counterfactual targets).  Giving both or neither is a `UsageError`.
    """
    lists_given = any(v is not None for v in (prompts, subject, target_new, ground_truth))
    if requests is not None and lists_given:
        raise UsageError("give either requests or prompts/subject/target_new, not both")
    if requests is None and not lists_given:
        raise UsageError("nothing to edit: give requests (dicts, a dataset spec such as 'world') or "
                         "prompts, subject and target_new")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(requests, str):
        records = load_dataset(requests, limit=limit, seed=seed)
        if not records or not isinstance(records[0], EditRecord):
            raise DatasetError(f"{requests!r} holds no edit records (TOFU/forget splits are for unlearning)")
        return list(records)  # type: ignore[arg-type]
    if requests is None:
        records = records_from_lists(prompts, subject, target_new, ground_truth)
    elif isinstance(requests, EditRequest | EditRecord | Mapping):
        records = [_one(requests, 0)]
    else:
        records = [_one(item, i) for i, item in enumerate(requests)]
    if not records:
        raise UsageError("requests is empty")
    return records[:limit] if limit is not None else records

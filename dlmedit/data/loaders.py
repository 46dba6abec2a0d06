"""Loaders for the published knowledge-editing and unlearning formats, all yielding `records` types.

Why one module per concern but one entry point: users name a dataset on the command line
(`counterfact:data/counterfact.json`, `world:forget01`); `load_dataset` turns that string
into records, and every format-specific loader is also callable on its own.

Every file may be a JSON list of objects or JSONL (one object per line); the first
non-space character decides (`[` = JSON list).  Errors name the file and the record
(`record 3` = 0-based index in a JSON list, `line 4` = 1-based line of a JSONL file).
A file is validated as a whole, then `limit` keeps its first records in file order
(as ROME's `dataset_size_limit` does), so `limit` never changes which records exist.

Accepted shapes
---------------
CounterFact / MultiCounterFact (ROME `counterfact.json`, MEMIT `multi_counterfact.json`)::

    {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is",
      "subject": "Danielle Darrieux", "relation_id": "P103",
      "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...], "attribute_prompts": [...],
     "generation_prompts": [...], "portability": {"New Question": ..., "New Answer": ...}?}

  Neighbourhood prompts share the record's true target, so they become
  `Probe(prompt, target_true)`.  Ids and unknown keys go to `meta`.

zsRE (MEND / ROME / EasyEdit)::

    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
     "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
     "rephrase": "...", "loc": "nq question: ...", "loc_ans": "...",
     "portability": {"New Question": ..., "New Answer": ...}?}

  The template is `src` with the first occurrence of `subject` replaced by "{}" (matched
  case-insensitively if the exact spelling is absent; the subject then takes `src`'s
  spelling so the filled prompt equals `src`).  `alt` is target_new; target_true is None
  (zsRE does not record the model's belief); `answers` go to `true_answers`.
  `rephrase` may be a string or a list.  `portability` may be one object or a list.

KAMEL-style triples (multi-token objects), one row per fact::

    {"subject" | "sub_label": "Gustave Eiffel",
     "relation" | "rel_uri" | "property" | "predicate": "P19",
     "objects" | "obj_labels": ["Dijon", ...]  or  "object" | "obj_label": "Dijon" or [...],
     "chosen_label": "Dijon"?,                  # preferred label; becomes target_true
     "template": "{} was born in"  or  "templates": ["...", ...]?,
     "target_new": "Lyon"?, "index" | "id" | "case_id": ...?}

  Subject placeholders "{}", "[S]" or "[X]"; a LAMA-style object slot "[Y]" is allowed
  only at the end (it and a trailing "." are dropped).  The first template is the edit
  prompt, the others become paraphrases.  Rows without templates take them from the
  `templates` argument or from `templates.json` next to the file
  (`{"P19": ["{} was born in", ...]}`).  Without `target_new`, a counterfactual target is
  drawn (seeded per row) from the true objects of other rows with the same relation, as
  CounterFact was built.  Neighbourhood = up to 10 other rows of the same relation whose
  objects include this row's true object.

TOFU (locuslab/TOFU `forget01.json`, `forget01_perturbed.json`, ...)::

    {"question": ..., "answer": ..., "paraphrased_answer": ...?, "paraphrased_question": ...?,
     "perturbed_answer": [...]?, "subject" | "author": ...?, "split": ...?}

  Split: the explicit argument, else the row's `split`, else the file name without
  extension and without a `_perturbed` suffix (`forget01_perturbed.json` -> `forget01`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dlmedit.data.records import (
    EditRecord,
    EditRequest,
    ForgetRecord,
    InvalidRecordError,
    Probe,
)
from dlmedit.errors import DlmeditError


class DatasetError(DlmeditError, ValueError):
    """A dataset spec, file or record is malformed; the message names file and record."""


class DatasetNotFoundError(DlmeditError, FileNotFoundError):
    """A dataset file named in a spec does not exist."""


class _RecordProblem(Exception):
    """Raised inside one record's parser; the loop adds file and record location."""


T = TypeVar("T")
_MAX_NEIGHBOURS = 10


# ----------------------------------------------------------------------------- reading


class _NonStandardConstant(ValueError):
    """NaN / Infinity in a JSON file: Python's json accepts them, JSON (and every other reader) does not."""


def _reject_constant(name: str) -> Any:
    raise _NonStandardConstant(name)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_WS = " \t\n\r"


def _check_path(path: str | Path) -> Path:
    text = str(path)
    if not text.strip():
        raise DatasetNotFoundError("dataset file name is empty; give a path, e.g. 'counterfact:data/cf.json'")
    if "\x00" in text:
        raise DatasetError(f"dataset path {text!r} contains a NUL character")
    p = Path(text).expanduser()
    try:
        exists, is_file = p.exists(), p.is_file()
    except (OSError, ValueError) as exc:
        raise DatasetError(f"dataset path {text!r} cannot be used: {exc}") from None
    if not exists:
        raise DatasetNotFoundError(f"dataset file not found: {p}")
    if not is_file:
        raise DatasetError(f"{p}: not a file")
    return p


def read_text(path: str | Path) -> str:
    """A dataset file as text: UTF-8 (a leading BOM is accepted).

    Anything else is a `DatasetError` naming the file, the line and the byte, with the fix
    — never a bare ``UnicodeDecodeError``.
    """
    p = _check_path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read the file ({exc.strerror or exc})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{p}: line 1: the file is UTF-16 text; dlmedit reads UTF-8 — re-save it as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DatasetError(
            f"{p}: line {line}, byte {column}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); dlmedit reads UTF-8 "
            "text — re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE)"
        ) from None


class _Where(str):
    """A record's location as cited in messages ("record 3"), carrying its line in the file."""

    line: int | None = None

    def __new__(cls, text: str, line: int | None = None) -> _Where:
        obj = super().__new__(cls, text)
        obj.line = line
        return obj


def _at_line(where: str) -> str:
    """`` (line 17)`` for a record of a JSON list, nothing for a JSONL line (it says its line already)."""
    line = getattr(where, "line", None)
    return f" (line {line})" if line is not None else ""


class _LineCounter:
    """Line numbers of increasing offsets into ``text`` in linear total time."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, offset: int) -> int:
        if offset < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, offset)
        self.pos = offset
        return self.line


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _decode_value(text: str, i: int, p: Path, where: str) -> tuple[Any, int]:
    """One JSON value at ``text[i:]`` (strict: no NaN / Infinity); errors name file, line and column."""
    try:
        return _DECODER.raw_decode(text, i)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{p}: line {exc.lineno}, column {exc.colno}: invalid JSON in {where}: {exc.msg}") from None
    except _NonStandardConstant as exc:
        raise DatasetError(f"{p}: {where}{_at_line(where)}: {exc} is not valid JSON; write null or a finite number") from None
    except RecursionError:
        raise DatasetError(f"{p}: {where}{_at_line(where)}: JSON nested too deeply to read") from None


def _json_list_rows(text: str, p: Path) -> list[tuple[str, Any]]:
    """The elements of a JSON list, each located as "record N (line L)"."""
    line_of = _LineCounter(text)
    i = _skip_ws(text, text.index("[") + 1)
    rows: list[tuple[str, Any]] = []
    if i < len(text) and text[i] == "]":
        i = _skip_ws(text, i + 1)
    else:
        while True:
            where = _Where(f"record {len(rows)}", line_of(i))
            if i >= len(text):
                raise DatasetError(f"{p}: line {line_of(i)}: the JSON list ends early (missing ']'); the file "
                                   "looks truncated")
            obj, i = _decode_value(text, i, p, where)
            rows.append((where, obj))
            i = _skip_ws(text, i)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
                if i < len(text) and text[i] == "]":
                    raise DatasetError(f"{p}: line {line_of(i)}: trailing comma before ']' (not valid JSON)")
                continue
            if i < len(text) and text[i] == "]":
                i = _skip_ws(text, i + 1)
                break
            if i >= len(text):
                raise DatasetError(f"{p}: line {line_of(i)}: the JSON list ends early (missing ']'); the file "
                                   "looks truncated")
            raise DatasetError(f"{p}: line {line_of(i)}: expected ',' or ']' after {where}, found {text[i]!r}")
    if i < len(text):
        raise DatasetError(f"{p}: line {line_of(i)}: extra data after the JSON list")
    return rows


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Read a JSON list or JSONL file into (location, object) pairs.

    The location ("record 3 (line 17)" / "line 4") is what error messages cite.  The file
    must be UTF-8 JSON (NaN / Infinity are refused: they are not JSON); every problem is
    a `DatasetError` naming the file and the line.
    """
    p = _check_path(path)
    text = read_text(p)
    stripped = text.lstrip()
    rows: list[tuple[str, Any]] = []
    if stripped.startswith("["):
        rows = _json_list_rows(text, p)
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row, end = _DECODER.raw_decode(line, _skip_ws(line, 0))
                if line[end:].strip():
                    raise json.JSONDecodeError("extra data after the JSON value", line, end)
            except json.JSONDecodeError as exc:
                hint = ""
                if lineno == 1 and stripped.startswith("{"):
                    hint = " (expected a JSON list of records or one JSON object per line)"
                raise DatasetError(f"{p}: line {lineno}: invalid JSON{hint}: {exc}") from None
            except _NonStandardConstant as exc:
                raise DatasetError(f"{p}: line {lineno}: {exc} is not valid JSON; write null or a finite number") from None
            except RecursionError:
                raise DatasetError(f"{p}: line {lineno}: JSON nested too deeply to read") from None
            rows.append((f"line {lineno}", row))
    if not rows:
        raise DatasetError(f"{p}: dataset is empty")
    for where, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{p}: {where}: expected a JSON object, got {type(row).__name__}{_at_line(where)}")
    return rows


# Keys that identify each format; used to say "this looks like a zsRE file" on a mismatch.
_SIGNATURES: dict[str, tuple[tuple[str, ...], ...]] = {
    "counterfact": (("requested_rewrite",),),
    "zsre": (("src", "alt"),),
    "tofu": (("question", "answer"),),
    "kamel": (
        ("subject", "objects"),
        ("subject", "object"),
        ("sub_label", "obj_labels"),
        ("sub_label", "obj_label"),
        ("subject", "obj_labels"),
        ("sub_label", "objects"),
    ),
}


def _detect_format(row: Mapping[str, Any]) -> str | None:
    for name, alternatives in _SIGNATURES.items():
        if any(all(k in row for k in keys) for keys in alternatives):
            return name
    return None


def _check_format(rows: Sequence[tuple[str, Mapping[str, Any]]], expected: str, origin: str) -> None:
    """Fail early, with the fix, when a file of another format is passed under this name."""
    where, first = rows[0]
    found = _detect_format(first)
    if found == expected:
        return
    keys = ", ".join(sorted(first)[:8])
    if found is None:
        raise DatasetError(
            f"{origin}: {where}{_at_line(where)}: not a {expected} record (keys: {keys}); see dlmedit.data.loaders for "
            "the accepted shape"
        )
    raise DatasetError(
        f"{origin}: {where}{_at_line(where)}: this looks like a {found} file, not {expected} (keys: {keys}); "
        f"load it as '{found}:{origin}'"
    )


def _parse_all(
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    origin: str,
    parse: Callable[[int, Mapping[str, Any]], T],
) -> list[T]:
    out = []
    for index, (where, row) in enumerate(rows):
        try:
            out.append(parse(index, row))
        except (_RecordProblem, InvalidRecordError) as exc:
            raise DatasetError(f"{origin}: {where}: {exc}{_at_line(where)}") from exc
    return out


def _apply_limit(records: list[T], limit: int | None) -> list[T]:
    if limit is None:
        return records
    _check_limit(limit)
    return records[:limit]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise DatasetError(f"limit must be a positive integer or None, got {limit!r}")


# ----------------------------------------------------------------------------- field access


def _typed(row: Mapping[str, Any], key: str, kind: type, noun: str) -> Any:
    """``row[key]``, which must be present and an instance of ``kind`` (``noun`` names it in errors)."""
    if key not in row:
        raise _RecordProblem(f"missing key {key!r}")
    value = row[key]
    if not isinstance(value, kind):
        raise _RecordProblem(f"{key!r} must be {noun}, got {type(value).__name__}")
    return value


def _text(row: Mapping[str, Any], key: str) -> str:
    return _typed(row, key, str, "a string")


def _opt_text(row: Mapping[str, Any], key: str) -> str | None:
    return _text(row, key) if row.get(key) is not None else None


def _texts(row: Mapping[str, Any], key: str, *, scalar_ok: bool = False) -> tuple[str, ...]:
    """A list of strings under `key` (absent = empty); a lone string if `scalar_ok`."""
    value = row.get(key)
    if value is None:
        return ()
    if isinstance(value, str) and scalar_ok:
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _RecordProblem(f"{key!r} must be a list of strings")
    return tuple(value)


def _obj(row: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    return _typed(row, key, dict, "an object")


def _first_key(row: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if row.get(k) is not None), None)


def _portability(row: Mapping[str, Any]) -> tuple[Probe, ...]:
    """EasyEdit's portability field: {"New Question", "New Answer"} or a list of those."""
    value = row.get("portability")
    if value is None or value == {} or value == []:
        return ()
    items = value if isinstance(value, list) else [value]
    probes = []
    for item in items:
        if not isinstance(item, dict):
            raise _RecordProblem("'portability' must be an object or a list of objects")
        probes.append(Probe(_text(item, "New Question"), _text(item, "New Answer")))
    return tuple(probes)


def _case_id(row: Mapping[str, Any], keys: Sequence[str], index: int) -> int | str:
    key = _first_key(row, keys)
    if key is None:
        return index
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _RecordProblem(f"{key!r} must be an integer or a string")
    return value


def _rest(row: Mapping[str, Any], used: Iterable[str]) -> dict[str, Any]:
    used = set(used)
    return {k: v for k, v in row.items() if k not in used}


# ----------------------------------------------------------------------------- CounterFact


_CF_KEYS = (
    "case_id",
    "requested_rewrite",
    "paraphrase_prompts",
    "neighborhood_prompts",
    "attribute_prompts",
    "generation_prompts",
    "portability",
)


def _counterfact_record(index: int, row: Mapping[str, Any], source: str) -> EditRecord:
    rr = _obj(row, "requested_rewrite")
    new, true = _obj(rr, "target_new"), _obj(rr, "target_true")
    true_str = _text(true, "str")
    request = EditRequest(
        template=_text(rr, "prompt"),
        subject=_text(rr, "subject"),
        target_new=_text(new, "str"),
        target_true=true_str,
        case_id=_case_id(row, ("case_id",), index),
        relation_id=_opt_text(rr, "relation_id"),
    )
    meta = _rest(row, _CF_KEYS)
    for name, target in (("target_new_id", new), ("target_true_id", true)):
        if target.get("id") is not None:
            meta[name] = target["id"]
    return EditRecord(
        request=request,
        paraphrase_prompts=_texts(row, "paraphrase_prompts"),
        neighborhood=tuple(Probe(p, true_str) for p in _texts(row, "neighborhood_prompts")),
        attribute_prompts=_texts(row, "attribute_prompts"),
        generation_prompts=_texts(row, "generation_prompts"),
        portability=_portability(row),
        true_answers=(true_str,),
        source=source,
        meta=meta,
    )


def parse_counterfact(
    rows: Sequence[tuple[str, Mapping[str, Any]]], origin: str = "<memory>", source: str = "counterfact"
) -> list[EditRecord]:
    """Parse CounterFact rows (as returned by `read_rows`) into `EditRecord`s."""
    if not rows:
        raise DatasetError(f"{origin}: dataset is empty")
    _check_format(rows, "counterfact", origin)
    return _parse_all(rows, origin, lambda i, r: _counterfact_record(i, r, source))


def load_counterfact(path: str | Path, limit: int | None = None, source: str = "counterfact") -> list[EditRecord]:
    """Load a CounterFact or MultiCounterFact file (same format)."""
    _check_limit(limit)
    return _apply_limit(parse_counterfact(read_rows(path), str(path), source), limit)


# ----------------------------------------------------------------------------- zsRE


_ZSRE_KEYS = ("case_id", "subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans", "portability")


def _template_from_question(question: str, subject: str) -> tuple[str, str]:
    """Replace the first occurrence of `subject` in `question` by "{}"; return (template, subject)."""
    at = question.find(subject)
    if at < 0:
        at = question.lower().find(subject.lower())
        if at < 0:
            raise _RecordProblem(f"subject {subject!r} does not occur in src {question!r}")
        subject = question[at : at + len(subject)]
    return question[:at] + "{}" + question[at + len(subject) :], subject


def _zsre_record(index: int, row: Mapping[str, Any]) -> EditRecord:
    src, subject = _text(row, "src"), _text(row, "subject")
    template, matched = _template_from_question(src, subject)
    meta = _rest(row, _ZSRE_KEYS)
    if matched != subject:
        meta["subject_as_given"] = subject
    request = EditRequest(
        template=template,
        subject=matched,
        target_new=_text(row, "alt"),
        target_true=None,
        case_id=_case_id(row, ("case_id",), index),
        relation_id=_opt_text(row, "relation_id"),
    )
    locality: tuple[Probe, ...] = ()
    if row.get("loc") is not None or row.get("loc_ans") is not None:
        locality = (Probe(_text(row, "loc"), _text(row, "loc_ans")),)
    return EditRecord(
        request=request,
        paraphrase_prompts=_texts(row, "rephrase", scalar_ok=True),
        locality=locality,
        portability=_portability(row),
        true_answers=_texts(row, "answers", scalar_ok=True),
        source="zsre",
        meta=meta,
    )


def parse_zsre(rows: Sequence[tuple[str, Mapping[str, Any]]], origin: str = "<memory>") -> list[EditRecord]:
    """Parse zsRE rows (MEND / EasyEdit layout) into `EditRecord`s."""
    if not rows:
        raise DatasetError(f"{origin}: dataset is empty")
    _check_format(rows, "zsre", origin)
    return _parse_all(rows, origin, _zsre_record)


def load_zsre(path: str | Path, limit: int | None = None) -> list[EditRecord]:
    """Load a zsRE file (e.g. MEND's `zsre_mend_eval.json`)."""
    _check_limit(limit)
    return _apply_limit(parse_zsre(read_rows(path), str(path)), limit)


# ----------------------------------------------------------------------------- KAMEL


_KAMEL_SUBJECT = ("subject", "sub_label")
_KAMEL_RELATION = ("relation", "rel_uri", "property", "predicate", "relation_id")
_KAMEL_OBJECTS = ("objects", "obj_labels", "object", "obj_label")
_KAMEL_IDS = ("index", "id", "case_id")
_KAMEL_KEYS = (
    *_KAMEL_SUBJECT,
    *_KAMEL_RELATION,
    *_KAMEL_OBJECTS,
    *_KAMEL_IDS,
    "chosen_label",
    "template",
    "templates",
    "target_new",
)


def _normalise_template(template: str) -> str:
    """Map "[S]"/"[X]" subject slots to "{}" and drop a trailing LAMA object slot "[Y]"."""
    t = template.replace("[S]", "{}").replace("[X]", "{}").strip()
    if "[Y]" in t:
        head, _, tail = t.rpartition("[Y]")
        if tail.strip() not in ("", ".") or "[Y]" in head:
            raise _RecordProblem(f"object slot [Y] must end the template: {template!r}")
        t = head.rstrip()
    return t


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def _kamel_fact(row: Mapping[str, Any], templates: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    subject_key = _first_key(row, _KAMEL_SUBJECT) or "subject"
    relation_key = _first_key(row, _KAMEL_RELATION)
    if relation_key is None:
        raise _RecordProblem(f"missing relation (one of {', '.join(_KAMEL_RELATION)})")
    relation = _text(row, relation_key)
    objects_key = _first_key(row, _KAMEL_OBJECTS)
    if objects_key is None:
        raise _RecordProblem(f"missing object(s) (one of {', '.join(_KAMEL_OBJECTS)})")
    objects = list(_texts(row, objects_key, scalar_ok=True))
    chosen = _opt_text(row, "chosen_label")
    if chosen is not None:
        objects = [chosen] + [o for o in objects if not _same(o, chosen)]
    objects = [o for o in objects if o.strip()]
    if not objects:
        raise _RecordProblem(f"{objects_key!r} holds no object")
    if row.get("templates") is not None:
        raw = _texts(row, "templates")
    elif row.get("template") is not None:
        raw = (_text(row, "template"),)
    else:
        raw = tuple(templates.get(relation, ()))
    if not raw:
        raise _RecordProblem(
            f"no template for relation {relation!r}: give 'template'/'templates' in the row "
            "or a templates.json next to the file"
        )
    return {
        "subject": _text(row, subject_key),
        "relation": relation,
        "objects": tuple(objects),
        "templates": tuple(_normalise_template(t) for t in raw),
        "target_new": _opt_text(row, "target_new"),
    }


def parse_kamel(
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    origin: str = "<memory>",
    seed: int = 0,
    templates: Mapping[str, Sequence[str]] | None = None,
) -> list[EditRecord]:
    """Parse KAMEL-style triples into `EditRecord`s (see module docstring for the shape)."""
    if not rows:
        raise DatasetError(f"{origin}: dataset is empty")
    _check_format(rows, "kamel", origin)
    facts = _parse_all(rows, origin, lambda i, r: _kamel_fact(r, templates or {}))
    by_relation: dict[str, list[int]] = {}
    for i, fact in enumerate(facts):
        by_relation.setdefault(fact["relation"], []).append(i)

    def build(index: int, row: Mapping[str, Any]) -> EditRecord:
        fact = facts[index]
        true = fact["objects"][0]
        new = fact["target_new"]
        if new is None:
            # Counterfactual target as CounterFact built them: another subject's true
            # object for the same relation.  Seeded per (seed, row) so `limit` and row
            # order elsewhere in the file do not change it.
            pool: list[str] = []
            for j in by_relation[fact["relation"]]:
                cand = facts[j]["objects"][0]
                if not any(_same(cand, o) for o in fact["objects"]) and not any(_same(cand, p) for p in pool):
                    pool.append(cand)
            if not pool:
                raise _RecordProblem(
                    f"no 'target_new' and no other object of relation {fact['relation']!r} to draw one from"
                )
            new = pool[int(np.random.default_rng([seed, index]).integers(len(pool)))]
        neighbours = []
        for j in by_relation[fact["relation"]]:
            other = facts[j]
            if (
                j != index
                and not _same(other["subject"], fact["subject"])
                and any(_same(true, o) for o in other["objects"])
            ):
                neighbours.append(Probe(other["templates"][0].replace("{}", other["subject"]), true))
            if len(neighbours) == _MAX_NEIGHBOURS:
                break
        first, *others = fact["templates"]
        return EditRecord(
            request=EditRequest(
                template=first,
                subject=fact["subject"],
                target_new=new,
                target_true=true,
                case_id=_case_id(row, _KAMEL_IDS, index),
                relation_id=fact["relation"],
            ),
            paraphrase_prompts=tuple(t.replace("{}", fact["subject"]) for t in others),
            neighborhood=tuple(neighbours),
            true_answers=fact["objects"],
            source="kamel",
            meta={**_rest(row, _KAMEL_KEYS), "target_new_drawn": fact["target_new"] is None},
        )

    return _parse_all(rows, origin, build)


def load_kamel(
    path: str | Path,
    limit: int | None = None,
    seed: int = 0,
    templates: Mapping[str, Sequence[str]] | None = None,
) -> list[EditRecord]:
    """Load KAMEL-style triples; relation templates from the rows, `templates`, or `templates.json`."""
    _check_limit(limit)
    p = Path(path)
    rows = read_rows(p)
    sidecar = p.parent / "templates.json"
    needs_sidecar = any(row.get("template") is None and row.get("templates") is None for _, row in rows)
    if templates is None and needs_sidecar and sidecar.is_file():
        templates = _read_templates(sidecar)
    return _apply_limit(parse_kamel(rows, str(p), seed, templates), limit)


def _read_templates(path: Path) -> dict[str, list[str]]:
    text = read_text(path)
    data, end = _decode_value(text, _skip_ws(text, 0), path, "templates")
    if text[end:].strip():
        raise DatasetError(f"{path}: extra data after the JSON object")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected an object mapping relation -> list of templates")
    out = {}
    for relation, value in data.items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DatasetError(f"{path}: templates of {relation!r} must be a string or a list of strings")
        out[relation] = values
    return out


# ----------------------------------------------------------------------------- TOFU


_TOFU_KEYS = (
    "question",
    "answer",
    "paraphrased_answer",
    "paraphrased_question",
    "perturbed_answer",
    "subject",
    "author",
    "split",
)


def split_from_filename(path: str | Path) -> str:
    """`forget01_perturbed.json` -> `forget01`: TOFU names its files after the split."""
    stem = Path(path).name.split(".")[0]
    return stem.removesuffix("_perturbed")


def _tofu_record(row: Mapping[str, Any], split: str | None, default_split: str) -> ForgetRecord:
    subject_key = _first_key(row, ("subject", "author"))
    return ForgetRecord(
        question=_text(row, "question"),
        answer=_text(row, "answer"),
        split=split or _opt_text(row, "split") or default_split,
        subject=_text(row, subject_key) if subject_key else None,
        paraphrased_question=_opt_text(row, "paraphrased_question"),
        paraphrased_answer=_opt_text(row, "paraphrased_answer"),
        perturbed_answers=_texts(row, "perturbed_answer", scalar_ok=True),
        meta=_rest(row, _TOFU_KEYS),
    )


def parse_tofu(
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    origin: str = "<memory>",
    split: str | None = None,
    default_split: str = "unknown",
) -> list[ForgetRecord]:
    """Parse TOFU question/answer rows into `ForgetRecord`s."""
    if not rows:
        raise DatasetError(f"{origin}: dataset is empty")
    _check_format(rows, "tofu", origin)
    return _parse_all(rows, origin, lambda i, r: _tofu_record(r, split, default_split))


def load_tofu(path: str | Path, split: str | None = None, limit: int | None = None) -> list[ForgetRecord]:
    """Load a TOFU split file; the split defaults to the row's `split` or the file name."""
    _check_limit(limit)
    rows = read_rows(path)
    return _apply_limit(parse_tofu(rows, str(path), split, split_from_filename(path)), limit)


# ----------------------------------------------------------------------------- world


WORLD_SPLITS = ("forget01", "forget05", "forget10", "retain", "utility")


def _load_world(part: str | None, seed: int) -> list[EditRecord] | list[ForgetRecord]:
    """Build the built-in world and parse its CounterFact / TOFU exports like any published file.

    Going through the exported rows (not the world's objects) keeps one parsing path: the
    world is checked by the same parsers users run on CounterFact and TOFU, and
    `dlmedit.data.world.export_world` writes exactly these rows to disk.  The import is
    lazy so that loading a published dataset never needs the world module.
    """
    edits = part in (None, "", "edits", "counterfact")
    if not edits and part not in WORLD_SPLITS:
        raise DatasetError(
            f"unknown world part {part!r}; use 'world' (edit records) or one of "
            f"{', '.join('world:' + s for s in WORLD_SPLITS)}"
        )
    from dlmedit.data import world as world_module

    world = world_module.build_world(seed)
    if edits:
        rows = world_module.counterfact_records(world)
        return parse_counterfact(_located(rows), f"world(seed={seed})", source="world")
    split = str(part)
    rows = world_module.tofu_rows(world).get(split, [])
    return parse_tofu(_located(rows), f"world:{split}(seed={seed})", split=split)


def _located(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(f"record {i}", row) for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------- entry point


DATASET_KINDS = ("counterfact", "mcf", "zsre", "kamel", "tofu", "world")


def load_dataset(spec: str, limit: int | None = None, seed: int = 0, world_seed: int = 0) -> list[EditRecord] | list[ForgetRecord]:
    """Load records from a spec: `KIND:FILE` or `world[:PART]`.

    Kinds: `counterfact:FILE` (also `mcf:FILE` for MultiCounterFact), `zsre:FILE`,
    `kamel:FILE`, `tofu:FILE` (or `tofu:FILE#split` to name the split), `world`
    (edit records of the built-in world) and `world:forget01|forget05|forget10|retain|utility`.
    Edit datasets return `EditRecord`s, TOFU and world splits `ForgetRecord`s.
    `seed` drives KAMEL's counterfactual targets; the world is built from `world_seed`
    (default 0, the world the shipped twins were trained on) so that a run's `--seed`
    never silently swaps the facts the models know; `limit` keeps the first records in
    file order.
    """
    _check_limit(limit)
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError("dataset spec is empty; use e.g. 'counterfact:path/to/counterfact.json' or 'world'")
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "world":
        return _apply_limit(_load_world(rest or None, world_seed), limit)
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r} in {spec!r}; expected one of {', '.join(DATASET_KINDS)}")
    if not sep or not rest:
        raise DatasetError(f"dataset spec {spec!r} names no file; use '{kind}:PATH'")
    if kind == "counterfact":
        return load_counterfact(rest, limit)
    if kind == "mcf":
        return load_counterfact(rest, limit, source="mcf")
    if kind == "zsre":
        return load_zsre(rest, limit)
    if kind == "kamel":
        return load_kamel(rest, limit, seed)
    path, _, split = rest.partition("#")
    return load_tofu(path, split or None, limit)

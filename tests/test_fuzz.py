"""Property-based fuzzing of the dataset loaders and request parsing: never a traceback, always the file and line.

Random bytes, random / malformed JSON and JSONL, other encodings, NaN / Infinity, huge and
non-Unicode strings go through the same entry points users call.  Each either returns
records or raises a `DlmeditError` whose message names the file (and the line when the
problem sits on one).  Sized to run in the default suite in well under a minute.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dlmedit.data.loaders import load_dataset
from dlmedit.errors import DlmeditError

# no example database: nothing is written into the work tree
FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("counterfact", "mcf", "zsre", "kamel", "tofu")
_DIR = Path(tempfile.mkdtemp(prefix="dlmedit-fuzz-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
_counter = iter(range(10**9))

# text: any Unicode (lone surrogates included), sometimes huge or blank
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=()), max_size=20),  # includes surrogates (Cs)
    st.sampled_from(["", " ", "{}", "{} is", "\x00", "\ud800", "ÿ", "a" * 100_000, "[Y]", "[X] is [Y]"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)), max_leaves=12)


def _cf_like():
    """CounterFact / zsRE / TOFU / KAMEL-shaped rows whose fields are fuzzed."""
    field = st.one_of(texts, scalars, json_values)
    cf = st.fixed_dictionaries({
        "case_id": st.one_of(st.integers(), texts, scalars),
        "requested_rewrite": st.one_of(st.fixed_dictionaries({
            "prompt": st.one_of(st.just("{} was born in"), field), "subject": st.one_of(st.just("Varo"), field),
            "target_new": st.one_of(st.fixed_dictionaries({"str": field}), field),
            "target_true": st.one_of(st.fixed_dictionaries({"str": field}), field)}), field),
    }, optional={"paraphrase_prompts": st.one_of(st.lists(field, max_size=3), field),
                 "neighborhood_prompts": st.one_of(st.lists(field, max_size=3), field),
                 "portability": field})
    zsre = st.fixed_dictionaries({"src": st.one_of(st.just("Where was Varo born?"), field),
                                  "subject": st.one_of(st.just("Varo"), field), "alt": field,
                                  "answers": st.one_of(st.lists(field, max_size=2), field)},
                                 optional={"rephrase": field, "loc": field, "loc_ans": field})
    tofu = st.fixed_dictionaries({"question": field, "answer": field},
                                 optional={"perturbed_answer": field, "paraphrased_answer": field, "split": field})
    kamel = st.fixed_dictionaries({"subject": field, "relation": field, "objects": field},
                                  optional={"template": field, "templates": field, "object": field})
    return st.one_of(cf, zsre, tofu, kamel)


def _write(data: bytes) -> Path:
    path = _DIR / f"data{next(_counter)}.json"
    path.write_bytes(data)
    return path


def _check_load(kind: str, path: Path) -> None:
    """Load and classify the outcome: records, or a DlmeditError naming the file (and the line)."""
    try:
        records = load_dataset(f"{kind}:{path}", seed=0)
    except DlmeditError as exc:
        message = str(exc)
        assert str(path) in message, message
        assert "line" in message or "empty" in message, message
        return
    assert isinstance(records, list) and records


def _dump(rows: list, layout: str, allow_nan: bool = True) -> str:
    if layout == "list":
        return json.dumps(rows, indent=1, allow_nan=allow_nan)
    if layout == "list-compact":
        return json.dumps(rows, allow_nan=allow_nan)
    return "\n".join(json.dumps(r, allow_nan=allow_nan) for r in rows) + "\n"


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.binary(max_size=600))
def test_random_bytes(kind, data):
    _check_load(kind, _write(data))


@FUZZ
@given(kind=st.sampled_from(KINDS), rows=st.lists(json_values, max_size=5),
       layout=st.sampled_from(["list", "list-compact", "jsonl"]))
def test_random_json_values(kind, rows, layout):
    try:
        text = _dump(rows, layout)
    except (UnicodeEncodeError, ValueError):
        assume(False)
    _check_load(kind, _write(text.encode("utf-8", "surrogatepass")))


@FUZZ
@given(kind=st.sampled_from(KINDS), rows=st.lists(_cf_like(), min_size=1, max_size=4),
       layout=st.sampled_from(["list", "list-compact", "jsonl"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "utf-8-surrogatepass"]),
       cut=st.one_of(st.none(), st.floats(min_value=0, max_value=1)))
def test_dataset_shaped_rows_encodings_and_truncation(kind, rows, layout, encoding, cut):
    text = _dump(rows, layout)
    if encoding == "utf-8-surrogatepass":
        data = text.encode("utf-8", "surrogatepass")
    else:
        try:
            data = text.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "strict")
        except UnicodeEncodeError:
            data = text.encode(encoding, "replace")
    if cut is not None:
        data = data[: int(len(data) * cut)]
    _check_load(kind, _write(data))


@FUZZ
@given(rows=st.lists(_cf_like(), min_size=1, max_size=3), number=st.sampled_from([math.nan, math.inf, -math.inf]),
       at=st.integers(min_value=0, max_value=2), layout=st.sampled_from(["list", "jsonl"]))
def test_nan_and_infinity_are_refused_with_the_line(rows, number, at, layout):
    rows = [dict(r) for r in rows]
    rows[min(at, len(rows) - 1)]["score"] = number
    try:
        text = _dump(rows, layout)
    except ValueError:
        assume(False)
    path = _write(text.encode("utf-8", "surrogatepass"))
    with pytest.raises(DlmeditError) as info:
        load_dataset(f"counterfact:{path}")
    message = str(info.value)
    assert str(path) in message and "line" in message, message


# ----------------------------------------------------------------------------- request parsing


@FUZZ
@given(prompt=st.one_of(st.none(), texts), subject=st.one_of(st.none(), texts),
       target_new=st.one_of(st.none(), texts), target_true=st.one_of(st.none(), texts))
def test_edit_options_to_requests(prompt, subject, target_new, target_true):
    """What `dlmedit edit --prompt/--subject/--target-new/--target-true` does with its texts before any model work."""
    from dlmedit.cli.app import check_cli_inputs
    from dlmedit.cli.edit import _requests_from_options

    try:
        check_cli_inputs(texts={"--prompt": prompt, "--subject": subject, "--target-new": target_new,
                                "--target-true": target_true})
        records = _requests_from_options(None, prompt, subject, target_new, target_true, None, 0)
    except DlmeditError as exc:
        assert "--" in str(exc) or "subject" in str(exc) or "target" in str(exc), str(exc)
        return
    except typer.BadParameter as exc:
        assert "--" in exc.format_message()
        return
    request = records[0].request
    # a prompt holding "{}" is taken as the template itself (EasyEdit / ROME style)
    assert request.prompt == (prompt.replace("{}", subject) if "{}" in prompt else prompt)
    request.prompt.encode("utf-8")  # never a string a tokenizer would choke on


@FUZZ
@given(requests=st.one_of(json_values, st.lists(_cf_like(), max_size=3), _cf_like(),
                          st.lists(st.dictionaries(st.sampled_from(["prompt", "subject", "target_new", "target_true",
                                                                    "ground_truth", "case_id"]),
                                                   st.one_of(texts, scalars, json_values)), max_size=3)))
def test_python_api_request_parsing(requests):
    """`dlmedit.data.requests.edit_records` (the API's and the CLI's request parser) on arbitrary input."""
    requests_module = pytest.importorskip("dlmedit.data.requests")
    if isinstance(requests, str):
        requests = {"prompt": requests}  # a string is a dataset spec; specs are fuzzed above
    try:
        records = requests_module.edit_records(requests)
    except DlmeditError:
        return
    for record in records:
        for text in (record.request.template, record.request.subject, record.request.target_new):
            text.encode("utf-8")


@FUZZ
@given(text=texts)
def test_option_parsers(text):
    """The CLI's own small parsers: a value or a clear error, never another exception."""
    from dlmedit.cli.edit import _parse_layers
    from dlmedit.cli.eval import parse_hparams, parse_lengths
    from dlmedit.cli.study import parse_stage_options
    from dlmedit.cli.unlearn import _parse_sweep

    for parse in (lambda: parse_hparams([text]), lambda: parse_lengths(text), lambda: _parse_layers(text),
                  lambda: _parse_sweep(text), lambda: parse_stage_options([text])):
        try:
            parse()
        except (DlmeditError, typer.BadParameter):
            pass

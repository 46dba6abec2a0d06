"""Every failure a user can cause is one line naming the input, exit code 2, and no traceback.

The table below drives the real command group in-process (typer's CliRunner calls the
same ``DlmeditGroup.main`` as the console script; `test_console_script_*` check that the
installed ``dlmedit`` script behaves the same in a subprocess).  Nearly every case fails
before a model is loaded, so the table runs in seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlmedit.cli.main import app

runner = CliRunner()

NON_UTF8 = "caf\udce9"  # what Python makes of the bytes b"caf\xe9" (Latin-1) on a UTF-8 command line


class _Unpickle:
    """Unpickling this creates a directory: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _cf_row(i: int, subject: str = "Varo Kelmin") -> dict:
    return {"case_id": i, "requested_rewrite": {"prompt": "{} was born in", "subject": subject,
                                                 "target_new": {"str": "Xanthe"}, "target_true": {"str": "Pelmora"}}}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken checkpoints, files and folders, built once."""
    import torch
    from tiny_models import write_checkpoint

    root = tmp_path_factory.mktemp("bad")
    good = write_checkpoint("llama", root / "good")
    paths: dict[str, Path] = {"root": root, "good": good}

    def copy(name: str) -> Path:
        dst = root / name
        shutil.copytree(good, dst)
        return dst

    truncated = copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    paths["truncated"] = truncated

    garbage = copy("garbage")
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    paths["garbage"] = garbage

    empty_weights = copy("empty_weights")
    (empty_weights / "model.safetensors").write_bytes(b"")
    paths["empty_weights"] = empty_weights

    pickle_only = copy("pickle_only")
    (pickle_only / "model.safetensors").unlink()
    paths["marker"] = root / "UNPICKLED"
    torch.save({"model.embed_tokens.weight": _Unpickle(paths["marker"])}, pickle_only / "pytorch_model.bin")
    paths["pickle_only"] = pickle_only

    missing_shard = copy("missing_shard")
    (missing_shard / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}), encoding="utf-8")
    paths["missing_shard"] = missing_shard

    no_tok = copy("no_tokenizer")
    for f in no_tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    paths["no_tokenizer"] = no_tok

    bad_config = copy("bad_config")
    (bad_config / "config.json").write_text("{not json", encoding="utf-8")
    paths["bad_config"] = bad_config
    latin_config = copy("latin_config")
    (latin_config / "config.json").write_bytes(b'{"model_type": "ll\xe9ma"}')
    paths["latin_config"] = latin_config
    no_config = copy("no_config")
    (no_config / "config.json").unlink()
    paths["no_config"] = no_config

    paths["file"] = root / "a_file.txt"
    paths["file"].write_text("x", encoding="utf-8")

    cf = [_cf_row(0), _cf_row(1, "MiraOstel")]
    paths["cf_latin1"] = root / "cf_latin1.json"
    paths["cf_latin1"].write_bytes(json.dumps(cf, indent=1).replace("Mira", "M\u00efra").encode("latin-1"))
    paths["cf_nan"] = root / "cf_nan.jsonl"
    paths["cf_nan"].write_text(json.dumps(cf[0]) + "\n" + json.dumps({**cf[1], "case_id": float("nan")}) + "\n",
                               encoding="utf-8")
    paths["cf_truncated"] = root / "cf_truncated.json"
    paths["cf_truncated"].write_text(json.dumps(cf, indent=1)[:-40], encoding="utf-8")
    paths["cf_utf16"] = root / "cf_utf16.json"
    paths["cf_utf16"].write_bytes(json.dumps(cf).encode("utf-16"))
    paths["cf_empty_subject"] = root / "cf_empty_subject.json"
    paths["cf_empty_subject"].write_text(json.dumps([_cf_row(0), _cf_row(1, "")]), encoding="utf-8")
    paths["tofu_latin1"] = root / "forget01.json"
    paths["tofu_latin1"].write_bytes(b'[{"question": "Who is X?", "answer": "Caf\xe9"}]')
    paths["tofu_not_list_of_objects"] = root / "forget05.json"
    paths["tofu_not_list_of_objects"].write_text("[1, 2, 3]", encoding="utf-8")
    return paths


def _cases() -> list[tuple[str, list[str], list[str]]]:
    """(case id, argv with {placeholders}, substrings the message must contain)."""
    out_ok = "{root}/out_{id}"
    file_out = "{file}"
    under_file = "{file}/sub/out"
    unwritable = "/sys/kernel/dlmedit-out"
    edit = ["edit", "-m", "builtin:arm", "--prompt", "Varo Kelmin was born in", "--subject", "Varo Kelmin",
            "--target-new", "Xanthe"]
    unl = ["unlearn", "-m", "builtin:arm", "--utility", "", "--n-retain", "4", "--out", out_ok]
    ev = ["eval", "-m", "builtin:arm", "--method", "rome", "--dataset", "world", "--limit", "2"]
    return [
        # --- checkpoints: corrupt weights, pickle, missing pieces
        ("truncated-safetensors", ["generate", "-m", "{truncated}", "-p", "a b"], ["model.safetensors", "truncated"]),
        ("garbage-safetensors", ["generate", "-m", "{garbage}", "-p", "a b"], ["model.safetensors", "not a valid safetensors"]),
        ("empty-safetensors", ["score", "-m", "{empty_weights}", "-p", "a", "-t", "b"], ["model.safetensors", "no header"]),
        ("pickle-only", ["generate", "-m", "{pickle_only}", "-p", "a b"], ["pickle", "safe_serialization=True"]),
        ("pickle-only-edit", [*edit, "-m", "{pickle_only}", "--out", out_ok], ["pickle", "safetensors only"]),
        ("missing-shard", ["generate", "-m", "{missing_shard}", "-p", "a"], ["model-00001-of-00002.safetensors"]),
        ("no-tokenizer", ["generate", "-m", "{no_tokenizer}", "-p", "a b"], ["no tokenizer files", "--tokenizer"]),
        ("tokenizer-missing-path", ["generate", "-m", "{good}", "--tokenizer", "{root}/nope", "-p", "a"],
         ["--tokenizer", "does not exist"]),
        ("tokenizer-not-a-tokenizer", ["generate", "-m", "{good}", "--tokenizer", "{file}", "-p", "a"],
         ["--tokenizer", "not a tokenizer.json"]),
        ("config-not-json", ["generate", "-m", "{bad_config}", "-p", "a"], ["config.json", "not valid JSON"]),
        ("config-not-utf8", ["generate", "-m", "{latin_config}", "-p", "a"], ["config.json", "not UTF-8"]),
        ("no-config", ["generate", "-m", "{no_config}", "-p", "a"], ["config.json"]),
        ("model-missing", ["generate", "-m", "{root}/nowhere", "-p", "a"], ["does not exist"]),
        ("model-is-file", ["generate", "-m", "{file}", "-p", "a"], ["not a directory"]),
        ("unknown-builtin", ["generate", "-m", "builtin:nope", "-p", "a"], ["builtin:nope", "known"]),
        # --- texts: empty options, non-UTF-8 bytes
        ("edit-empty-subject", [*edit[:6], "", *edit[7:], "--out", out_ok], ["--subject is empty"]),
        ("edit-empty-target-new", [*edit[:8], "", "--out", out_ok], ["--target-new is empty"]),
        ("edit-empty-prompt", [*edit[:4], "", *edit[5:], "--out", out_ok], ["--prompt is empty"]),
        ("edit-non-utf8-prompt", [*edit[:4], NON_UTF8 + " Varo Kelmin", *edit[5:], "--out", out_ok],
         ["--prompt", "not valid UTF-8"]),
        ("edit-non-utf8-target", [*edit[:8], NON_UTF8, "--out", out_ok], ["--target-new", "not valid UTF-8"]),
        ("edit-subject-not-in-prompt", [*edit[:6], "Mira Ostel", *edit[7:], "--out", out_ok],
         ["Mira Ostel", "does not occur"]),
        ("generate-non-utf8-prompt", ["generate", "-m", "builtin:arm", "-p", NON_UTF8], ["--prompt", "UTF-8"]),
        ("generate-empty-prompt", ["generate", "-m", "builtin:arm", "-p", " "], ["--prompt is empty"]),
        ("score-empty-target", ["score", "-m", "builtin:arm", "-p", "a", "-t", ""], ["--target is empty"]),
        ("score-pairs", ["score", "-m", "builtin:arm", "-p", "a", "-p", "b", "-t", "c"], ["one --target per --prompt"]),
        ("trace-non-utf8-subject", ["trace", "-m", "builtin:arm", "-p", "Varo Kelmin was born in", "-s", NON_UTF8,
                                    "--out", out_ok], ["--subject", "UTF-8"]),
        # --- output folders, checked before any model work
        ("edit-out-is-file", [*edit, "--out", file_out], ["--out", "existing file"]),
        ("edit-out-under-file", [*edit, "--out", under_file], ["--out", "lies under", "a_file.txt"]),
        ("edit-out-unwritable", [*edit, "--out", unwritable], ["--out", "not writable"]),
        ("eval-out-is-file", [*ev, "--out", file_out], ["--out", "existing file"]),
        ("eval-out-under-file", [*ev, "--out", under_file], ["--out", "lies under"]),
        ("eval-out-unwritable", [*ev, "--out", unwritable], ["--out", "not writable"]),
        ("study-out-is-file", ["study", "--quick", "--out", file_out], ["--out", "existing file"]),
        ("study-out-under-file", ["study", "--quick", "--out", under_file], ["--out", "lies under"]),
        ("trace-out-under-file", ["trace", "-m", "builtin:arm", "-p", "Varo Kelmin was born in", "-s", "Varo Kelmin",
                                  "--out", under_file], ["--out", "lies under"]),
        ("unlearn-out-is-file", [*unl[:-1], file_out], ["--out", "existing file"]),
        ("unlearn-save-memory-under-file", [*unl, "--save-memory", under_file], ["--save-memory", "lies under"]),
        ("world-export-out-is-file", ["world", "export", "--out", file_out], ["--out", "existing file"]),
        ("world-train-out-under-file", ["world", "train", "--paradigm", "arm", "--out", under_file], ["--out", "lies under"]),
        # --- the memory's settings (library checks, reached through the CLI)
        ("unlearn-q-0", [*unl, "--q", "0"], ["q (--q)", "at least 1"]),
        ("unlearn-q-wider-than-site", [*unl, "--q", "100000"], ["q (--q)", "larger than the width"]),
        ("unlearn-lambda-negative", [*unl, "--lambda", "-1"], ["λ (--lambda)", "≥ 0"]),
        ("unlearn-lambda-nan", [*unl, "--lambda", "nan"], ["λ (--lambda)"]),
        ("unlearn-alpha-0", [*unl, "--alpha", "0"], ["α (--alpha)", "> 0"]),
        ("unlearn-alpha-inf", [*unl, "--alpha", "inf"], ["α (--alpha)"]),
        ("unlearn-gate-2", [*unl, "--gate", "2"], ["gate (--gate)", "(-1, 1)"]),
        ("unlearn-site", [*unl, "--site", "nowhere"], ["--site", "nowhere"]),
        ("unlearn-key-stats", [*unl, "--key-stats", "bogus"], ["--key-stats", "bogus"]),
        ("unlearn-n-states-0", [*unl, "--n-states", "0"], ["--n-states"]),
        ("unlearn-sweep-nan", [*unl, "--sweep", "alpha=1,nan"], ["--sweep", "finite"]),
        ("unlearn-sweep-knob", [*unl, "--sweep", "beta=1"], ["--sweep"]),
        ("unlearn-method", [*unl, "--method", "forgetit"], ["forgetit"]),
        ("unlearn-lr-negative", [*unl, "--lr", "-0.1"], ["--lr", "> 0"]),
        # --- dataset files: encodings, JSON, records
        ("unlearn-forget-latin1", [*unl, "--forget", "tofu:{tofu_latin1}"], ["forget01.json", "line 1", "UTF-8"]),
        ("unlearn-forget-not-objects", [*unl, "--forget", "tofu:{tofu_not_list_of_objects}"],
         ["forget05.json", "record 0", "line 1", "expected a JSON object"]),
        ("edit-requests-latin1", ["edit", "-m", "builtin:arm", "--requests", "counterfact:{cf_latin1}", "--out", out_ok],
         ["cf_latin1.json", "line", "not valid UTF-8"]),
        ("edit-requests-utf16", ["edit", "-m", "builtin:arm", "--requests", "counterfact:{cf_utf16}", "--out", out_ok],
         ["cf_utf16.json", "UTF-16"]),
        ("edit-requests-nan", ["edit", "-m", "builtin:arm", "--requests", "counterfact:{cf_nan}", "--out", out_ok],
         ["cf_nan.jsonl", "line 2", "NaN is not valid JSON"]),
        ("edit-requests-missing", ["edit", "-m", "builtin:arm", "--requests", "counterfact:{root}/none.json",
                                   "--out", out_ok], ["none.json", "not found"]),
        ("edit-requests-and-prompt", [*edit, "--requests", "world", "--out", out_ok], ["not both"]),
        ("eval-dataset-truncated", [*ev[:6], "counterfact:{cf_truncated}", "--out", out_ok],
         ["cf_truncated.json", "line"]),
        ("eval-dataset-latin1", [*ev[:6], "zsre:{cf_latin1}", "--out", out_ok], ["cf_latin1.json", "UTF-8"]),
        ("eval-dataset-empty-subject", [*ev[:6], "counterfact:{cf_empty_subject}", "--out", out_ok],
         ["cf_empty_subject.json", "record 1", "subject is empty", "line"]),
        ("eval-dataset-kind", [*ev[:6], "wikidata:x.json", "--out", out_ok], ["unknown dataset kind", "wikidata"]),
        # --- other options
        ("edit-method", [*edit, "--method", "bogus", "--out", out_ok], ["bogus", "rome"]),
        ("edit-target-states", [*edit, "--target-states", "halfway", "--out", out_ok], ["--target-states", "halfway"]),
        ("edit-layers", [*edit, "--layers", "three", "--out", out_ok], ["--layers"]),
        ("edit-limit-0", ["edit", "-m", "builtin:arm", "--requests", "world", "--limit", "0", "--out", out_ok],
         ["--limit"]),
        ("eval-method", [*ev[:4], "bogus", *ev[5:], "--out", out_ok], ["bogus"]),
        ("eval-lengths", [*ev, "--lengths", "7", "--out", out_ok], ["--lengths", "7"]),
        ("eval-limit-0", [*ev[:-1], "0", "--out", out_ok], ["--limit"]),
        ("eval-protocol", [*ev, "--protocol", "parallel", "--out", out_ok], ["protocol", "parallel"]),
        ("eval-hparam", [*ev, "--hparam", "nonsense", "--out", out_ok], ["--hparam", "key=value"]),
        ("eval-batch-size-0", [*ev, "--batch-size", "0", "--out", out_ok], ["--batch-size"]),
        ("trace-sites", ["trace", "-m", "builtin:arm", "-p", "Varo Kelmin was born in", "-s", "Varo Kelmin",
                         "--sites", "everywhere", "--out", out_ok], ["everywhere"]),
        ("trace-prompt-without-subject", ["trace", "-m", "builtin:arm", "-p", "Varo Kelmin was born in",
                                          "--out", out_ok], ["subject"]),
        ("world-train-paradigm", ["world", "train", "--paradigm", "gpt", "--out", out_ok], ["paradigm"]),
        ("world-train-recipe", ["world", "train", "--paradigm", "arm", "--recipe", "[1,", "--out", out_ok],
         ["--recipe"]),
        ("apply-missing-delta", ["apply", "-m", "builtin:arm", "--delta", "{root}/no_delta"], ["no_delta"]),
        ("study-model-missing", ["study", "--quick", "--models", "builtin:arm,{root}/nowhere", "--out", out_ok],
         ["nowhere", "does not exist"]),
        ("trace-facts-latin1", ["trace", "-m", "builtin:arm", "--facts", "{cf_latin1}", "--out", out_ok],
         ["cf_latin1.json", "UTF-8"]),
        ("unlearn-reference-missing", [*unl, "--reference", "{root}/noref"], ["noref", "does not exist"]),
        ("study-option", ["study", "--quick", "--option", "nostage.x=1", "--out", out_ok], ["--option", "nostage"]),
        # --- parse errors (before a command runs)
        ("not-an-integer", [*unl, "--q", "abc"], ["--q", "integer"]),
        ("unknown-option", ["generate", "-m", "builtin:arm", "-p", "a", "--frobnicate"], ["--frobnicate"]),
        ("missing-option", ["edit", "-m", "builtin:arm"], ["--out"]),
        ("unknown-command", ["frobnicate"], ["frobnicate"]),
    ]


CASES = _cases()


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


def _fill(items: list[str], env: dict[str, Path], case_id: str) -> list[str]:
    values = {k: str(v) for k, v in env.items()} | {"id": case_id}
    return [item.format(**values) if "{" in item else item for item in items]


@pytest.mark.parametrize(("case_id", "argv", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(env, case_id, argv, expected):
    args = _fill(argv, env, case_id)
    result = runner.invoke(app, args)
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code} for {args}:\n{output}\n{result.exception!r}"
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith(("error:", "error ("))]
    assert len(errors) == 1, output
    for part in expected:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    if case_id.startswith("pickle"):
        assert not env["marker"].exists(), "the pickle file was unpickled"


def test_out_is_checked_before_the_model_loads(env, monkeypatch):
    """A bad --out fails before load_model is ever called (edit used to fail after computing the edit)."""
    import dlmedit

    def boom(*_a, **_k):
        raise AssertionError("load_model called")

    monkeypatch.setattr(dlmedit, "load_model", boom)
    for command in (["edit", "-m", "builtin:arm", "--prompt", "a b", "--subject", "a", "--target-new", "c"],
                    ["eval", "-m", "builtin:arm", "--method", "rome", "--dataset", "world"]):
        result = runner.invoke(app, [*command, "--out", str(env["file"])])
        assert result.exit_code == 2 and "existing file" in result.output, result.output


def test_pickle_only_checkpoint_never_reaches_torch_load(env, monkeypatch):
    """The payload does create its marker when torch.load unpickles it; dlmedit never does."""
    import torch

    from dlmedit import load_model
    from dlmedit.errors import CheckpointNotFoundError

    loads: list[object] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(CheckpointNotFoundError, match="pickle weights"):
        load_model(str(env["pickle_only"]))
    assert not env["marker"].exists() and loads == []
    # the payload is live: unpickling it (which dlmedit refused to do) creates the marker
    real_load(env["pickle_only"] / "pytorch_model.bin", weights_only=False)
    assert env["marker"].is_dir()
    env["marker"].rmdir()


def test_corrupt_weights_and_tokenizer_errors_in_the_python_api(env):
    from dlmedit import load_model
    from dlmedit.errors import CheckpointNotFoundError, CorruptCheckpointError, DlmeditError

    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_model(str(env["truncated"]))
    with pytest.raises(CorruptCheckpointError, match="not a valid safetensors"):
        load_model(str(env["garbage"]))
    with pytest.raises(CheckpointNotFoundError, match="tokenizer="):
        load_model(str(env["no_tokenizer"]))
    with pytest.raises(DlmeditError, match="embedding has"):
        from tiny_models import build_tokenizer

        big = build_tokenizer(extra_words=tuple(f"w{i}" for i in range(200)))
        load_model(str(env["no_tokenizer"]), tokenizer=big)


def test_tokenizer_option_loads_a_checkpoint_without_tokenizer_files(env):
    from dlmedit import load_model

    lm = load_model(str(env["no_tokenizer"]), tokenizer=str(env["good"]))
    ref = load_model(str(env["good"]))
    assert lm.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    result = runner.invoke(app, ["generate", "-m", str(env["no_tokenizer"]), "--tokenizer", str(env["good"]),
                                 "-p", "the capital of france is", "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["outputs"][0]["prompt"] == "the capital of france is"


def test_memory_settings_are_checked_in_the_library():
    from dlmedit.errors import InvalidSettingError
    from dlmedit.unlearn.experiments import MemorySettings

    for kwargs, text in (({"q": 0}, "q (--q)"), ({"lam": -1.0}, "λ"), ({"alpha": 0.0}, "α"),
                         ({"alpha": float("nan")}, "α"), ({"gate": 1.5}, "gate"), ({"site": "x"}, "site"),
                         ({"key_stats": "x"}, "key statistics"), ({"n_states": 0}, "n_states")):
        with pytest.raises(InvalidSettingError, match=re.escape(text)):
            MemorySettings(**kwargs)


def test_every_command_uses_the_single_error_path():
    from typer.main import get_command

    def walk(command, path=()):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, command

    commands = list(walk(get_command(app)))
    assert len(commands) >= 12
    unwrapped = [" ".join(p) for p, c in commands if not getattr(c.callback, "__dlmedit_friendly__", False)]
    assert unwrapped == []


def test_unexpected_exception_is_one_line_with_exit_1(monkeypatch):
    import dlmedit.models.loading as loading

    def bug(*_a, **_k):
        raise KeyError("a bug")

    monkeypatch.setattr(loading, "resolve_path", bug)
    monkeypatch.delenv("DLMEDIT_DEBUG", raising=False)
    result = runner.invoke(app, ["generate", "-m", "builtin:arm", "-p", "a"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "unexpected KeyError" in result.output and "rerun with --verbose for the traceback" in result.output
    monkeypatch.setenv("DLMEDIT_DEBUG", "1")
    result = runner.invoke(app, ["generate", "-m", "builtin:arm", "-p", "a"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)  # the traceback is shown


def test_verbose_adds_the_traceback_to_a_user_error(env, monkeypatch):
    monkeypatch.setenv("DLMEDIT_DEBUG", "1")
    result = runner.invoke(app, ["generate", "-m", str(env["truncated"]), "-p", "a"])
    assert result.exit_code == 2
    assert "Traceback" in result.output and result.output.strip().splitlines()[-1].startswith("error (")


def _console(args: list[bytes | str], **env: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("dlmedit")
    return subprocess.run([str(script), *args], capture_output=True, timeout=300,
                          env={**os.environ, "DLMEDIT_DEBUG": "", **env})


def test_console_script_matches_the_table(env, tmp_path):
    """The installed script (not CliRunner): raw non-UTF-8 argv bytes, and a parse error before any command runs."""
    if not Path(sys.executable).with_name("dlmedit").exists():
        pytest.skip("the dlmedit console script is not installed next to this python")
    bad_bytes = _console([b"generate", b"-m", b"builtin:arm", b"-p", b"caf\xe9"])
    assert bad_bytes.returncode == 2, bad_bytes.stderr
    err = bad_bytes.stderr.decode()
    assert "Traceback" not in err and "--prompt" in err and "UTF-8" in err
    parse = _console(["unlearn", "--q", "abc", "--out", str(tmp_path / "u")])
    assert parse.returncode == 2 and b"--q" in parse.stderr and b"Traceback" not in parse.stderr

"""`dlmedit edit` (compute and save a weight edit) and `dlmedit apply` (load a saved edit onto a model)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from dlmedit.cli.app import app, check_cli_inputs, echo_json, friendly_errors, seed_everything, tokenizer_option
from dlmedit.cli.models import LogitShiftOpt, MaskIdOpt, ParadigmOpt, family_options

METHODS = ("rome", "memit", "alphaedit", "ft")
STATE_KINDS = ("final", "partial", "trajectory")


def _parse_layers(text: str | None) -> Any:
    if text is None:
        return None
    text = text.strip()
    if text == "trace":
        return "trace"
    try:
        items = [float(x) if "." in x else int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"--layers expects comma-separated indices / fractions or 'trace', got {text!r}") from None
    return items


def _requests_from_options(
    requests_spec: str | None, prompt: str | None, subject: str | None, target_new: str | None,
    target_true: str | None, limit: int | None, seed: int,
) -> list[Any]:
    """The records to edit from the flags; the shapes and checks are `dlmedit.data.requests.edit_records`'s."""
    from dlmedit.data.requests import edit_records

    if requests_spec is not None and (prompt or subject or target_new):
        raise typer.BadParameter("give either --requests or --prompt/--subject/--target-new, not both")
    if requests_spec is None and not (prompt and subject and target_new):
        raise typer.BadParameter("give --requests FILE, or all of --prompt, --subject and --target-new")
    if requests_spec is not None:
        return edit_records(requests_spec, limit=limit, seed=seed)
    return edit_records(prompts=prompt, subject=subject, target_new=target_new, ground_truth=target_true)


def _probe(lm: Any, requests: list[Any], max_new_tokens: int | None) -> list[dict[str, Any]]:
    """Scores of target_new / target_true and a real generation after each request's prompt."""
    from dlmedit.evaluate.measure import MeasureSettings, generation_plan

    prompts = [r.prompt for r in requests]
    new = lm.score(prompts, [r.target_new for r in requests])
    true_idx = [i for i, r in enumerate(requests) if r.target_true is not None]
    true = lm.score([prompts[i] for i in true_idx], [requests[i].target_true for i in true_idx]) if true_idx else []
    true_by = dict(zip(true_idx, true, strict=True))
    out = []
    for i, r in enumerate(requests):
        window = max_new_tokens or generation_plan(lm, len(new[i].target_ids), MeasureSettings())[1]
        gen = lm.generate([r.prompt], window)
        row: dict[str, Any] = {
            "logprob_new": new[i].total, "mean_nll_new": new[i].mean_nll, "estimator": new[i].estimator,
            "generation": gen.texts[0],
        }
        if i in true_by:
            row["logprob_true"] = true_by[i].total
            row["mean_nll_true"] = true_by[i].mean_nll
            row["new_beats_true"] = bool(new[i].mean_nll < true_by[i].mean_nll)
        out.append(row)
    return out


@app.command("edit")
@friendly_errors
def edit_command(
    model: str = typer.Option(..., "--model", "-m", help="alias (see `dlmedit models`) or checkpoint directory"),
    method: str = typer.Option("rome", help="rome | memit | alphaedit | ft"),
    requests: str = typer.Option(None, "--requests", help="dataset spec (counterfact:FILE, zsre:FILE, kamel:FILE, world, …)"),
    prompt: str = typer.Option(None, help="prompt containing the subject, e.g. 'The capital of France is'"),
    subject: str = typer.Option(None, help="subject as it appears in the prompt"),
    target_new: str = typer.Option(None, "--target-new", help="the new answer"),
    target_true: str = typer.Option(None, "--target-true", help="the current answer (optional, for scores)"),
    limit: int = typer.Option(None, help="with --requests: edit only the first N records"),
    layers: str = typer.Option(None, help="comma-separated layer indices or depth fractions, or 'trace'"),
    target_states: str = typer.Option(None, "--target-states", help="final | partial | trajectory (the MDM correction)"),
    key_states: str = typer.Option(None, "--key-states",
                                   help="final | partial | trajectory: states the key k* is averaged over"),
    hparam: list[str] = typer.Option([], "--hparam", help="override a hyper-parameter: key=value (repeat)"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "--out", help="directory for the delta and edit.json"),
    max_new_tokens: int = typer.Option(None, help="generation length for before/after probes (default: answer length)"),
    trust_remote_code: bool = typer.Option(False),
    tokenizer: str = tokenizer_option(),
    paradigm: str = ParadigmOpt,
    logit_shift: int = LogitShiftOpt,
    mask_token_id: int = MaskIdOpt,
) -> None:
    """Compute a weight edit, save it (delta.safetensors + delta.json) and before/after probes (edit.json)."""
    from dlmedit import load_model
    from dlmedit.edit.editor import get_editor
    from dlmedit.edit.hparams import parse_hparam_overrides

    check_cli_inputs(outs={"--out": out}, models=[model], tokenizer=tokenizer,
                     texts={"--prompt": prompt, "--subject": subject, "--target-new": target_new,
                            "--target-true": target_true, "--requests": requests})
    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if limit is not None and limit < 1:
        raise typer.BadParameter(f"--limit must be a positive number of records, got {limit}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise typer.BadParameter(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    for name, value in (("--target-states", target_states), ("--key-states", key_states)):
        if value is not None and value not in STATE_KINDS:
            raise typer.BadParameter(f"{name} must be one of {', '.join(STATE_KINDS)}, got {value!r}")
    seed_everything(seed)
    records = _requests_from_options(requests, prompt, subject, target_new, target_true, limit, seed)
    reqs = [r.request for r in records]
    overrides = parse_hparam_overrides(hparam)
    if layers is not None:
        overrides["layers"] = _parse_layers(layers)
    if target_states is not None:
        overrides["target_states"] = target_states
    if key_states is not None:
        overrides["key_states"] = key_states
    lm = load_model(model, trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                    **family_options(paradigm, logit_shift, mask_token_id))
    editor = get_editor(method, lm, seed=seed, **overrides)
    before = _probe(lm, reqs, max_new_tokens)
    start = time.perf_counter()
    delta = editor.compute(reqs, progress=lambda m: typer.echo(m, err=True))
    seconds = time.perf_counter() - start
    delta.save(out)
    with delta.apply(lm.module):
        after = _probe(lm, reqs, max_new_tokens)
    report = {
        "model": model, "method": method, "hparams": delta.hparams, "seconds": seconds,
        "seconds_per_edit": seconds / len(reqs), "delta_norms": delta.norms(), "stats": editor_stats(editor),
        "requests": [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                      "target_true": r.target_true, "before": b, "after": a}
                     for r, b, a in zip(reqs, before, after, strict=True)],
    }
    from dlmedit.cache import atomic_write_json

    atomic_write_json(Path(out) / "edit.json", report)
    judged = [a["new_beats_true"] for a in after if "new_beats_true" in a]
    verdict = f"; target_new beats target_true after the edit: {sum(judged)}/{len(judged)}" if judged else ""
    typer.echo(f"{method}: {len(reqs)} edit(s) in {seconds:.1f}s{verdict}; saved to {out}", err=True)
    echo_json({"out": str(out), "seconds": seconds,
               "after": [{"prompt": r.prompt, "generation": a["generation"]} for r, a in zip(reqs, after, strict=True)]})


def editor_stats(editor: Any) -> dict[str, Any]:
    info = getattr(editor, "stats_info", None) or {}
    return {k: v for k, v in info.items() if k in ("cached", "computed", "tokens", "seconds", "corpus")}


@app.command("apply")
@friendly_errors
def apply_command(
    model: str = typer.Option(..., "--model", "-m", help="alias or checkpoint directory the delta was computed on"),
    delta_dir: Path = typer.Option(..., "--delta", help="directory written by `dlmedit edit`"),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="prompt to generate from (default: the edit's prompts)"),
    target: list[str] = typer.Option([], "--target", "-t", help="target to score after each --prompt (optional)"),
    max_new_tokens: int = typer.Option(None, help="tokens to generate (default: the answer window / 8)"),
    force: bool = typer.Option(False, help="apply even if the model's fingerprint differs from the delta's"),
    seed: int = typer.Option(0),
    trust_remote_code: bool = typer.Option(False),
    tokenizer: str = tokenizer_option(),
    paradigm: str = ParadigmOpt,
    logit_shift: int = LogitShiftOpt,
    mask_token_id: int = MaskIdOpt,
) -> None:
    """Load a model, apply a saved edit (fingerprint-checked) and generate / score."""
    from dlmedit import load_model
    from dlmedit.edit.delta import EditDelta

    check_cli_inputs(models=[model], tokenizer=tokenizer, texts={"--prompt": prompt, "--target": target})
    if max_new_tokens is not None and max_new_tokens < 1:
        raise typer.BadParameter(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if target and len(target) != len(prompt):
        raise typer.BadParameter("give one --target per --prompt")
    seed_everything(seed)
    delta = EditDelta.load(delta_dir)
    lm = load_model(model, trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                    **family_options(paradigm, logit_shift, mask_token_id))
    prompts = list(prompt) or [r["template"].replace("{}", r["subject"]) for r in delta.requests]
    if not prompts:
        raise typer.BadParameter("the delta records no requests; pass --prompt")
    handle = delta.apply(lm.module, check_model=not force)
    try:
        window = max_new_tokens or getattr(lm.paradigm, "default_new_tokens", None) or 8
        gen = lm.generate(prompts, window)
        rows: list[dict[str, Any]] = [{"prompt": p, "generation": t} for p, t in zip(prompts, gen.texts, strict=True)]
        if target:
            for row, t, res in zip(rows, target, lm.score(prompts, list(target)), strict=True):
                row.update(target=t, logprob=res.total, mean_nll=res.mean_nll, estimator=res.estimator)
    finally:
        handle.revert()
    echo_json({"model": model, "delta": str(delta_dir), "method": delta.method, "outputs": rows})


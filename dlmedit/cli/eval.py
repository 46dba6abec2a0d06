"""`dlmedit eval`: edit with a method under a protocol, measure every record, write resumable results.

Cheap checks (options, dataset file and format, --out configuration) run before the
model is loaded, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from dlmedit.cli.app import app, check_cli_inputs, echo_json, friendly_errors, tokenizer_option

# the length selection lives in the library (the Python API uses it too); re-exported for callers of this module
from dlmedit.evaluate.session import LENGTH_BUCKETS, parse_lengths, select_lengths  # noqa: F401


def parse_hparams(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they are (numbers, booleans, lists), else strings."""
    from dlmedit.evaluate.measure import EvalConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise EvalConfigError(f"--hparam {item!r}: expected key=value (e.g. --hparam layers=[3,4])")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key in out:
            raise EvalConfigError(f"--hparam {key} given twice")
        out[key] = value
    return out


@app.command("eval")
@friendly_errors
def eval_command(
    method: str = typer.Option(..., "--method", help="rome | memit | alphaedit | ft | none"),
    dataset: str = typer.Option(..., "--dataset", "-d",
                                help="world | counterfact:FILE | mcf:FILE | zsre:FILE | kamel:FILE"),
    out: Path = typer.Option(..., "--out", "-o", help="results directory (results.jsonl, run.json, summary.json)"),
    model: str = typer.Option("builtin:mdm", "--model", "-m", help="alias (see `dlmedit models`) or checkpoint"),
    limit: int = typer.Option(None, help="evaluate the first N records of the dataset (after --lengths)"),
    lengths: str = typer.Option(None, "--lengths",
                                help="keep only records whose target_new has these token-length buckets, "
                                     "e.g. 1 or 3,4+ (buckets 1, 2, 3, 4+; measured with the model's tokenizer)"),
    protocol: str = typer.Option("single", help="single (edit, measure, revert per record) | batch | sequential"),
    every: int = typer.Option(None, help="sequential: re-measure all earlier edits every K edits (default N/10)"),
    target_states: str = typer.Option("final", help="final | partial | trajectory (passed to the editor)"),
    estimator: str = typer.Option(None, help="MDM likelihood: exact | chain | mc_elbo (default exact/chain)"),
    order: str = typer.Option("l2r", help="MDM chain-rule order: l2r | confidence"),
    mc_samples: int = typer.Option(128, help="MDM mc_elbo samples"),
    hparam: list[str] = typer.Option(None, "--hparam", help="editor hyper-parameter key=value (repeatable)"),
    generation: bool = typer.Option(True, "--generation/--no-generation", help="exact match by real generation"),
    gen_window: int = typer.Option(None, help="generation window in tokens (default: answer window or len+2)"),
    sampler: str = typer.Option("llada", help="MDM sampler: llada | dream"),
    remasking: str = typer.Option("low_confidence", help="MDM (llada): low_confidence | random"),
    alg: str = typer.Option("maskgit_plus", help="MDM (dream): origin | maskgit_plus | topk_margin | entropy"),
    steps: int = typer.Option(None, help="MDM denoising steps (default one token per step)"),
    block_length: int = typer.Option(None, help="MDM (llada): semi-autoregressive block length"),
    fluency: bool = typer.Option(False, help="also generate from generation_prompts and report n-gram entropy"),
    fluency_tokens: int = typer.Option(32, help="tokens generated per generation prompt for fluency"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(64, help="sequences per forward pass"),
    chunk_size: int = typer.Option(32, help="records per batched measurement call"),
    overwrite: bool = typer.Option(False, help="discard existing results in --out"),
    trust_remote_code: bool = typer.Option(False, help="allow code from the checkpoint's repository"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    json_out: bool = typer.Option(False, "--json", help="print summary.json to stdout instead of the table"),
    wait: bool = typer.Option(True, "--wait/--no-wait",
                              help="if another process is writing --out: wait for it and then resume (default), "
                                   "or stop at once"),
    tokenizer: str = tokenizer_option(),
) -> None:
    """Edit with METHOD and measure ES/PS/NS, generation exact match, zsRE accuracies, by target length."""
    from rich.console import Console

    from dlmedit import load_model
    from dlmedit.evaluate.runner import EvalConfig, out_lock
    from dlmedit.evaluate.session import evaluate_dataset, measure_settings

    check_cli_inputs(outs={"--out": out}, models=[model], tokenizer=tokenizer, texts={"--dataset": dataset})
    for name, value in (("--mc-samples", mc_samples), ("--batch-size", batch_size), ("--chunk-size", chunk_size),
                        ("--fluency-tokens", fluency_tokens), ("--gen-window", gen_window), ("--steps", steps),
                        ("--block-length", block_length)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"{name} must be at least 1, got {value}")
    settings = measure_settings(estimator=estimator, order=order, mc_samples=mc_samples, generation=generation,
                                gen_window=gen_window, sampler=sampler, remasking=remasking, alg=alg, steps=steps,
                                block_length=block_length, fluency=fluency, fluency_tokens=fluency_tokens,
                                batch_size=batch_size, seed=seed)
    buckets = parse_lengths(lengths)
    config = EvalConfig(model=model, lengths=sorted(buckets) or None, method=method, dataset=dataset, protocol=protocol, limit=limit, every=every,
                        target_states=target_states, hparams=parse_hparams(hparam), seed=seed, measure=settings,
                        chunk_size=chunk_size)
    console = Console(stderr=json_out)
    # the lock is taken before the model loads: a second process on the same --out waits (or stops) first
    with out_lock(out, wait=wait, log=lambda m: typer.echo(m, err=True)):
        summary = evaluate_dataset(
            config, out, lambda: load_model(model, trust_remote_code=trust_remote_code, tokenizer=tokenizer),
            overwrite=overwrite, progress=progress, console=None if json_out else console)
    if json_out:
        echo_json(summary)
    else:
        console.print(f"results: {out / 'results.jsonl'} · summary: {out / 'summary.json'}")

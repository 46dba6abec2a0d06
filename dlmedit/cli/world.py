"""`dlmedit world export | train | recall`: the built-in fact world and its twin models."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dlmedit.cli.app import app, check_cli_inputs, echo_json, friendly_errors, seed_everything, tokenizer_option

#: step counts of the shipped twins' recipes (see README)
DEFAULT_STEPS = {"arm": 1200, "mdm": 9300, "dream": 1000}  # the shipped runs (see dlmedit/builtin/README.md)

world_app = typer.Typer(help="The built-in world of fictitious facts and the twin models trained on it.",
                        no_args_is_help=True)
app.add_typer(world_app, name="world")


@world_app.command("export")
@friendly_errors
def export_command(out: Path = typer.Option(..., "--out"), seed: int = typer.Option(0, "--seed")) -> None:
    """Write the world as CounterFact-format and TOFU-like JSON (plus templates)."""
    from dlmedit.data.world import build_world, export_world

    check_cli_inputs(outs={"--out": out})
    paths = export_world(build_world(seed), out)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@world_app.command("train")
@friendly_errors
def train_command(
    paradigm: str = typer.Option(..., "--paradigm", help="arm | mdm | dream (dream: adapted from --init-from, an ARM twin)"),
    out: Path = typer.Option(..., "--out"),
    steps: int = typer.Option(None, help="training steps (default: the recipe's)"),
    seed: int = typer.Option(0, "--seed"),
    init_from: Path = typer.Option(None, help="checkpoint to start from (required for dream)"),
    exclude_forget: str = typer.Option(None, help="train without a forget split's subjects, e.g. forget10"),
    save_every: int = typer.Option(250),
    eval_every: int = typer.Option(500),
    threads: int = typer.Option(2),
    recipe: str = typer.Option("{}", help='JSON overrides of TwinRecipe fields, e.g. \'{"lr": 0.0015}\''),
) -> None:
    """Train (or resume) a twin; re-running the same command continues from its last checkpoint."""
    import json
    from dataclasses import fields

    from dlmedit.train.twins import TwinRecipe, train_twin

    check_cli_inputs(outs={"--out": out})
    if init_from is not None and not init_from.exists():
        raise typer.BadParameter(f"--init-from {init_from} does not exist; give a trained twin's checkpoint folder")
    for name, value in (("--steps", steps), ("--save-every", save_every), ("--eval-every", eval_every),
                        ("--threads", threads)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"{name} must be at least 1, got {value}")
    try:
        overrides = json.loads(recipe)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--recipe is not valid JSON: {exc}") from None
    known = {f.name for f in fields(TwinRecipe)}
    if not isinstance(overrides, dict) or set(overrides) - known:
        raise typer.BadParameter(f"--recipe must be a JSON object with TwinRecipe fields ({', '.join(sorted(known))})")

    if paradigm not in ("arm", "mdm", "dream"):
        raise typer.BadParameter("paradigm must be arm, mdm or dream")
    seed_everything(seed)
    start = time.perf_counter()
    path = train_twin(paradigm, out, steps=steps or DEFAULT_STEPS[paradigm], seed=seed, init_from=init_from,
                      exclude_forget=exclude_forget or False, save_every=save_every, eval_every=eval_every,
                      n_threads=threads, progress=True, recipe=TwinRecipe(**overrides))
    typer.echo(f"{path} ({time.perf_counter() - start:.0f} s this run)")


@world_app.command("recall")
@friendly_errors
def recall_command(
    model: str = typer.Option("builtin:mdm", "--model", "-m"),
    limit: int = typer.Option(None, help="facts to test (seeded sample; default all)"),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json"),
    batch_size: int = typer.Option(256),
    tokenizer: str = tokenizer_option(),
) -> None:
    """Exact-match recall of the world's facts by real generation, by length bucket and template kind.

    ARMs decode greedily; MDMs denoise a window of masks with LLaDA's low-confidence
    sampler, one token per step.  The answer is the text up to the first EOS.
    """
    from dlmedit import load_model
    from dlmedit.data.world import build_world
    from dlmedit.train.twins import recall_items, recall_lm

    check_cli_inputs(models=[model], tokenizer=tokenizer)
    for name, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"{name} must be at least 1, got {value}")
    seed_everything(seed)
    lm = load_model(model, tokenizer=tokenizer)
    window = getattr(lm.paradigm, "default_new_tokens", None) or getattr(lm.module.config, "dlmedit_answer_window", None) or 8
    items = recall_items(build_world(0), max_facts=limit, seed=seed)
    start = time.perf_counter()
    res = recall_lm(lm, items, window=window, batch_size=batch_size)
    table = {k: {"recall": hit / n, "n": n} for k, (hit, n) in res["counts"].items()}
    result = {"model": model, "paradigm": lm.paradigm.name, "window": window, "recall": table,
              "seconds": round(time.perf_counter() - start, 1)}
    if json_out:
        echo_json(result)
        return
    t = Table(title=f"recall by generation: {model} ({lm.paradigm.name})")
    for col in ("templates", "1", "2", "3", "4+", "all"):
        t.add_column(col)
    for group in ("train", "heldout"):
        t.add_row(group, *[f"{table[f'{group}/{b}']['recall']:.3f}" if f"{group}/{b}" in table else "–"
                           for b in ("1", "2", "3", "4+", "all")])
    Console().print(t)

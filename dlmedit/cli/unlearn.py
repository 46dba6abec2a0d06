"""`dlmedit unlearn`: forget facts with the residual edit memory or a baseline, and measure it.

Examples::

    dlmedit unlearn --model builtin:mdm --method memory --forget world:forget05 --out runs/u1
    dlmedit unlearn --model builtin:mdm --method memory,ga,graddiff,npo,rmu,steer --forget world:forget05 --out runs/u2
    dlmedit unlearn --model builtin:mdm --forget world:forget05 --sweep alpha=0.25,0.5,1,2 --out runs/u3
    dlmedit unlearn --model builtin:mdm --forget world:forget10 --sequential 50 --out runs/u4
    dlmedit unlearn --model builtin:mdm --forget world:forget10 --scaling 1,10,100,400 --out runs/u5
    dlmedit unlearn --model builtin:mdm --forget world:forget05 --ablation random-coordinate --out runs/u6

Writes ``results.json`` (settings, base scores, every result), ``rows.jsonl`` (one row per
method / setting) and the PNG plots of the experiments asked for, and prints a table.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import typer

from dlmedit.cli.app import app, check_cli_inputs, friendly_errors, seed_everything, tokenizer_option

_HEADLINE = (("forget_lp", "ForgetLP"), ("forget_lp_drop", "drop"), ("d_retain_lp", "ΔRetainLP"),
             ("d_utility_lp", "ΔUtilityLP"), ("forget_para_lp", "ParaLP"), ("forget_icl_lp", "ICL-LP"),
             ("forget_truth_ratio", "TR(forget)"), ("model_utility", "utility"), ("fit_time_s", "fit s"),
             ("peak_rss_mb", "peak MB"))


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{what} is empty")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise typer.BadParameter(f"{what} must be finite numbers, got {bad[0]} in {text!r}")
    return values


def _parse_sweep(text: str) -> tuple[str, list[float]]:
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or name not in ("alpha", "lambda", "q", "gate"):
        raise typer.BadParameter(f"--sweep takes alpha=V1,V2,…, lambda=…, q=… or gate=… (got {text!r})")
    numbers = _parse_floats(values, "--sweep")
    if name == "alpha" and any(a <= 0 for a in numbers):
        raise typer.BadParameter("every α in --sweep must be > 0")
    if name == "lambda" and any(a < 0 for a in numbers):
        raise typer.BadParameter("every λ in --sweep must be ≥ 0")
    if name == "gate" and any(not -1 < a < 1 for a in numbers):
        raise typer.BadParameter("every gate in --sweep must be a cosine threshold in (-1, 1)")
    if name == "q" and any(a < 1 or a != int(a) for a in numbers):
        raise typer.BadParameter("every q in --sweep must be an integer ≥ 1")
    return name, numbers


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _print_table(title: str, rows: list[dict[str, Any]], label: str = "method") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column(label)
    for _, head in _HEADLINE:
        table.add_column(head, justify="right")
    for row in rows:
        table.add_row(str(row.get("_label", row.get(label, row.get("method")))),
                      *[_fmt(row.get(key)) for key, _ in _HEADLINE])
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the numbers into 80 columns
        console = Console(width=200)
    console.print(table)


def _check_unlearn_options(*, out: str, save_memory: str | None, model: str, reference: str | None,
                           tokenizer: str | None, specs: dict[str, str | None], memory: dict[str, Any],
                           counts: dict[str, int | None], positive: dict[str, float], n_background: int) -> None:
    """Everything about ``dlmedit unlearn``'s options that can be checked before the model loads."""
    from dlmedit.checks import check_finite
    from dlmedit.data.loaders import load_dataset
    from dlmedit.unlearn.experiments import MemorySettings

    check_cli_inputs(outs={"--out": out, "--save-memory": save_memory}, models=[model, reference],
                     tokenizer=tokenizer, texts={name: spec for name, spec in specs.items() if spec})
    MemorySettings(**memory)  # α, λ, q, gate, site, key statistics (q against the site's width once loaded)
    for name, value in counts.items():
        if value is not None:
            check_finite(value, name, low=1, integer=True)
    check_finite(n_background, "--n-background", low=0, integer=True)
    for name, value in positive.items():
        check_finite(value, name, low=0, low_open=True)
    for spec in specs.values():  # dataset files are read now, so a bad file fails before the model loads
        if spec and not spec.strip().lower().startswith("world"):
            load_dataset(spec)


@app.command("unlearn")
@friendly_errors
def unlearn_command(
    model: str = typer.Option("builtin:mdm", "--model", "-m", help="alias or checkpoint directory"),
    method: str = typer.Option("memory", help="memory | ga | graddiff | npo | rmu | steer (comma-separated for several)"),
    forget: str = typer.Option("world:forget01", help="forget split (dataset spec, e.g. world:forget05 or tofu:FILE)"),
    retain: str = typer.Option("world:retain", help="retain split (a seeded sample of --n-retain rows is scored)"),
    utility: str = typer.Option("world:utility", help="real-knowledge utility split ('' to skip)"),
    n_retain: int = typer.Option(100, help="retain rows scored"),
    alpha: float = typer.Option(1.0, help="memory / steering write strength α > 0"),
    lam: float = typer.Option(1.0, "--lambda", help="memory ridge λ ≥ 0"),
    q: int = typer.Option(None, help="memory: coordinates kept per position (default: all)"),
    gate: float = typer.Option(None, help="memory: write only where the key's cosine to a stored key ≥ GATE "
                                          "(default: no gate, write everywhere)"),
    layer: int = typer.Option(None, help="memory / steering / RMU layer (default: --trace peak, else n_layers//3)"),
    site: str = typer.Option("resid", help="memory site: resid | mlp_out | attn_out | mlp_key"),
    trace: bool = typer.Option(False, "--trace", help="choose the layer by tracing forget facts (temporal peak)"),
    key_stats: str = typer.Option("whiten", help="memory keys: whiten | center | none (background = spare retain rows)"),
    n_background: int = typer.Option(600, help="memory: background rows (spare retain rows) for key statistics"),
    n_states: int = typer.Option(8, help="target states per fact for keys/deltas (MDM; an ARM has one)"),
    epochs: float = typer.Option(5.0, help="training baselines: passes over the forget set (TOFU: 5)"),
    steps: int = typer.Option(None, help="training baselines: optimiser steps (overrides --epochs)"),
    lr: float = typer.Option(1e-4, help="training baselines: Adam learning rate"),
    batch_size: int = typer.Option(16, help="training baselines: facts per step"),
    estimator: str = typer.Option(None, help="scoring estimator (MDM: exact | chain | mc_elbo)"),
    reference: str = typer.Option(None, help="model never trained on the forget subjects (forget quality)"),
    generation: bool = typer.Option(False, help="also generate answers (ROUGE-L) for model utility"),
    sweep: str = typer.Option(None, help="alpha=V1,V2,… (or lambda=…, q=…): memory sweep + Pareto plot"),
    sequential_n: int = typer.Option(None, "--sequential", help="insert N facts one at a time; curve + plot"),
    eval_every: int = typer.Option(5, help="--sequential: evaluate every K insertions"),
    scaling_counts: str = typer.Option(None, "--scaling", help="fact counts, e.g. 1,10,100,400; log-log plot"),
    ablation: str = typer.Option(None, help="random-coordinate: memory at random (layer, site) coordinates"),
    draws: int = typer.Option(3, help="--ablation: random coordinates drawn"),
    save_memory: str = typer.Option(None, help="save the memory of --method memory to this directory"),
    seed: int = typer.Option(0),
    world_seed: int = typer.Option(0, help="seed of the built-in world"),
    out: str = typer.Option(..., "--out", "-o", help="output directory"),
    tokenizer: str = tokenizer_option(),
) -> None:
    """Unlearn a forget split with the residual edit memory or a baseline, and evaluate forget/retain."""
    from tqdm.auto import tqdm

    from dlmedit import load_model
    from dlmedit.unlearn import experiments as ex
    from dlmedit.unlearn.session import append_rows, check_methods, prepare_unlearning, run_unlearning, save_results

    methods = check_methods(method)
    if ablation is not None and ablation != "random-coordinate":
        raise typer.BadParameter("--ablation supports 'random-coordinate'")
    sweep_spec = _parse_sweep(sweep) if sweep else None
    counts = [int(c) for c in _parse_floats(scaling_counts, "--scaling")] if scaling_counts else None
    _check_unlearn_options(out=out, save_memory=save_memory, model=model, reference=reference, tokenizer=tokenizer,
                           specs={"--forget": forget, "--retain": retain, "--utility": utility},
                           memory={"layer": layer, "site": site, "alpha": alpha, "lam": lam, "q": q, "gate": gate,
                                   "key_stats": key_stats, "n_states": n_states, "seed": seed},
                           counts={"--n-retain": n_retain, "--batch-size": batch_size, "--steps": steps,
                                   "--eval-every": eval_every, "--draws": draws, "--sequential": sequential_n},
                           positive={"--epochs": epochs, "--lr": lr}, n_background=n_background)

    seed_everything(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / "rows.jsonl"
    rows_path.unlink(missing_ok=True)
    started = time.time()
    lm = load_model(model, tokenizer=tokenizer)
    setup = prepare_unlearning(
        lm, model=model, forget=forget, retain=retain, utility=utility, n_retain=n_retain, alpha=alpha, lam=lam,
        q=q, gate=gate, layer=layer, site=site, trace=trace, key_stats=key_stats, n_background=n_background,
        n_states=n_states, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, estimator=estimator,
        reference=reference, generation=generation, seed=seed, world_seed=world_seed, log=typer.echo)
    sets, settings, background, eval_kwargs, results = (setup.sets, setup.memory, setup.background,
                                                        setup.eval_kwargs, setup.results)
    with tqdm(total=len(methods), desc="methods", unit="method") as bar:

        def on_row(row: dict[str, Any]) -> None:
            append_rows(rows_path, [row])
            if row["method"] != "base":
                bar.update(1)

        run_unlearning(setup, methods, save_memory=save_memory, log=typer.echo, on_row=on_row,
                       on_method=bar.set_postfix_str)
    base, method_rows = results["base"], results["methods"]
    _print_table(f"unlearning {forget} on {model} (base ForgetLP {base['forget_lp']:.2f}, "
                 f"RetainLP {base['retain_lp']:.2f} nats/answer)", [{"method": "base", **base}, *method_rows])

    if sweep_spec:
        knob, values = sweep_spec
        with tqdm(total=len(values), desc=f"{knob} sweep", unit="value") as pbar:
            sweep_rows = ex.sweep(lm, sets, base, knob, values, memory=settings, background=background,
                                  eval_kwargs=eval_kwargs, progress=lambda _k, n: pbar.update(n))
        for r in sweep_rows:
            r["_label"] = f"{knob}={r['value']:g}"
        results[f"{knob}_sweep"] = sweep_rows
        append_rows(rows_path, [{"experiment": f"{knob}_sweep", **r} for r in sweep_rows])
        ex.plot_pareto(sweep_rows, base, out_dir / f"pareto_{knob}.png", others=method_rows)
        _print_table(f"{knob} sweep (memory)", sweep_rows, label=knob)

    if sequential_n:
        with tqdm(total=sequential_n, desc="sequential inserts", unit="fact") as pbar:
            seq = ex.sequential(lm, sets, sequential_n, memory=settings, background=background, eval_every=eval_every,
                                eval_kwargs=eval_kwargs, progress=lambda _k, n: pbar.update(n))
        results["sequential"] = seq
        (out_dir / "sequential.json").write_text(json.dumps(ex.finite_or_none(seq), indent=1, default=str))
        ex.plot_sequential(seq, out_dir / "sequential.png")
        last = seq["curve"][-1]
        typer.echo(f"sequential: after {last['n_inserted']} facts ForgetLP {last['forget_lp_inserted']:.2f} "
                   f"(unedited {last['forget_lp_inserted_base']:.2f}), ΔRetainLP {last['d_retain_lp']:+.3f}")

    if counts:
        pool = [*sets.forget, *sets.spare]
        with tqdm(total=len(counts), desc="scaling", unit="count") as pbar:
            scale_rows = ex.scaling(lm, sets, pool, counts, memory=settings, background=background,
                                    eval_kwargs=eval_kwargs, seed=seed, progress=lambda _k, n: pbar.update(n))
        results["scaling"] = scale_rows
        append_rows(rows_path, [{"experiment": "scaling", **r} for r in scale_rows])
        ex.plot_scaling(scale_rows, out_dir / "scaling.png")
        for r in scale_rows:
            typer.echo(f"scaling N={r['n_facts']}: fit {r['fit_time_s']:.2f}s ({r['per_fact_fit_s'] * 1e3:.1f} ms/fact), "
                       f"incremental {r['per_fact_incremental_s'] * 1e3:.2f} ms/fact, ForgetLP drop "
                       f"{r['forget_lp_drop']:.2f}, ΔRetainLP {r['d_retain_lp']:+.3f}")

    if ablation:
        with tqdm(total=draws + 1, desc="coordinates", unit="coord") as pbar:
            abl = ex.random_coordinate_ablation(lm, sets, base, draws, memory=settings, background=background,
                                                eval_kwargs=eval_kwargs, seed=seed,
                                                progress=lambda _k, n: pbar.update(n))
        for r in abl:
            c = r["coordinate"]
            r["_label"] = f"{c['source']} L{c['layer']} {c['site']}"
        results["ablation_random_coordinate"] = abl
        append_rows(rows_path, [{"experiment": "random_coordinate", **r} for r in abl])
        _print_table("random-coordinate ablation (same facts, α, λ, q)", abl, label="coordinate")

    save_results(out_dir, results, time.time() - started)
    typer.echo(f"wrote {out_dir / 'results.json'} and {rows_path}")


"""`dlmedit adapt`: adapt a pretrained ARM to masked diffusion (Dream recipe) into a small, shippable adapter."""

from __future__ import annotations

from pathlib import Path

import typer

from dlmedit.cli.app import app, echo_json, friendly_errors, seed_everything


@app.command("adapt")
@friendly_errors
def adapt_command(
    out: Path = typer.Option(..., "--out", help="run folder (re-run the same command to resume after a kill)"),
    base: str = typer.Option("smollm2", "--base", help="the autoregressive model to adapt (alias or checkpoint)"),
    corpus: str = typer.Option("wiki", "--corpus", help="training text: wiki | world | a .txt/.jsonl/.json file"),
    steps: int = typer.Option(1200, "--steps", help="optimizer steps (batch × window tokens each)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    window: int = typer.Option(64, "--window", help="tokens per training row"),
    lr: float = typer.Option(1e-3, "--lr"),
    lora_rank: int = typer.Option(16, "--lora-rank"),
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="self-distillation weight (KL to the frozen base)"),
    suffix_share: float = typer.Option(0.4, "--suffix-share", help="share of rows whose masks are one suffix span"),
    max_suffix: int = typer.Option(None, "--max-suffix", help="longest suffix span (default: the whole row)"),
    hold_frac: float = typer.Option(0.1, "--hold-frac", help="share of steps at the ARM-equivalent attention"),
    anneal_end_frac: float = typer.Option(0.6, "--anneal-end-frac", help="share of steps by which attention is fully bidirectional"),
    schedule: str = typer.Option("log", "--schedule", help="log: the attention penalty log(openness) anneals linearly; linear: the openness does"),
    masks_see_all: bool = typer.Option(False, "--masks-see-all", help="mask positions attend to every position throughout (visible ones keep the annealed pattern)"),
    eval_every: int = typer.Option(50, "--eval-every", help="steps between recall / NLL checks"),
    eval_facts: int = typer.Option(60, "--eval-facts", help="known facts checked along the way"),
    mask_token: str = typer.Option("<reponame>", "--mask-token", help="an unused token of the base vocabulary"),
    threads: int = typer.Option(2, "--threads"),
    ship_to: Path = typer.Option(None, "--ship-to", help="copy the best fully bidirectional adapter here"),
    json_out: bool = typer.Option(False, "--json"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Adapt --base to a masked diffusion LM: LoRA + mask embedding, attention annealed to bidirectional."""
    from dlmedit.adapt import AdaptConfig, adapt

    seed_everything(seed)
    cfg = AdaptConfig(base=base, corpus=corpus, steps=steps, batch_size=batch_size, window=window, lr=lr,
                      lora_rank=lora_rank, lora_alpha=2 * lora_rank, kl_weight=kl_weight,
                      suffix_share=suffix_share, max_suffix=max_suffix, hold_frac=hold_frac,
                      anneal_end_frac=anneal_end_frac, schedule=schedule, masks_see_all=masks_see_all, eval_every=eval_every, eval_facts=eval_facts,
                      mask_token=mask_token, seed=seed, threads=threads)
    summary = adapt(cfg, out, progress=not json_out, ship_to=ship_to)
    if json_out:
        echo_json(summary)
        return
    best = summary["best"]
    typer.echo(f"done: {summary['steps_done']} steps; best fully bidirectional point: step {best.get('step')} "
               f"(score {best.get('score')}) in {out / 'best'}; curve: {out / 'curve.jsonl'}")


@app.command("pair")
@friendly_errors
def pair_command(
    arm: str = typer.Option("smollm2", "--arm", help="the autoregressive model"),
    mdm: str = typer.Option("smollm2-dream", "--mdm", help="the masked-diffusion model (e.g. adapted from --arm)"),
    relations: str = typer.Option("capital,language", "--relations", help="country relations to recall (capital, language, demonym)"),
    limit: int = typer.Option(None, "--limit", help="facts per relation (default: all)"),
    nll_texts: int = typer.Option(24, "--nll-texts", help="held-out texts for the NLL comparison (0: skip)"),
    out: Path = typer.Option(None, "--out", help="write pair.json here"),
    json_out: bool = typer.Option(False, "--json"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Recall of real facts by generation and held-out NLL, ARM vs MDM side by side."""
    from rich.console import Console
    from rich.table import Table

    from dlmedit import load_model
    from dlmedit.adapt.compare import heldout_nll, heldout_texts_for, pair_recall
    from dlmedit.cache import atomic_write_json
    from dlmedit.data.countries import country_facts

    if out is not None and out.exists() and not out.is_dir():
        raise typer.BadParameter(f"--out {out} exists and is not a directory")
    seed_everything(seed)
    rels = tuple(r.strip() for r in relations.split(",") if r.strip())
    facts = country_facts(rels, seed=seed)
    if limit is not None:
        facts = [f for r in rels for f in [x for x in facts if x.relation == r][:limit]]
    arm_lm, mdm_lm = load_model(arm), load_model(mdm)
    result: dict = {"arm": arm, "mdm": mdm, "relations": list(rels), "recall": pair_recall(arm_lm, mdm_lm, facts)}
    if nll_texts > 0:
        texts, where = heldout_texts_for(mdm_lm, seed=seed)
        result["nll"] = {"texts": where, "arm": heldout_nll(arm_lm, texts, n=nll_texts, seed=seed),
                         "mdm": heldout_nll(mdm_lm, texts, n=nll_texts, seed=seed)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "pair.json", result)
    if json_out:
        echo_json(result)
        return
    console = Console(width=max(100, Console().width))
    rec = result["recall"]
    table = Table(title=f"recall by generation over the {rec['arm_known']} of {rec['n_candidates']} facts {arm} "
                        "recalls greedily (ARM = 100 % by construction)")
    for col in ("group", "n", f"{mdm} recall", "95 % CI"):
        table.add_column(col)
    for key, row in rec["table"].items():
        lo, hi = row["ci95"]
        table.add_row(key, str(row["n"]), f"{row['mdm_recall']:.3f}", f"[{lo:.3f}, {hi:.3f}]")
    console.print(table)
    if "nll" in result:
        nll = Table(title=f"held-out NLL per token (nats): {result['nll']['texts']}")
        for col in ("model", "estimator", "NLL/token", "95 % CI", "tokens"):
            nll.add_column(col)
        for who in ("arm", "mdm"):
            for est, row in result["nll"][who].items():
                if isinstance(row, dict):
                    lo, hi = row["ci95"]
                    nll.add_row(result[who], est, f"{row['nll_per_token']:.3f}", f"[{lo:.3f}, {hi:.3f}]", str(row["tokens"]))
        console.print(nll)

"""`dlmedit models | generate | score`: inspect, run and score any supported model."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from dlmedit.cli.app import app, echo_json, friendly_errors, seed_everything

ModelOpt = typer.Option("builtin:mdm", "--model", "-m", help="alias (see `dlmedit models`) or checkpoint directory")


@app.command("models")
def models_command() -> None:
    """List model families (adapters) and built-in aliases."""
    from dlmedit.models.adapters import registered_families
    from dlmedit.models.loading import aliases

    console = Console()
    table = Table(title="families (adapter → model_type / module classes)")
    table.add_column("family")
    table.add_column("served")
    for family, names in sorted(registered_families().items()):
        table.add_row(family, ", ".join(names))
    table.add_row("llada", "model_type llada (converted onto Llama modules, no remote code)")
    table.add_row("dream", "model_type Dream (converted onto Qwen2 modules, no remote code)")
    console.print(table)
    alias_table = Table(title="aliases")
    alias_table.add_column("alias")
    alias_table.add_column("model")
    for alias, text in aliases().items():
        alias_table.add_row(alias, text)
    console.print(alias_table)


@app.command("generate")
@friendly_errors
def generate_command(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt (repeat for a batch)"),
    model: str = ModelOpt,
    max_new_tokens: int = typer.Option(None, help="tokens to generate (MDM default: the model's answer window)"),
    steps: int = typer.Option(None, help="MDM: denoising steps (default: one token per step)"),
    block_length: int = typer.Option(None, help="MDM (LLaDA sampler): semi-autoregressive block length"),
    sampler: str = typer.Option("llada", help="MDM: llada | dream"),
    remasking: str = typer.Option("low_confidence", help="MDM (llada): low_confidence | random"),
    alg: str = typer.Option("maskgit_plus", help="MDM (dream): origin | maskgit_plus | topk_margin | entropy"),
    temperature: float = typer.Option(0.0),
    cfg_scale: float = typer.Option(0.0, help="MDM (llada): classifier-free guidance scale"),
    trust_remote_code: bool = typer.Option(False, help="allow code from the checkpoint's repository"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    seed: int = typer.Option(0),
) -> None:
    """Generate continuations (greedy for ARMs, iterative denoising for MDMs)."""
    from dlmedit import load_model

    seed_everything(seed)
    lm = load_model(model, trust_remote_code=trust_remote_code)
    options: dict = {"temperature": temperature, "seed": seed}
    if lm.paradigm.name == "mdm":
        options |= {"steps": steps, "block_length": block_length, "sampler": sampler, "remasking": remasking,
                    "alg": alg, "cfg_scale": cfg_scale}
    elif max_new_tokens is None:
        max_new_tokens = 16
    result = lm.generate(prompt, max_new_tokens, **options)
    if json_out:
        echo_json({"model": model, "settings": result.settings,
                   "outputs": [{"prompt": p, "text": t} for p, t in zip(prompt, result.texts, strict=True)]})
        return
    for p, t in zip(prompt, result.texts, strict=True):
        typer.echo(f"{p}\u2192{t}" if t.startswith(" ") else f"{p} \u2192 {t}")


@app.command("score")
@friendly_errors
def score_command(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt (repeat, paired with --target)"),
    target: list[str] = typer.Option(..., "--target", "-t", help="target continuation (repeat)"),
    model: str = ModelOpt,
    estimator: str = typer.Option(None, help="MDM: exact | chain | mc_elbo (default exact for 1 token, else chain)"),
    order: str = typer.Option("l2r", help="MDM chain order: l2r | confidence"),
    mc_samples: int = typer.Option(128, help="MDM mc_elbo sample count"),
    trust_remote_code: bool = typer.Option(False),
    json_out: bool = typer.Option(False, "--json"),
    seed: int = typer.Option(0),
) -> None:
    """Log-probability of each target after its prompt, per token and in total."""
    from dlmedit import load_model

    if len(prompt) != len(target):
        raise typer.BadParameter("give one --target per --prompt")
    seed_everything(seed)
    lm = load_model(model, trust_remote_code=trust_remote_code)
    options = {"order": order, "mc_samples": mc_samples, "seed": seed} if lm.paradigm.name == "mdm" else {}
    results = lm.score(prompt, target, estimator=estimator, **options)
    rows = [{"prompt": p, "target": t, "estimator": r.estimator, "logprob": r.total, "mean_nll": r.mean_nll,
             "token_logprobs": r.token_logprobs, "tokens": [lm.tokenizer.decode([i]) for i in r.target_ids]}
            for p, t, r in zip(prompt, target, results, strict=True)]
    if json_out:
        echo_json({"model": model, "scores": rows})
        return
    table = Table(title=f"{model} ({lm.paradigm.name})")
    for col in ("prompt", "target", "estimator", "log p", "per token"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["prompt"], row["target"], row["estimator"], f"{row['logprob']:.3f}",
                      " ".join(f"{tok!r}:{lp:.2f}" for tok, lp in zip(row["tokens"], row["token_logprobs"], strict=True)))
    Console().print(table)

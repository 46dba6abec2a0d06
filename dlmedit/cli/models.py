"""`dlmedit models | generate | score`: inspect, run and score any supported model."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from dlmedit.cli.app import app, check_cli_inputs, echo_json, friendly_errors, seed_everything, tokenizer_option

ModelOpt = typer.Option("builtin:mdm", "--model", "-m", help="alias (see `dlmedit models`) or checkpoint directory")
ParadigmOpt = typer.Option(None, "--paradigm", help="arm | mdm: override what the checkpoint declares (mdm makes "
                           "attention bidirectional; e.g. DiffuLLaMA, which ships a plain Llama config)")
LogitShiftOpt = typer.Option(None, "--logit-shift", help="MDM: 1 reads a token's logits one slot to the left "
                             "(Dream, DiffuLLaMA), 0 at its own slot (LLaDA); default: the family's")
MaskIdOpt = typer.Option(None, "--mask-token-id", help="MDM: the mask token's id when neither config nor tokenizer "
                         "declares it (DiffuLLaMA: an existing vocabulary id, 811 in its training code)")
ChatOpt = typer.Option(False, "--chat", help="wrap each prompt in the tokenizer's chat template (Instruct models)")


def family_options(paradigm: str | None, logit_shift: int | None, mask_token_id: int | None = None) -> dict:
    """load_model keywords for --paradigm / --logit-shift / --mask-token-id, checked."""
    if paradigm is not None and paradigm not in ("arm", "mdm"):
        raise typer.BadParameter(f"--paradigm must be arm or mdm, got {paradigm!r}")
    if logit_shift is not None and logit_shift not in (0, 1):
        raise typer.BadParameter(f"--logit-shift must be 0 or 1, got {logit_shift}")
    if mask_token_id is not None and mask_token_id < 0:
        raise typer.BadParameter(f"--mask-token-id must be a token id ≥ 0, got {mask_token_id}")
    return {"paradigm": paradigm, "logit_shift": logit_shift, "mask_token_id": mask_token_id}


def _chat(lm, prompts: list[str], chat: bool) -> list[str]:
    """Prompts as the model sees them: wrapped in its chat template when --chat is given."""
    if not chat:
        return list(prompts)
    from dlmedit.models.chat import chat_prompt

    return [chat_prompt(lm.tokenizer, p) for p in prompts]


@app.command("models")
@friendly_errors
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
    console.print(table)
    from dlmedit.models.loading import checkpoint_families

    ckpt = Table(title="checkpoint families (no remote code): recognised by → loaded as")
    ckpt.add_column("family")
    ckpt.add_column("recognised by")
    ckpt.add_column("loaded as")
    for family, (matched, loaded) in checkpoint_families().items():
        ckpt.add_row(family, matched, loaded)
    console.print(ckpt)
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
    tokenizer: str = tokenizer_option(),
    paradigm: str = ParadigmOpt,
    logit_shift: int = LogitShiftOpt,
    mask_token_id: int = MaskIdOpt,
    chat: bool = ChatOpt,
) -> None:
    """Generate continuations (greedy for ARMs, iterative denoising for MDMs)."""
    from dlmedit import load_model

    check_cli_inputs(models=[model], tokenizer=tokenizer, texts={"--prompt": prompt})
    for name, value in (("--max-new-tokens", max_new_tokens), ("--steps", steps), ("--block-length", block_length)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"{name} must be at least 1, got {value}")
    seed_everything(seed)
    lm = load_model(model, trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                    **family_options(paradigm, logit_shift, mask_token_id))
    shown, prompt = prompt, _chat(lm, prompt, chat)
    options: dict = {"temperature": temperature, "seed": seed}
    if lm.paradigm.name == "mdm":
        options |= {"steps": steps, "block_length": block_length, "sampler": sampler, "remasking": remasking,
                    "alg": alg, "cfg_scale": cfg_scale}
    elif max_new_tokens is None:
        max_new_tokens = 16
    result = lm.generate(prompt, max_new_tokens, **options)
    if json_out:
        echo_json({"model": model, "settings": result.settings, "source": lm.source, "chat": chat,
                   "outputs": [{"prompt": p, "text": t} for p, t in zip(shown, result.texts, strict=True)]})
        return
    for p, t in zip(shown, result.texts, strict=True):
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
    tokenizer: str = tokenizer_option(),
    paradigm: str = ParadigmOpt,
    logit_shift: int = LogitShiftOpt,
    mask_token_id: int = MaskIdOpt,
    chat: bool = ChatOpt,
) -> None:
    """Log-probability of each target after its prompt, per token and in total."""
    from dlmedit import load_model

    check_cli_inputs(models=[model], tokenizer=tokenizer, texts={"--prompt": prompt, "--target": target})
    if len(prompt) != len(target):
        raise typer.BadParameter("give one --target per --prompt")
    if mc_samples < 1:
        raise typer.BadParameter(f"--mc-samples must be at least 1, got {mc_samples}")
    seed_everything(seed)
    lm = load_model(model, trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                    **family_options(paradigm, logit_shift, mask_token_id))
    options = {"order": order, "mc_samples": mc_samples, "seed": seed} if lm.paradigm.name == "mdm" else {}
    results = lm.score(_chat(lm, prompt, chat), target, estimator=estimator, **options)
    rows = [{"prompt": p, "target": t, "estimator": r.estimator, "logprob": r.total, "mean_nll": r.mean_nll,
             "token_logprobs": r.token_logprobs, "tokens": [lm.tokenizer.decode([i]) for i in r.target_ids]}
            for p, t, r in zip(prompt, target, results, strict=True)]
    if json_out:
        echo_json({"model": model, "source": lm.source, "chat": chat, "scores": rows})
        return
    table = Table(title=f"{model} ({lm.paradigm.name})")
    for col in ("prompt", "target", "estimator", "log p", "per token"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["prompt"], row["target"], row["estimator"], f"{row['logprob']:.3f}",
                      " ".join(f"{tok!r}:{lp:.2f}" for tok, lp in zip(row["tokens"], row["token_logprobs"], strict=True)))
    Console().print(table)

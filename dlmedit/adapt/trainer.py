"""`dlmedit adapt`: turn a pretrained ARM into a masked diffusion LM the way Dream was made from Qwen2.5.

What it does (the reasons are in :mod:`dlmedit.adapt.objective`): LoRA on every linear
layer plus a trained mask-token embedding; Dream's one-position logit shift (the ARM's
head is reused: logits at i predict token i+1); attention annealed from the
ARM-equivalent pattern to full bidirectional attention; masked-diffusion loss on general
text (never the evaluated facts) plus self-distillation to the frozen base.

Along the way it measures what matters: recall by denoising of facts the base model
knows (at the current openness and at full bidirectional attention) and held-out masked
NLL, written to ``curve.jsonl``; the best fully bidirectional point is kept in ``best/``.
A killed run re-run with the same arguments continues from ``state/`` (LoRA weights,
mask embedding, optimizer, step; data and noise are functions of (seed, step)).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dlmedit.adapt.artifact import save_artifact, untie_head
from dlmedit.adapt.objective import AnnealedAttention, diffusion_losses, sample_noise
from dlmedit.cache import atomic_dir, atomic_write_json
from dlmedit.errors import DlmeditError
from dlmedit.train.optim_state import load_optimizer_state, save_optimizer_state

__all__ = ["AdaptConfig", "AdaptError", "adapt", "openness_at", "recall_by_denoising"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdaptError(DlmeditError, ValueError):
    """The adaptation cannot start with these inputs (base already an MDM, unknown base, bad settings)."""


@dataclass
class AdaptConfig:
    """Every setting of an adaptation run (stored in the run folder; a resume must match it)."""

    base: str = "smollm2"
    corpus: str = "wiki"
    steps: int = 1200
    batch_size: int = 8
    window: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 20
    lora_rank: int = 16
    lora_alpha: int = 32
    kl_weight: float = 1.0
    suffix_share: float = 0.4
    max_suffix: int | None = None
    hold_frac: float = 0.1
    schedule: str = "log"
    masks_see_all: bool = False
    min_log_openness: float = -12.0
    anneal_end_frac: float = 0.6
    eval_every: int = 50
    checkpoint_every: int = 10
    eval_facts: int = 60
    mask_token: str = "<reponame>"
    seed: int = 0
    threads: int = 2
    bf16: bool = True
    relations: tuple[str, ...] = field(default=("capital",))
    exclude_relations: tuple[str, ...] = field(default=("capital", "demonym", "language"))

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "lora_rank", "eval_facts", "threads"):
            if int(getattr(self, name)) < 1:
                raise AdaptError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.window < 4:
            raise AdaptError(f"window must be ≥ 4 tokens, got {self.window}")
        if not 0 <= self.hold_frac <= self.anneal_end_frac <= 1:
            raise AdaptError("need 0 ≤ hold_frac ≤ anneal_end_frac ≤ 1")
        if self.schedule not in ("log", "linear"):
            raise AdaptError(f"schedule must be log or linear, got {self.schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AdaptError(f"lr must be a positive number, got {self.lr}")


def openness_at(step: int, cfg: AdaptConfig) -> float:
    """0 for the first ``hold_frac`` of the steps, then annealed to 1 at ``anneal_end_frac``, then 1.

    ``schedule="log"`` (default) moves the attention penalty log(openness) linearly from
    ``min_log_openness`` to 0, so the anneal spends its steps where leaking starts to matter
    (a linear openness jumps to a penalty of −1.8 within a sixth of the anneal, and on
    SmolLM2 recall at that point had already collapsed from 40/40 to 2/40 — measured).
    ``schedule="linear"`` moves the openness itself linearly.
    """
    start, end = cfg.hold_frac * cfg.steps, cfg.anneal_end_frac * cfg.steps
    if step < start:
        return 0.0
    if step >= end or end <= start:
        return 1.0
    frac = (step - start) / (end - start)
    if cfg.schedule == "linear":
        return frac
    return math.exp(cfg.min_log_openness * (1.0 - frac))


def _lr_at(step: int, cfg: AdaptConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


# -- data --------------------------------------------------------------------------------
def _token_stream(texts: list[str], tokenizer: Any) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for row in enc:
        ids.extend(row)
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, n: int, width: int, generator: torch.Generator) -> torch.Tensor:
    if stream.numel() <= width:
        raise AdaptError(f"the corpus has {stream.numel()} tokens, fewer than one window of {width}")
    starts = torch.randint(0, stream.numel() - width, (n,), generator=generator)
    return torch.stack([stream[s : s + width] for s in starts.tolist()])


def training_texts(cfg: AdaptConfig, facts: list[Any]) -> tuple[list[str], list[str], int]:
    """(training texts, held-out texts, excluded count): texts naming an evaluated fact are dropped."""
    from dlmedit.data.corpus import load_corpus
    from dlmedit.data.countries import mentions_fact

    texts = list(load_corpus(cfg.corpus, seed=cfg.seed, shuffle=True).texts)
    kept = [t for t in texts if not mentions_fact(t, facts)]
    n_held = max(8, len(kept) // 50)
    return kept[n_held:], kept[:n_held], len(texts) - len(kept)


# -- recall ------------------------------------------------------------------------------
def _starts_with(text: str, obj: str) -> bool:
    text = text.strip()
    return text.startswith(obj) and (len(text) == len(obj) or not text[len(obj)].isalnum())


def recall_by_denoising(lm: Any, facts: list[Any], batch_size: int = 32) -> list[bool]:
    """Exact recall by real generation: greedy for an ARM, LLaDA low-confidence one token per step for an MDM.

    The window is the object's token count + 1, so the model must also end the answer;
    a fact counts when the generated text starts with the object (followed by a
    non-letter).
    """
    groups: dict[int, list[int]] = {}
    for i, fact in enumerate(facts):
        n = len(lm.encode_target(fact.prompt, fact.object)) + 1
        groups.setdefault(n, []).append(i)
    hits = [False] * len(facts)
    for window, idxs in sorted(groups.items()):
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s : s + batch_size]
            out = lm.generate([facts[i].prompt for i in chunk], window, temperature=0.0)
            for i, text in zip(chunk, out.texts, strict=True):
                hits[i] = _starts_with(text, facts[i].object)
    return hits


def recall_table(facts: list[Any], hits: list[bool], lm: Any) -> dict[str, list[int]]:
    """{"all", "single", "multi", "len1", "len2", "len3+", relation...: [hits, n]} over the facts."""
    table: dict[str, list[int]] = {}
    for fact, hit in zip(facts, hits, strict=True):
        n = len(lm.encode_target(fact.prompt, fact.object))
        keys = ["all", "single" if n == 1 else "multi", f"len{min(n, 3)}{'+' if n >= 3 else ''}", fact.relation]
        for key in keys:
            cell = table.setdefault(key, [0, 0])
            cell[0] += int(hit)
            cell[1] += 1
    return table


# -- the run -----------------------------------------------------------------------------
class _Run:
    """Model, adapter, optimizer and data of one adaptation run (built once, resumed from ``state/``)."""

    def __init__(self, cfg: AdaptConfig, out: Path, progress: bool) -> None:
        from peft import LoraConfig, get_peft_model

        from dlmedit.models import load_model
        from dlmedit.models.loading import wrap_model

        self.cfg, self.out, self.progress = cfg, out, progress
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        base = load_model(cfg.base)
        if base.paradigm.name != "arm":
            raise AdaptError(f"{cfg.base!r} is already a masked-diffusion model ({base.paradigm.name}); "
                             "adapt starts from an autoregressive base (e.g. smollm2)")
        self.base_lm = base
        tok = base.tokenizer
        mask_id = tok.convert_tokens_to_ids(cfg.mask_token)
        if mask_id is None or (mask_id == tok.unk_token_id and cfg.mask_token != tok.unk_token):
            raise AdaptError(f"mask token {cfg.mask_token!r} is not in {cfg.base}'s vocabulary; pass --mask-token")
        self.mask_id = int(mask_id)
        module = base.module
        untie_head(module)
        embed = module.get_input_embeddings()
        # Mask embedding: the mean of all token embeddings — a point the model has no
        # association with, at the scale of real inputs (rather than the unused token's row).
        self.mask_vec = torch.nn.Parameter(embed.weight.detach().mean(0).clone())
        embed.register_forward_hook(self._embed_hook)
        for p in module.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(LORA_TARGETS), bias="none")
        self.model = get_peft_model(module, lora)
        self.inner = self.model.get_base_model()
        self.attention = AnnealedAttention(self.inner, self.mask_id, cfg.masks_see_all)
        params = [p for p in self.model.parameters() if p.requires_grad] + [self.mask_vec]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        self.mdm = wrap_model(self.inner, tok, "mdm", mask_token_id=self.mask_id, logit_shift=1,
                              name=f"{cfg.base}-dream", prepend_bos=base.prepend_bos)
        self.tok = tok

    def _embed_hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        is_mask = (ids == self.mask_id).unsqueeze(-1)
        if not bool(is_mask.any()):
            return output
        return torch.where(is_mask, self.mask_vec.to(output.dtype), output)

    # state ---------------------------------------------------------------------------
    def save_state(self, step: int, extra: dict[str, Any]) -> None:
        """LoRA weights, mask embedding and AdamW state into ``state/`` (atomically, safetensors + JSON)."""
        with atomic_dir(self.out / "state") as tmp:
            trainable = {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            trainable["__mask_embedding__"] = self.mask_vec.detach().contiguous()
            save_file(trainable, str(tmp / "trainable.safetensors"))
            save_optimizer_state(self.opt, tmp, {"step": step, **extra})

    def load_state(self) -> dict[str, Any]:
        state = self.out / "state"
        tensors = load_file(str(state / "trainable.safetensors"))
        with torch.no_grad():
            self.mask_vec.copy_(tensors.pop("__mask_embedding__"))
            named = dict(self.model.named_parameters())
            for n, v in tensors.items():
                named[n].copy_(v)
        return load_optimizer_state(self.opt, state)

    # one step --------------------------------------------------------------------------
    def step_loss(self, batch: torch.Tensor, openness: float, generator: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        noisy, masked, k = sample_noise(batch, self.mask_id, generator, cfg.suffix_share, cfg.max_suffix)
        teacher = None
        # bf16 autocast: on CPUs with AMX / AVX512-BF16 matmuls run ~8x faster (measured
        # 985 vs 117 GFLOP/s on this machine's cores); master weights, losses stay fp32.
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
        if cfg.kl_weight > 0:
            with torch.no_grad(), self.model.disable_adapter(), self.attention.at(0.0), autocast:
                teacher = self.inner(input_ids=batch, use_cache=False).logits
        with self.attention.at(openness), autocast:
            logits = self.inner(input_ids=noisy, use_cache=False).logits
        mdm, kl = diffusion_losses(logits, teacher, batch, masked, k)
        loss = mdm + cfg.kl_weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return {"loss": loss.item(), "mdm": mdm.item(), "kl": kl.item()}

    @torch.no_grad()
    def heldout_nll(self, windows: torch.Tensor, openness: float) -> float:
        gen = torch.Generator().manual_seed(12345)
        noisy, masked, _ = sample_noise(windows, self.mask_id, gen, self.cfg.suffix_share, self.cfg.max_suffix)
        with self.attention.at(openness):
            logits = self.inner(input_ids=noisy, use_cache=False).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                               reduction="none").view_as(masked[:, 1:])
        return float((ce * masked[:, 1:]).sum() / masked[:, 1:].sum())

    @torch.no_grad()
    def recall(self, facts: list[Any], openness: float) -> dict[str, list[int]]:
        self.model.eval()
        with self.attention.at(openness):
            hits = recall_by_denoising(self.mdm, facts)
        return recall_table(facts, hits, self.mdm)


def _known_facts(run: _Run, cfg: AdaptConfig, out: Path) -> tuple[list[Any], list[Any]]:
    """(facts the base ARM recalls greedily, up to eval_facts; every fact whose texts are kept out of training)."""
    from dlmedit.data.countries import CountryFact, country_facts

    candidates = country_facts(cfg.relations, seed=cfg.seed)
    excluded = country_facts(tuple(dict.fromkeys((*cfg.relations, *cfg.exclude_relations))), seed=cfg.seed)
    path = out / "known_facts.json"
    if path.is_file():
        known = [CountryFact(**row) for row in json.loads(path.read_text())]
        return known, excluded
    with run.model.disable_adapter():
        hits = recall_by_denoising(run.base_lm, candidates)
    known = [f for f, h in zip(candidates, hits, strict=True) if h][: cfg.eval_facts]
    atomic_write_json(path, [asdict(f) for f in known])
    return known, excluded


def adapt(cfg: AdaptConfig, out: str | Path, *, progress: bool = True, ship_to: Path | None = None) -> dict[str, Any]:
    """Run (or resume) an adaptation into ``out``; returns the summary written to ``out/summary.json``."""
    from tqdm.auto import tqdm

    cfg.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdaptError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        previous = json.loads(cfg_path.read_text())
        mine = json.loads(json.dumps(asdict(cfg)))
        changed = {k: (previous.get(k), v) for k, v in mine.items() if previous.get(k) != v and k != "steps"}
        if changed:
            raise AdaptError(f"{out} holds a run with other settings {changed}; use a new --out or the same settings")
    from dlmedit.data.corpus import load_corpus

    load_corpus(cfg.corpus, limit=1)  # a missing or empty corpus fails before any model work
    atomic_write_json(cfg_path, asdict(cfg))
    torch.set_num_threads(cfg.threads)
    run = _Run(cfg, out, progress)
    known, candidates = _known_facts(run, cfg, out)
    if not known:
        warnings.warn(f"{cfg.base} recalls none of the evaluation facts: only held-out NLL is tracked", stacklevel=2)
    train, held, excluded = training_texts(cfg, candidates)
    stream = _token_stream(train, run.tok)
    held_windows = _windows(_token_stream(held, run.tok), 16, cfg.window, torch.Generator().manual_seed(777))
    start = 0
    best: dict[str, Any] = {"score": None}
    if (out / "state" / "state.json").is_file():
        meta = run.load_state()
        start, best = int(meta["step"]), meta.get("best", best)
    curve_path = out / "curve.jsonl"
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="adapt",
               dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        openness = openness_at(step, cfg)
        for group in run.opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        run.model.train()
        losses = run.step_loss(_windows(stream, cfg.batch_size, cfg.window, gen), openness, gen)
        bar.set_postfix(open=f"{openness:.2f}", mdm=f"{losses['mdm']:.2f}", kl=f"{losses['kl']:.3f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            row = _evaluate(run, known, held_windows, done, openness_at(done - 1, cfg), losses, time.time() - t0)
            with curve_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            score = row["score_full"]
            if best["score"] is None or score >= best["score"]:  # ties: the later (more trained) point
                best = {"score": score, "step": done, "row": row}
                save_artifact(run.model, run.mask_vec, _meta(cfg, run, done, row, excluded, 1.0), out / "best")
            save_artifact(run.model, run.mask_vec, _meta(cfg, run, done, row, excluded, row["openness"]),
                          out / "evals" / f"step{done:06d}")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            run.save_state(done, {"best": best})
    base_recall = {"all": [len(known), len(known)]}
    summary = {"config": asdict(cfg), "steps_done": cfg.steps, "best": best, "excluded_texts": excluded,
               "training_tokens": int(stream.numel()), "eval_facts": len(known), "base_recall": base_recall}
    atomic_write_json(out / "summary.json", summary)
    rows = [json.loads(line) for line in curve_path.read_text().splitlines() if line.strip()]
    point = shipping_point(rows, bar=SHIP_BAR, masks_see_all=cfg.masks_see_all)
    summary["shipping_point"] = point
    atomic_write_json(out / "summary.json", summary)
    if ship_to is not None and point is not None:
        ship_point(out, point, Path(ship_to))
    return summary


def ship_point(run_dir: Path, point: dict[str, Any], dest: Path) -> Path:
    """Copy the eval snapshot of ``point`` to ``dest``, its metadata saying the attention it is served at."""
    src = Path(run_dir) / "evals" / f"step{int(point['step']):06d}"
    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        meta = json.loads((tmp / "dlmedit_adapter.json").read_text())
        meta["openness"] = float(point["openness"])
        meta["masks_see_all"] = bool(point.get("masks_see_all")) and float(point["openness"]) < 1.0
        meta["shipping_point"] = point
        (tmp / "dlmedit_adapter.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        shutil.copy(Path(run_dir) / "curve.jsonl", tmp / "curve.jsonl")
    return dest


#: share of the base model's recall (single- and multi-token objects separately) a shipped point must keep
SHIP_BAR = 0.8


def shipping_point(rows: list[dict[str, Any]], bar: float = SHIP_BAR,
                   masks_see_all: bool = False) -> dict[str, Any] | None:
    """The eval point to ship: the most bidirectional one whose recall holds ``bar``.

    Each eval row offers two candidates: the snapshot served with full bidirectional
    attention (``recall_full``) and served at the openness it was trained at
    (``recall_at_openness``).  Recall is measured on facts the base ARM recalls, so the
    ratio to the ARM is the recall itself; a candidate holds the bar when single- and
    multi-token recall both do.  Among candidates of equal openness the later step wins;
    when none holds the bar, the one with the best worse-of-(single, multi) recall is
    returned, marked ``holds_bar: False``.
    """
    def worst(rec: dict[str, Any]) -> float:
        return min(rec[k][0] / rec[k][1] if rec.get(k) and rec[k][1] else 1.0 for k in ("single", "multi"))

    candidates = []
    for r in rows:
        candidates.append({"step": r["step"], "openness": 1.0, "recall": worst(r["recall_full"]),
                           "masks_see_all": False})
        if r["openness"] < 1.0:
            candidates.append({"step": r["step"], "openness": r["openness"], "recall": worst(r["recall_at_openness"]),
                               "masks_see_all": masks_see_all})
    if not candidates:
        return None
    holding = [c for c in candidates if c["recall"] >= bar]
    if holding:
        best = max(holding, key=lambda c: (c["openness"], c["masks_see_all"], c["step"]))
        return {**best, "holds_bar": True}
    best = max(candidates, key=lambda c: (c["recall"], c["openness"], c["step"]))
    return {**best, "holds_bar": False}


def _evaluate(run: _Run, known: list[Any], held: torch.Tensor, step: int, openness: float,
              losses: dict[str, float], seconds: float) -> dict[str, Any]:
    full = run.recall(known, 1.0)
    at = run.recall(known, openness) if openness < 1.0 else full
    ratio = {k: v[0] / v[1] for k, v in full.items() if v[1]}
    nll = run.heldout_nll(held, 1.0)
    score = min(ratio.get("single", 1.0), ratio.get("multi", 1.0)) if known else -nll
    return {"step": step, "openness": openness, "tokens": step * run.cfg.batch_size * run.cfg.window,
            "recall_full": full, "recall_at_openness": at, "score_full": score,
            "heldout_nll_full": nll, "heldout_nll_at_openness": run.heldout_nll(held, openness),
            "train": losses, "seconds": round(seconds, 1)}


def _meta(cfg: AdaptConfig, run: _Run, step: int, row: dict[str, Any], excluded: int,
          openness: float) -> dict[str, Any]:
    """The adapter's metadata; ``openness`` is the attention pattern it is served at (1 = bidirectional)."""
    return {"name": f"{cfg.base}-dream", "base": cfg.base, "mask_token": cfg.mask_token,
            "mask_token_id": run.mask_id, "logit_shift": 1, "openness": openness, "step": step,
            "masks_see_all": bool(cfg.masks_see_all and openness < 1.0),
            "recall_full": row["recall_full"], "heldout_nll_full": row["heldout_nll_full"],
            "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)}, "excluded_texts": excluded}

"""Train the built-in twin models (ARM, MDM from scratch, Dream-like adapted MDM).

Why: the twins are the controlled comparison at the heart of dlmedit — one small
Llama stack, one tokenizer, one data stream, trained as an autoregressive model
and as a masked diffusion model.  Only the paradigm differs, so differences in
tracing/editing behaviour are due to the paradigm, not to data or size.

Recipe (see ``TwinRecipe``):

* Rows are ``<|bos|> prompt target <|eos|>…`` with the target followed by EOS up
  to a fixed *answer window* (LLaDA SFT style: the MDM learns to fill the unused
  part of its generation window with EOS).  Batches are right-padded with
  ``<|pad|>`` and an attention mask.  Both twins see the same rows in the same
  order (a per-epoch permutation derived from the seed).
* ARM: causal attention, next-token loss on every real token.
* MDM: bidirectional (``set_bidirectional``), LLaDA loss: t ~ U(0,1),
  p = (1-ε)t + ε, tokens masked independently with probability p (BOS never),
  CE on masked positions divided by p, normalised by the number of maskable
  tokens of the row.  A share of rows (``answer_only_share``) masks only the
  answer window — the prompt stays clean, as in LLaDA SFT.  The logit at
  position i predicts token i (``logit_shift`` 0).
* Dream twin: initialised from the trained ARM, made bidirectional, keeps the
  one-position shift (logits at i-1 predict token i), BOS never masked.

All randomness of a step (mask sampling) is drawn from a generator seeded by
(seed, step), and the data order from (seed, epoch), so a resumed run continues
exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dlmedit.data.tokenizer import build_world_tokenizer
from dlmedit.data.world import TrainingRow, World, build_world, length_bucket
from dlmedit.models.attention import set_bidirectional

__all__ = [
    "Paradigm",
    "TwinRecipe",
    "encode_rows",
    "evaluate_twin",
    "load_twin",
    "recall",
    "recall_items",
    "train_twin",
    "twin_llama_config",
]

Paradigm = Literal["arm", "mdm", "dream"]
PARADIGM_FIELDS = ("dlmedit_paradigm", "mask_token_id", "logit_shift", "is_causal", "dlmedit_twin")


@dataclass
class TwinRecipe:
    """Hyper-parameters of one twin run (stored in the checkpoint's state.json)."""

    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 3
    intermediate_size: int = 512
    vocab_size: int = 1536
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.0
    answer_window: int = 7
    answer_only_share: float = 0.5
    mask_eps: float = 1e-3
    mask_sampling: str = "count"
    full_answer_share: float = 0.0
    grad_clip: float = 1.0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------

def twin_llama_config(tok: PreTrainedTokenizerFast, recipe: TwinRecipe, paradigm: Paradigm) -> LlamaConfig:
    """The one Llama config shared by all twins, plus the paradigm fields."""
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    _set_paradigm_fields(cfg, tok, paradigm, {})
    return cfg


def _set_paradigm_fields(cfg: LlamaConfig, tok: PreTrainedTokenizerFast, paradigm: Paradigm, twin: dict) -> None:
    cfg.dlmedit_paradigm = "arm" if paradigm == "arm" else "mdm"
    cfg.mask_token_id = int(tok.mask_token_id)
    cfg.logit_shift = 0 if paradigm == "mdm" else 1
    cfg.is_causal = paradigm == "arm"
    cfg.dlmedit_twin = {"role": paradigm, **twin}


def encode_rows(
    rows: list[TrainingRow], tok: PreTrainedTokenizerFast, window: int
) -> list[tuple[list[int], int]]:
    """Token rows ``[bos] prompt target eos…`` and the index where the answer window starts."""
    out = []
    for r in rows:
        p = tok(r.prompt, add_special_tokens=False)["input_ids"]
        t = tok(" " + r.target, add_special_tokens=False)["input_ids"]
        if len(t) >= window:
            raise ValueError(f"target {r.target!r} has {len(t)} tokens; answer window {window} needs ≥1 EOS")
        ids = [tok.bos_token_id, *p, *t] + [tok.eos_token_id] * (window - len(t))
        out.append((ids, 1 + len(p)))
    return out


def _collate(encoded: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    L = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    answer = torch.zeros((B, L), dtype=torch.bool)
    for i, (ids, start) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        answer[i, start : len(ids)] = True
    return {"input_ids": input_ids, "attention_mask": attn, "answer_mask": answer}


def _arm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def _mdm_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    gen: torch.Generator,
    mask_id: int,
    shift: int,
    answer_only_share: float,
    eps: float,
    mask_sampling: str = "count",
    full_answer_share: float = 0.0,
) -> torch.Tensor:
    """LLaDA's masked-diffusion loss; ``shift`` 1 reads token i's prediction at position i-1 (Dream).

    ``mask_sampling="bernoulli"`` is the pre-training form: t ~ U(0,1),
    p = (1-eps)t + eps, each maskable token masked independently, loss Σ CE/p over
    masked tokens / n_maskable.  ``"count"`` (default) is its stratified form, the one
    LLaDA uses for likelihood evaluation: the number of masked tokens k ~ U{1..n},
    k positions drawn uniformly, weight n/k (so p = k/n).  Same expectation, but on
    our ~16-token rows the Bernoulli form leaves many rows with nothing masked and
    gives the rest weights up to 1/eps = 1000, which dominate the clipped gradient
    and stall learning; the count form bounds the weight by n.
    ``full_answer_share`` of the answer-only rows mask the whole answer window
    (k = n): uniform k trains mostly lightly-masked states, while generation starts
    from the all-masked window — without it the loss falls but recall lags.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    B, L = ids.shape
    maskable = attn.bool().clone()
    maskable[:, 0] = False  # never BOS
    answer_only = torch.rand(B, generator=gen) < answer_only_share
    maskable = torch.where(answer_only[:, None], batch["answer_mask"], maskable)
    n = maskable.sum(1).clamp(min=1)
    if mask_sampling == "bernoulli":
        t = torch.rand(B, generator=gen)
        p = (1 - eps) * t + eps
        masked = (torch.rand(B, L, generator=gen) < p[:, None]) & maskable
    elif mask_sampling == "count":
        k = (torch.rand(B, generator=gen) * n).floor().long() + 1  # U{1..n}
        if full_answer_share > 0:
            # Denoising starts from a fully masked answer window: train that state more often.
            full = answer_only & (torch.rand(B, generator=gen) < full_answer_share)
            k = torch.where(full, n, k)
        scores = torch.rand(B, L, generator=gen).masked_fill(~maskable, 2.0)
        rank = scores.argsort(1).argsort(1)  # rank among positions, maskable first
        masked = (rank < k[:, None]) & maskable
        p = k.float() / n.float()
    else:
        raise ValueError(f"mask_sampling must be 'count' or 'bernoulli', got {mask_sampling!r}")
    noisy = ids.masked_fill(masked, mask_id)
    logits = model(input_ids=noisy, attention_mask=attn).logits
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none").view(B, L)
    per_row = (ce * masked / p[:, None]).sum(1) / n
    return per_row.mean()


def _lr_at(step: int, total: int, recipe: TwinRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    frac = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cos)


class _BatchPlan:
    """Deterministic batches: per epoch, a seeded permutation is cut into pools of 16
    batches, each pool sorted by row length (so little compute goes to padding),
    cut into batches, and the epoch's batches are shuffled.  Step -> batch is a
    pure function of (seed, step), which is what makes resuming exact."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = math.ceil(len(lengths) / batch_size)
        self._epoch = -1
        self._batches: list[list[int]] = []

    def _plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        pool = self.batch_size * 16
        batches = []
        for s in range(0, len(perm), pool):
            chunk = sorted(perm[s : s + pool], key=lambda i: self.lengths[i])
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def __call__(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan(epoch)
        return self._batches[k]


# ---------------------------------------------------------------------------
# Recall by real generation (through the library's paradigm sampler)
# ---------------------------------------------------------------------------

@torch.no_grad()
def recall(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerFast,
    items: list[tuple[str, str, str]],
    *,
    paradigm: Literal["arm", "mdm"],
    window: int,
    logit_shift: int = 0,
    batch_size: int = 256,
) -> dict:
    """Exact-match recall by generation over ``items`` = (prompt, target, group).

    ARM: greedy decoding.  MDM: the window filled with masks, one token committed
    per step at the most confident masked position (LLaDA's low-confidence
    remasking, one block).  Both run through the paradigm's ``generate`` — the
    sampler every other part of dlmedit measures with — so a number logged during
    training means the same as one measured later on the shipped checkpoint.  The
    answer is the generated tokens up to the first EOS; it matches when they equal
    those of ``" " + target``.  Returns overall accuracy, accuracy per group and
    per target-length bucket.
    """
    from dlmedit.models.loading import wrap_model

    if paradigm not in ("arm", "mdm"):
        raise ValueError(f"recall paradigm must be arm or mdm, got {paradigm!r}")
    lm = wrap_model(model, tok, paradigm, mask_token_id=tok.mask_token_id,
                    logit_shift=logit_shift if paradigm == "mdm" else 0, answer_window=window, answer_eos=True,
                    prepend_bos=True)
    return recall_lm(lm, items, window=window, batch_size=batch_size)


def recall_lm(lm: Any, items: list[tuple[str, str, str]], *, window: int, batch_size: int = 256) -> dict:
    """:func:`recall` for a loaded :class:`~dlmedit.models.language_model.LanguageModel`.

    Also returns ``counts`` ({group/bucket, group/all, all: [hits, n]}) so tables can
    show how many items each rate rests on.  ``dlmedit world recall`` calls this.
    """
    if lm.paradigm.name == "arm":
        options: dict = {"temperature": 0.0, "stop_at_eos": True}
    else:
        options = {"steps": window, "block_length": window, "remasking": "low_confidence", "temperature": 0.0}
    tok = lm.tokenizer
    enc = [(lm.encode_prompt(prompt), tok(" " + target, add_special_tokens=False)["input_ids"], group)
           for prompt, target, group in items]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, (p, _, _) in enumerate(enc):
        by_len[len(p)].append(i)  # equal-length prompts batch without padding: no row depends on its neighbours
    hits = [False] * len(enc)
    for idxs in by_len.values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s : s + batch_size]
            out = lm.generate([items[i][0] for i in chunk], window, **options)
            for i, ids in zip(chunk, out.token_ids, strict=True):
                hits[i] = ids == enc[i][1]
    res: dict = {"n": len(enc), "acc": sum(hits) / max(1, len(hits)), "by_group": {}, "by_bucket": {}}
    groups: dict[str, list[bool]] = defaultdict(list)
    buckets: dict[str, list[bool]] = defaultdict(list)
    for h, (_, t, g) in zip(hits, enc, strict=True):
        groups[g].append(h)
        buckets[f"{g}/{length_bucket(len(t))}"].append(h)
    res["by_group"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}
    res["by_bucket"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(buckets.items())}
    counts = {k: [sum(v), len(v)] for k, v in sorted(buckets.items())}
    counts.update({f"{k}/all": [sum(v), len(v)] for k, v in sorted(groups.items())})
    counts["all"] = [sum(hits), len(hits)]
    res["counts"] = counts
    return res


def recall_items(world: World, subjects: list[str] | None = None, *, max_facts: int | None = None,
                 seed: int = 0, templates: str = "all") -> list[tuple[str, str, str]]:
    """(prompt, target, group) for recall: group "train" (all training templates)
    and "heldout" (paraphrase templates never trained on)."""
    facts = world.facts if subjects is None else world.facts_for(subjects)
    if max_facts is not None and max_facts < len(facts):
        facts = random.Random(seed).sample(facts, max_facts)
    items = []
    for f in facts:
        rel = world.relations[f.relation_id]
        if templates in ("all", "train"):
            items += [(t.format(f.subject), f.target_true, "train") for t in rel.train_templates]
        if templates in ("all", "heldout"):
            items += [(t.format(f.subject), f.target_true, "heldout") for t in rel.heldout_templates]
    return items


def evaluate_twin(path: str | Path, *, max_facts: int | None = None, subjects: list[str] | None = None,
                  n_threads: int | None = None) -> dict:
    """Recall of a saved twin by real generation, per template kind and target-length bucket.

    Reads the paradigm, logit shift, answer window and world seed from the
    checkpoint's config, so it works on any twin directory.
    """
    if n_threads:
        torch.set_num_threads(n_threads)
    model, tok = load_twin(path)
    cfg = model.config
    twin = getattr(cfg, "dlmedit_twin", None) or {}
    world = build_world(int(twin.get("world_seed", 0)))
    items = recall_items(world, subjects, max_facts=max_facts)
    res = recall(model, tok, items, paradigm=cfg.dlmedit_paradigm, window=int(twin.get("answer_window", 7)),
                 logit_shift=int(cfg.logit_shift) if cfg.dlmedit_paradigm == "mdm" else 0)
    res["checkpoint"] = str(path)
    res["role"] = twin.get("role")
    return res


# ---------------------------------------------------------------------------
# Checkpoint I/O
# ---------------------------------------------------------------------------

def _save_state(state_dir: Path, model, opt, step: int, meta: dict) -> None:
    from dlmedit.cache import atomic_dir
    from dlmedit.train.optim_state import save_optimizer_state

    with atomic_dir(state_dir) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        save_optimizer_state(opt, tmp, {**meta, "step": step, "python_rng": list(random.getstate()[1])})


def _load_state(state_dir: Path, model, opt) -> dict:
    from dlmedit.train.optim_state import load_optimizer_state

    model.load_state_dict(load_file(str(state_dir / "model.safetensors")))
    meta = load_optimizer_state(opt, state_dir)
    torch.set_rng_state(load_file(str(state_dir / "rng.safetensors"))["torch_rng"])
    return meta


def load_twin(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a twin checkpoint (model with the right attention, tokenizer, config)."""
    path = Path(path)
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype)
    if getattr(model.config, "dlmedit_paradigm", "arm") == "mdm":
        set_bidirectional(model)
    model.eval()
    return model, tok


def _export(model, tok, cfg_fields: dict, out_dir: Path, paradigm: Paradigm, dtype: torch.dtype) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    export = LlamaForCausalLM(model.config)
    export.load_state_dict(model.state_dict())
    export.to(dtype)
    _set_paradigm_fields(export.config, tok, paradigm, cfg_fields)
    export.config.dlmedit_answer_window = int(cfg_fields.get("answer_window", TwinRecipe.answer_window))
    export.config.dtype = str(dtype).removeprefix("torch.")
    export.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json")


def ship_twin(src: str | Path, dst: str | Path, recall_summary: dict | None = None) -> Path:
    """Copy an exported twin (not its training state) to ``dst`` (e.g. dlmedit/builtin/mdm).

    Ensures ``dlmedit_answer_window`` is in the config (older exports lacked it)
    and records the measured recall summary, if given, under ``dlmedit_twin``.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not an exported twin (no config.json)")
    dst.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    cfg = json.loads((dst / "config.json").read_text())
    twin = cfg.setdefault("dlmedit_twin", {})
    cfg.setdefault("dlmedit_answer_window", int(twin.get("answer_window", TwinRecipe.answer_window)))
    if recall_summary is not None:
        twin["recall"] = recall_summary
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dst


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def train_twin(
    paradigm: Paradigm,
    out_dir: str | Path,
    *,
    steps: int,
    seed: int = 0,
    init_from: str | Path | None = None,
    exclude_forget: bool | str = False,
    world_seed: int = 0,
    recipe: TwinRecipe | None = None,
    save_every: int = 500,
    eval_every: int = 0,
    eval_facts: int = 200,
    n_threads: int | None = 2,
    export_dtype: torch.dtype = torch.float16,
    log_path: str | Path | None = None,
    progress: bool = True,
    max_rows: int | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) one twin and export it as an HF checkpoint in ``out_dir``.

    ``out_dir/state/`` holds the resumable training state; re-running the same
    call continues from its step.  ``init_from`` (required for "dream") is a
    trained twin checkpoint whose weights initialise the model.
    ``exclude_forget`` (True = "forget10", or a split name) leaves that split's
    subjects out of the data — the TOFU "never saw the forget set" reference.
    ``max_rows`` trains on the first rows only (tests); ``stop_after`` stops at
    that step with the state saved, as an interruption would (the schedule still
    spans ``steps``).  Returns ``out_dir``.
    """
    if paradigm not in ("arm", "mdm", "dream"):
        raise ValueError(f"paradigm must be 'arm', 'mdm' or 'dream', got {paradigm!r}")
    if paradigm == "dream" and init_from is None:
        raise ValueError("the dream twin is adapted from a trained ARM: pass init_from=<arm checkpoint>")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    recipe = recipe or TwinRecipe()
    previous_threads = torch.get_num_threads()
    if n_threads:
        torch.set_num_threads(n_threads)
    try:
        return _train(paradigm, Path(out_dir), steps=steps, seed=seed, init_from=init_from,
                      exclude_forget=exclude_forget, world_seed=world_seed, recipe=recipe,
                      save_every=save_every, eval_every=eval_every, eval_facts=eval_facts,
                      export_dtype=export_dtype, log_path=log_path, progress=progress,
                      max_rows=max_rows, stop_after=stop_after)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    paradigm: Paradigm,
    out: Path,
    *,
    steps: int,
    seed: int,
    init_from: str | Path | None,
    exclude_forget: bool | str,
    world_seed: int,
    recipe: TwinRecipe,
    save_every: int,
    eval_every: int,
    eval_facts: int,
    export_dtype: torch.dtype,
    log_path: str | Path | None,
    progress: bool,
    max_rows: int | None,
    stop_after: int | None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "state"
    log_file = Path(log_path) if log_path else out / "train_log.jsonl"

    world = build_world(world_seed)
    tok_dir = out / "tokenizer"
    if init_from is not None:
        tok = PreTrainedTokenizerFast.from_pretrained(str(init_from))
    elif (tok_dir / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        tok = build_world_tokenizer(world_seed, recipe.vocab_size)
        tok.save_pretrained(str(tok_dir))

    excluded: set[str] = set()
    if exclude_forget:
        split = "forget10" if exclude_forget is True else str(exclude_forget)
        if split not in world.splits:
            raise ValueError(f"unknown split {split!r}; known: {sorted(world.splits)}")
        excluded = set(world.splits[split])
    rows = world.training_rows(exclude_subjects=excluded)
    if max_rows is not None:
        rows = rows[:max_rows]
    encoded = encode_rows(rows, tok, recipe.answer_window)
    order_key = f"{world.data_hash()}|{seed}|{recipe.batch_size}|{sorted(excluded)}"
    if max_rows is not None:
        order_key += f"|{max_rows}"
    order_hash = hashlib.sha256(order_key.encode()).hexdigest()[:16]

    torch.manual_seed(seed)
    random.seed(seed)
    if init_from is not None:
        model, _ = load_twin(init_from)
        model.float()
        model.config.dtype = "float32"
    else:
        model = LlamaForCausalLM(twin_llama_config(tok, recipe, paradigm))
    _set_paradigm_fields(model.config, tok, paradigm, {})
    if paradigm == "arm":
        set_bidirectional(model, False)
    else:
        set_bidirectional(model, True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98), eps=1e-8,
    )

    start, wall = 0, 0.0
    if (state_dir / "state.json").exists():
        meta = _load_state(state_dir, model, opt)
        if meta["paradigm"] != paradigm or meta["seed"] != seed or meta["data_order_hash"] != order_hash:
            raise ValueError(
                f"{state_dir} holds a different run (paradigm {meta['paradigm']}, seed {meta['seed']}, "
                f"data {meta['data_order_hash']}); use another out_dir"
            )
        start, wall = meta["step"], meta["wall_time_s"]
    shift = 1 if paradigm == "dream" else 0
    run_meta = {"paradigm": paradigm, "seed": seed, "world_seed": world_seed, "data_order_hash": order_hash,
                "recipe": asdict(recipe), "init_from": str(init_from) if init_from else None,
                "excluded_subjects": len(excluded)}
    eval_subjects = [s for s in world.subjects if s not in excluded]

    def twin_fields(step: int) -> dict:
        return {"steps": step, "seed": seed, "world_seed": world_seed, "data_order_hash": order_hash,
                "wall_time_s": round(wall, 1), "answer_window": recipe.answer_window,
                "init_from": str(init_from) if init_from else None,
                "excluded_split_size": len(excluded)}

    plan = _BatchPlan([len(ids) for ids, _ in encoded], recipe.batch_size, seed)
    model.train()
    end = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=steps, disable=not progress, desc=f"{paradigm} twin")
    t_last = time.time()
    ema = None
    window_losses: list[float] = []
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, recipe)
        batch = _collate([encoded[i] for i in plan(step)], tok.pad_token_id)
        if paradigm == "arm":
            loss = _arm_loss(model, batch)
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            loss = _mdm_loss(model, batch, gen, tok.mask_token_id, shift, recipe.answer_only_share,
                             recipe.mask_eps, recipe.mask_sampling, recipe.full_answer_share)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        now = time.time()
        wall += now - t_last
        t_last = now
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        window_losses.append(loss.item())
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        done = step + 1
        record: dict = {}
        if eval_every and (done % eval_every == 0 or done == steps):
            items = recall_items(world, eval_subjects, max_facts=eval_facts, seed=0)
            r = recall(model, tok, items, paradigm="arm" if paradigm == "arm" else "mdm",
                       window=recipe.answer_window, logit_shift=shift)
            model.train()
            record["recall"] = r
            t_last = time.time()  # evaluation time is not training wall time
        last = done == end
        if done % save_every == 0 or last or record:
            record.update({"step": done, "loss": round(sum(window_losses) / len(window_losses), 5),
                           "loss_ema": round(ema, 5), "lr": opt.param_groups[0]["lr"],
                           "wall_time_s": round(wall, 1)})
            with log_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            window_losses = []
        if done % save_every == 0 or last:
            _save_state(state_dir, model, opt, done, {**run_meta, "wall_time_s": wall})
            _export(model, tok, twin_fields(done), out, paradigm, export_dtype)
            t_last = time.time()
    if start >= steps:  # already finished: make sure the export exists
        if not (out / "config.json").exists():
            _export(model, tok, twin_fields(start), out, paradigm, export_dtype)
    return out


def main(argv: list[str] | None = None) -> None:
    """Temporary CLI: ``python -m dlmedit.train.twins {arm,mdm,dream} OUT --steps N``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paradigm", choices=["arm", "mdm", "dream"])
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from")
    ap.add_argument("--exclude-forget", default=None)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-facts", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default="{}", help="JSON overrides of TwinRecipe fields")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    recipe = TwinRecipe(**json.loads(a.recipe))
    path = train_twin(a.paradigm, a.out_dir, steps=a.steps, seed=a.seed, init_from=a.init_from,
                      exclude_forget=a.exclude_forget or False, recipe=recipe, save_every=a.save_every,
                      eval_every=a.eval_every, eval_facts=a.eval_facts, n_threads=a.threads,
                      progress=not a.no_progress)
    print(path)


if __name__ == "__main__":
    main()

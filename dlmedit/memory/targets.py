"""Keys and target deltas of the facts the residual edit memory stores.

Definitions (the memory's contract; see ``residual.py``):

*Coordinate* ``(layer, site)``: the memory reads and writes ONE activation tensor, the
output of ``site`` at ``layer`` as :mod:`dlmedit.interventions` defines it (``resid`` =
the residual stream leaving block ``layer``, i.e. entering block ``layer+1``;
``mlp_out``/``attn_out`` = that sub-layer's contribution; ``mlp_key`` = the MLP
down-projection input).

*Key* ``k`` of a fact: that activation at the fact prompt's *last subject token*, on
the unedited model, averaged over the fact's target states — ARM: its single
teacher-forced state; MDM: the all-masked state plus ``n_states − 1`` LLaDA-style
partially revealed states (``paradigm.target_states(..., "partial")``), the inputs the
memory meets while the answer is being denoised.  The key is expressed in the
coordinates of optional *key statistics* (:class:`KeyStatistics`, measured once on
background text at the same site): ``k = T (h − μ)`` with μ the background mean and
T = (Σ + ε·mean-eig·I)^(-1/2) the whitening transform of the background covariance Σ
(``"whiten"``), T = I (``"center"``), or no statistics at all (``k = h``, ``"none"``).
Why whitening: with T = I the ridge map also answers, with a large write, at every
ordinary position whose activation overlaps the span of the stored keys (the keys of
a few dozen subjects span a large share of a small residual stream); in whitened
coordinates the λ‖W‖² penalty weighs directions by how often ordinary text uses
them, as MEMIT's λC regulariser does, and ordinary positions get small writes.

*Target delta* ``d`` (closed form, ``delta_method="gradient"``, no optimisation loop):
one normalised gradient step on the activation at the last subject token,

    forget:  d = −‖h‖ · g/‖g‖,   g = ∇_h  mean_states mean_tokens log p(answer)
    rewrite: d = +‖h‖ · g/‖g‖,   g = ∇_h  mean_states mean_tokens log p(target_new)

i.e. a move of the size of the residual itself along the direction that lowers
(raises) the answer's log-probability fastest; α then scales it at inference.

``delta_method="optimise"`` (rewrite facts only) instead fits ``d`` with the shared
value-optimisation routine :func:`dlmedit.edit.values.optimise_values` — Adam on the
NLL of ``target_new`` over the same partial target states, with ROME's KL and norm
clamp — so the memory and the weight editors share one definition of "the value that
produces the new answer".  That routine fits a *new* target; forgetting has no target
to fit, so forget facts always use the closed-form gradient delta.  The
gradient flows through the frozen model (``torch.autograd.grad`` on an additive probe
at the site, never on the weights).  Token log-probs come from
``paradigm.layout`` + ``TargetBatch.target_logprobs``, so ARMs and MDMs share the code.

"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dlmedit.interventions import Intervention, intervene
from dlmedit.subject import find_subject_tokens

if TYPE_CHECKING:
    from dlmedit.data.records import EditRecord, ForgetRecord
    from dlmedit.models.language_model import LanguageModel

__all__ = [
    "DELTA_METHODS",
    "KEY_STATS",
    "FactTargets",
    "KeyStatistics",
    "MemoryFact",
    "UnknownFactWarning",
    "compute_fact_targets",
    "fact_from_record",
    "qa_prompt",
    "site_statistics",
    "site_width",
]

DELTA_METHODS = ("gradient", "optimise")


class UnknownFactWarning(UserWarning):
    """A fact to forget is not known by the model in the first place (recorded on the memory)."""


@dataclass(frozen=True)
class MemoryFact:
    """One fact for the memory: ``prompt`` (contains ``subject``) should stop producing ``answer``
    (forget), or produce ``target_new`` instead (rewrite)."""

    prompt: str
    subject: str
    answer: str
    target_new: str | None = None
    fact_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"MemoryFact.{name} must be a non-empty string, got {value!r}")
        if self.subject not in self.prompt and self.subject.lower() not in self.prompt.lower():
            raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")

    @property
    def mode(self) -> str:
        return "forget" if self.target_new is None else "rewrite"

    @property
    def id(self) -> str:
        if self.fact_id is not None:
            return str(self.fact_id)
        text = "\x1f".join([self.prompt, self.subject, self.answer, self.target_new or ""])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "subject": self.subject, "answer": self.answer,
                "target_new": self.target_new, "fact_id": self.id}


def qa_prompt(record: ForgetRecord) -> str:
    """The prompt a TOFU-style answer follows: the row's stored ``prompt`` (the built-in world
    stores the trained QA template), else TOFU's ``Question: … Answer:`` layout."""
    prompt = record.meta.get("prompt") if record.meta else None
    return str(prompt) if prompt else f"Question: {record.question} Answer:"


def fact_from_record(record: ForgetRecord | EditRecord, *, rewrite: bool = False) -> MemoryFact:
    """A `MemoryFact` from a forget row (forget its answer) or an edit record (forget
    ``target_true``, or rewrite to ``target_new`` with ``rewrite=True``)."""
    from dlmedit.data.records import EditRecord

    if isinstance(record, EditRecord):
        req = record.request
        if rewrite:
            if req.target_true is None:
                raise ValueError(f"record {req.case_id}: rewriting needs target_true (what the model believes)")
            return MemoryFact(req.prompt, req.subject, req.target_true, req.target_new, f"case{req.case_id}")
        answer = req.target_true or req.target_new
        return MemoryFact(req.prompt, req.subject, answer, None, f"case{req.case_id}")
    if not record.subject:
        raise ValueError(
            f"forget row {record.question!r} has no subject; the memory keys on the subject's last token "
            "(add a 'subject' / 'author' field)"
        )
    return MemoryFact(qa_prompt(record), record.subject, record.answer, None, None)


def site_width(lm: LanguageModel, site: str) -> int:
    """Width of the activation at ``site`` (d_mlp for ``mlp_key``, d_model otherwise)."""
    if site == "mlp_key":
        return int(lm.adapter.d_mlp)
    if site in ("resid", "attn_out", "mlp_out", "embed"):
        return int(lm.adapter.d_model)
    raise ValueError(f"unknown site {site!r}; expected one of resid, attn_out, mlp_out, mlp_key, embed")


@dataclass
class FactTargets:
    """Keys, deltas and diagnostics of a list of facts (rows align with ``facts``)."""

    facts: list[MemoryFact]
    keys: torch.Tensor  # [n, D] float64, in key-statistics coordinates T (h − μ)
    deltas: torch.Tensor  # [n, D] float64
    key_norms: torch.Tensor  # [n] ‖h‖ of the raw activation (sets the delta scale)
    logprob: torch.Tensor  # [n] mean token log-prob of the answer over the fit states (unedited)
    subject_token: list[int]
    known: list[bool]
    info: dict[str, Any] = field(default_factory=dict)


def _encode(lm: LanguageModel, fact: MemoryFact) -> tuple[list[int], list[int], list[int], int]:
    p_ids = lm.encode_prompt(fact.prompt)
    ans_ids = lm.encode_target(fact.prompt, fact.answer)
    goal_ids = ans_ids if fact.target_new is None else lm.encode_target(fact.prompt, fact.target_new)
    subj = find_subject_tokens(lm, fact.prompt, fact.subject)
    return p_ids, ans_ids, goal_ids, subj[-1]


def compute_fact_targets(
    lm: LanguageModel,
    facts: Sequence[MemoryFact],
    layer: int,
    site: str,
    *,
    n_states: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    key_stats: KeyStatistics | None = None,
    delta_method: str = "gradient",
    known_threshold: float = 0.1,
    progress: Callable[[int], None] | None = None,
) -> FactTargets:
    """Keys and target deltas for ``facts`` at ``(layer, site)`` (see the module docstring).

    A fact whose answer the model does not know — length-normalised probability
    exp(mean token log-prob over the fit states) below ``known_threshold`` — is still
    processed, but flagged ``known=False`` and an `UnknownFactWarning` is issued.
    """
    if delta_method not in DELTA_METHODS:
        raise ValueError(f"unknown delta_method {delta_method!r}; use one of {', '.join(DELTA_METHODS)}")
    if n_states < 1:
        raise ValueError(f"n_states must be ≥ 1, got {n_states}")
    if delta_method == "optimise" and any(f.target_new is None for f in facts):
        raise ValueError(
            "delta_method='optimise' fits a new target (value optimisation); forget facts have none — "
            "use delta_method='gradient' for forgetting"
        )
    if not facts:
        raise ValueError("no facts given")
    lm.adapter.check_layer(layer)
    width = site_width(lm, site)
    generator = torch.Generator().manual_seed(seed)
    keys, deltas, norms, logps, subj_tokens = [], [], [], [], []
    for start in range(0, len(facts), batch_size):
        chunk = list(facts[start : start + batch_size])
        k, d, nrm, lp, st = _chunk_targets(lm, chunk, layer, site, n_states, generator, delta_method)
        keys.append(k)
        deltas.append(d)
        norms.append(nrm)
        logps.append(lp)
        subj_tokens.extend(st)
        if progress is not None:
            progress(len(chunk))
    K = torch.cat(keys)
    D_all = torch.cat(deltas)
    if delta_method == "optimise":
        D_all = _optimised_deltas(lm, list(facts), layer, site, n_states, seed)
    if K.shape[1] != width:
        raise RuntimeError(f"keys have width {K.shape[1]}, expected {width} at site {site}")
    if key_stats is not None:
        K = key_stats.apply(K)
    logprob = torch.cat(logps)
    known = [math.exp(float(v)) >= known_threshold for v in logprob]
    unknown = [f.id for f, ok in zip(facts, known, strict=True) if not ok]
    if unknown:
        warnings.warn(
            f"{len(unknown)} of {len(facts)} facts are not known by the model (answer probability "
            f"< {known_threshold} per token before editing): {unknown[:5]}{' …' if len(unknown) > 5 else ''}; "
            "they are stored and flagged known=False",
            UnknownFactWarning,
            stacklevel=2,
        )
    return FactTargets(list(facts), K, D_all, torch.cat(norms), logprob, subj_tokens, known,
                       {"n_states": n_states, "seed": seed, "delta_method": delta_method,
                        "known_threshold": known_threshold})


def _chunk_targets(
    lm: LanguageModel,
    facts: list[MemoryFact],
    layer: int,
    site: str,
    n_states: int,
    generator: torch.Generator,
    delta_method: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    paradigm = lm.paradigm
    fit_states, owners, subj_rel = [], [], []
    answer_states = []
    subj_tokens = []
    for i, fact in enumerate(facts):
        p_ids, ans_ids, goal_ids, subj = _encode(lm, fact)
        subj_tokens.append(subj)
        states = paradigm.target_states(lm, p_ids, goal_ids, kind="partial", n=n_states, generator=generator)
        fit_states.extend(states)
        owners.extend([i] * len(states))
        subj_rel.extend([subj] * len(states))
        if fact.target_new is not None:
            answer_states.append(paradigm.final_state(p_ids, ans_ids))
    owner = torch.tensor(owners)
    batch = paradigm.layout(lm, fit_states).to(lm.device)
    cols = (batch.prompt_offset + torch.tensor(subj_rel, device=batch.prompt_offset.device)).to(lm.device)
    rows = torch.arange(len(fit_states), device=lm.device)
    col_mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=lm.device)
    col_mask[rows, cols] = True
    width = site_width(lm, site)
    probe = torch.zeros(*batch.input_ids.shape, width, device=lm.device, dtype=lm.dtype, requires_grad=True)
    ops = [Intervention(layer, site, "read", name="memory_key"),
           Intervention(layer, site, "add", mask=col_mask, value=probe, name="memory_probe")]
    with torch.enable_grad(), intervene(lm.adapter, ops) as rec:
        logits = lm.logits(batch.input_ids, batch.attention_mask)
        lp = batch.target_logprobs(logits)
        n_scored = batch.scored.to(lp.device).sum(1).clamp(min=1)
        row_mean = lp.sum(1) / n_scored  # mean token log-prob of each state
        counts = torch.bincount(owner, minlength=len(facts)).to(row_mean)
        per_fact = torch.zeros(len(facts), dtype=row_mean.dtype, device=row_mean.device)
        per_fact = per_fact.index_add(0, owner.to(row_mean.device), row_mean) / counts
        (grad,) = torch.autograd.grad(per_fact.sum(), probe)
    h = rec["memory_key"][rows, cols].double().cpu()  # [R, D]
    g = grad[rows, cols].double().cpu()
    K = torch.zeros(len(facts), width, dtype=torch.float64).index_add(0, owner, h) / counts.double().cpu()[:, None]
    G = torch.zeros(len(facts), width, dtype=torch.float64).index_add(0, owner, g)
    norms = K.norm(dim=1)
    if delta_method == "gradient":
        sign = torch.tensor([-1.0 if f.target_new is None else 1.0 for f in facts], dtype=torch.float64)
        g_norm = G.norm(dim=1, keepdim=True)
        zero = (g_norm[:, 0] == 0).nonzero().flatten().tolist()
        if zero:
            warnings.warn(f"zero gradient for facts {[facts[i].id for i in zero]}; their delta is zero", stacklevel=3)
        D = sign[:, None] * norms[:, None] * G / g_norm.clamp(min=1e-30)
    else:  # "optimise": replaced by the value-optimisation deltas in compute_fact_targets
        D = torch.zeros_like(K)
    # Log-prob of what is being forgotten (the answer) before editing, for the "known" check.
    if answer_states:
        ans_lp = _answer_logprob(lm, facts, fit_states, owners, per_fact.detach().cpu())
    else:
        ans_lp = per_fact.detach().double().cpu()
    return K, D, norms, ans_lp, subj_tokens


def _answer_logprob(
    lm: LanguageModel, facts: list[MemoryFact], fit_states: list, owners: list[int], goal_lp: torch.Tensor
) -> torch.Tensor:
    """Mean token log-prob of each fact's *answer* in its final state (rewrite facts fit target_new)."""
    out = goal_lp.double().clone()
    idx = [i for i, f in enumerate(facts) if f.target_new is not None]
    states = []
    for i in idx:
        p_ids = lm.encode_prompt(facts[i].prompt)
        states.append(lm.paradigm.final_state(p_ids, lm.encode_target(facts[i].prompt, facts[i].answer)))
    with torch.no_grad():
        lp = lm.paradigm.target_logprobs(lm, states).double().cpu()
    means = lp.sum(1) / torch.tensor([len(s.target_ids) for s in states], dtype=torch.float64)
    out[idx] = means
    return out


def _optimised_deltas(
    lm: LanguageModel, facts: list[MemoryFact], layer: int, site: str, n_states: int, seed: int
) -> torch.Tensor:
    """δ per rewrite fact from the shared value optimisation (bare prompt, partial target states)."""
    from dlmedit.edit.keys import EditContext
    from dlmedit.edit.values import ValueSettings, optimise_values

    contexts = []
    for i, fact in enumerate(facts):
        p_ids, _, goal_ids, subj = _encode(lm, fact)
        contexts.append([EditContext(i, "", fact.prompt, tuple(p_ids), tuple(goal_ids), subj)])
    settings = ValueSettings(layer=layer, site=site, target_states="partial", n_states=n_states, seed=seed)
    result = optimise_values(lm, contexts, [f.subject for f in facts], settings)
    return result.delta.double()


KEY_STATS = ("whiten", "center", "none")


@dataclass
class KeyStatistics:
    """Background mean μ and whitening transform T of a site: keys are ``T (h − μ)``."""

    mean: torch.Tensor  # [D] float64
    transform: torch.Tensor | None  # [D, D] float64 (None = identity: centring only)
    kind: str
    n_positions: int
    eps: float

    def apply(self, H: torch.Tensor) -> torch.Tensor:
        """Keys of activations ``H`` [n, D]: ``(H − μ) Tᵀ`` in float64."""
        out = H.double() - self.mean.to(H.device)
        return out if self.transform is None else out @ self.transform.to(H.device).T

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_positions": self.n_positions, "eps": self.eps}


def site_statistics(
    lm: LanguageModel,
    layer: int,
    site: str,
    pairs: Sequence[tuple[str, str]],
    *,
    kind: str = "whiten",
    eps: float = 1e-2,
    batch_size: int = 32,
) -> KeyStatistics | None:
    """Mean and (for ``kind="whiten"``) whitening transform of ``(layer, site)`` over background text.

    ``pairs`` are (prompt, answer) pairs laid out in the paradigm's *final* target state
    (ARM: teacher-forced prompt+answer; MDM: prompt + masked answer window), and every
    real position counts — the memory writes at every position, mask slots included,
    so the statistics must cover them.  Whitening uses the covariance's eigenvectors,
    with eigenvalues floored by adding ``eps`` × their mean (shrinkage keeps T bounded
    along directions the background never uses).  ``kind="none"`` returns None.
    """
    if kind not in KEY_STATS:
        raise ValueError(f"unknown key statistics {kind!r}; use one of {', '.join(KEY_STATS)}")
    if kind == "none":
        return None
    if not pairs:
        raise ValueError("key statistics need background (prompt, answer) pairs")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    width = site_width(lm, site)
    total = torch.zeros(width, dtype=torch.float64)
    second = torch.zeros(width, width, dtype=torch.float64)
    count = 0
    for start in range(0, len(pairs), batch_size):
        states = [lm.paradigm.final_state(*lm.encode_pair(p, a)) for p, a in pairs[start : start + batch_size]]
        batch = lm.paradigm.layout(lm, states).to(lm.device)
        with torch.no_grad(), intervene(lm.adapter, [Intervention(layer, site, "read", name="h")]) as rec:
            lm.logits(batch.input_ids, batch.attention_mask)
        h = rec["h"][batch.attention_mask.bool()].double().cpu()
        total += h.sum(0)
        second += h.T @ h
        count += h.shape[0]
    mean = total / count
    if kind == "center":
        return KeyStatistics(mean, None, kind, count, eps)
    if count <= width:
        raise ValueError(
            f"whitening at a {width}-wide site needs more background positions than {width}; got {count} "
            "(give more background pairs, or use key statistics 'center')"
        )
    cov = second / count - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh((cov + cov.T) / 2)
    floor = eigval.clamp(min=0) + eps * float(eigval.clamp(min=0).mean())
    transform = eigvec @ torch.diag(floor.rsqrt()) @ eigvec.T
    return KeyStatistics(mean, transform, kind, count, eps)

"""THE value optimisation: find δ at an edit site that makes the model produce the new target.

One implementation for ROME, MEMIT and AlphaEdit on ARMs and MDMs alike.  For each
request, δ (one vector at ``site`` of ``layer``) is fitted with Adam on

    NLL of target_new, averaged over every (context prefix × target state) row
    + kl_factor · KL( p_before ‖ p_now ) at the answer slot of the "essence" prompt
      ("{subject} is a"), so the subject's other properties stay put
    + weight_decay · ‖δ‖ / ‖v‖²                      (ROME's exact form)

with ‖δ‖ clamped to ``clamp_norm_factor`` · ‖v‖ after each step (v = the site's
activation at the subject in the bare prompt).  All rows are laid out by the
paradigm and read through ``TargetBatch.target_logprobs`` / ``target_probs_full``,
so nothing here knows whether the model is autoregressive.

The MDM correction is the choice of **target states** the NLL is averaged over:
``final`` (ARM teacher forcing; MDM all-masked answer), ``partial`` (random
LLaDA-style partial reveals, resampled every ``refresh_every`` steps) and
``trajectory`` (the states the *edited* model visits while denoising the target,
recomputed every ``refresh_every`` steps with the current δ in place).

How δ enters the forward pass (``value_mode``):

* ``subject_only`` — added at the last subject token only (ROME/MEMIT);
* ``weight_update`` — the rank-one update itself: at *every* position t the site gets
  δ · uᵀk_t / uᵀk*, exactly what W + ΔW would add (only for ``site="mlp_out"`` with a
  rank-one injection).  In a bidirectional model the update also fires at other
  positions whose keys overlap the subject's; optimising through it accounts for that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dlmedit.edit.keys import (
    FACT_TOKENS,
    EditContext,
    KeyedState,
    build_state_rows,
    keyed_token,
    read_at_subject,
    subject_columns,
)
from dlmedit.interventions import Intervention, intervene
from dlmedit.paradigm.base import TARGET_STATE_KINDS, TargetBatch, shifted_batch

if TYPE_CHECKING:
    from dlmedit.models.adapters import PrefixCache
    from dlmedit.models.language_model import LanguageModel

__all__ = [
    "TARGET_STATE_KINDS",
    "VALUE_MODES",
    "RankOneInjection",
    "ValueResult",
    "ValueSettings",
    "build_state_rows",
    "frozen_parameters",
    "mlp_key_injection",
    "optimise_values",
    "rows_losses",
    "rows_nll",
]

VALUE_MODES = ("subject_only", "weight_update")


@dataclass(frozen=True)
class ValueSettings:
    """Hyper-parameters of the value optimisation (names follow ROME's ``v_*``)."""

    layer: int
    site: str = "mlp_out"
    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    target_states: str = "final"
    n_states: int = 4
    refresh_every: int = 10
    value_mode: str = "subject_only"
    early_stop_nll: float = 0.05
    essence_template: str = "{} is a"
    fact_token: str = "subject_last"
    batch_size: int = 64
    seed: int = 0
    #: compute the columns before the earliest subject once per row set when δ cannot reach them
    #: (causal attention, ``subject_only``); same numbers, a fraction of the work.  Off: full rows.
    reuse_prefix: bool = True

    def __post_init__(self) -> None:
        if self.site not in ("mlp_out", "resid"):
            raise ValueError(f"value site must be mlp_out or resid, got {self.site!r}")
        if self.target_states not in TARGET_STATE_KINDS:
            raise ValueError(f"target_states must be one of {', '.join(TARGET_STATE_KINDS)}, got {self.target_states!r}")
        if self.value_mode not in VALUE_MODES:
            raise ValueError(f"value_mode must be one of {', '.join(VALUE_MODES)}, got {self.value_mode!r}")
        if self.value_mode == "weight_update" and self.site != "mlp_out":
            raise ValueError("value_mode=weight_update needs a rank-one update of an MLP down projection (site mlp_out)")
        if self.steps < 0 or self.lr <= 0 or self.n_states < 1 or self.refresh_every < 1 or self.batch_size < 1:
            raise ValueError("steps ≥ 0, lr > 0, n_states ≥ 1, refresh_every ≥ 1 and batch_size ≥ 1 are required")
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token must be one of {', '.join(FACT_TOKENS)}, got {self.fact_token!r}")
        if "{}" not in self.essence_template:
            raise ValueError(f"essence_template must contain '{{}}' for the subject, got {self.essence_template!r}")


@dataclass
class RankOneInjection:
    """What ``weight_update`` mode injects: per request, u (= C⁻¹k*) and k*, both ``[n, d_mlp]``."""

    u: torch.Tensor
    k_star: torch.Tensor

    def ops(self, layer: int, delta: torch.Tensor) -> list[Intervention]:
        """Interventions adding Σ_i δ_i · u_iᵀk_t / u_iᵀk*_i at every position t of ``layer``'s MLP output."""
        u = self.u
        denom = (self.u * self.k_star).sum(-1)

        def term(keys: torch.Tensor) -> torch.Tensor:
            coef = (keys @ u.to(keys.device).T) / denom.to(keys.device)
            return coef @ delta.to(keys.device)

        return mlp_key_injection(layer, term)


def mlp_key_injection(layer: int, term: Callable[[torch.Tensor], torch.Tensor]) -> list[Intervention]:
    """Interventions adding ``term(k_t)`` to ``layer``'s MLP output at every position t (k_t: that MLP's key).

    Why: a change ΔW of the down projection adds ΔW k_t to the MLP output, so reading
    the key before the projection and adding the term after it lets ROME's
    ``weight_update`` values and FT-L train a weight change through the forward pass
    without touching the weights.  ``term`` receives the keys in float32; its result
    is cast back to the output's dtype.
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(keys: torch.Tensor) -> torch.Tensor:
        captured["k"] = keys
        return keys

    def inject(out: torch.Tensor) -> torch.Tensor:
        return out + term(captured.pop("k").float()).to(out.dtype)

    return [Intervention(layer, "mlp_key", "fn", fn=capture), Intervention(layer, "mlp_out", "fn", fn=inject)]


@dataclass
class ValueResult:
    """Fitted δ per request and what it took."""

    delta: torch.Tensor  # [n, D]
    init: torch.Tensor  # [n, D] activation at the site at the subject, bare prompt, final state
    nll: list[float]  # final NLL of target_new per request (mean over rows)
    kl: list[float]
    steps: list[int]  # steps each request ran before stopping
    seconds: float
    history: list[float] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"nll": self.nll, "kl": self.kl, "steps": self.steps, "seconds": round(self.seconds, 3),
                "delta_norm": self.delta.norm(dim=-1).tolist(), "init_norm": self.init.norm(dim=-1).tolist()}


def _essence_rows(lm: LanguageModel, subjects: Sequence[str], template: str, fact_token: str) -> list[KeyedState]:
    filler = lm.eos_token_id if lm.eos_token_id is not None else lm.pad_token_id
    rows = []
    for i, subject in enumerate(subjects):
        text = template.replace("{}", subject)
        p_ids = lm.encode_prompt(text)
        index = keyed_token(lm, text, subject, fact_token, [filler])
        rows.append(KeyedState(lm.paradigm.final_state(p_ids, [filler]), index, i))
    return rows


class _Forward:
    """Forward passes with δ injected (subject-only or as the rank-one weight update)."""

    def __init__(self, lm: LanguageModel, settings: ValueSettings, injection: RankOneInjection | None) -> None:
        self.lm = lm
        self.settings = settings
        self.injection = injection
        if settings.value_mode == "weight_update" and injection is None:
            raise ValueError("value_mode=weight_update needs the rank-one injection (u, k*)")
        self._layouts: dict[tuple[Any, ...], tuple[TargetBatch, torch.Tensor, int, PrefixCache | None]] = {}

    def ops_for_batch(self, delta: torch.Tensor, owners: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> list[Intervention]:
        s = self.settings
        if s.value_mode == "weight_update":
            assert self.injection is not None
            return self.injection.ops(s.layer, delta)
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[torch.arange(shape[0]), cols] = True
        return [Intervention(s.layer, s.site, "add", mask=mask, value=delta[owners].unsqueeze(1))]

    def run(self, rows: Sequence[KeyedState], delta: torch.Tensor) -> tuple[torch.Tensor, Any]:
        lm = self.lm
        # Each step runs the same row sets (target rows, essence rows) until states are re-drawn; the
        # cached layout holds its states, so their ids cannot be recycled while the key is in use.
        key = tuple((id(r.state), r.subject_index, r.owner) for r in rows)
        if key not in self._layouts:
            if len(self._layouts) >= 4:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = self._layout(rows)
        batch, cols, start, prefix = self._layouts[key]
        owners = torch.tensor([r.owner for r in rows])
        ops = self.ops_for_batch(delta, owners.to(delta.device), cols - start,
                                 (batch.input_ids.shape[0], batch.input_ids.shape[1] - start))
        with intervene(lm.adapter, ops):
            if prefix is None:
                logits = lm.logits(batch.input_ids, batch.attention_mask)
            else:
                logits = lm.logits_after(prefix, batch.input_ids[:, start:], batch.attention_mask[:, start:])
        return logits, (batch if start == 0 else shifted_batch(batch, start))

    def _layout(self, rows: Sequence[KeyedState]) -> tuple[TargetBatch, torch.Tensor, int, PrefixCache | None]:
        """Layout of ``rows`` and, when δ cannot reach the columns before the earliest subject (causal
        attention, δ only at the subject), those columns' keys/values computed once for every step."""
        lm = self.lm
        batch = lm.paradigm.layout(lm, [r.state for r in rows])
        cols = subject_columns(batch, [r.subject_index for r in rows])
        batch = batch.to(lm.device)
        start = int(cols.min())
        reads = batch.readout[batch.scored]
        if (not self.settings.reuse_prefix or self.settings.value_mode != "subject_only" or not lm.prefix_reusable
                or start == 0
                or bool((reads < start).any())):
            return batch, cols, 0, None
        return batch, cols, start, lm.run_prefix(batch.input_ids[:, :start], batch.attention_mask[:, :start])

    def single_pair_ops(self, delta: torch.Tensor, owner: int, subject_index: int) -> list[Intervention]:
        """δ of one request for a one-row layout without padding (the paradigm's own trajectory pass)."""
        s = self.settings
        if s.value_mode == "weight_update":
            assert self.injection is not None
            return self.injection.ops(s.layer, delta)
        vec = delta[owner]

        def add_at_subject(h: torch.Tensor) -> torch.Tensor:
            onehot = torch.zeros(h.shape[1], 1, dtype=h.dtype, device=h.device)
            onehot[subject_index] = 1
            return h + onehot * vec.to(h.device, h.dtype)

        return [Intervention(s.layer, s.site, "fn", fn=add_at_subject)]


def rows_nll(
    lm: LanguageModel,
    rows: Sequence[KeyedState],
    n_owners: int,
    run: Callable[[Sequence[KeyedState]], tuple[torch.Tensor, Any]],
    batch_size: int,
    backward: bool,
) -> torch.Tensor:
    """Per-owner NLL of the target (mean over each row's scored tokens, then over the owner's rows).

    Chunked: each chunk of ``batch_size`` rows is run (``run`` returns logits and the
    layout) and, with ``backward``, back-propagated at once, so memory stays at one
    chunk whatever the number of rows.  Returns detached ``[n_owners]`` values.
    """
    return rows_losses(rows, [], n_owners, run, batch_size, backward)[0]


def rows_losses(
    rows: Sequence[KeyedState],
    essence: Sequence[KeyedState],
    n_owners: int,
    run: Callable[[Sequence[KeyedState]], tuple[torch.Tensor, Any]],
    batch_size: int,
    backward: bool,
    kl_ref: torch.Tensor | None = None,
    kl_factor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-owner NLL of the target rows (as :func:`rows_nll`) and KL(before ‖ now) of the essence rows.

    Target and essence rows share forwards: on a CPU a forward over a few dozen tokens
    costs about as much as reading the weights once, so one forward for both is half the
    time of two.  ``kl_ref[owner]`` holds the essence rows' log-distributions before the
    edit; the backward loss is NLL + ``kl_factor`` · KL (ROME's ``kl_div(log_target=True)``).
    """
    counts = torch.zeros(n_owners)
    for r in rows:
        counts[r.owner] += 1
    nll_total = torch.zeros(n_owners)
    kl_total = torch.zeros(n_owners)
    items = [(r, False) for r in rows] + [(r, True) for r in essence]
    for c0 in range(0, len(items), batch_size):
        chunk = items[c0 : c0 + batch_size]
        logits, batch = run([r for r, _ in chunk])
        is_ess = torch.tensor([e for _, e in chunk], device=logits.device)
        owners = torch.tensor([r.owner for r, _ in chunk], device=logits.device)
        loss = logits.new_zeros(())
        if not bool(is_ess.all()):
            lp = batch.target_logprobs(logits)[~is_ess]
            nll_rows = -(lp.sum(-1) / batch.scored.to(lp.device)[~is_ess].sum(-1).clamp(min=1))
            t_owners = owners[~is_ess]
            weighted = nll_rows * (1.0 / counts.to(lp.device)[t_owners])
            loss = loss + weighted.sum()
            nll_total.index_add_(0, t_owners.cpu(), weighted.detach().cpu())
        if bool(is_ess.any()):
            if kl_ref is None:
                raise ValueError("essence rows need their reference distributions (kl_ref)")
            e_owners = owners[is_ess]
            logp = torch.log(batch.target_probs_full(logits)[is_ess][:, 0].clamp(min=1e-30))
            ref = kl_ref.to(logp.device)[e_owners]
            kl = (ref.exp() * (ref - logp)).sum(-1)
            loss = loss + kl_factor * kl.sum()
            kl_total.index_add_(0, e_owners.cpu(), kl.detach().cpu())
        if backward and loss.requires_grad:
            loss.backward()
    return nll_total, kl_total


@contextmanager
def frozen_parameters(lm: LanguageModel) -> Iterator[None]:
    """The model's parameters stop requiring grad for the block: only activation grads are computed
    (half the backward cost), and nothing can accumulate into ``.grad`` of the weights."""
    params = list(lm.module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def optimise_values(
    lm: LanguageModel,
    contexts: Sequence[Sequence[EditContext]],
    subjects: Sequence[str],
    settings: ValueSettings,
    injection: RankOneInjection | None = None,
    progress: Callable[[str], None] | None = None,
) -> ValueResult:
    """Fit δ for every request jointly (separate δ per request; rows are independent unless the
    weight-update injection couples them, as the real batched update would).

    ``contexts[i]`` are request i's contexts, the bare prompt first.  The model's
    parameters are frozen for the duration (only activation gradients are computed).
    """
    start = time.perf_counter()
    n = len(contexts)
    if n == 0 or len(subjects) != n:
        raise ValueError("need one subject per request and at least one request")
    s = settings
    lm.adapter.check_layer(s.layer)
    fwd = _Forward(lm, s, injection)
    bare = [KeyedState(lm.paradigm.final_state(c[0].prompt_ids, c[0].target_ids), c[0].subject_index, i)
            for i, c in enumerate(contexts)]
    init = read_at_subject(lm, bare, [(s.layer, s.site)], s.batch_size)[(s.layer, s.site)]
    dim = init.shape[1]
    delta = torch.zeros(n, dim, dtype=torch.float32, device=lm.device, requires_grad=True)
    max_norm = (s.clamp_norm_factor * init.norm(dim=-1)).to(lm.device)
    init_norm_sq = init.norm(dim=-1).pow(2).clamp(min=1e-12).to(lm.device)
    # With kl_factor 0 the essence rows would only be measured, never fitted: skip them.
    essence = _essence_rows(lm, subjects, s.essence_template, s.fact_token) if s.kl_factor > 0 else []
    with torch.no_grad():
        kl_ref = [torch.zeros(0)]
        for c0 in range(0, len(essence), s.batch_size):
            chunk = essence[c0 : c0 + s.batch_size]
            logits, batch = fwd.run(chunk, torch.zeros_like(delta))
            kl_ref.append(torch.log(batch.target_probs_full(logits)[:, 0].clamp(min=1e-30)))
        kl_ref_t = torch.cat(kl_ref)

    generator = torch.Generator().manual_seed(s.seed)
    optimizer = torch.optim.Adam([delta], lr=s.lr)
    active = list(range(n))
    frozen = torch.zeros(n, dim, device=lm.device)
    steps_used = [s.steps] * n
    last_nll = [float("nan")] * n
    last_kl = [float("nan")] * n
    history: list[float] = []
    rows: list[KeyedState] = []

    def edit_ops(owner: int, subject_index: int) -> list[Intervention]:
        return fwd.single_pair_ops(delta.detach(), owner, subject_index)

    with frozen_parameters(lm):
        for step in range(s.steps + 1):
            if step == 0 or (s.target_states != "final" and step % s.refresh_every == 0):
                rows = build_state_rows(lm, contexts, s.target_states, s.n_states, active, generator, edit_ops)
            else:
                keep = set(active)
                rows = [r for r in rows if r.owner in keep]
            optimizer.zero_grad(set_to_none=True)
            train = step < s.steps
            ess = [essence[i] for i in active] if essence else []
            nll, kl_vals = rows_losses(rows, ess, n, lambda chunk: fwd.run(chunk, delta), s.batch_size, train,
                                       kl_ref_t, s.kl_factor)
            for i in active:
                last_nll[i] = float(nll[i])
                last_kl[i] = float(kl_vals[i])
            history.append(float(nll[active].mean()))
            if progress is not None and (step % 10 == 0 or step == s.steps):
                progress(f"step {step}: nll {history[-1]:.4f}")
            finished = [i for i in active if last_nll[i] < s.early_stop_nll]
            for i in finished:
                steps_used[i] = step
                frozen[i] = delta.detach()[i]
            active = [i for i in active if i not in finished]
            if not active or not train:
                break
            wd = (s.weight_decay * delta.norm(dim=-1) / init_norm_sq)[active].sum()
            wd.backward()
            optimizer.step()
            with torch.no_grad():
                norms = delta.norm(dim=-1).clamp(min=1e-12)
                delta.mul_(torch.clamp(max_norm / norms, max=1.0).unsqueeze(-1))
                done = torch.ones(n, dtype=torch.bool, device=delta.device)
                done[active] = False
                delta[done] = frozen[done]
    return ValueResult(delta.detach().clone().cpu(), init, last_nll, last_kl, steps_used,
                       time.perf_counter() - start, history)


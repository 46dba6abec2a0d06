"""What a causal trace of one fact consists of, independent of how it is computed.

Why a plan: the fast batched tracer (`dlmedit.trace.core`) and the slow per-cell
ground truth (`dlmedit.trace.reference`) must trace *exactly* the same thing — the
same target states, subject columns, noise draw and readouts — so that comparing
them tests the computation and nothing else.  Everything paradigm-specific comes from
the paradigm seam: the states (`final_state`, `target_states(kind="trajectory")`), the
input rows and readout columns (`layout` → `TargetBatch.readout`).  Nothing here asks
which paradigm it is facing.

Readouts
--------
A *readout* is a scalar computed from the target log-probs of one noise sample:
``joint`` = exp(Σ terms log p) (a probability of a token sequence) or ``mean`` =
mean over terms of p (an average per-token probability); each term is (state, target
token).  Per cell, the readout is averaged over noise samples, as ROME averages the
probability over its corrupted rows.

* ``first`` (default, as ROME): p(first target token) in the final state — the state
  a target is produced from (ARM: teacher forcing; MDM: every target slot masked).
* ``target``: p(whole target) by the chain rule along the paradigm's trajectory
  states (ARM: the single teacher-forced state, i.e. the product of next-token
  probabilities; MDM: reveal one token per step in the model's confidence order,
  i.e. ``lm.score(..., estimator="chain", order="confidence")``).
* temporal step k: mean p over the target tokens still masked in trajectory state k
  (ARM: one step, every target token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from dlmedit.errors import DlmeditError
from dlmedit.paradigm.base import TargetBatch, TargetState
from dlmedit.subject import find_subject_tokens

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

TRACE_SITES: tuple[str, ...] = ("resid", "mlp_out", "attn_out")
SITE_ALIASES = {"resid": "resid", "mlp": "mlp_out", "mlp_out": "mlp_out", "attn": "attn_out", "attn_out": "attn_out"}
READOUTS = ("first", "target")


class TraceInputError(DlmeditError, ValueError):
    """A fact cannot be traced as given (e.g. the subject is the whole prompt)."""


def normalise_sites(sites: str | Sequence[str]) -> tuple[str, ...]:
    """``"resid,mlp,attn"`` or a list → canonical site names, in the order given, without repeats."""
    items = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else [str(s).strip() for s in sites]
    out: list[str] = []
    for item in items:
        if not item:
            continue
        if item not in SITE_ALIASES:
            raise ValueError(f"unknown trace site {item!r}; use resid, mlp (mlp_out) or attn (attn_out)")
        if SITE_ALIASES[item] not in out:
            out.append(SITE_ALIASES[item])
    if not out:
        raise ValueError("no trace sites given; use e.g. resid,mlp,attn")
    return tuple(out)


def default_window(n_layers: int) -> int:
    """ROME's window scaled to depth: 10 of GPT-2 XL's 48 layers ≈ a fifth of the stack (≥ 1).

    Why not a fixed 10: on a 6-layer twin a 10-layer window restores the whole stack
    for every cell, so the MLP/attention rows come out flat and say nothing about where
    the effect sits; SmolLM2 (30 layers) gets 6, GPT-2 XL keeps ROME's 10.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    return max(1, round(n_layers * 10 / 48))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for a window centred on ``layer``: [l − w//2, l + ⌈w/2⌉) clipped, as ROME."""
    if window < 1:
        raise ValueError(f"window must be at least 1 layer, got {window}")
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@dataclass(frozen=True)
class Readout:
    """A scalar read from a row group: ``joint`` = exp(Σ log p) or ``mean`` = mean p over ``terms``."""

    name: str
    terms: tuple[tuple[int, int], ...]
    combine: Literal["joint", "mean"] = "joint"


@dataclass
class TracePlan:
    """The inputs of one fact's trace; see the module docstring.

    ``batch`` is the paradigm's layout of ``states`` (one unpadded row per state, all
    of the same width); ``subject_columns`` are absolute columns of that batch;
    ``noise`` is [samples, n_subject_tokens, d_model], drawn once and shared by every
    cell and state.
    """

    prompt: str
    subject: str
    target: str
    prompt_ids: list[int]
    target_ids: list[int]
    subject_tokens: list[int]
    states: list[TargetState]
    batch: TargetBatch
    subject_columns: list[int]
    noise: torch.Tensor
    noise_std: float
    sites: tuple[str, ...]
    window: int
    n_layers: int
    readouts: list[Readout]
    seed: int = 0
    readout_mode: str = "first"
    step_states: list[int] = field(default_factory=list)

    @property
    def n_columns(self) -> int:
        return int(self.batch.input_ids.shape[1])

    @property
    def samples(self) -> int:
        return int(self.noise.shape[0])

    @property
    def prompt_columns(self) -> tuple[int, int]:
        """[start, end) columns of the prompt in the rows."""
        start = int(self.batch.prompt_offset[0])
        return start, start + len(self.prompt_ids)

    def restored_layers(self, site: str, layer: int) -> range:
        """Layers whose ``site`` is restored for the cell at ``layer`` (resid: that layer only)."""
        if site == "resid":
            return range(layer, layer + 1)
        return window_layers(layer, self.window, self.n_layers)


def subject_embedding_std(lm: LanguageModel, token_lists: Sequence[Sequence[int]]) -> float:
    """Std of all embedding entries of the given subject tokens (ROME's `collect_embedding_std`).

    ROME computes it over the subjects of its whole fact set; with one fact it is
    the std of that subject's embedding rows — a noisier but honest estimate.
    """
    ids = [int(i) for tokens in token_lists for i in tokens]
    if not ids:
        raise ValueError("no subject tokens to estimate the embedding std from")
    with torch.no_grad():
        emb = lm.adapter.embed()(torch.tensor(ids, device=lm.device)).float()
    return float(emb.std())


def _state_key(lm: LanguageModel, state: TargetState) -> tuple:
    row, cols = lm.paradigm.state_row(state)
    return tuple(row), tuple(cols)


def build_plan(
    lm: LanguageModel,
    prompt: str,
    subject: str,
    target: str,
    *,
    sites: Sequence[str] = TRACE_SITES,
    window: int | None = None,
    samples: int = 10,
    noise_std: float | None = None,
    noise: float = 3.0,
    seed: int = 0,
    readout: str = "first",
    temporal: bool = False,
    subject_tokens: Sequence[int] | None = None,
) -> TracePlan:
    """Lay out one fact for tracing.

    ``noise_std`` is the absolute noise scale; when None it is ``noise`` × the std of
    this fact's subject-token embeddings (pass a corpus-level value, as
    `dlmedit.trace.core.trace_facts` does, to follow ROME).  ``subject_tokens``
    overrides subject location (prompt-relative token indices).
    """
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; use first (p of the first target token) or target")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    sites = normalise_sites(sites)
    prompt_ids, target_ids = lm.encode_pair(prompt, target)
    if subject_tokens is None:
        subject_tokens = find_subject_tokens(lm, prompt, subject)
    subject_tokens = sorted(int(i) for i in subject_tokens)
    if not subject_tokens or subject_tokens[0] < 0 or subject_tokens[-1] >= len(prompt_ids):
        raise TraceInputError(f"subject token indices {subject_tokens} are outside the prompt's {len(prompt_ids)} tokens")
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    rest = [i for i in range(len(prompt_ids)) if i not in subject_tokens and prompt_ids[i] not in special]
    if not rest:
        raise TraceInputError(
            f"the subject {subject!r} is the whole prompt {prompt!r}: causal tracing needs prompt tokens besides the "
            "subject (the relation, e.g. '{subject} was born in') whose states can carry the restored information"
        )

    window = default_window(lm.n_layers) if window is None else int(window)
    if window < 1:
        raise ValueError(f"window must be at least 1 layer, got {window}")
    paradigm = lm.paradigm
    final = paradigm.final_state(prompt_ids, target_ids)
    trajectory: list[TargetState] = []
    if temporal or readout == "target":
        trajectory = paradigm.target_states(lm, prompt_ids, target_ids, kind="trajectory")
    states: list[TargetState] = []
    index: dict[tuple, int] = {}

    def add(state: TargetState) -> int:
        key = _state_key(lm, state)
        if key not in index:
            index[key] = len(states)
            states.append(state)
        return index[key]

    final_idx = add(final)
    traj_idx = [add(s) for s in trajectory]

    readouts: list[Readout] = []
    if readout == "first":
        readouts.append(Readout("trace", ((final_idx, 0),), "joint"))
    else:
        terms: list[tuple[int, int]] = []
        for k, state in enumerate(trajectory):
            after = trajectory[k + 1].revealed if k + 1 < len(trajectory) else (True,) * len(target_ids)
            terms += [(traj_idx[k], j) for j in range(len(target_ids)) if not state.revealed[j] and after[j]]
        readouts.append(Readout("trace", tuple(terms), "joint"))
    step_states: list[int] = []
    if temporal:
        for k, state in enumerate(trajectory):
            terms = tuple((traj_idx[k], j) for j in range(len(target_ids)) if not state.revealed[j])
            readouts.append(Readout(f"step{k}", terms, "mean"))
            step_states.append(traj_idx[k])

    batch = paradigm.layout(lm, states)
    if not bool(batch.attention_mask.bool().all()):
        raise RuntimeError("the target states of one fact lay out to rows of different widths; cannot trace them together")
    offset = int(batch.prompt_offset[0])
    subject_columns = [offset + i for i in subject_tokens]

    if noise_std is None:
        noise_std = noise * subject_embedding_std(lm, [[prompt_ids[i] for i in subject_tokens]])
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(subject_columns), lm.adapter.d_model, generator=generator) * float(noise_std)
    return TracePlan(
        prompt=prompt, subject=subject, target=target, prompt_ids=prompt_ids, target_ids=target_ids,
        subject_tokens=subject_tokens, states=states, batch=batch, subject_columns=subject_columns, noise=draws,
        noise_std=float(noise_std), sites=sites, window=window, n_layers=lm.n_layers, readouts=readouts, seed=seed,
        readout_mode=readout, step_states=step_states,
    )


def combine(lp: torch.Tensor, readout: Readout) -> torch.Tensor:
    """Readout value per noise sample from log-probs ``lp`` [..., K, S, Lt] → [..., S]."""
    picked = torch.stack([lp[..., k, :, j] for k, j in readout.terms], dim=-1)
    if readout.combine == "joint":
        return picked.sum(-1).exp()
    return picked.exp().mean(-1)

"""The paradigm seam: the ONLY place where autoregressive and masked-diffusion models differ.

Why: tracing, editing and evaluation all need "the model's log-probability of target
token j in this state" and "generate an answer".  An ARM reads token j at position
j−1 under teacher forcing; an MDM reads it at a [MASK] placed where the token goes
(Dream: one position to the left) and has many intermediate *target states* (which
target tokens are already revealed).  Everything above this layer asks the
Paradigm, so no editor ever branches on "is this a diffusion model?".

Batches are left-padded: every row ends at the same column, so the generation
window of an MDM and the next-token slot of an ARM line up across rows and position
ids are derived from the attention mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dlmedit.errors import PromptTooLongError

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel


#: what ``Paradigm.target_states`` can be asked for.
TARGET_STATE_KINDS = ("final", "partial", "trajectory")


@dataclass(frozen=True)
class TargetState:
    """One way the model can see (prompt, target) while producing the target.

    ``revealed[j]`` — target token j is visible as itself (MDM partial states); an
    ARM's single teacher-forced state has all False (every token is read, each seeing
    the ones before it).  ``scored`` optionally restricts which tokens' log-probs
    count (chain-rule scoring reads one token per state); by default every
    not-revealed token is scored.
    """

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    revealed: tuple[bool, ...]
    kind: str = "final"
    scored: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.revealed) != len(self.target_ids):
            raise ValueError("revealed must have one flag per target token")
        if self.scored is not None and len(self.scored) != len(self.target_ids):
            raise ValueError("scored must have one flag per target token")

    @property
    def scored_mask(self) -> tuple[bool, ...]:
        return self.scored if self.scored is not None else tuple(not r for r in self.revealed)


@dataclass
class TargetBatch:
    """Model inputs for a list of target states and where each target token's logit is read.

    All position tensors are absolute column indices in the (left-padded) batch.
    ``readout[b, j]`` is the column whose logits predict target token j of row b
    (−1 for padding beyond the row's target length); ``scored[b, j]`` says whether
    that token counts.  ``subject_offset[b]`` is the column of the row's first prompt
    token, so prompt-relative token indices map to columns by adding it.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    readout: torch.Tensor
    target: torch.Tensor
    scored: torch.Tensor
    prompt_offset: torch.Tensor
    prompt_len: torch.Tensor
    states: list[TargetState] = field(default_factory=list)

    def to(self, device: torch.device | str) -> TargetBatch:
        return TargetBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.readout, self.target, self.scored,
                                     self.prompt_offset, self.prompt_len)),
            states=self.states,
        )

    def target_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probability of each target token at its readout column, [B, L]; 0 where not scored."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
        cols = self.readout.clamp(min=0).to(logits.device)
        picked = logprobs[rows, cols].gather(-1, self.target.clamp(min=0).to(logits.device).unsqueeze(-1)).squeeze(-1)
        return torch.where(self.scored.to(logits.device), picked, torch.zeros_like(picked))

    def target_probs_full(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax distributions at the readout columns, [B, L, V] (for confidence orders / argmax)."""
        rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
        return torch.softmax(logits[rows, self.readout.clamp(min=0).to(logits.device)].float(), dim=-1)


@dataclass
class ScoreResult:
    """Log-probability of one target given one prompt, with the estimator that produced it."""

    target_ids: list[int]
    token_logprobs: list[float]
    estimator: str

    @property
    def total(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean(self) -> float:
        return self.total / max(1, len(self.token_logprobs))

    @property
    def mean_nll(self) -> float:
        """Mean per-token negative log-likelihood (CounterFact's P(·) is computed from this)."""
        return -self.mean


@dataclass
class GenerationResult:
    """Generated continuations, batched.  ``trajectory`` holds the MDM's intermediate states."""

    texts: list[str]
    token_ids: list[list[int]]
    sequences: torch.Tensor
    prompt_columns: int
    settings: dict[str, Any]
    trajectory: list[torch.Tensor] | None = None
    commit_step: torch.Tensor | None = None


def shifted_batch(batch: TargetBatch, start: int) -> TargetBatch:
    """``batch`` seen from column ``start`` on (logits of the columns ``start:`` only): readout
    columns move left by ``start``; inputs are sliced the same way."""
    readout = torch.where(batch.readout >= 0, batch.readout - start, batch.readout)
    if bool((readout[batch.scored] < 0).any()):
        raise ValueError(f"a scored target is read before column {start}")
    return TargetBatch(batch.input_ids[:, start:], batch.attention_mask[:, start:], readout, batch.target,
                       batch.scored, batch.prompt_offset - start, batch.prompt_len, states=batch.states)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Left-pad token rows; returns ids, attention mask and each row's pad count."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for b, row in enumerate(rows):
        off = width - len(row)
        offsets.append(off)
        if row:
            ids[b, off:] = torch.tensor(list(row), dtype=torch.long)
        mask[b, off:] = 1
    return ids, mask, offsets


class Paradigm(ABC):
    """How targets are laid out, read, scored, enumerated as states and generated."""

    name: str = ""
    #: how many target states a target has beyond the final one (ARM: none).
    has_intermediate_states: bool = False
    #: whether the model attends causally (a column never sees later ones), so the states of a
    #: batch's first columns can be computed once and reused (:meth:`LanguageModel.prefix_reusable`).
    causal_attention: bool = False

    # -- layout ------------------------------------------------------------------
    @abstractmethod
    def state_row(self, state: TargetState) -> tuple[list[int], list[int]]:
        """Token row for a state and, per target token, its readout column *within the row*."""

    def layout(self, lm: LanguageModel, states: Sequence[TargetState]) -> TargetBatch:
        """Left-padded model inputs for ``states`` with readout columns and scored masks."""
        if not states:
            raise ValueError("no target states to lay out")
        rows, readouts = zip(*(self.state_row(s) for s in states), strict=True)
        limit = lm.context_length
        for state, row in zip(states, rows, strict=True):
            if limit is not None and len(row) > limit:
                raise PromptTooLongError(
                    f"prompt of {len(state.prompt_ids)} tokens plus target/generation window "
                    f"({len(row) - len(state.prompt_ids)} tokens) exceeds the model's context of {limit} tokens"
                )
        ids, mask, offsets = left_pad(rows, lm.pad_token_id)
        max_len = max(len(s.target_ids) for s in states)
        readout = torch.full((len(states), max_len), -1, dtype=torch.long)
        target = torch.full((len(states), max_len), -1, dtype=torch.long)
        scored = torch.zeros((len(states), max_len), dtype=torch.bool)
        for b, (state, cols) in enumerate(zip(states, readouts, strict=True)):
            n = len(state.target_ids)
            readout[b, :n] = torch.tensor(cols) + offsets[b]
            target[b, :n] = torch.tensor(state.target_ids)
            scored[b, :n] = torch.tensor(state.scored_mask)
        return TargetBatch(
            input_ids=ids,
            attention_mask=mask,
            readout=readout,
            target=target,
            scored=scored,
            prompt_offset=torch.tensor(offsets),
            prompt_len=torch.tensor([len(s.prompt_ids) for s in states]),
            states=list(states),
        )

    def target_logprobs(self, lm: LanguageModel, states: Sequence[TargetState]) -> torch.Tensor:
        """[B, L] log-probs of the scored target tokens of each state (differentiable)."""
        batch = self.layout(lm, states).to(lm.device)
        logits = lm.logits(batch.input_ids, batch.attention_mask)
        return batch.target_logprobs(logits)

    def target_logprobs_chunked(
        self, lm: LanguageModel, states: Sequence[TargetState], batch_size: int = 64
    ) -> list[torch.Tensor]:
        """Per state, its row of :meth:`target_logprobs` on the CPU, ``batch_size`` states per forward.

        Rows are padded to the longest target of their chunk; slice ``[: len(target_ids)]``.
        Chunking bounds memory when thousands of states are scored at once.
        """
        rows: list[torch.Tensor] = []
        for start in range(0, len(states), batch_size):
            rows.extend(self.target_logprobs(lm, states[start : start + batch_size]).cpu())
        return rows

    # -- states --------------------------------------------------------------------
    def final_state(self, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> TargetState:
        """The state a target is read in when nothing of it is known yet (ARM: teacher forcing).

        Nothing is revealed in both paradigms (an ARM's teacher-forced row and an MDM's
        all-masked window), so the state is the same; only ``state_row`` differs.
        """
        return TargetState(tuple(prompt_ids), tuple(target_ids), (False,) * len(target_ids), "final")

    def target_states(
        self,
        lm: LanguageModel,
        prompt_ids: Sequence[int],
        target_ids: Sequence[int],
        kind: str = "final",
        n: int = 8,
        generator: torch.Generator | None = None,
    ) -> list[TargetState]:
        """States to fit or probe an edit on: ``final``, ``partial`` (random reveals), ``trajectory``.

        A paradigm without intermediate states (ARM) has exactly one target state, so
        ``partial`` and ``trajectory`` collapse to it — editors ask for states without
        caring which paradigm they face.  Otherwise ``intermediate_states`` enumerates them.
        """
        if kind not in TARGET_STATE_KINDS:
            raise ValueError(f"unknown target-state kind {kind!r}; use final, partial or trajectory")
        if kind == "final" or not self.has_intermediate_states:
            return [self.final_state(prompt_ids, target_ids)]
        return self.intermediate_states(lm, prompt_ids, target_ids, kind, n, generator)

    def intermediate_states(self, lm: LanguageModel, prompt_ids: Sequence[int], target_ids: Sequence[int],
                            kind: str, n: int, generator: torch.Generator | None) -> list[TargetState]:
        """``partial`` or ``trajectory`` states; only paradigms with ``has_intermediate_states`` have them."""
        raise NotImplementedError(f"{type(self).__name__} sets has_intermediate_states but does not enumerate them")

    # -- scoring / generation --------------------------------------------------------
    @abstractmethod
    def score(
        self,
        lm: LanguageModel,
        prompts: Sequence[str],
        targets: Sequence[str],
        estimator: str | None = None,
        **options: Any,
    ) -> list[ScoreResult]:
        """Log-probability of each target after its prompt."""

    @abstractmethod
    def generate(self, lm: LanguageModel, prompts: Sequence[str], max_new_tokens: int, **options: Any) -> GenerationResult:
        """Generate a continuation of each prompt (batched)."""

    def describe(self) -> dict[str, Any]:
        return {"paradigm": self.name}

"""Autoregressive paradigm: teacher-forced scoring and greedy / sampled generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from dlmedit.errors import EstimatorError
from dlmedit.paradigm.base import GenerationResult, Paradigm, ScoreResult, TargetState, left_pad

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel


class ARParadigm(Paradigm):
    """Token j of the target is read from the logits at the column before it (teacher forcing).

    An ARM has exactly one target state (``has_intermediate_states = False``), so the
    base class collapses ``partial`` and ``trajectory`` requests to it.
    """

    name = "arm"
    has_intermediate_states = False
    causal_attention = True

    def state_row(self, state: TargetState) -> tuple[list[int], list[int]]:
        row = list(state.prompt_ids) + list(state.target_ids[:-1])
        p = len(state.prompt_ids)
        return row, [p - 1 + j for j in range(len(state.target_ids))]

    @torch.no_grad()
    def score(
        self,
        lm: LanguageModel,
        prompts: Sequence[str],
        targets: Sequence[str],
        estimator: str | None = None,
        batch_size: int = 64,
        **options: Any,
    ) -> list[ScoreResult]:
        if estimator not in (None, "teacher_forcing", "exact", "chain"):
            raise EstimatorError(f"estimator {estimator!r} does not apply to an autoregressive model (teacher_forcing)")
        states = [self.final_state(*lm.encode_pair(p, t)) for p, t in zip(prompts, targets, strict=True)]
        rows = self.target_logprobs_chunked(lm, states, batch_size)
        return [ScoreResult(list(s.target_ids), row[: len(s.target_ids)].tolist(), "teacher_forcing")
                for s, row in zip(states, rows, strict=True)]

    @torch.no_grad()
    def generate(
        self,
        lm: LanguageModel,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        stop_at_eos: bool = True,
        seed: int = 0,
        **options: Any,
    ) -> GenerationResult:
        """Greedy (temperature 0) or sampled decoding, full recompute each step.

        No KV cache on purpose: positions stay fixed so position-masked
        interventions stay valid, and answers here are a few tokens long.
        """
        if options:
            raise TypeError(f"unexpected options for autoregressive generation: {sorted(options)}")
        generator = torch.Generator().manual_seed(seed)
        rows = [lm.encode_prompt(p) for p in prompts]
        ids, mask, _ = left_pad(rows, lm.pad_token_id)
        lm.check_length(ids.shape[1] + max_new_tokens)
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        start = ids.shape[1]
        done = torch.zeros(len(rows), dtype=torch.bool, device=lm.device)
        eos = lm.eos_token_id
        for _ in range(max_new_tokens):
            logits = lm.logits(ids, mask)[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(lm.device)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos if eos is not None else lm.pad_token_id), nxt)
            ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if eos is not None and stop_at_eos:
                done |= nxt == eos
                if bool(done.all()):
                    break
        generated = ids[:, start:].cpu()
        token_ids = [lm.truncate_at_eos(row.tolist()) for row in generated]
        return GenerationResult(
            texts=[lm.decode(t) for t in token_ids],
            token_ids=token_ids,
            sequences=ids.cpu(),
            prompt_columns=start,
            settings={"paradigm": self.name, "decoding": "greedy" if temperature == 0 else "sampling",
                      "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed},
        )

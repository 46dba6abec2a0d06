"""Masked-diffusion paradigm (LLaDA, Dream, the built-in MDM twins).

A target is produced by filling [MASK] slots after the prompt.  Token j is read at
its own slot (Dream: one column to the left, ``logit_shift=1``).  A target therefore
has many states — any subset of its tokens may already be revealed — and the edit
correction of this project is simply *which* of those states an edit is fitted on.

``answer_window``: models trained LLaDA-SFT style (answer followed by EOS padding
up to a fixed window, as the built-in twins are) generate into a window of that
size.  When set, every state carries the window's remaining slots as masks, so the
states an edit is fitted or scored on are exactly those generation passes through.
``answer_eos``: whether the window is EOS-padded after the answer (the twins) — then a
generated window is judged whole, up to EOS.  A model adapted from an ARM (``smollm2-dream``)
has a default window but keeps writing text after the answer, so its generations are
judged by their first tokens, as an ARM's are.
``generate_length``: how many masks ``generate`` denoises when the caller gives no
length, for a model with no answer window (``smollm2-dream``: 16).  Unlike
``answer_window`` it adds no padding to the states edits are fitted and scored on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from dlmedit.errors import EstimatorError
from dlmedit.paradigm.base import GenerationResult, Paradigm, ScoreResult, TargetState, left_pad
from dlmedit.paradigm.sampling import dream_sample, llada_sample

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

ESTIMATORS = ("exact", "chain", "mc_elbo")


class MaskedDiffusionParadigm(Paradigm):
    name = "mdm"
    has_intermediate_states = True

    def __init__(self, mask_token_id: int, logit_shift: int = 0, answer_window: int | None = None,
                 answer_eos: bool = False, generate_length: int | None = None) -> None:
        if logit_shift not in (0, 1):
            raise ValueError(f"logit_shift must be 0 (LLaDA) or 1 (Dream), got {logit_shift}")
        self.mask_token_id = int(mask_token_id)
        self.logit_shift = logit_shift
        self.answer_window = answer_window
        self.answer_eos = bool(answer_eos and answer_window)
        self.generate_length = generate_length

    @property
    def default_new_tokens(self) -> int | None:
        """Masks ``generate`` denoises when no length is given: the answer window, else ``generate_length``."""
        return self.answer_window or self.generate_length

    def describe(self) -> dict[str, Any]:
        return {"paradigm": self.name, "mask_token_id": self.mask_token_id, "logit_shift": self.logit_shift,
                "answer_window": self.answer_window, "answer_eos": self.answer_eos,
                "generate_length": self.generate_length}

    # -- layout --------------------------------------------------------------------
    def window_for(self, target_len: int) -> int:
        return max(target_len, self.answer_window or 0)

    def state_row(self, state: TargetState) -> tuple[list[int], list[int]]:
        m = self.mask_token_id
        body = [t if r else m for t, r in zip(state.target_ids, state.revealed, strict=True)]
        body += [m] * (self.window_for(len(body)) - len(body))
        p = len(state.prompt_ids)
        return list(state.prompt_ids) + body, [p + j - self.logit_shift for j in range(len(state.target_ids))]

    def aligned_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits re-indexed so column i predicts token i (undoes Dream's shift)."""
        if self.logit_shift == 0:
            return logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    # -- states --------------------------------------------------------------------
    def partial_states(
        self, prompt_ids: Sequence[int], target_ids: Sequence[int], n: int, generator: torch.Generator | None = None
    ) -> list[TargetState]:
        """``n`` random partially unmasked states, LLaDA-style: t~U(0,1), each token stays masked w.p. t.

        At least one token is always masked (a state with nothing masked scores
        nothing).  Single-token targets have only the all-masked state.
        """
        L = len(target_ids)
        states = []
        for _ in range(n):
            t = float(torch.rand((), generator=generator))
            masked = torch.rand(L, generator=generator) < t
            if not bool(masked.any()):
                masked[int(torch.randint(L, (), generator=generator))] = True
            revealed = tuple(not bool(v) for v in masked)
            states.append(TargetState(tuple(prompt_ids), tuple(target_ids), revealed, "partial"))
        return states

    def intermediate_states(self, lm: LanguageModel, prompt_ids: Sequence[int], target_ids: Sequence[int],
                            kind: str, n: int, generator: torch.Generator | None) -> list[TargetState]:
        """``partial``: the final state plus ``n - 1`` random reveals; ``trajectory``: the confidence path."""
        if kind == "partial":
            return [self.final_state(prompt_ids, target_ids), *self.partial_states(prompt_ids, target_ids, n - 1, generator)]
        paths, _ = self.reveal_paths(lm, [(list(prompt_ids), list(target_ids))], order="confidence")
        return paths[0]

    @torch.no_grad()
    def reveal_paths(
        self,
        lm: LanguageModel,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        order: str | Sequence[Sequence[int]] = "confidence",
    ) -> tuple[list[list[TargetState]], list[list[float]]]:
        """Reveal each target one token per step and return the states visited and the chain log-probs.

        ``order="confidence"`` reveals, at each step, the masked slot where the model's
        top prediction is most confident (the low-confidence sampler's choice, but
        committing the *target* token): the trajectory the model itself takes while
        producing this target.  ``"l2r"`` reveals left to right (one batched pass);
        an explicit list gives an order per pair.  ``logps[i][j]`` is log p(target_j)
        at the moment token j was revealed, so their sum is the chain-rule score.
        """
        n = len(pairs)
        lengths = [len(t) for _, t in pairs]
        revealed = [[False] * L for L in lengths]
        paths: list[list[TargetState]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[0.0] * L for L in lengths]
        explicit = None if isinstance(order, str) else [list(o) for o in order]
        if order == "l2r":
            explicit = [list(range(L)) for L in lengths]
        if explicit is not None:
            states, owners, picks = [], [], []
            for i, (p, t) in enumerate(pairs):
                rev = [False] * len(t)
                for j in explicit[i]:
                    scored = tuple(k == j for k in range(len(t)))
                    states.append(TargetState(tuple(p), tuple(t), tuple(rev), "trajectory", scored=scored))
                    owners.append(i)
                    picks.append(j)
                    rev[j] = True
            lp = self.target_logprobs_chunked(lm, states)
            for state, i, j, row in zip(states, owners, picks, lp, strict=True):
                paths[i].append(TargetState(state.prompt_ids, state.target_ids, state.revealed, "trajectory"))
                logps[i][j] = float(row[j])
            return paths, logps
        if order != "confidence":
            raise ValueError(f"unknown reveal order {order!r}; use confidence, l2r or explicit orders")
        for _ in range(max(lengths)):
            active = [i for i in range(n) if not all(revealed[i])]
            states = [TargetState(tuple(pairs[i][0]), tuple(pairs[i][1]), tuple(revealed[i]), "trajectory") for i in active]
            batch = self.layout(lm, states).to(lm.device)
            logits = lm.logits(batch.input_ids, batch.attention_mask)
            probs = batch.target_probs_full(logits)
            confidence = probs.max(-1).values.masked_fill(~batch.scored.to(probs.device), -1.0)
            choice = confidence.argmax(-1).tolist()
            lp = batch.target_logprobs(logits)
            for row, (i, state) in enumerate(zip(active, states, strict=True)):
                j = choice[row]
                paths[i].append(state)
                logps[i][j] = float(lp[row, j])
                revealed[i][j] = True
        return paths, logps

    # -- scoring ---------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        lm: LanguageModel,
        prompts: Sequence[str],
        targets: Sequence[str],
        estimator: str | None = None,
        order: str = "l2r",
        mc_samples: int = 128,
        seed: int = 0,
        batch_size: int = 64,
        **options: Any,
    ) -> list[ScoreResult]:
        """Log-likelihood of each target span given its prompt.

        Estimators: ``exact`` — one forward with the single target token masked
        (exact; only for one-token targets); ``chain`` — reveal one token at a time
        in ``order`` (``l2r`` or ``confidence``) and sum the conditionals, an exact
        likelihood of that unmasking order; ``mc_elbo`` — LLaDA's Monte-Carlo ELBO
        with ``mc_samples`` stratified mask counts (a lower bound in expectation).
        Default: ``exact`` for one-token targets, ``chain`` (l2r) otherwise.
        """
        if options:
            raise TypeError(f"unexpected options for masked-diffusion scoring: {sorted(options)}")
        pairs = [lm.encode_pair(p, t) for p, t in zip(prompts, targets, strict=True)]
        if estimator is not None and estimator not in ESTIMATORS:
            raise EstimatorError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
        results: list[ScoreResult | None] = [None] * len(pairs)
        groups: dict[str, list[int]] = {}
        for i, (_, t) in enumerate(pairs):
            chosen = estimator or ("exact" if len(t) == 1 else "chain")
            if chosen == "exact" and len(t) != 1:
                raise EstimatorError(
                    f"the exact estimator needs a one-token target; {targets[i]!r} has {len(t)} tokens (use chain or mc_elbo)"
                )
            groups.setdefault(chosen, []).append(i)
        for chosen, idx in groups.items():
            sub = [pairs[i] for i in idx]
            if chosen == "exact":
                lp = self.target_logprobs_chunked(lm, [self.final_state(p, t) for p, t in sub], batch_size)
                for i, row in zip(idx, lp, strict=True):
                    results[i] = ScoreResult(list(pairs[i][1]), [float(row[0])], "exact")
            elif chosen == "chain":
                _, logps = self.reveal_paths(lm, sub, order=order)
                for i, row in zip(idx, logps, strict=True):
                    results[i] = ScoreResult(list(pairs[i][1]), row, f"chain:{order}")
            else:
                generator = torch.Generator().manual_seed(seed)
                for i, (p, t) in zip(idx, sub, strict=True):
                    results[i] = self._mc_elbo(lm, p, t, mc_samples, generator, batch_size)
        return [r for r in results if r is not None]

    def _mc_elbo(
        self, lm: LanguageModel, prompt_ids: Sequence[int], target_ids: Sequence[int], n: int,
        generator: torch.Generator, batch_size: int,
    ) -> ScoreResult:
        L = len(target_ids)
        u = float(torch.rand((), generator=generator))
        states, weights = [], []
        for i in range(n):
            k = min(L, 1 + int(((i + u) / n) * L))
            masked = torch.randperm(L, generator=generator)[:k]
            revealed = [True] * L
            for j in masked.tolist():
                revealed[j] = False
            states.append(TargetState(tuple(prompt_ids), tuple(target_ids), tuple(revealed), "mc"))
            weights.append(L / k)
        lp = torch.stack(self.target_logprobs_chunked(lm, states, batch_size))
        per_token = (lp * torch.tensor(weights).unsqueeze(1)).mean(0) / 1.0
        return ScoreResult(list(target_ids), per_token.tolist(), f"mc_elbo:{n}")

    # -- generation --------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        lm: LanguageModel,
        prompts: Sequence[str],
        max_new_tokens: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        sampler: str = "llada",
        remasking: str = "low_confidence",
        alg: str = "maskgit_plus",
        temperature: float = 0.0,
        cfg_scale: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        alg_temp: float | None = None,
        eps: float = 1e-3,
        seed: int = 0,
        return_trajectory: bool = False,
    ) -> GenerationResult:
        """Iterative denoising of a window of ``max_new_tokens`` masks after each prompt.

        ``sampler="llada"``: LLaDA's sampler (``steps``, ``block_length``,
        ``remasking``, ``temperature`` with Gumbel noise, ``cfg_scale``).
        ``sampler="dream"``: Dream's ``alg`` ∈ origin / maskgit_plus / topk_margin /
        entropy.  Defaults: window = answer window, one token per step, one block.
        """
        gen_length = max_new_tokens or self.default_new_tokens
        if not gen_length or gen_length <= 0:
            raise ValueError("max_new_tokens must be a positive number of tokens to generate")
        steps = steps or gen_length
        block_length = block_length or gen_length
        generator = torch.Generator().manual_seed(seed)
        rows = [lm.encode_prompt(p) + [self.mask_token_id] * gen_length for p in prompts]
        ids, mask, _ = left_pad(rows, lm.pad_token_id)
        lm.check_length(ids.shape[1])
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        gen_start = ids.shape[1] - gen_length

        def logits_fn(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.aligned_logits(lm.logits(x, attention_mask)).float()

        settings: dict[str, Any] = {"paradigm": self.name, "sampler": sampler, "gen_length": gen_length,
                                    "steps": steps, "temperature": temperature, "seed": seed}
        if sampler == "llada":
            out = llada_sample(logits_fn, ids, mask, gen_start, self.mask_token_id, steps=steps,
                               block_length=block_length, temperature=temperature, remasking=remasking,
                               cfg_scale=cfg_scale, generator=generator)
            settings.update(block_length=block_length, remasking=remasking, cfg_scale=cfg_scale)
        elif sampler == "dream":
            out = dream_sample(logits_fn, ids, mask, gen_start, self.mask_token_id, steps=steps, alg=alg, eps=eps,
                               temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp,
                               generator=generator)
            settings.update(alg=alg, eps=eps, top_p=top_p, top_k=top_k, alg_temp=alg_temp)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; use llada or dream")
        generated = out.sequences[:, gen_start:].cpu()
        token_ids = [lm.truncate_at_eos([t for t in row.tolist()]) for row in generated]
        return GenerationResult(
            texts=[lm.decode(t) for t in token_ids],
            token_ids=token_ids,
            sequences=out.sequences.cpu(),
            prompt_columns=gen_start,
            settings=settings,
            trajectory=[s.cpu() for s in out.trajectory] if return_trajectory else None,
            commit_step=out.commit_step.cpu(),
        )


def enumerate_orders(length: int) -> list[tuple[int, ...]]:
    """All unmasking orders of a short target (tests and exact small-case likelihoods)."""
    if length > 7:
        raise ValueError("enumerating orders is only feasible for targets of at most 7 tokens")
    return list(itertools.permutations(range(length)))


def log_mean_exp(values: Sequence[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values) / len(values))

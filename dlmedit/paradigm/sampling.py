"""Masked-diffusion samplers: LLaDA's block sampler and Dream's four algorithms.

Why here and not in the paradigm class: the samplers are pure functions of a
``logits_fn`` (aligned logits: position i predicts token i, any logit shift already
applied), so they are testable on toy logits and reusable by temporal tracing, which
replays the same trajectory.  Both record the full trajectory of states.
Re-implemented from the published algorithm descriptions (see shared/model-facts.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SamplerOutput:
    sequences: torch.Tensor
    trajectory: list[torch.Tensor]
    commit_step: torch.Tensor


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: ``mask_count // steps`` per step, the remainder on the earliest steps. [B, steps]."""
    base = mask_count // steps
    remainder = mask_count % steps
    out = base.unsqueeze(1).expand(-1, steps).clone()
    step_idx = torch.arange(steps, device=mask_count.device).unsqueeze(0)
    out += (step_idx < remainder.unsqueeze(1)).long()
    return out


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """LLaDA's Gumbel-max perturbation in float64 (temperature 0 → unchanged logits)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    gumbel = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel


def _commit_topk(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T]: per row, the ``k[b]`` highest-confidence columns (−inf never chosen)."""
    order = torch.argsort(confidence, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < k.unsqueeze(1)) & torch.isfinite(confidence)


def llada_sample(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    attention_mask: torch.Tensor,
    gen_start: int,
    mask_id: int,
    *,
    steps: int,
    block_length: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> SamplerOutput:
    """LLaDA's semi-autoregressive low-confidence / random remasking sampler.

    ``x`` holds prompts (left-padded) followed by ``gen_length`` mask tokens from
    column ``gen_start`` on.  Steps are split evenly over blocks; each step commits
    the scheduled number of tokens inside the current block only.
    """
    gen_length = x.shape[1] - gen_start
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
    n_blocks = gen_length // block_length
    if steps % n_blocks != 0:
        raise ValueError(f"steps {steps} must be a multiple of the number of blocks {n_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {remasking!r}; use low_confidence or random")
    steps_per_block = steps // n_blocks
    x = x.clone()
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :gen_start] = attention_mask[:, :gen_start].bool()
    trajectory = [x.clone()]
    commit_step = torch.full((x.shape[0], gen_length), -1, dtype=torch.long, device=x.device)
    step_counter = 0
    for block in range(n_blocks):
        lo = gen_start + block * block_length
        hi = lo + block_length
        schedule = num_transfer_tokens((x[:, lo:hi] == mask_id).sum(1), steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = logits_fn(torch.cat([x, un_x]), torch.cat([attention_mask, attention_mask]))
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = logits_fn(x, attention_mask)
            x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x.device)
            x0_p[:, hi:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -torch.inf))
            transfer = _commit_topk(confidence, schedule[:, i])
            x[transfer] = x0[transfer]
            commit_step[transfer[:, gen_start:]] = step_counter
            step_counter += 1
            trajectory.append(x.clone())
    return SamplerOutput(x, trajectory, commit_step)


def _top_p_top_k(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.cumsum(torch.softmax(sorted_logits, -1), -1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), -torch.inf)
    return logits


def dream_sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    alg: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's token sampling + confidence (max prob, top-1 − top-2 margin, or −entropy)."""
    if temperature > 0:
        logits = logits / temperature
    logits = _top_p_top_k(logits, top_p, top_k)
    probs = torch.softmax(logits.float(), dim=-1)
    if temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        x0 = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs.clamp_min(1e-10))).sum(-1)
    return confidence, x0


def dream_sample(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    attention_mask: torch.Tensor,
    gen_start: int,
    mask_id: int,
    *,
    steps: int,
    alg: str = "maskgit_plus",
    eps: float = 1e-3,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    generator: torch.Generator | None = None,
) -> SamplerOutput:
    """Dream's diffusion_generate loop: ``origin``, ``maskgit_plus``, ``topk_margin``, ``entropy``.

    Unlike the reference (which averages the mask count over the batch) the number of
    tokens to commit is computed per row, so rows never influence each other.
    """
    if alg not in ("origin", "maskgit_plus", "topk_margin", "entropy"):
        raise ValueError(f"unknown Dream algorithm {alg!r}; use origin, maskgit_plus, topk_margin or entropy")
    x = x.clone()
    timesteps = torch.linspace(1, eps, steps + 1)
    trajectory = [x.clone()]
    gen_length = x.shape[1] - gen_start
    commit_step = torch.full((x.shape[0], gen_length), -1, dtype=torch.long, device=x.device)
    for i in range(steps):
        mask_index = x == mask_id
        if not mask_index.any():
            trajectory.append(x.clone())
            continue
        logits = logits_fn(x, attention_mask)
        t, s = float(timesteps[i]), float(timesteps[i + 1])
        last = i == steps - 1
        if alg == "origin":
            p_transfer = 1 - s / t if not last else 1.0
            draw = torch.rand(x.shape, generator=generator, device=x.device)
            transfer = mask_index & (draw < p_transfer)
            _, x0 = dream_sample_tokens(logits, temperature, top_p, top_k, alg, generator)
        else:
            confidence, x0 = dream_sample_tokens(logits, temperature, top_p, top_k, alg, generator)
            n_mask = mask_index.sum(1)
            k = n_mask if last else (n_mask.double() * (1 - s / t)).long()
            full_conf = torch.where(mask_index, confidence.double(), torch.full_like(confidence, -torch.inf, dtype=torch.float64))
            if alg_temp:
                gumbel = -torch.log(-torch.log(torch.rand(full_conf.shape, generator=generator, dtype=torch.float64)))
                full_conf = torch.where(mask_index, full_conf / alg_temp + gumbel, full_conf)
            transfer = _commit_topk(full_conf, k)
        x[transfer] = x0[transfer]
        commit_step[transfer[:, gen_start:]] = i
        trajectory.append(x.clone())
    return SamplerOutput(x, trajectory, commit_step)

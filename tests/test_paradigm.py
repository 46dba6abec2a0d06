"""Paradigm seam: scoring estimators, target states, the LLaDA / Dream samplers, batching."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dlmedit.errors import EstimatorError
from dlmedit.paradigm.base import TargetState
from dlmedit.paradigm.mdm import enumerate_orders, log_mean_exp
from dlmedit.paradigm.sampling import llada_sample, num_transfer_tokens

PROMPT = "the capital of france is"


def _exact_conditional(lm, prompt_ids, target_ids, revealed, j):
    """log p(target_j | prompt, revealed tokens) from one hand-built forward."""
    mask = lm.mask_token_id
    body = [t if r else mask for t, r in zip(target_ids, revealed, strict=True)]
    ids = torch.tensor([prompt_ids + body])
    with torch.no_grad():
        logits = lm.logits(ids)
    col = len(prompt_ids) + j - lm.paradigm.logit_shift
    return torch.log_softmax(logits[0, col].float(), -1)[target_ids[j]].item()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_exact_single_token_equals_manual_softmax(tiny_models, family):
    lm = tiny_models[family]
    result = lm.score([PROMPT], ["paris"], estimator="exact")[0]
    p, t = lm.encode_pair(PROMPT, "paris")
    assert result.estimator == "exact"
    assert result.total == pytest.approx(_exact_conditional(lm, p, t, [False], 0), abs=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("order", ["l2r", "confidence"])
def test_chain_equals_sum_of_exact_conditionals(tiny_models, family, order):
    lm = tiny_models[family]
    target = "north river city"
    p, t = lm.encode_pair(PROMPT, target)
    paths, _logps = lm.paradigm.reveal_paths(lm, [(p, t)], order=order)
    manual = 0.0
    # direct: sum over the recorded reveal order
    order_seen = []
    for a, b in itertools.pairwise(paths[0] + [None]):
        if b is None:
            order_seen.append(next(j for j in range(len(t)) if not a.revealed[j]))
        else:
            order_seen.append(next(j for j in range(len(t)) if b.revealed[j] and not a.revealed[j]))
    revealed = [False] * len(t)
    for j in order_seen:
        manual += _exact_conditional(lm, p, t, revealed, j)
        revealed[j] = True
    score = lm.score([PROMPT], [target], estimator="chain", order=order)[0]
    assert score.total == pytest.approx(manual, abs=1e-4)
    if order == "l2r":
        assert order_seen == list(range(len(t)))


def test_mc_elbo_below_exact_likelihood_in_expectation(tiny_models):
    """Enumerate every unmasking order of a 3-token target: the model's likelihood under
    random-order ancestral sampling is log mean_σ exp(chain_σ); the ELBO's expectation
    (computed exactly over all mask subsets) must not exceed it, and the MC estimate with
    many samples must approach that expectation."""
    lm = tiny_models["llada"]
    target = "north river city"
    p, t = lm.encode_pair(PROMPT, target)
    L = len(t)
    orders = enumerate_orders(L)
    _, chains = lm.paradigm.reveal_paths(lm, [(p, t)] * len(orders), order=orders)
    exact_ll = log_mean_exp([sum(c) for c in chains])
    elbo = 0.0
    for k in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), k))
        for masked in subsets:
            revealed = [j not in masked for j in range(L)]
            contrib = sum(_exact_conditional(lm, p, t, revealed, j) for j in masked)
            elbo += (1 / L) * (1 / len(subsets)) * (L / k) * contrib
    assert elbo <= exact_ll + 1e-6
    mc = lm.score([PROMPT], [target], estimator="mc_elbo", mc_samples=600, seed=0)[0]
    assert mc.estimator == "mc_elbo:600"
    assert mc.total == pytest.approx(elbo, abs=0.05 * abs(elbo) + 0.05)


def test_exact_estimator_rejects_multi_token(tiny_models):
    with pytest.raises(EstimatorError, match="one-token"):
        tiny_models["llada"].score([PROMPT], ["north river"], estimator="exact")


def test_arm_score_is_teacher_forcing(tiny_models):
    lm = tiny_models["llama"]
    p, t = lm.encode_pair(PROMPT, "north river")
    with torch.no_grad():
        logits = lm.logits(torch.tensor([p + t]))
    lp = torch.log_softmax(logits[0].float(), -1)
    manual = lp[len(p) - 1, t[0]].item() + lp[len(p), t[1]].item()
    assert lm.score([PROMPT], ["north river"])[0].total == pytest.approx(manual, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "llada", "dream"])
def test_batched_scoring_equals_one_by_one(tiny_models, family):
    lm = tiny_models[family]
    prompts = [PROMPT, "alpha was born in", "the river of beta is in the north of"]
    targets = ["paris", "north river city", "red"]
    batched = lm.score(prompts, targets)
    for prompt, target, b in zip(prompts, targets, batched, strict=True):
        single = lm.score([prompt], [target])[0]
        assert b.total == pytest.approx(single.total, abs=1e-4)


def test_target_states(tiny_models):
    lm = tiny_models["llada"]
    p, t = lm.encode_pair(PROMPT, "north river city")
    g = torch.Generator().manual_seed(0)
    partial = lm.paradigm.target_states(lm, p, t, "partial", n=16, generator=g)
    assert partial[0].revealed == (False,) * 3
    assert all(not all(s.revealed) for s in partial)
    assert len({s.revealed for s in partial}) > 2
    traj = lm.paradigm.target_states(lm, p, t, "trajectory")
    assert [sum(s.revealed) for s in traj] == [0, 1, 2]
    arm = tiny_models["llama"]
    assert len(arm.paradigm.target_states(arm, p, t, "partial", n=16)) == 1


def test_num_transfer_schedule():
    sched = num_transfer_tokens(torch.tensor([10, 3]), 4)
    assert sched.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]
    assert sched.sum(1).tolist() == [10, 3]


def test_llada_sampler_blocks_in_order_and_schedule():
    torch.manual_seed(0)
    vocab, mask_id, gen, prompt_len = 12, 11, 8, 3

    def logits_fn(x, attention_mask):
        g = torch.Generator().manual_seed(int(x.sum()))
        return torch.randn(x.shape[0], x.shape[1], vocab, generator=g).index_fill(-1, torch.tensor([mask_id]), -1e9)

    x = torch.cat([torch.randint(0, 10, (2, prompt_len)), torch.full((2, gen), mask_id)], 1)
    am = torch.ones_like(x)
    out = llada_sample(logits_fn, x, am, prompt_len, mask_id, steps=8, block_length=4)
    assert not (out.sequences == mask_id).any()
    # tokens committed per step follow the schedule (one per step here)
    for before, after in itertools.pairwise(out.trajectory):
        assert ((before == mask_id) & (after != mask_id)).sum(1).tolist() == [1, 1]
    # blocks in order: every first-block position is committed before any second-block one
    assert out.commit_step[:, :4].max() < out.commit_step[:, 4:].min()
    out2 = llada_sample(logits_fn, x, am, prompt_len, mask_id, steps=8, block_length=4)
    assert torch.equal(out.sequences, out2.sequences)
    out3 = llada_sample(logits_fn, x, am, prompt_len, mask_id, steps=4, block_length=8)
    for before, after in itertools.pairwise(out3.trajectory):
        assert ((before == mask_id) & (after != mask_id)).sum(1).tolist() == [2, 2]


@pytest.mark.parametrize("sampler,alg", [("llada", None), ("dream", "maskgit_plus"), ("dream", "topk_margin"),
                                         ("dream", "entropy"), ("dream", "origin")])
def test_mdm_generation_deterministic_and_batched(tiny_models, sampler, alg):
    lm = tiny_models["dream"]
    prompts = [PROMPT, "alpha was born in the city of"]
    kwargs = {"sampler": sampler} | ({"alg": alg} if alg else {})
    a = lm.generate(prompts, max_new_tokens=4, **kwargs)
    b = lm.generate(prompts, max_new_tokens=4, **kwargs)
    assert a.token_ids == b.token_ids
    single = [lm.generate([p], max_new_tokens=4, **kwargs).token_ids[0] for p in prompts]
    if alg != "origin":  # origin draws random numbers per column, so batch shape changes the draws
        assert single == a.token_ids


def test_mdm_generation_trajectory(tiny_models):
    lm = tiny_models["llada"]
    out = lm.generate([PROMPT], max_new_tokens=4, steps=4, return_trajectory=True)
    masks = [int((s == lm.mask_token_id).sum()) for s in out.trajectory]
    assert masks == [4, 3, 2, 1, 0]
    assert sorted(out.commit_step[0].tolist()) == [0, 1, 2, 3]


def test_llada_sampling_temperature_and_cfg(tiny_models):
    lm = tiny_models["llada"]
    a = lm.generate([PROMPT], max_new_tokens=4, temperature=1.0, seed=1, cfg_scale=1.0)
    b = lm.generate([PROMPT], max_new_tokens=4, temperature=1.0, seed=1, cfg_scale=1.0)
    assert a.token_ids == b.token_ids
    assert a.settings["cfg_scale"] == 1.0


def test_arm_greedy_batched_equals_single(tiny_models):
    lm = tiny_models["llama"]
    prompts = [PROMPT, "alpha was born in the city of"]
    batched = lm.generate(prompts, max_new_tokens=5, stop_at_eos=False)
    for p, ids in zip(prompts, batched.token_ids, strict=True):
        assert lm.generate([p], max_new_tokens=5, stop_at_eos=False).token_ids[0] == ids


def test_state_validation():
    with pytest.raises(ValueError):
        TargetState((1,), (2, 3), (False,))
    assert math.isfinite(log_mean_exp([-1.0, -2.0]))


def test_generate_length_sets_the_default_window_without_padding_states(tiny_models, monkeypatch):
    """smollm2-dream's 16: a default for generate, never padding in the states edits are fitted on."""
    lm = tiny_models["llada"]
    monkeypatch.setattr(lm.paradigm, "generate_length", 5)
    assert lm.paradigm.default_new_tokens == 5
    out = lm.generate([PROMPT], steps=5)
    assert len(out.token_ids[0]) == 5
    row, readout = lm.paradigm.state_row(lm.paradigm.final_state(*lm.encode_pair(PROMPT, " paris")))
    assert len(row) == len(lm.encode_prompt(PROMPT)) + 1 and len(readout) == 1
    monkeypatch.setattr(lm.paradigm, "answer_window", 4)  # a twin's window pads the states and wins as the default
    assert lm.paradigm.default_new_tokens == 4
    row, _ = lm.paradigm.state_row(lm.paradigm.final_state(*lm.encode_pair(PROMPT, " paris")))
    assert len(row) == len(lm.encode_prompt(PROMPT)) + 4

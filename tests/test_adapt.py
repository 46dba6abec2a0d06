"""`dlmedit adapt` on a tiny random Llama: the objective's pieces, resume after kill -9, bad inputs, the artifact."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import WORDS, write_checkpoint

from dlmedit.adapt import AdaptConfig, AdaptError, adapt
from dlmedit.adapt.objective import attention_bias, diffusion_losses, sample_noise
from dlmedit.adapt.trainer import openness_at
from dlmedit.errors import DlmeditError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint("llama", tmp_path_factory.mktemp("adapt") / "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("adapt-corpus") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)), encoding="utf-8")
    return path


def _cfg(base: Path, corpus: Path, **over) -> AdaptConfig:
    values = dict(base=str(base), corpus=str(corpus), steps=6, batch_size=2, window=12, warmup=2,
                  lora_rank=2, lora_alpha=4, eval_every=3, checkpoint_every=2, mask_token="<|mdm_mask|>",
                  threads=1, relations=(), exclude_relations=(), bf16=False)
    values.update(over)
    return AdaptConfig(**values)


def test_openness_bias_is_arm_equivalent_at_zero_and_full_at_one() -> None:
    ids = torch.tensor([[5, 6, 9, 9, 7]])  # 9 = mask
    closed = attention_bias(ids, 9, 0.0)[0, 0]
    allowed = closed == 0
    # causal, masks invisible to other positions, each position sees itself
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 0, 1]],
                            dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert torch.all(attention_bias(ids, 9, 1.0) == 0)
    half = attention_bias(ids, 9, 0.5)[0, 0]
    assert torch.allclose(half[~expected], torch.full_like(half[~expected], float(torch.log(torch.tensor(0.5)))))


def test_masks_see_all_opens_mask_rows_only() -> None:
    ids = torch.tensor([[5, 6, 9, 9, 7]])  # 9 = mask
    allowed = attention_bias(ids, 9, 0.0, masks_see_all=True)[0, 0] == 0
    arm_equivalent = attention_bias(ids, 9, 0.0)[0, 0] == 0
    assert allowed[2].all() and allowed[3].all()  # mask rows see every position
    for row in (0, 1, 4):  # visible rows keep the ARM-equivalent pattern
        assert torch.equal(allowed[row], arm_equivalent[row])


def test_noise_never_masks_the_first_token_and_suffix_rows_are_suffixes() -> None:
    ids = torch.arange(10, 30).repeat(64, 1)
    noisy, masked, k = sample_noise(ids, 99, torch.Generator().manual_seed(0), suffix_share=1.0)
    assert not masked[:, 0].any()
    assert torch.equal(masked.sum(1), k)
    for row, n in zip(masked, k.tolist(), strict=True):
        assert row[-n:].all() and not row[:-n].any()
    assert torch.equal(noisy[masked], torch.full((int(k.sum()),), 99))


def test_losses_use_the_shift_and_the_1_over_k_weight() -> None:
    vocab = 7
    clean = torch.tensor([[1, 2, 3, 4]])
    masked = torch.tensor([[False, False, True, True]])
    k = torch.tensor([2])
    logits = torch.zeros(1, 4, vocab)
    logits[0, 1, 3] = 10.0  # position 1 predicts token 3 (column 2): right
    logits[0, 2, 0] = 10.0  # position 2 predicts column 3 (token 4): wrong
    mdm, kl = diffusion_losses(logits, logits.clone(), clean, masked, k)
    ce = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 4]), reduction="sum") / 2
    assert mdm.item() == pytest.approx(ce.item(), rel=1e-6)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


def test_schedule_holds_then_anneals_to_full() -> None:
    cfg = AdaptConfig(steps=100, hold_frac=0.2, anneal_end_frac=0.6, schedule="linear")
    assert openness_at(0, cfg) == 0.0 and openness_at(19, cfg) == 0.0
    assert openness_at(40, cfg) == pytest.approx(0.5)
    assert openness_at(60, cfg) == 1.0 and openness_at(99, cfg) == 1.0
    log = AdaptConfig(steps=100, hold_frac=0.2, anneal_end_frac=0.6, schedule="log", min_log_openness=-12.0)
    assert openness_at(19, log) == 0.0
    assert openness_at(20, log) == pytest.approx(math.exp(-12.0))
    assert openness_at(40, log) == pytest.approx(math.exp(-6.0))
    assert openness_at(60, log) == 1.0


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_base: Path, corpus: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    adapt(_cfg(tiny_base, corpus), whole, progress=False)
    killed = tmp_path / "killed"
    # the same run, slowed down (0.5 s per step) so that the kill lands mid-run
    script = (
        f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_adapt import _cfg\nfrom pathlib import Path\nfrom dlmedit.adapt import adapt, trainer\n"
        "step = trainer._Run.step_loss\n"
        "trainer._Run.step_loss = lambda self, *a: (time.sleep(0.5), step(self, *a))[1]\n"
        f"adapt(_cfg(Path({str(tiny_base)!r}), Path({str(corpus)!r})), Path({str(killed)!r}), progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: a loaded CI machine starts Python slowly
    state = killed / "state" / "state.json"
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["step"] >= 2):
        if proc.poll() is not None:
            pytest.fail(f"adaptation subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.is_file(), "the adaptation subprocess wrote no checkpoint within the deadline"
    step_at_kill = json.loads(state.read_text())["step"]
    assert 2 <= step_at_kill < 6, "the kill must land mid-run"
    adapt(_cfg(tiny_base, corpus), killed, progress=False)
    a = load_file(str(whole / "state" / "trainable.safetensors"))
    b = load_file(str(killed / "state" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((killed / "state" / "state.json").read_text())["step"] == 6
    curve = [json.loads(line)["step"] for line in (killed / "curve.jsonl").read_text().splitlines()]
    assert curve[-1] == 6


def test_artifact_merges_into_a_bidirectional_mdm(tiny_base: Path, corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dlmedit import load_model
    from dlmedit.adapt.artifact import merged_checkpoint

    out = tmp_path / "run"
    adapt(_cfg(tiny_base, corpus, steps=3, eval_every=3), out, progress=False)
    artifact = out / "best"
    meta = json.loads((artifact / "dlmedit_adapter.json").read_text())
    assert meta["logit_shift"] == 1 and meta["openness"] == 1.0
    merged = merged_checkpoint(artifact, tiny_base, tmp_path / "cache")
    assert merged_checkpoint(artifact, tiny_base, tmp_path / "cache") == merged  # cached
    lm = load_model(str(merged))
    assert lm.paradigm.name == "mdm" and lm.paradigm.logit_shift == 1
    assert lm.mask_token_id == meta["mask_token_id"]
    # bidirectional: changing a later token changes an earlier position's logits
    ids = torch.tensor([[5, 6, 7, 8]])
    other = ids.clone()
    other[0, 3] = 9
    with torch.no_grad():
        assert not torch.allclose(lm.logits(ids)[0, 0], lm.logits(other)[0, 0])
    # the mask row was written into the embedding but not the (untied) head
    base = load_model(str(tiny_base))
    emb = lm.module.get_input_embeddings().weight[meta["mask_token_id"]]
    mask_vec = load_file(str(artifact / "mask_embedding.safetensors"))["mask_embedding"]
    assert torch.allclose(emb, mask_vec)
    head_row = lm.module.get_output_embeddings().weight[meta["mask_token_id"]]
    assert torch.allclose(head_row, base.module.get_output_embeddings().weight[meta["mask_token_id"]])


def test_bad_inputs_are_clear_errors(tiny_checkpoints: dict[str, Path], tiny_base: Path, corpus: Path,
                                     tmp_path: Path) -> None:
    with pytest.raises(AdaptError, match="already a masked-diffusion model"):
        adapt(_cfg(tiny_checkpoints["llada"], corpus), tmp_path / "a", progress=False)
    with pytest.raises(DlmeditError, match="does not exist"):
        adapt(_cfg(tmp_path / "no-such-model", corpus), tmp_path / "b", progress=False)
    with pytest.raises(DlmeditError, match="not found"):
        adapt(_cfg(tiny_base, tmp_path / "missing.txt"), tmp_path / "c", progress=False)
    with pytest.raises(AdaptError, match="not in"):
        adapt(_cfg(tiny_base, corpus, mask_token="<|nope|>"), tmp_path / "d", progress=False)
    with pytest.raises(AdaptError, match="steps"):
        adapt(_cfg(tiny_base, corpus, steps=0), tmp_path / "e", progress=False)
    adapt(_cfg(tiny_base, corpus, steps=2, eval_every=2), tmp_path / "f", progress=False)
    with pytest.raises(AdaptError, match="other settings"):
        adapt(_cfg(tiny_base, corpus, lr=0.5), tmp_path / "f", progress=False)


def test_shipping_point_is_the_most_bidirectional_point_that_holds_the_bar() -> None:
    from dlmedit.adapt.trainer import shipping_point

    def row(step: int, openness: float, at: tuple, full: tuple = ((0, 10), (0, 10))) -> dict:
        return {"step": step, "openness": openness,
                "recall_at_openness": {"single": list(at[0]), "multi": list(at[1])},
                "recall_full": {"single": list(full[0]), "multi": list(full[1])}}

    rows = [row(100, 0.0, ((10, 10), (9, 10))), row(200, 0.5, ((9, 10), (8, 10))), row(300, 1.0, ((9, 10), (5, 10)))]
    assert shipping_point(rows) == {"step": 200, "openness": 0.5, "recall": 0.8, "masks_see_all": False,
                                    "holds_bar": True}
    rows.append(row(400, 0.0, ((10, 10), (10, 10)), full=((10, 10), (8, 10))))
    assert shipping_point(rows)["step"] == 400 and shipping_point(rows)["openness"] == 1.0
    failing = [row(100, 0.0, ((5, 10), (1, 10))), row(200, 1.0, ((3, 10), (2, 10)), full=((3, 10), (2, 10)))]
    assert shipping_point(failing) == {"step": 200, "openness": 1.0, "recall": 0.2, "masks_see_all": False,
                                       "holds_bar": False}
    held = shipping_point([row(100, 0.0, ((10, 10), (9, 10)))], masks_see_all=True)
    assert held["masks_see_all"] is True and held["openness"] == 0.0


def test_a_partially_annealed_artifact_loads_with_its_attention_pattern(tiny_base: Path, corpus: Path,
                                                                       tmp_path: Path) -> None:
    from dlmedit import load_model
    from dlmedit.adapt.artifact import merged_checkpoint

    out = tmp_path / "run"
    adapt(_cfg(tiny_base, corpus, steps=4, eval_every=2, hold_frac=0.5, anneal_end_frac=1.0), out, progress=False)
    point = out / "evals" / "step000002"
    assert json.loads((point / "dlmedit_adapter.json").read_text())["openness"] == 0.0
    lm = load_model(str(merged_checkpoint(point, tiny_base, tmp_path / "cache")))
    assert lm.module._dlmedit_attention.openness == 0.0
    # ARM-equivalent pattern: a later token does not change an earlier position's logits
    ids = torch.tensor([[5, 6, 7, 8]])
    other = ids.clone()
    other[0, 3] = 9
    with torch.no_grad():
        assert torch.allclose(lm.logits(ids)[0, :3], lm.logits(other)[0, :3], atol=1e-6)

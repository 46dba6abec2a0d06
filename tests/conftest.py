"""Shared fixtures: tiny checkpoints of every family, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

from tiny_models import FAMILIES, WORDS, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: write_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_models(tiny_checkpoints: dict[str, Path]):
    from dlmedit import load_model

    return {family: load_model(str(path)) for family, path in tiny_checkpoints.items()}


@pytest.fixture()
def one_thread():
    """Run a test on one intra-op thread, restoring the previous count afterwards.

    Tiny models gain nothing from threads and lose a lot when other processes share the
    cores; test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def fast(tmp_path, monkeypatch):
    """Edit hyper-parameters that keep every method to a fraction of a second on a tiny model.

    Statistics come from a 120-line random corpus of the tiny vocabulary in a per-test
    cache, so no test reads or writes the user's cache.
    """
    import random

    monkeypatch.setenv("DLMEDIT_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(120)), encoding="utf-8")
    return {"stats_corpus": str(corpus), "stats_tokens": 1200, "stats_max_length": 16, "context_n": 2,
            "context_length": 3, "v_steps": 4}

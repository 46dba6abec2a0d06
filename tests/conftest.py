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

from tiny_models import FAMILIES, write_checkpoint  # noqa: E402


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

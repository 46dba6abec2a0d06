"""What every benchmark script needs before it can measure anything: a model to measure.

Why a shared module: the benchmarks must fall back the same way when the built-in twin
has not been trained yet (a tiny random LLaDA from the test suite's checkpoint writer),
so that their numbers are taken on the same kind of model.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench_model(model: str | None):
    """Load ``model``; without one, ``builtin:mdm`` if trained, else a fresh tiny random LLaDA.

    Returns ``(language_model, label)`` where ``label`` says which model was used.
    """
    from dlmedit import load_model
    from dlmedit.errors import CheckpointNotFoundError

    if model is not None:
        return load_model(model), model
    try:
        return load_model("builtin:mdm"), "builtin:mdm"
    except CheckpointNotFoundError:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import write_checkpoint  # the test suite's tiny random checkpoints

        path = write_checkpoint("llada", Path(tempfile.mkdtemp(prefix="dlmedit-bench-")) / "llada")
        return load_model(str(path)), "tiny random llada (builtin:mdm not trained yet)"

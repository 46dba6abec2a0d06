"""What a command prints: our progress and results, nothing from third parties unless asked.

Why one module: transformers, huggingface_hub, tokenizers, accelerate and Ray each
print in their own way (tqdm bars, ``logging`` records, ``warnings``, env-driven
notices).  A user of ``dlmedit generate`` should read one answer, not a loading bar, a
deprecation notice and a "model of type X to instantiate a model of type Y" message
that is wrong for our conversions.  :func:`configure` silences all of that once, at the
start of a command; ``--verbose`` (or ``DLMEDIT_DEBUG=1``) brings it back, with
tracebacks.  dlmedit's own warnings stay visible, as one line each.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = ["configure", "hide_module_bars", "verbose"]

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_state = {"verbose": False, "configured": False}

# Read by the libraries at import time, so they are set before any of them is imported.
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}


def verbose() -> bool:
    """True when ``--verbose`` was given or ``DLMEDIT_DEBUG`` is set to a true value."""
    env = os.environ.get("DLMEDIT_DEBUG", "").strip().lower()
    return bool(_state["verbose"]) or env not in ("", "0", "false", "no")


@contextlib.contextmanager
def hide_module_bars(module_name: str) -> Iterator[None]:
    """Hide the tqdm bars a third-party module draws with its own ``tqdm`` import, while in the block.

    Why: some code paths (transformers' GGUF de-quantisation) call ``tqdm`` directly,
    ignoring transformers' progress-bar switch.  Only when :func:`configure` ran (a CLI
    command) and ``--verbose`` was not given; a library user keeps the bar.
    """
    if not _state["configured"] or verbose():
        yield
        return
    module = importlib.import_module(module_name)
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


def _is_ours(filename: str) -> bool:
    try:
        return str(Path(filename).resolve()).startswith(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """One line per dlmedit warning; third-party warnings are dropped (shown with --verbose)."""
    if not _is_ours(filename):
        return
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    stream = file or sys.stderr
    try:
        stream.write(f"warning: {text}\n")
    except (OSError, ValueError):  # a closed stream must not turn a warning into a crash
        pass


def configure(verbose_flag: bool = False) -> None:
    """Silence third-party output for this process unless ``verbose_flag`` / ``DLMEDIT_DEBUG``.

    Safe to call more than once (the last call wins).  Only the CLI calls it: a library
    user in a notebook keeps the libraries' defaults.
    """
    _state["verbose"] = bool(verbose_flag)
    _state["configured"] = True
    _wide_tables_when_piped()
    if verbose():
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        warnings.resetwarnings()
        warnings.simplefilter("default")
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.showwarning = _show_warning
    warnings.simplefilter("default")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("transformers", "huggingface_hub", "accelerate", "torch", "ray", "peft", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_transformers()


def _wide_tables_when_piped() -> None:
    """Piped or redirected output gets 200 columns, so rich never cuts a number to "1.…".

    Why: rich falls back to 80 columns when stdout is not a terminal and then ellipsises
    cells that do not fit; result tables are read from logs and files as often as from a
    terminal.  An explicit ``COLUMNS`` (the user's choice) is kept.
    """
    try:
        piped = not sys.stdout.isatty()
    except (AttributeError, ValueError):
        piped = True
    if piped and not os.environ.get("COLUMNS"):
        os.environ["COLUMNS"] = "200"


def _quiet_transformers() -> None:
    """transformers keeps its own verbosity and progress-bar switches; use them if it is importable."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover
        return
    disable_progress_bars()


def reorder_verbose_flag(argv: list[str]) -> list[str]:
    """Move ``--verbose`` written after a sub-command to the front, where typer reads it.

    Why: users type ``dlmedit generate ... --verbose``; the flag is global (it changes what
    every library prints), so it is declared once on the app, before the sub-command.
    """
    flags = [a for a in argv if a == "--verbose"]
    rest = [a for a in argv if a != "--verbose"]
    return flags[:1] + rest


def describe(exc: BaseException) -> Any:
    """The one-line form of an unexpected exception (its type and first line)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

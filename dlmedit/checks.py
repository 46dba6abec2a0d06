"""Input checks shared by the library and the CLI: texts, output folders, input files.

Why one module: the same bad input must give the same error whether it comes from the
command line or from Python (``load_model(...)``, ``EditRequest(...)``, ``run_evaluation``),
and the CLI runs these checks before any model work so a typo costs a second.  Every
check raises a :class:`~dlmedit.errors.DlmeditError` subclass whose message names the
input (``what``) and says how to fix it.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

from dlmedit.errors import InvalidSettingError, InvalidTextError, OutputPathError

__all__ = ["check_finite", "check_output_dir", "check_text", "undecodable"]


def undecodable(text: str) -> int | None:
    """Index of the first character that cannot be encoded as UTF-8 (a lone surrogate), else None.

    Python maps command-line bytes that are not UTF-8 to lone surrogates
    (``surrogateescape``), and JSON's ``"\\ud800"`` escape produces one too; a tokenizer
    fails on them deep inside, so they are caught at the door.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return int(exc.start)
    return None


def check_text(value: object, what: str, *, allow_empty: bool = False) -> str:
    """``value`` as a string that is non-empty (unless ``allow_empty``) and valid UTF-8.

    ``what`` names the input in the message, e.g. ``"--subject"`` or ``"subject"``.
    """
    if not isinstance(value, str):
        raise InvalidTextError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidTextError(f"{what} is empty; give a non-empty text")
    at = undecodable(value)
    if at is not None:
        raise InvalidTextError(
            f"{what} contains bytes that are not valid UTF-8 (at character {at}: {value[max(0, at - 10):at + 10]!r}); "
            "give the text in UTF-8 (check the terminal's or file's encoding)"
        )
    return value


def check_finite(value: object, what: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> float:
    """A finite number ≥ ``low`` (> ``low`` if ``low_open``) and ≤ ``high``; ``what`` names it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise InvalidSettingError(f"{what} must be {kind}, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidSettingError(f"{what} must be a finite number, got {value!r}")
    if low is not None and (number <= low if low_open else number < low):
        raise InvalidSettingError(f"{what} must be {'>' if low_open else '≥'} {low:g}, got {value!r}")
    if high is not None and number > high:
        raise InvalidSettingError(f"{what} must be ≤ {high:g}, got {value!r}")
    return number


def check_output_dir(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Check that ``path`` can be used as an output folder, without creating it.

    It must be a folder or not exist yet; its nearest existing ancestor must be a folder
    in which a file can actually be created (probed with a temporary file, so read-only
    file systems and permissions are caught even for root).
    """
    text = os.fspath(path)
    if isinstance(text, bytes):  # pragma: no cover - Path never gives bytes
        text = text.decode("utf-8", "surrogateescape")
    if not text.strip():
        raise OutputPathError(f"{what} is empty; give a folder for the results")
    if undecodable(text) is not None:
        raise OutputPathError(f"{what} {text!r} contains bytes that are not valid UTF-8; choose a plain folder name")
    p = Path(text).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{what} {p} is an existing file, not a folder; choose a folder (new or existing)")
    probe = p
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise OutputPathError(f"{what} {p} lies under {probe}, which is a file, not a folder; choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dlmedit-write-test.", dir=probe)
    except OSError as exc:
        where = "" if probe == p else f" (its nearest existing folder is {probe})"
        raise OutputPathError(
            f"{what} {p} is not writable{where}: {exc.strerror or exc}; choose a folder you can write to"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return p

"""Exception types users can catch.  Each names the problem and, where possible, the fix.

Why one module: every layer raises these, and a CLI wrapper turns any `DlmeditError`
into a one-line message instead of a traceback.
"""

from __future__ import annotations


class DlmeditError(Exception):
    """Base class of every error dlmedit raises on purpose (bad input, bad files)."""


class UnknownArchitectureError(DlmeditError, ValueError):
    """The checkpoint's model_type / architecture has no registered adapter."""


class CheckpointNotFoundError(DlmeditError, FileNotFoundError):
    """A model path or alias does not resolve to a checkpoint."""


class RemoteCodeRequiredError(DlmeditError, ValueError):
    """The checkpoint needs code from its repository and trust_remote_code was not given."""


class MissingPackageError(DlmeditError, ImportError):
    """An optional package (e.g. the GGUF weights package) is not installed."""


class PromptTooLongError(DlmeditError, ValueError):
    """A prompt (plus its target / generation window) exceeds the model's context."""


class EmptyTargetError(DlmeditError, ValueError):
    """A target string tokenises to no tokens."""


class MaskTokenInPromptError(DlmeditError, ValueError):
    """A prompt contains the model's mask token, which would be denoised as an unknown."""


class SubjectNotFoundError(DlmeditError, ValueError):
    """The subject string is not found in the tokenised prompt."""


class EstimatorError(DlmeditError, ValueError):
    """A likelihood estimator cannot be used for this input (e.g. `exact` on a multi-token target)."""


class UsageError(DlmeditError, ValueError):
    """A command-line option or API argument has a value that cannot work (names the option and the fix)."""


class InvalidSettingError(DlmeditError, ValueError):
    """A numeric setting is out of its range (e.g. the memory's q, λ or α)."""


class InvalidTextError(DlmeditError, ValueError):
    """A text input is empty or is not valid Unicode (e.g. bytes that are not UTF-8 on the command line)."""


class OutputPathError(DlmeditError, OSError):
    """An output path cannot be used: it is a file, lies under a file, or is not writable."""


class CorruptCheckpointError(DlmeditError, ValueError):
    """A checkpoint's weight file is truncated, garbage, or in a format dlmedit refuses to read (pickle)."""


class OutputLockedError(DlmeditError, RuntimeError):
    """Another process is writing the same output folder."""

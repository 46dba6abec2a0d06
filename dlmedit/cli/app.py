"""The `dlmedit` typer application object; command modules register themselves on it.

Why a separate module: each command group lives in its own file (models, trace, edit,
eval, world, unlearn, study) and imports this `app`, so adding a command never means
editing a central file beyond one import line in `dlmedit.cli.main`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer
from typer.core import TyperGroup

try:  # typer ≥ 0.2x vendors click as typer._click; older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import ClickException, get_current_context  # type: ignore[no-redef]
    from click.exceptions import NoArgsIsHelpError  # type: ignore[no-redef]

#: exit code of a failure the user can fix (bad option, bad file); 1 is left for bugs
USER_ERROR = 2
RERUN_HINT = "rerun with --verbose for the traceback"


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def echo_error(message: str, kind: str | None = None) -> None:
    """The single way the CLI reports a failure: one line on stderr, ``error: …`` or ``error (Kind): …``."""
    text = _one_line(message).encode("utf-8", "backslashreplace").decode("utf-8")  # a non-UTF-8 file name prints too
    typer.secho(f"error ({kind}): {text}" if kind else f"error: {text}", fg="red", err=True)


def _usage_message(exc: ClickException) -> str:
    """Click's parse errors (missing option, not an integer, unknown option) as one line with the help command."""
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None) or get_current_context(silent=True)
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return message


class DlmeditGroup(TyperGroup):
    """The root command group: parse errors (raised before a command runs) go through `echo_error` too.

    Typer would print them as a boxed panel with the usage; here they are one ``error:``
    line and exit code 2, like every other failure a user can cause.  Errors inside a
    command are handled by `friendly_errors`.
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError:  # the help was printed already
            sys.exit(USER_ERROR)
        except ClickException as exc:
            echo_error(_usage_message(exc))
            sys.exit(exc.exit_code)
        except typer.Abort:
            echo_error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


app = typer.Typer(
    name="dlmedit",
    cls=DlmeditGroup,
    help="Causal tracing, knowledge editing and unlearning for masked diffusion and autoregressive LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


@app.callback()
def _root(
    verbose: bool = typer.Option(
        False, "--verbose", help="also show third-party warnings, progress bars and tracebacks (or DLMEDIT_DEBUG=1)"
    ),
) -> None:
    """Causal tracing, knowledge editing and unlearning for masked diffusion and autoregressive LMs."""
    from dlmedit import quiet

    quiet.configure(verbose)


def friendly_errors(fn: F) -> F:
    """The CLI's single error path; every command is wrapped in it.

    * a failure the user can fix — a `DlmeditError` (bad option, bad file, bad setting), a
      click `BadParameter` raised in a command body, or an `OSError` naming a file — is
      one line naming the input and the fix, exit code 2;
    * anything else is a bug: one line naming the exception plus "rerun with --verbose
      for the traceback", exit code 1.
    With ``--verbose`` / ``DLMEDIT_DEBUG=1`` the traceback is printed as well.
    """
    import traceback

    from dlmedit.errors import DlmeditError

    def _verbose() -> bool:
        from dlmedit.quiet import verbose

        return verbose()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except ClickException as exc:  # BadParameter & co. raised by a command's own checks
            echo_error(_usage_message(exc))
            raise typer.Exit(USER_ERROR) from None
        except DlmeditError as exc:
            if _verbose():
                traceback.print_exc()
            echo_error(str(exc), kind=type(exc).__name__)
            raise typer.Exit(USER_ERROR) from None
        except OSError as exc:
            if exc.filename is None:
                return _unexpected(exc)
            if _verbose():
                traceback.print_exc()
            target = exc.filename if exc.filename2 is None else f"{exc.filename} → {exc.filename2}"
            echo_error(f"{target}: {exc.strerror or exc}; check the path, its permissions and the free disk space")
            raise typer.Exit(USER_ERROR) from None
        except Exception as exc:
            return _unexpected(exc)

    def _unexpected(exc: Exception) -> Any:
        from dlmedit.quiet import describe

        if _verbose():
            raise exc
        echo_error(f"unexpected {describe(exc)} (this is a bug in dlmedit or a library it uses); {RERUN_HINT}")
        raise typer.Exit(1) from None

    wrapper.__dlmedit_friendly__ = True  # type: ignore[attr-defined]  (checked by the tests for every command)
    return wrapper  # type: ignore[return-value]


def tokenizer_option() -> Any:
    """The ``--tokenizer`` option of every command that loads a model."""
    return typer.Option(None, "--tokenizer",
                        help="tokenizer folder (or tokenizer.json) for a checkpoint saved without tokenizer files")


def check_cli_inputs(
    *,
    outs: dict[str, Any] | None = None,
    texts: dict[str, Any] | None = None,
    models: Sequence[str | None] = (),
    tokenizer: str | None = None,
) -> None:
    """Checks every command runs first, before any model work: a bad input costs a second, not a model load.

    ``outs`` maps option names to output folders (must be folders or creatable, and
    writable); ``texts`` maps option names to strings or lists of strings (non-empty,
    valid UTF-8); ``models`` are model options (a checkpoint folder is resolved and its
    weight files checked; aliases are left to the loader); ``tokenizer`` must exist.
    """
    from dlmedit.checks import check_output_dir, check_text

    for option, value in (texts or {}).items():
        if value is None:
            continue
        values = [value] if isinstance(value, str) else list(value)
        for item in values:
            check_text(item, option)
    for option, path in (outs or {}).items():
        if path is not None:
            check_output_dir(path, option)
    for model in models:
        if model is None:
            continue
        check_text(model, "--model")
        if model.startswith("builtin:") or model == "smollm2":
            continue
        from dlmedit.models.loading import check_weight_files, resolve_path

        check_weight_files(resolve_path(model))
    if tokenizer is not None:
        from pathlib import Path

        from dlmedit.errors import CheckpointNotFoundError

        check_text(tokenizer, "--tokenizer")
        if not Path(tokenizer).expanduser().exists():
            raise CheckpointNotFoundError(f"--tokenizer {tokenizer} does not exist; give a folder with tokenizer files")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def echo_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")

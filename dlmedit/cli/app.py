"""The `dlmedit` typer application object; command modules register themselves on it.

Why a separate module: each command group lives in its own file (models, trace, edit,
eval, world, unlearn, study) and imports this `app`, so adding a command never means
editing a central file beyond one import line in `dlmedit.cli.main`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

app = typer.Typer(
    name="dlmedit",
    help="Causal tracing, knowledge editing and unlearning for masked diffusion and autoregressive LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn a `DlmeditError` (bad input, bad file) into a one-line message and exit code 2."""
    from dlmedit.errors import DlmeditError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DlmeditError as exc:
            typer.secho(f"error ({type(exc).__name__}): {exc}", fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def echo_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")

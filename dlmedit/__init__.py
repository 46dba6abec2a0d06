"""dlmedit: locate-then-edit knowledge editing, causal tracing and unlearning for masked diffusion and autoregressive LMs.

Python API (each mirrors the CLI command of the same name and returns what it writes;
see `dlmedit.api`)::

    import dlmedit
    lm = dlmedit.load_model("builtin:arm")
    delta = dlmedit.edit(lm, prompts=["Jumar Nylozar was born in"], subject=["Jumar Nylozar"],
                         target_new=["The Isle of Quen"])
    handle = delta.apply(lm.module)      # ... handle.revert() restores the weights bit-exactly
    dlmedit.trace(lm, "Jumar Nylozar was born in", "Jumar Nylozar")
    dlmedit.evaluate(lm, "world", method="rome", limit=5)
    dlmedit.unlearn(lm, "memory", forget="world:forget01")
    dlmedit.study("runs/quick", quick=True)

``dlmedit.edit``, ``dlmedit.trace``, ``dlmedit.evaluate``, ``dlmedit.unlearn`` and
``dlmedit.study`` are the subpackages of those names, made *callable*: calling one runs
the API function, while ``import dlmedit.edit.rome`` / ``from dlmedit.edit.delta import
EditDelta`` keep working.  Why not plain functions bound over the package names: a
function attribute shadows the subpackage, which breaks ``import dlmedit.edit.delta as
d`` (Python resolves the alias through the attribute), ``dlmedit.edit.rome.X`` and
string-path patching (``monkeypatch.setattr("dlmedit.edit.covariance.…")``).  Assigning
a `types.ModuleType` subclass to a module's ``__class__`` is the documented way to
customise a module's behaviour (Python reference, "Customizing module attribute access").
"""

from __future__ import annotations

import inspect
import types
from typing import Any

__version__ = "0.1.0"

# the model layer first: modules of the subpackages may import `load_model` from here while they load
from dlmedit.models import LanguageModel, load_model, wrap_model

# `api` is cheap (it imports its dependencies inside the functions); the others are the subpackages made callable below
from dlmedit import api, edit, evaluate, study, trace, unlearn  # isort: skip


class _CallablePackage(types.ModuleType):
    """A dlmedit subpackage that, called, runs the `dlmedit.api` function of the same name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _make_callable(package: types.ModuleType) -> None:
    short = package.__name__.rpartition(".")[2]
    function = getattr(api, short)
    signature = inspect.signature(function)
    if not isinstance(package, _CallablePackage):
        package.__class__ = _CallablePackage
    package.__signature__ = signature  # type: ignore[attr-defined]  (read by inspect.signature / help)
    package_doc = inspect.cleandoc(package.__doc__ or "")
    marker = f"Calling this package runs dlmedit.api.{short}"
    if marker not in package_doc:
        summary, _, details = inspect.cleandoc(function.__doc__ or "").partition("\n")
        package.__doc__ = (
            f"{summary}\n\n{marker}:\n\n    dlmedit.{short}{signature}\n{details}\n\n"
            f"The dlmedit.{short} package\n{'-' * (len(short) + 24)}\n\n{package_doc}"
        )


for _package in (edit, evaluate, study, trace, unlearn):
    _make_callable(_package)
del _package

__all__ = ["LanguageModel", "__version__", "api", "edit", "evaluate", "load_model", "study", "trace", "unlearn",
           "wrap_model"]

"""The editor interface every weight-editing method implements, and the registry that names them.

Why: evaluation runs, the CLI and the study pick a method by name and treat them
alike — "compute a delta for these requests on the model as it is now".  Methods are
thin: they call the shared primitives (keys, value optimisation, statistics, solves)
and return an `EditDelta`; they never apply themselves, so the caller decides about
reverting, composing and protocols.  Stateful methods (AlphaEdit's memory of earlier
keys for sequential editing) keep that state on the editor instance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from dlmedit.edit.delta import EditDelta

if TYPE_CHECKING:
    from dlmedit.data.records import EditRequest
    from dlmedit.models.language_model import LanguageModel

_EDITORS: dict[str, type[Editor]] = {}


def register_editor(cls: type[Editor]) -> type[Editor]:
    _EDITORS[cls.name] = cls
    return cls


def editor_names() -> list[str]:
    _import_methods()
    return sorted(_EDITORS)


def get_editor(name: str, lm: LanguageModel, seed: int = 0, **hparams: Any) -> Editor:
    """Instantiate the editor called ``name`` for ``lm`` (hyper-parameters override the family defaults)."""
    _import_methods()
    try:
        cls = _EDITORS[name]
    except KeyError:
        raise ValueError(f"unknown edit method {name!r}; choose one of {', '.join(sorted(_EDITORS))}") from None
    return cls(lm, seed=seed, **hparams)


def _import_methods() -> None:
    """Import the method modules so they register (kept lazy to avoid import cycles)."""
    import importlib

    for module in ("dlmedit.edit.rome", "dlmedit.edit.memit", "dlmedit.edit.alphaedit", "dlmedit.edit.finetune"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


class Editor(ABC):
    """Computes an `EditDelta` for a batch of requests against the model's current weights."""

    name: ClassVar[str] = ""

    def __init__(self, lm: LanguageModel, seed: int = 0, **hparams: Any) -> None:
        self.lm = lm
        self.seed = seed
        self.hparams = hparams

    @abstractmethod
    def compute(self, requests: Sequence[EditRequest], progress: Callable[[str], None] | None = None) -> EditDelta:
        """Delta realising ``requests`` (not applied)."""

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "seed": self.seed, **self.hparams}


@register_editor
class NoEdit(Editor):
    """The unedited baseline: an empty delta, so runs with ``--method none`` share every code path."""

    name = "none"

    def compute(self, requests: Sequence[EditRequest], progress: Callable[[str], None] | None = None) -> EditDelta:
        return EditDelta.for_model(self.lm.module, method="none", requests=[vars(r) for r in requests])

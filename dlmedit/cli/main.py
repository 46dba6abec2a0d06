"""Entry point of the `dlmedit` console script: imports every command module, then runs the app."""

from __future__ import annotations

from dlmedit.cli import adapt as _adapt  # noqa: F401  (registers adapt)
from dlmedit.cli import edit as _edit  # noqa: F401  (registers edit/apply)
from dlmedit.cli import eval as _eval  # noqa: F401  (registers eval)
from dlmedit.cli import models as _models  # noqa: F401  (registers models/generate/score)
from dlmedit.cli import study as _study  # noqa: F401  (registers study)
from dlmedit.cli import sweep as _sweep  # noqa: F401  (registers sweep)
from dlmedit.cli import trace as _trace  # noqa: F401  (registers trace)
from dlmedit.cli import unlearn as _unlearn  # noqa: F401  (registers unlearn)
from dlmedit.cli import world as _world  # noqa: F401  (registers world export/train/recall)
from dlmedit.cli.app import app


def main() -> None:
    import sys

    from dlmedit import quiet

    quiet.configure("--verbose" in sys.argv[1:])
    app(args=quiet.reorder_verbose_flag(sys.argv[1:]), prog_name="dlmedit")


if __name__ == "__main__":
    main()

"""Command-line interface: each command lives in its own module and registers on `app`."""

from __future__ import annotations

from innkeeper.cli import doctor as _doctor  # noqa: F401  (registers `doctor`)
from innkeeper.cli import fit as _fit  # noqa: F401  (registers `fit`)
from innkeeper.cli import inspect as _inspect  # noqa: F401  (registers `inspect`)
from innkeeper.cli import models as _models  # noqa: F401  (registers `models`)
from innkeeper.cli import pull as _pull  # noqa: F401  (registers `pull`)
from innkeeper.cli import serve as _serve  # noqa: F401  (registers `serve`)
from innkeeper.cli import tune as _tune  # noqa: F401  (registers `tune`)
from innkeeper.cli import worker as _worker  # noqa: F401  (registers `worker`)
from innkeeper.cli.app import CliError, app, fail


def main() -> None:
    """Entry point of the `innkeeper` script."""
    try:
        app()
    except CliError as exc:
        fail(str(exc))


__all__ = ["app", "main"]

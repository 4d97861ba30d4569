"""The typer application every command module registers on, and the CLI's one error path."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(
    name="innkeeper",
    help="A self-hosted LLM server: serve, inspect, fit, pull and list GGUF models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
err_console = Console(stderr=True)


class CliError(Exception):
    """A user-facing failure: printed as one `error:` line, exit status 1, no traceback."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line and exit; used instead of letting a traceback escape."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)

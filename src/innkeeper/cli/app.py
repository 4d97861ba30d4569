"""The typer application every command module registers on, and the CLI's one error path."""

from __future__ import annotations

import importlib.metadata
from typing import Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

import innkeeper


class _FlagsShowNoType:
    """Help tables without a `<bool>` type after flags that take no value (`--help`, `--json`).

    typer's rich help prints every option's type, flags included, which reads as if `--help`
    wanted an argument. An empty metavar is what typer then prints instead.
    """

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_FlagsShowNoType, TyperCommand):
    """Every `innkeeper` command."""


class _Group(_FlagsShowNoType, TyperGroup):
    """`innkeeper` itself (its `--help` and `--version`)."""


class _App(typer.Typer):
    """A Typer whose commands all use `_Command`, so no module has to name it."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(
    name="innkeeper",
    help="A self-hosted LLM server: serve, inspect, fit, pull and list GGUF models.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
err_console = Console(stderr=True)


def version_text() -> str:
    """`innkeeper --version`: this package and the llama-cpp-python it runs on.

    Read from the installed metadata, so it works (and is fast) without loading llama.cpp.
    """
    try:
        llama = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        llama = "not installed"
    return f"innkeeper {innkeeper.__version__} (llama-cpp-python {llama})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="print innkeeper's and llama-cpp-python's versions and exit",
    ),
) -> None:
    """A self-hosted LLM server: serve, inspect, fit, pull and list GGUF models."""


class CliError(Exception):
    """A user-facing failure: printed as one `error:` line, exit status 1, no traceback."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line and exit; used instead of letting a traceback escape."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)

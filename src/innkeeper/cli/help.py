"""`--help` of the commands with many options (`serve`, `fit`): panels readable at 80 columns.

typer groups options in panels (`rich_help_panel`, from each setting's declared panel), but
lays each panel out with a column per flag spelling plus one for the type: one option with a
`--no-` form (`-kvo/-nkvo`) leaves a dozen characters of help per line at 80 columns, and every
value shows a Python type name. Here each option is two columns: its flags and value name
(`-c, --ctx-size N`), then its help, in the same rich panels and order.
"""

from __future__ import annotations

import inspect
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

# typer (0.29) vendors click: parameters are read by their click attributes, not their class.

OTHER_PANEL = "Options"
FLAGS_WIDTH_MAX = 30  # the flags column at most; longer spellings wrap


def _spellings(opts: list[str], metavar: str) -> str:
    """`-c, --ctx-size N`: short names first, then the long ones, then the value's name."""
    names = sorted(opts, key=lambda o: (o.startswith("--"), len(o)))
    text = ", ".join(names)
    return f"{text} {metavar}" if metavar else text


def _flags(param: Any, ctx: Any) -> str:
    if param.param_type_name == "argument":
        return str(param.metavar or param.name.upper())
    metavar = "" if param.is_flag else (param.metavar or param.make_metavar(ctx))
    lines = [_spellings(param.opts, metavar)]
    if param.secondary_opts:  # the --no- form of an on/off option, on its own line
        lines.append(_spellings(param.secondary_opts, ""))
    return "\n".join(lines)


class PanelHelp(TyperCommand):
    """A typer command whose help is printed by `print_help` below."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        print_help(self, ctx)


def print_help(command: TyperCommand, ctx: Any) -> None:
    """Usage, description, then a panel per help panel: arguments first, other options last."""
    console = Console(highlight=False)
    usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
    console.print(Padding(Text.assemble(("Usage: ", "bold"), usage), (1, 1, 0, 1)))
    if command.help:  # paragraphs reflowed to the terminal's width
        paragraphs = inspect.cleandoc(command.help).split("\n\n")
        text = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        console.print(Padding(Text(text), (1, 1, 0, 1)))
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            panel = "Arguments"
        else:
            panel = getattr(param, "rich_help_panel", None) or OTHER_PANEL
        help_text = getattr(param, "help", None) or ""
        panels.setdefault(panel, []).append((_flags(param, ctx), help_text))
    order = sorted(panels, key=lambda p: (p != "Arguments", p == OTHER_PANEL))
    rows = [row for name in order for row in panels[name]]
    width = min(max(len(line) for flags, _ in rows for line in flags.split("\n")), FLAGS_WIDTH_MAX)
    console.print()
    for name in order:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(width=width, style="bold cyan")
        grid.add_column(ratio=1)
        for flags, help_text in panels[name]:
            grid.add_row(Text(flags), Text(help_text))
        console.print(Panel(grid, title=name, title_align="left", border_style="dim"))

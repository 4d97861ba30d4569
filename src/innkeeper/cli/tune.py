"""`innkeeper tune MODEL`: measure which settings run this model fastest here, and keep them.

The work is engine/tuner.py's (the plan, the search of engine/tune.py with each candidate
measured in a child process by engine/speed.py, the profile saved through models/profiles.py,
which `serve` then uses for this model on this machine); this module parses the options,
shows the progress bar and the table. Nothing is saved until the end, atomically: Ctrl-C
leaves no file and no process.
"""

from __future__ import annotations

import json
import re
from inspect import Parameter, Signature
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from innkeeper.cli.app import app, console, err_console, fail
from innkeeper.cli.fit import EXIT_DOES_NOT_FIT
from innkeeper.cli.help import PanelHelp
from innkeeper.cli.options import build_config, options
from innkeeper.engine.tune import Trial, flag_text
from innkeeper.models.hardware import format_size, hardware_with_overrides
from innkeeper.models.spec import ModelFormatError
from innkeeper.models.store import ModelNotFoundError, resolve_model
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig

if TYPE_CHECKING:  # engine/tuner.py loads llama.cpp: imported when tune runs, not at start-up
    from innkeeper.engine.tuner import Tuned

EXIT_INTERRUPTED = 130
# serve's settings that tune takes as given (--ram/--vram: plan for less than is free)
_TUNE_FLAGS = ("--ctx-size", "--parallel", "--ram", "--vram")


def parse_budget(text: str) -> float:
    """`90`, `90s`, `2m`, `1.5m` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min)?\s*", text.lower())
    if not m:
        raise typer.BadParameter(f"a duration such as 90s or 2m, not {text!r}")
    seconds = float(m.group(1)) * (60 if m.group(2) in ("m", "min") else 1)
    if seconds <= 0:
        raise typer.BadParameter("must be more than 0 seconds")
    return seconds


def _tps(value: float | None) -> str:
    return f"{value:.1f}" if value else "-"


def tune_command(**values: Any) -> None:
    """Find the fastest settings for MODEL on this machine by measuring short, real runs.

    Starts from what `serve` would run (the memory plan's context and GPU layers), measures
    prompt and decode speed, and varies one setting at a time within --budget. The winner is
    saved as a profile that `serve` uses for this model on this machine (`--no-profile` there
    ignores it; flags given to serve override it).

    Exit status: 0 tuned, 2 the model does not fit, 130 interrupted (nothing saved), 1 error.
    """
    from innkeeper.engine.planning import ModelFileError, checked_model_file
    from innkeeper.engine.tuner import DoesNotFit, TuneFailed, tune_model

    ref, as_json = values.pop("model"), values.pop("as_json")
    budget, allow_quant = parse_budget(values.pop("budget")), values.pop("allow_kv_quant")
    n_prompt, n_gen = values.pop("prompt_tokens"), values.pop("gen_tokens")
    try:
        path = checked_model_file(resolve_model(ref))
        server = build_config(path, values)
        hw = hardware_with_overrides(vram=server.plan_vram, ram=server.plan_ram)
    except (ModelNotFoundError, ModelFileError, ValueError, OSError) as exc:
        fail(str(exc))
    try:
        with Progress(
            TextColumn("[bold]tuning[/]"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=err_console if as_json else console,
            transient=True,
        ) as bar:
            task = bar.add_task("serve's defaults", total=1.0)

            def progress(trial: Trial, used: float) -> None:
                bar.update(task, completed=used, description=flag_text(trial.changes))

            tuned = tune_model(
                path,
                server.engine,
                hw,
                budget_s=budget,
                allow_kv_quant=allow_quant,
                n_prompt=n_prompt,
                n_gen=n_gen,
                progress=progress,
            )
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted: nothing saved[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except DoesNotFit as exc:
        fail(str(exc), EXIT_DOES_NOT_FIT)
    except (TuneFailed, ModelFormatError, ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(tuned.to_json(), indent=2, sort_keys=True))
    else:
        _render(console, tuned, path.name)


def _render(out: Console, tuned: Tuned, name: str) -> None:
    """The table of every candidate tried, the winner and its gain, and the profile saved."""
    result, report = tuned.result, tuned.to_json()
    parallel = report["parallel"]
    table = Table(
        title=f"{name}: context {report['ctx_size']:,}, {parallel} parallel", title_justify="left"
    )
    for col in ("", "settings", "prompt t/s", "decode t/s"):
        table.add_column(col, justify="right" if "t/s" in col else "left")
    if parallel > 1:
        table.add_column("all slots t/s", justify="right")
    table.add_column("memory", justify="right")
    table.add_column("result")
    for t in result.trials:
        s = t.speed
        mark = "[bold green]★[/]" if t is result.winner else ""
        row = [mark, flag_text(t.changes), _tps(s and s.prompt_tps), _tps(s and s.decode_tps)]
        if parallel > 1:
            row.append(_tps(s and s.aggregate_tps))
        status = {
            "ok": t.note or "",
            "early-stop": "[dim]cut short: slower[/]",
            "no-fit": "[dim]skipped: does not fit[/]",
            "failed": f"[red]failed[/] {t.error[:60]}",
        }[t.status]
        row += [format_size(t.memory_bytes) if t.memory_bytes else "-", status]
        table.add_row(*row)
    out.print(table)
    gain = report["gain"]
    if result.winner is result.default:
        out.print("[bold]serve's defaults are the fastest here[/] (no setting beat them clearly)")
    else:
        out.print(
            f"[bold green]winner[/] {flag_text(result.winner.changes)}: prompt "
            f"{(gain['prompt'] or 1) - 1:+.0%}, decode {(gain['decode'] or 1) - 1:+.0%} "
            "against serve's defaults (measured back to back)",
            highlight=False,
        )
    if report["stopped_by_budget"]:
        out.print(f"[dim]the {report['budget_s']:.0f} s budget ended the search early[/]")
    out.print(
        f"saved as the profile {report['profile']['path']}: `innkeeper serve` uses it for this "
        "model on this machine (`--no-profile` ignores it)",
        highlight=False,
        soft_wrap=True,
    )


def _own(name: str, default: Any, annotation: Any) -> Parameter:
    return Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# typer reads the options from the signature: --ctx-size, --parallel, --ram and --vram are
# serve's own declarations (cli/options.py), the rest are tune's.
tune_command.__signature__ = Signature(  # type: ignore[attr-defined]
    [
        Parameter(
            "model",
            Parameter.POSITIONAL_OR_KEYWORD,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Argument(
                    metavar="MODEL",
                    help="a GGUF file or a store name; default: the embedded SmolLM2",
                    show_default=False,
                ),
            ],
        ),
        *options(EngineConfig, ServerConfig, keep=lambda spec: spec.flags[0] in _TUNE_FLAGS),
        _own(
            "budget",
            "90s",
            Annotated[
                str,
                typer.Option(
                    "--budget", metavar="TIME", help="time for the search, e.g. 3m (default: 90s)"
                ),
            ],
        ),
        _own(
            "allow_kv_quant",
            False,
            Annotated[
                bool,
                typer.Option(
                    "--allow-kv-quant",
                    help="also try quantized KV caches (faster or smaller, but they change "
                    "the output slightly)",
                ),
            ],
        ),
        _own(
            "prompt_tokens",
            256,
            Annotated[
                int,
                typer.Option(
                    "--prompt-tokens",
                    min=1,
                    metavar="N",
                    help="prompt tokens per run (default: 256)",
                ),
            ],
        ),
        _own(
            "gen_tokens",
            32,
            Annotated[
                int,
                typer.Option(
                    "--gen-tokens", min=2, metavar="N", help="tokens decoded per run (default: 32)"
                ),
            ],
        ),
        _own(
            "as_json",
            False,
            Annotated[bool, typer.Option("--json", help="print machine-readable JSON")],
        ),
    ]
)
app.command("tune", cls=PanelHelp)(tune_command)

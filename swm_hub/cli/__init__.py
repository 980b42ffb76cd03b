"""The ``swm-hub`` command line: one short module per command, and one exit point that turns errors into advice.

Every error swm-hub raises on purpose becomes one line on stderr that says what to do next, and exit code
1; anything else is a bug and keeps its traceback. ``SWM_HUB_DEBUG=1`` shows the traceback of any error.
A command module imports only the options at the top and the pipeline or stage it runs when it runs, after
its options are checked: ``--help``, a mistyped option and ``push`` start without torch.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable

import typer

from swm_hub.cli import analyze, bench, card, compress, evaluate, export, heal, push
from swm_hub.core import errors
from swm_hub.core.atomic import exit_on_sigterm
from swm_hub.core.program import program_name

APP_EXAMPLES = """\b
Examples:
  swm-hub analyze smollm2 --out smollm2-analysis
  swm-hub compress smollm2 --target-layers 24 --out smollm2-swm-24L
  swm-hub eval smollm2-swm-24L
  swm-hub heal smollm2-swm-24L
  swm-hub export smollm2-swm-24L
  swm-hub bench smollm2-swm-24L --baseline smollm2
  swm-hub card smollm2-swm-24L
  swm-hub push smollm2-swm-24L --dry-run

Run 'swm-hub COMMAND --help' for each command's options.
"""

app = typer.Typer(
    name="swm-hub",
    help="Make LLMs shallower by Sliding-Window Merging of redundant decoder layers.",
    epilog=APP_EXAMPLES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)

COMMANDS: tuple[tuple[str, Callable[..., None], str], ...] = (
    ("analyze", analyze.analyze, analyze.EXAMPLES),
    ("compress", compress.compress, compress.EXAMPLES),
    ("eval", evaluate.evaluate, evaluate.EXAMPLES),
    ("heal", heal.heal, heal.EXAMPLES),
    ("export", export.export, export.EXAMPLES),
    ("bench", bench.bench, bench.EXAMPLES),
    ("card", card.card, card.EXAMPLES),
    ("push", push.push, push.EXAMPLES),
)
"""The commands in the order ``--help`` lists them: name, function (its docstring is the help), examples."""

for _name, _command, _examples in COMMANDS:
    app.command(name=_name, epilog=_examples)(_command)

ADVICE: tuple[tuple[type[errors.SwmHubError], str], ...] = (
    (errors.OutputExistsError, "pass --overwrite to replace it, or choose another --out"),
    (
        errors.UnsupportedArchitectureError,
        "convert the model to one of those architectures, or open an issue",
    ),
    (errors.ImpossibleTargetError, "see --help for --target-layers, --ratio and --threshold"),
    (errors.CorruptWeightsError, "download the model again (delete the broken files first)"),
    (
        errors.CalibrationDataError,
        "pass --calib a readable UTF-8 .txt file, or .jsonl with a 'text' field per line, long enough "
        "for --samples x --seq-len tokens (or lower those)",
    ),
    (
        errors.PlanMismatchError,
        "pass --plan the swm_plan.json that compress wrote for this same model, or run without --plan",
    ),
)
"""The next step for each kind of error, most specific first; an error not listed says it in its message."""


def _hint(error: errors.SwmHubError) -> str:
    return next((hint for kind, hint in ADVICE if isinstance(error, kind)), "")


def _report_interrupted(stop: errors.HealInterrupted) -> None:
    """Ctrl-C during a heal: one line saying how far it got and the command that resumes, then exit 130."""
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch, the main process says it
        sys.exit(130)
    advice = ""
    if stop.checkpoint is not None:
        again = [*sys.argv[1:], *([] if "--resume" in sys.argv else ["--resume"])]
        advice = f"; resume with: {program_name()} {shlex.join(again)}"
    typer.echo(f"{stop}{advice}", err=True)
    sys.exit(130)


def main() -> None:
    """Run the app; an error of ours prints one line and a hint, and exits 1."""
    exit_on_sigterm()  # SIGTERM cleans up (temporary folders, caches) like Ctrl-C
    try:
        app(prog_name=program_name())  # "hf swm" in usage lines when the hf CLI runs us as its extension
    except errors.HealInterrupted as stop:
        _report_interrupted(stop)
    except errors.SwmHubError as error:
        if os.environ.get("SWM_HUB_DEBUG", "") not in ("", "0"):
            raise
        if (
            os.environ.get("RANK", "0") != "0"
        ):  # under accelerate launch, every process fails alike: one says it
            sys.exit(1)
        hint = _hint(error)
        typer.echo(f"error: {error}", err=True)
        if hint:
            typer.echo(f"hint: {hint}", err=True)
        typer.echo("(set SWM_HUB_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


__all__ = ["ADVICE", "COMMANDS", "app", "main"]

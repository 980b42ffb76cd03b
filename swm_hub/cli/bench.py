"""``swm-hub bench``: the latency of a model and of its original, side by side."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from swm_hub.cli.common import JsonOpt, ModelArg, QuietOpt, echo, with_options
from swm_hub.core.options import BENCH_HELP, BenchOptions
from swm_hub.core.progress import configure, quiet_requested

EXAMPLES = """\b
Examples:
  swm-hub bench smollm2-swm-24L --baseline smollm2
  swm-hub bench smollm2-swm-24L --baseline smollm2 --json smollm2-swm-24L/bench.json
  swm-hub bench smollm2-swm-24L --baseline smollm2-onnx --backend onnxruntime --runs 3
  swm-hub bench smollm2-swm-24L --baseline smollm2-genai --backend genai
"""


@with_options(
    "settings",
    BenchOptions,
    BENCH_HELP,
    only=("device", "dtype", "prompt_tokens", "new_tokens", "runs", "threads"),
)
def bench(
    model: ModelArg,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="the original model, to compare with", show_default=False)
    ] = None,
    backend: Annotated[str, typer.Option("--backend", help=BENCH_HELP["backend"])] = BenchOptions.backend,
    compiled: Annotated[
        bool | None, typer.Option("--compiled/--eager", help=BENCH_HELP["compiled"], show_default=False)
    ] = None,
    json_file: JsonOpt = None,
    quiet: QuietOpt = False,
    settings: dict[str, Any] | None = None,
) -> None:
    """Latency of a model and its original side by side: prefill, per-token decode, end to end, tokens/s, memory.

    Prints median, min and max over the runs, the measured speedup and the ideal one (layers before /
    layers after). Save the JSON as bench.json in a compressed folder and 'swm-hub card' adds the table.
    """
    configure(quiet_requested(quiet))
    # BenchOptions refuses a name that is not a backend.
    options = BenchOptions(backend=backend, compiled=compiled, **(settings or {}))  # type: ignore[arg-type]
    from swm_hub.stages.bench import bench as run_bench  # the stage loads once the options are valid

    report = run_bench(model, baseline, options)
    echo(report.table_lines())
    if json_file is not None:
        report.save_json(json_file)
        echo(f"wrote {json_file}")

"""``swm-hub bench``: the latency of a model and of its original, side by side."""

from __future__ import annotations

from typing import Annotated

import typer

from swm_hub.cli.common import JsonOpt, ModelArg, QuietOpt, echo
from swm_hub.core.options import BenchOptions
from swm_hub.core.progress import configure, quiet_requested

EXAMPLES = """\b
Examples:
  swm-hub bench smollm2-swm-24L --baseline smollm2
  swm-hub bench smollm2-swm-24L --baseline smollm2 --json smollm2-swm-24L/bench.json
  swm-hub bench smollm2-swm-24L --baseline smollm2-onnx --backend onnxruntime --runs 3
  swm-hub bench smollm2-swm-24L --baseline smollm2-genai --backend genai
"""


def bench(
    model: ModelArg,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="the original model, to compare with", show_default=False)
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="torch, onnxruntime (a folder with an ONNX export) or genai (a folder with a genai export)",
        ),
    ] = BenchOptions.backend,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = BenchOptions.device,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="torch backend: float32, bfloat16 or float16 (fp32, bf16, fp16 also accepted; "
            "default float16 on cuda, float32 on cpu)",
            show_default=False,
        ),
    ] = None,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", help="prompt length in tokens")
    ] = BenchOptions.prompt_tokens,
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", help="tokens generated per run")
    ] = BenchOptions.new_tokens,
    runs: Annotated[
        int, typer.Option("--runs", help="timed runs per model, after one warm-up")
    ] = BenchOptions.runs,
    compiled: Annotated[
        bool | None,
        typer.Option(
            "--compiled/--eager", help="static KV cache + torch.compile (default on CUDA)", show_default=False
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads (default: torch's)", show_default=False)
    ] = None,
    json_file: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Latency of a model and its original side by side: prefill, per-token decode, end to end, tokens/s, memory.

    Prints median, min and max over the runs, the measured speedup and the ideal one (layers before /
    layers after). Save the JSON as bench.json in a compressed folder and 'swm-hub card' adds the table.
    """
    configure(quiet_requested(quiet))
    options = BenchOptions(
        backend=backend,  # type: ignore[arg-type]  # BenchOptions refuses a name that is not a backend
        device=device,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        runs=runs,
        compiled=compiled,
        dtype=dtype,
        threads=threads,
    )
    from swm_hub.stages.bench import bench as run_bench  # the stage loads once the options are valid

    report = run_bench(model, baseline, options)
    echo(report.table_lines())
    if json_file is not None:
        report.save_json(json_file)
        echo(f"wrote {json_file}")

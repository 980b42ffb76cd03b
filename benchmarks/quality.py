"""Held-out perplexity of a compressed model on every kind of text, next to plain layer dropping.

A merge that is refitted on calibration text can learn that text instead of the layers' function, so one
held-out number on text like the calibration's cannot tell a merge that generalizes from one that does not.
This benchmark measures, for each removal count:

- ``default``: the default ``compress`` (``MergeOptions()``: swm-fit on the default calibration, every kind
  of the shipped corpus sampled evenly), on the held-out split of every kind;
- ``leave-one-kind-out``: for each kind, the same compression calibrated on the other kinds only, measured on
  the held-out split of the kind it never saw;
- the drop baselines of ``swm_hub.stages.evaluate.DROP_RULES`` (ShortGPT's block influence, PruneMe's angular
  distance), chosen from the same calibration traces as the merge they are compared with.

"ratio" is a perplexity over the best drop baseline's on the same kind at the same count (below 1: better
than deleting the layers). The summary line of each count is the worst ratio over every kind, left-out
kinds included. ``--outside DIR`` adds every ``*.txt`` of DIR as further held-out kinds, for checking on
text that is not in the repository.

Run from the repository root (about 25 minutes on a 2-core CPU for SmolLM2 at four counts; ``--quick`` is
one count, no leave-one-kind-out, in about 3 minutes)::

    python benchmarks/quality.py                                  # SmolLM2-135M, 3, 6, 9 and 12 of 30
    python benchmarks/quality.py --model gemma3-270m              # Gemma 3 270M, 2, 3, 4 and 5 of 18
    python benchmarks/quality.py --counts 9 --outside ~/texts     # plus your own held-out texts
    python benchmarks/quality.py --quick

It prints a table for people first, then one JSON line with every row, last, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swm_hub.core.architectures import ArchitectureSpec
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import MergeOptions
from swm_hub.core.texts import KINDS, TextSource
from swm_hub.runtime.execution import batch_losses, execution_of
from swm_hub.runtime.layer_trace import BatchTrace
from swm_hub.runtime.loading import pull
from swm_hub.runtime.tracing import calibration_batches, trace_calibration
from swm_hub.stages import merge as merge_stage
from swm_hub.stages.evaluate import (
    DROP_RULES,
    HeldoutBatches,
    heldout_batches,
)
from swm_hub.stages.merge import build_merged_model, plan_merge
from swm_hub.stages.merge.rules import consolidate

DEFAULT_COUNTS = {"smollm2": "3,6,9,12", "gemma3-270m": "2,3,4,5"}
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Row:
    """One model on one kind of held-out text; ``setup`` is the calibration it was compressed with."""

    count: int
    setup: str
    name: str
    kind: str
    perplexity: float
    layers: str
    ratio_to_best_drop: float | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(DEFAULT_COUNTS))
    parser.add_argument("--counts", help="comma-separated numbers of layers to remove (default: per model)")
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks per kind")
    parser.add_argument("--eval-len", type=int, default=256, help="tokens per held-out block")
    parser.add_argument("--outside", type=Path, help="a folder of *.txt files to evaluate on too")
    parser.add_argument("--no-loko", action="store_true", help="skip the leave-one-kind-out runs")
    parser.add_argument("--quick", action="store_true", help="the middle count only, no leave-one-kind-out")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    args = parser.parse_args(argv)
    counts = [int(c) for c in (args.counts or DEFAULT_COUNTS[args.model]).split(",") if c.strip()]
    args.counts = [counts[len(counts) // 2]] if args.quick else counts
    args.no_loko = args.no_loko or args.quick
    return args


def note(message: str) -> None:
    """Progress on stderr, so stdout holds only the table and the JSON line."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def outside_batches(tokenizer: Any, folder: Path, blocks: int, length: int) -> dict[str, list[torch.Tensor]]:
    """Every ``*.txt`` of ``folder`` as one more held-out kind, cut like the shipped ones."""
    return {
        f"outside:{path.stem}": heldout_batches(tokenizer, TextSource(path=path), blocks, length).batches
        for path in sorted(folder.glob("*.txt"))
    }


def traced(loaded: LoadedModel, kinds: tuple[str, ...]) -> list[BatchTrace]:
    """Calibration traces of the default calibration, restricted to ``kinds``."""
    options = replace(MergeOptions().calibration, kinds=kinds)
    return trace_calibration(loaded.model, calibration_batches(loaded.tokenizer, options), False)


def rows_for(
    loaded: LoadedModel,
    traces: list[BatchTrace],
    kinds: tuple[str, ...],
    heldout: HeldoutBatches,
    count: int,
    setup: str,
) -> list[Row]:
    """The merge and the drop baselines at ``count``, all chosen from ``traces``, on every kind of ``heldout``."""
    num_layers = loaded.config.num_hidden_layers
    rows = []
    for name, rule in DROP_RULES.items():
        dropped = rule(traces, count)
        losses = execution_of(loaded).losses(heldout.batches, False, name, skip=dropped)
        rows += kind_rows(heldout, losses, count, setup, name, "drop " + ",".join(map(str, dropped)))
    calibration = replace(MergeOptions().calibration, kinds=kinds)
    options = MergeOptions(target_layers=num_layers - count, calibration=calibration)
    plan = plan_merge(loaded, traces, options, progress=False)
    merged = build_merged_model(loaded, plan, traces)
    windows = " ".join(f"{low}-{high}" for low, high in plan.windows)
    rows += kind_rows(heldout, batch_losses(merged, heldout.batches), count, setup, "swm-fit", windows)
    return with_ratios(rows)


def kind_rows(
    heldout: HeldoutBatches,
    losses: Sequence[tuple[float, int]],
    count: int,
    setup: str,
    name: str,
    layers: str,
) -> list[Row]:
    row = heldout.row(name, 0, losses)
    found = [Row(count, setup, name, kind, ppl, layers) for kind, ppl in row.by_kind.items()]
    note(
        f"{count} removed, {setup}: {name} [{layers}] "
        + " ".join(f"{r.kind}={r.perplexity:.2f}" for r in found)
    )
    return found


def with_ratios(rows: Sequence[Row]) -> list[Row]:
    """Each merge row's perplexity over the best drop baseline's on the same kind."""
    best: dict[str, float] = {}
    for row in rows:
        if row.name in DROP_RULES:
            best[row.kind] = min(best.get(row.kind, row.perplexity), row.perplexity)
    return [replace(row, ratio_to_best_drop=row.perplexity / best[row.kind]) for row in rows]


def fit_each_window_once() -> None:
    """Consolidate a window once per calibration, however many counts merge it.

    A consolidated layer depends only on the model, the calibration traces, the window and the rule, and the
    counts of one calibration share most of their windows; the gradient refit (Gemma) takes minutes a
    window, so the merges of the whole run reuse each one. Keyed by the traces' identity: each calibration
    is traced once and kept for the whole run.
    """
    fitted: dict[tuple[Any, ...], nn.Module] = {}

    def once(
        layers: Sequence[nn.Module], spec: ArchitectureSpec, traces: Sequence[BatchTrace], *window: Any
    ) -> nn.Module:
        key = (id(traces), *window)
        if key not in fitted:
            started = time.perf_counter()
            fitted[key] = consolidate(layers, spec, traces, *window)
            note(f"consolidated layers {window[0]}-{window[1]} in {time.perf_counter() - started:.0f} s")
        return fitted[key]

    setattr(merge_stage, "consolidate", once)  # noqa: B010 (the name merge calls, not one it exports)


def measure(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    loaded = pull(args.model)
    tokenizer = loaded.tokenizer
    shipped = heldout_batches(
        tokenizer, TextSource(split="heldout"), args.eval_blocks * len(KINDS), args.eval_len
    )
    extra = outside_batches(tokenizer, args.outside, args.eval_blocks, args.eval_len) if args.outside else {}
    everything = HeldoutBatches({**shipped.by_kind, **extra})
    rows = [
        Row(0, "dense", "dense", kind, ppl, "-")
        for kind, ppl in everything.row(
            "dense", 0, batch_losses(loaded.model, everything.batches)
        ).by_kind.items()
    ]
    note("dense " + " ".join(f"{r.kind}={r.perplexity:.2f}" for r in rows))
    default_traces = traced(loaded, KINDS)
    loko = (
        {} if args.no_loko else {kind: traced(loaded, tuple(k for k in KINDS if k != kind)) for kind in KINDS}
    )
    for count in args.counts:  # the default first: the figure users get, before the longer check
        rows += rows_for(loaded, default_traces, KINDS, everything, count, "default")
    for count in args.counts:
        for kind, traces in loko.items():
            left_out = HeldoutBatches({kind: shipped.by_kind[kind]})
            others = tuple(k for k in KINDS if k != kind)
            rows += rows_for(loaded, traces, others, left_out, count, f"without {kind}")
    settings = {
        "model": args.model,
        "num_layers": loaded.config.num_hidden_layers,
        "calibration": asdict(MergeOptions().calibration) | {"text": TextSource().label},
        "heldout": {
            "blocks_per_kind": args.eval_blocks,
            "seq_len": args.eval_len,
            "outside": str(args.outside),
        },
        "threads": torch.get_num_threads(),
    }
    return rows, settings


def summary_lines(rows: Sequence[Row]) -> list[str]:
    """Per count, the worst ratio of the default and of the left-out kinds: the figures that decide."""
    lines = []
    for count in sorted({row.count for row in rows if row.count}):
        merged = [r for r in rows if r.count == count and r.name == "swm-fit" and r.ratio_to_best_drop]
        for label, chosen in (
            ("default calibration", [r for r in merged if r.setup == "default"]),
            ("left-out kinds", [r for r in merged if r.setup != "default"]),
        ):
            if chosen:
                worst = max(chosen, key=lambda r: r.ratio_to_best_drop or 0.0)
                lost = sorted({r.kind for r in chosen if (r.ratio_to_best_drop or 0.0) > 1.0})
                verdict = f"loses on {', '.join(lost)}" if lost else "wins on every kind"
                lines.append(
                    f"{count} removed, {label}: worst ratio {worst.ratio_to_best_drop:.3f} ({worst.kind}); {verdict}"
                )
    return lines


def table(rows: Sequence[Row]) -> str:
    """A fixed-width table for people."""
    header = ("count", "calibration", "name", "kind", "perplexity", "ratio", "windows / dropped layers")
    cells = [
        (
            str(r.count),
            r.setup,
            r.name,
            r.kind,
            f"{r.perplexity:.2f}",
            "-" if r.ratio_to_best_drop is None else f"{r.ratio_to_best_drop:.3f}",
            r.layers,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    right = {0, 4, 5}

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in cells)])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    fit_each_window_once()
    started = time.perf_counter()
    rows, settings = measure(args)
    print(
        f"{settings['model']}: {settings['num_layers']} layers; held-out perplexity per kind, "
        f"{args.eval_blocks} blocks x {args.eval_len} tokens each; default calibration "
        f"{settings['calibration']['samples']} x {settings['calibration']['seq_len']} tokens of {TextSource().label}"
    )
    print(table(rows))
    print("\n".join(summary_lines(rows)))
    print(f"total {time.perf_counter() - started:.0f} s on {settings['threads']} threads")
    print(json.dumps({**settings, "rows": [asdict(row) for row in rows]}))


if __name__ == "__main__":
    main()

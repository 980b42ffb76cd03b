"""Held-out perplexity of SmolLM2-135M compressed by each method, next to the plain layer-dropping baselines.

What it measures, for each removal count in ``--counts`` (SmolLM2-135M has 30 decoder layers):

- ``dense``: the uncompressed model (once, not per count);
- each drop baseline of ``swm_hub.evaluate.DROP_RULES`` (ShortGPT's block influence, PruneMe's angular
  distance), removing the same number of layers;
- each merge method of ``swm_hub.options.METHODS`` (``plan_merge`` with ``target_layers = 30 - count``);
- ablations: the windows ``swm-fit`` selected, consolidated with each other rule of
  ``swm_hub.consolidate.MERGE_RULES``. Same windows, different consolidation, so the table separates what
  the selection buys from what the consolidation buys (only when ``swm-fit`` is among ``--methods``).

Every selection and every ``fit`` refit uses one calibration trace: ``CalibrationOptions()`` defaults
(32 blocks of 128 tokens of the packaged calibration text). Perplexity is measured on the packaged
held-out text, a different work, in ``--eval-blocks`` blocks of ``--eval-len`` tokens, 8 blocks a batch.
"ratio" is a row's perplexity over the best drop baseline's at the same count (below 1: better than
dropping); "select s" is the wall time the selection took (for ablations, the swm-fit selection is reused).

Run it from the repository root (about 15 minutes for swm-fit and the baselines at four counts on a 2-core
CPU; swm-paper adds roughly 8 minutes of selection per count, since it runs the model for every candidate
window)::

    python benchmarks/quality.py                  # counts 3, 6, 9 and 12, 48 x 256 held-out tokens
    python benchmarks/quality.py --quick          # count 6 only, 16 x 256 held-out tokens
    python benchmarks/quality.py --counts 6 --methods swm-fit

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
from typing import Any

import torch
from transformers import PreTrainedModel

from swm_hub.analyze import calibration_batches, calibration_record, trace_calibration
from swm_hub.calibration import TextSource
from swm_hub.consolidate import MERGE_RULES
from swm_hub.evaluate import DROP_RULES, perplexity, windows_for_dropped
from swm_hub.layer_trace import BatchTrace
from swm_hub.merge import build_merged_model, plan_merge
from swm_hub.options import METHODS, CalibrationOptions, MergeOptions
from swm_hub.plan import MergePlan
from swm_hub.pull import LoadedModel, pull

MODEL = "smollm2"
EVAL_BATCH = 8
ABLATED_METHOD = "swm-fit"
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Row:
    """One line of the table: a compressed (or the dense) model and its held-out perplexity."""

    count: int
    layers: int
    name: str
    kind: str
    windows: list[tuple[int, int]]
    dropped: list[int]
    perplexity: float
    select_seconds: float | None
    ratio_to_best_drop: float | None = None


@dataclass(frozen=True)
class Setup:
    """The model, the shared calibration traces and the held-out batches every row is measured with."""

    loaded: LoadedModel
    traces: list[BatchTrace]
    heldout: list[torch.Tensor]
    num_layers: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="3,6,9,12", help="comma-separated numbers of layers to remove")
    parser.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks")
    parser.add_argument("--eval-len", type=int, default=256, help="tokens per held-out block")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}"
    )
    parser.add_argument("--quick", action="store_true", help="count 6 only and 16 held-out blocks")
    args = parser.parse_args(argv)
    args.counts = [6] if args.quick else [int(c) for c in args.counts.split(",") if c.strip()]
    args.eval_blocks = 16 if args.quick else args.eval_blocks
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


def note(message: str) -> None:
    """Progress on stderr, so stdout holds only the table and the JSON line."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def prepare(eval_blocks: int, eval_len: int) -> Setup:
    """Load the model, trace the calibration text once, and cut the held-out text into batches."""
    loaded = pull(MODEL)
    traces = trace_calibration(
        loaded.model, calibration_batches(loaded.tokenizer, CalibrationOptions()), False
    )
    heldout_options = CalibrationOptions(samples=eval_blocks, seq_len=eval_len, batch_size=EVAL_BATCH)
    heldout = calibration_batches(loaded.tokenizer, heldout_options, TextSource(packaged="heldout"))
    return Setup(loaded, traces, heldout, num_layers=loaded.config.num_hidden_layers)


def build_merged(setup: Setup, plan: MergePlan) -> PreTrainedModel:
    """The plan's model in memory: what ``merge.write_merged`` writes, without the folder."""
    return build_merged_model(setup.loaded, plan, setup.traces)


def evaluate(setup: Setup, plan: MergePlan) -> float:
    """Held-out perplexity of the model the plan describes."""
    return perplexity(build_merged(setup, plan), setup.heldout)


def drop_plan(setup: Setup, name: str, windows: list[tuple[int, int]]) -> MergePlan:
    """A plan that keeps each window's lowest layer as it is: the drop baselines in the merge's own terms."""
    config = setup.loaded.config
    return MergePlan(
        model=MODEL,
        base_model=setup.loaded.source.base_model,
        revision=None,
        model_type=config.model_type,
        num_layers=setup.num_layers,
        windows=windows,
        method=name,
        score=name,
        criterion="none",
        merge="drop",
        ridge=MergeOptions().ridge,
        threshold=None,
        target={"threshold": None, "target_layers": setup.num_layers - sum(h - lo for lo, h in windows)},
        calibration=calibration_record(TextSource(), CalibrationOptions()),
    )


def done(row: Row) -> Row:
    """Report a finished row at once, so a long run that is cut short still shows what it measured."""
    where = layers_text(row)
    note(f"{row.count} removed: {row.name} [{where}] perplexity {row.perplexity:.2f}")
    return row


def dense_row(setup: Setup) -> Row:
    note("dense model")
    ppl = perplexity(setup.loaded.model, setup.heldout)
    return done(Row(0, setup.num_layers, "dense", "dense", [], [], ppl, None))


def drop_rows(setup: Setup, count: int) -> list[Row]:
    rows = []
    for name, rule in DROP_RULES.items():
        note(f"{count} removed: {name}")
        start = time.perf_counter()
        dropped = rule(setup.traces, count)
        seconds = time.perf_counter() - start
        plan = drop_plan(setup, name, windows_for_dropped(dropped))
        ppl = evaluate(setup, plan)
        rows.append(done(Row(count, plan.layers_after, name, "drop", plan.windows, dropped, ppl, seconds)))
    return rows


def method_rows(setup: Setup, count: int, methods: Sequence[str]) -> tuple[list[Row], dict[str, MergePlan]]:
    """One row per merge method, and the plans, so the ablations can reuse a method's windows."""
    rows, plans = [], {}
    for method in methods:
        note(f"{count} removed: {method}")
        options = MergeOptions(target_layers=setup.num_layers - count, method=method)
        start = time.perf_counter()
        plan = plan_merge(setup.loaded, setup.traces, options, progress=False)
        seconds = time.perf_counter() - start
        note(f"{count} removed: {method} selected {plan.windows} in {seconds:.1f} s")
        ppl = evaluate(setup, plan)
        rows.append(done(Row(count, plan.layers_after, method, "method", plan.windows, [], ppl, seconds)))
        plans[method] = plan
    return rows, plans


def ablation_rows(setup: Setup, count: int, plan: MergePlan) -> list[Row]:
    """The plan's windows consolidated by every other merge rule."""
    rows = []
    for rule in MERGE_RULES:
        if rule == plan.merge:
            continue
        name = f"{plan.method} windows + {rule}"
        note(f"{count} removed: {name}")
        ppl = evaluate(setup, replace(plan, merge=rule))
        rows.append(done(Row(count, plan.layers_after, name, "ablation", plan.windows, [], ppl, None)))
    return rows


def with_ratios(rows: Sequence[Row]) -> list[Row]:
    """Each compressed row's perplexity over the best drop baseline's at the same count."""
    best: dict[int, float] = {}
    for row in rows:
        if row.kind == "drop":
            best[row.count] = min(best.get(row.count, row.perplexity), row.perplexity)
    return [
        replace(row, ratio_to_best_drop=row.perplexity / best[row.count]) if row.count in best else row
        for row in rows
    ]


def layers_text(row: Row) -> str:
    if row.dropped:
        return "drop " + ",".join(str(layer) for layer in row.dropped)
    return " ".join(f"{low}-{high}" for low, high in row.windows) or "-"


def table(rows: Sequence[Row]) -> str:
    """A fixed-width table for people."""
    header = ("count", "layers", "name", "windows / dropped layers", "perplexity", "ratio", "select s")
    lines = [
        (
            str(row.count),
            str(row.layers),
            row.name,
            layers_text(row),
            f"{row.perplexity:.2f}",
            "-" if row.ratio_to_best_drop is None else f"{row.ratio_to_best_drop:.3f}",
            "-" if row.select_seconds is None else f"{row.select_seconds:.1f}",
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    right = {0, 1, 4, 5, 6}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(cells) for cells in lines)])


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    setup = prepare(args.eval_blocks, args.eval_len)
    rows = [dense_row(setup)]
    for count in args.counts:
        rows += drop_rows(setup, count)
        found, plans = method_rows(setup, count, args.methods)
        rows += found
        if ABLATED_METHOD in plans:
            rows += ablation_rows(setup, count, plans[ABLATED_METHOD])
    settings = {
        "model": MODEL,
        "num_layers": setup.num_layers,
        "calibration": calibration_record(TextSource(), CalibrationOptions()),
        "heldout": {
            "text": TextSource(packaged="heldout").label,
            "blocks": args.eval_blocks,
            "seq_len": args.eval_len,
            "batch_size": EVAL_BATCH,
        },
        "threads": torch.get_num_threads(),
    }
    return with_ratios(rows), settings


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    rows, settings = run(args)
    held = settings["heldout"]
    calib = settings["calibration"]
    print(
        f"{MODEL}: {settings['num_layers']} layers; held-out perplexity on {held['text']}, "
        f"{held['blocks']} blocks x {held['seq_len']} tokens (batches of {held['batch_size']}); "
        f"calibration {calib['samples']} x {calib['seq_len']} tokens of {calib['text']}, traced once"
    )
    print(table(rows))
    print(f"total {time.perf_counter() - started:.0f} s on {settings['threads']} threads")
    print(json.dumps({**settings, "rows": [asdict(row) for row in rows]}))


if __name__ == "__main__":
    main()

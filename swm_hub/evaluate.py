"""Perplexity on held-out text, and the plain layer-dropping baselines a merge has to beat.

Baselines drop the same number of layers as the merge removed, chosen from the same calibration traces by
the published rules: ShortGPT's Block Influence (drop the layers whose output is most like their input) and
PruneMe's angular distance (drop the consecutive block whose input and output are closest). Like the merge,
they never drop the first or the last layer, so both sides choose from the same layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from swm_hub.layer_trace import BatchTrace, flat_hidden
from swm_hub.similarity import io_redundancy, mean_cosine

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

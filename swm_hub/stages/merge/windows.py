"""Top-down sliding-window search over a model's decoder layers.

The search walks from the top of the network down. At each step it grows a window of consecutive layers
downwards while the window stays similar enough by the chosen score, commits the last window that passed,
and continues below it. The first and the last layer are never in a window.

Scores (higher = more alike, all in (0, 1]):
- ``influence``: the lowest, over the layers the window removes (all but its lowest), of the cosine between
  what enters and what leaves that layer in the original model (ShortGPT's Block Influence, one layer at a
  time). A window is then a run of layers that each barely turn the residual stream, merged into the layer
  below it; for a target count the search keeps the layers that turn it least, as block-influence dropping
  does, and the ``fit`` consolidation then makes the merged layer stand for the whole run. On text of kinds
  the calibration never saw, it measured better than whole-window angles (see ``benchmarks/quality.py``).
- ``angular``: the cosine between what enters the window and what leaves it in the original model, over
  calibration tokens (PruneMe's angular criterion applied to a sliding window). It needs no model run; it
  was the default before ``influence``, and beats it on the calibration's own kinds of text but not on others.
- ``cosine``: the cosine between the final hidden states of the model with the candidate window
  consolidated (and the windows above it already merged) and those of the original (the public SWM code).
  It runs only the candidate layer and the layers above it, from the cached input of the window's lowest
  layer: the layers below are untouched, so their output is the cached one.

Criteria: ``absolute`` compares the score itself with the threshold (the paper); ``incremental`` compares
it with the score of the model compressed so far, so a window is judged by what it adds.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm, trange

from swm_hub.core.architectures import ArchitectureSpec
from swm_hub.core.errors import ImpossibleTargetError, InvalidOptionError
from swm_hub.core.merge_rules import MergeRule
from swm_hub.core.similarity import mean_cosine
from swm_hub.runtime.layer_trace import BatchTrace, LogitHead, apply_layer, flat_hidden
from swm_hub.stages.merge.rules import consolidate

Window = tuple[int, int]
LayerRef = nn.Module | int
"""A consolidated layer, or the index of an original layer (read from ``SearchContext.layers`` when run, so
that streamed layers are loaded one at a time and never all held)."""
Above = Sequence[tuple[LayerRef, int]]
"""The layers standing above a candidate, each with the original position whose call arguments it takes."""

FLAT_CACHE_SIZE = 3
"""Flattened layer positions kept between scores: a sweep compares one window output with inputs further and
further down, so the output and the latest input are what is reused; more would hold every position."""


@dataclass
class Reference:
    """The original model's normed final hidden states at a fixed subset of token positions.

    Only the first calibration batch is scored (the paper's code used 10 samples): each candidate costs a
    run of every layer above it, while the fit consolidation still learns from all the batches.
    """

    traces: Sequence[BatchTrace]
    positions: torch.Tensor
    final_hidden: list[torch.Tensor]


@dataclass
class SearchContext:
    """Everything a candidate evaluation needs: the layers, their cached inputs, and the reference."""

    layers: Sequence[nn.Module]
    spec: ArchitectureSpec
    traces: Sequence[BatchTrace]
    head: LogitHead
    reference: Reference
    rule: MergeRule
    ridge: float


def score_positions(seq_len: int, per_sequence: int) -> torch.Tensor:
    """Evenly spaced positions past the first few tokens, which have too little context to judge by."""
    first = min(seq_len - 1, max(1, seq_len // 16))
    count = min(per_sequence, seq_len - first)
    positions: torch.Tensor = torch.unique(torch.linspace(first, seq_len - 1, count).round().long())
    return positions


def reference_outputs(
    traces: Sequence[BatchTrace], head: LogitHead, per_sequence: int = 32, batches: int = 1
) -> Reference:
    """What the candidates are compared with, at the scored positions of the scored batches."""
    scored = traces[:batches]
    positions = score_positions(scored[0].hidden[-1].shape[1], per_sequence)
    finals = [head.norm(t.hidden[-1][:, positions]) for t in scored]
    return Reference(traces=scored, positions=positions, final_hidden=finals)


@dataclass
class SearchResult:
    """The committed windows (inclusive, lowest layer first) and every score the search computed."""

    windows: list[Window]
    trials: list[dict[str, float | int | bool]] = field(default_factory=list)
    threshold: float = 0.0

    @property
    def removed(self) -> int:
        return sum(high - low for low, high in self.windows)


class WindowSearch:
    """One calibration set and reference, swept top-down at any threshold; scores are memoised."""

    def __init__(self, ctx: SearchContext, score: str, criterion: str, bisection_steps: int = 12) -> None:
        if score not in SCORES:
            raise InvalidOptionError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        if criterion not in CRITERIA:
            raise InvalidOptionError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        self.ctx = ctx
        self.score = SCORES[score]
        self.runs_model = score not in MODEL_FREE_SCORES
        self.criterion = criterion
        self.bisection_steps = bisection_steps
        self._memo: dict[tuple[tuple[Window, ...], int, int], float] = {}
        self._layer_cosines: dict[int, float] = {}
        self._flat: OrderedDict[int, torch.Tensor] = OrderedDict()

    def flat_hidden(self, index: int) -> torch.Tensor:
        """What entered layer ``index`` (see ``layer_trace.flat_hidden``), kept while it is recently used."""
        if index in self._flat:
            self._flat.move_to_end(index)
        else:
            self._flat[index] = flat_hidden(self.ctx.traces, index)
            if len(self._flat) > FLAT_CACHE_SIZE:
                self._flat.popitem(last=False)
        return self._flat[index]

    def layer_cosine(self, index: int) -> float:
        """Mean cosine between what enters and what leaves layer ``index`` in the original model."""
        if index not in self._layer_cosines:
            self._layer_cosines[index] = mean_cosine(self.flat_hidden(index), self.flat_hidden(index + 1))
        return self._layer_cosines[index]

    def candidate_finals(self, low: int, high: int, above: Above) -> list[torch.Tensor]:
        """Final hidden states (at scored positions) of the model with ``low..high`` consolidated.

        Layer by layer over all scored batches, so that each streamed layer is loaded once per candidate.
        """
        ctx = self.ctx
        lowest: LayerRef = (
            low
            if low == high
            else consolidate(ctx.layers, ctx.spec, ctx.traces, low, high, ctx.rule, ctx.ridge)
        )
        traces = ctx.reference.traces
        calls = [trace.calls for trace in traces]
        hidden = [trace.hidden[low] for trace in traces]
        for ref, position in [(lowest, low), *above]:
            hidden = apply_layer(ctx.layers[ref] if isinstance(ref, int) else ref, position, hidden, calls)
        return [h[:, ctx.reference.positions] for h in hidden]

    def similarity(self, committed: tuple[Window, ...], low: int, high: int, above: Above) -> float:
        # A model-free score reads the original's states only, so windows committed above do not change it.
        key = (() if not self.runs_model else committed, low, high)
        if key not in self._memo:
            self._memo[key] = self.score(self, low, high, above)
        return self._memo[key]

    def _grow(
        self,
        committed: tuple[Window, ...],
        high: int,
        above: Above,
        threshold: float,
        room: int,
        result: SearchResult,
    ) -> int:
        """The lowest layer of the window that ends at ``high`` (``high`` itself when none passes)."""
        baseline = self.similarity(committed, high, high, above) if self.criterion == "incremental" else 1.0
        low = high
        while low - 1 >= 1 and high - low < room:
            similarity = self.similarity(committed, low - 1, high, above)
            relative = similarity / baseline
            passed = relative >= threshold
            result.trials.append(
                {
                    "low": low - 1,
                    "high": high,
                    "similarity": similarity,
                    "relative": relative,
                    "passed": passed,
                }
            )
            if not passed:
                break
            low -= 1
        return low

    def sweep(self, threshold: float, cap: int | None = None, progress: bool = False) -> SearchResult:
        """Select windows top-down at ``threshold``; with ``cap``, stop growing once ``cap`` layers go."""
        ctx = self.ctx
        count = len(ctx.layers)
        above: list[tuple[LayerRef, int]] = [(count - 1, count - 1)]
        committed: tuple[Window, ...] = ()
        result = SearchResult(windows=[], threshold=threshold)
        high = count - 2
        with tqdm(total=count - 2, desc="window search", disable=not progress, leave=False) as bar:
            while high >= 1:
                room = count if cap is None else cap - result.removed
                low = self._grow(committed, high, above, threshold, room, result)
                layer: LayerRef = high
                if low < high:
                    if self.runs_model:
                        layer = consolidate(ctx.layers, ctx.spec, ctx.traces, low, high, ctx.rule, ctx.ridge)
                    committed = ((low, high), *committed)
                    result.windows.insert(0, (low, high))
                above.insert(0, (layer, low))
                bar.update(high - low + 1)
                high = low - 1
        return result

    def for_target(self, removed: int, progress: bool = False) -> SearchResult:
        """The least permissive threshold whose capped sweep removes exactly ``removed`` layers.

        Bisection on the distance ``d`` of a threshold ``exp(-d)``, in log space: the thresholds that
        matter sit close to 1, and a capped sweep at a permissive enough threshold removes exactly
        ``removed`` layers.
        """
        most = most_removable(len(self.ctx.layers))
        if not 1 <= removed <= most:
            raise ImpossibleTargetError(
                f"removing {removed} layers", len(self.ctx.layers), f"between 1 and {most} can go"
            )
        strict, permissive = 1e-6, 30.0
        best = self.sweep(math.exp(-permissive), cap=removed)
        for _ in trange(self.bisection_steps, desc="window search", disable=not progress, leave=False):
            middle = math.sqrt(strict * permissive)
            trial = self.sweep(math.exp(-middle), cap=removed)
            if trial.removed >= removed:
                permissive, best = middle, trial
            else:
                strict = middle
        return best


def most_removable(num_layers: int) -> int:
    """Windows never include the first or the last layer: all inner layers merged into one leave three."""
    return num_layers - 3


def _angular(search: WindowSearch, low: int, high: int, above: Above) -> float:
    """Mean cosine between the window's input and output in the original model."""
    cosine = torch.nn.functional.cosine_similarity(
        search.flat_hidden(low), search.flat_hidden(high + 1), dim=-1
    )
    return float(cosine.mean().clamp(min=1e-6))


def _influence(search: WindowSearch, low: int, high: int, above: Above) -> float:
    """The least redundant of the layers the window removes: each must barely change its input.

    A window of one layer removes nothing and scores 1, like the other scores of an unchanged model.
    """
    return max(1e-6, min((search.layer_cosine(index) for index in range(low + 1, high + 1)), default=1.0))


def _final_cosine(search: WindowSearch, low: int, high: int, above: Above) -> float:
    ctx = search.ctx
    finals = search.candidate_finals(low, high, above)
    cosines = [
        torch.nn.functional.cosine_similarity(ctx.head.norm(h), r, dim=-1).mean()
        for h, r in zip(finals, ctx.reference.final_hidden, strict=True)
    ]
    return float(torch.stack(cosines).mean().clamp(min=1e-6))


SCORES: Mapping[str, Callable[[WindowSearch, int, int, Above], float]] = {
    "influence": _influence,
    "angular": _angular,
    "cosine": _final_cosine,
}
CRITERIA = ("absolute", "incremental")
MODEL_FREE_SCORES = frozenset({"influence", "angular"})
"""Scores computed from the original model's cached states alone: merged layers need not be built to sweep."""

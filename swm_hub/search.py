"""Top-down sliding-window search over a model's decoder layers.

The search walks from the top of the network down. At each step it grows a window of consecutive layers
downwards while the model with that window consolidated stays similar enough to the original, commits the
last window that passed, and continues below it. A candidate is scored by running only its consolidated
layer and the (already compressed) layers above it, from the cached input of the window's lowest layer: the
layers below are untouched, so their output is the cached one.

Two scores are offered:
- ``kl``: exp(-KL(original || candidate)) of the next-token distributions on calibration tokens, a
  functional check of what the model predicts. With the ``incremental`` criterion a window is judged by
  what it adds to the KL of the model compressed so far, so every region of the network is judged on its own
  cost rather than on what the windows above it left of a global budget.
- ``cosine``: the cosine between the final hidden states of candidate and original (the public SWM code),
  judged ``cumulative``-ly against the original model as the paper does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from swm_hub.architectures import ArchitectureSpec
from swm_hub.errors import ImpossibleTargetError
from swm_hub.layer_trace import BatchTrace, LayerCall, LogitHead, run_layers
from swm_hub.merge import MergeRule, consolidate

Window = tuple[int, int]


@dataclass
class Reference:
    """What the original model produced on the calibration batches, for the scores to compare against."""

    log_probs: list[torch.Tensor]
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


def reference_outputs(traces: Sequence[BatchTrace], head: LogitHead) -> Reference:
    """The original model's next-token log-probabilities and normed final hidden states."""
    log_probs = [torch.log_softmax(head(t.hidden[-1]).float(), dim=-1) for t in traces]
    final_hidden = [head.norm(t.hidden[-1]) for t in traces]
    return Reference(log_probs=log_probs, final_hidden=final_hidden)


def _kl_similarity(ctx: SearchContext, finals: Sequence[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for reference, hidden in zip(ctx.reference.log_probs, finals, strict=True):
        candidate = torch.log_softmax(ctx.head(hidden).float(), dim=-1)
        kl = (reference.exp() * (reference - candidate)).sum(dim=-1)
        total += float(kl.sum())
        count += kl.numel()
    return math.exp(-total / count)


def _cosine_similarity(ctx: SearchContext, finals: Sequence[torch.Tensor]) -> float:
    cosines = [
        torch.nn.functional.cosine_similarity(ctx.head.norm(h), r, dim=-1).mean()
        for h, r in zip(finals, ctx.reference.final_hidden, strict=True)
    ]
    return float(torch.stack(cosines).mean())


SCORES: Mapping[str, Callable[[SearchContext, Sequence[torch.Tensor]], float]] = {
    "kl": _kl_similarity,
    "cosine": _cosine_similarity,
}
CRITERIA = ("incremental", "cumulative")


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

    def __init__(self, ctx: SearchContext, score: str, criterion: str) -> None:
        self.ctx = ctx
        self.score = SCORES[score]
        self.criterion = criterion
        self._memo: dict[tuple[tuple[Window, ...], int, int], float] = {}
        self.evaluations = 0

    def _finals(
        self, position_layer: nn.Module, low: int, above: Sequence[tuple[nn.Module, int]]
    ) -> list[torch.Tensor]:
        """Final hidden states of the model whose layers from ``low`` up are ``position_layer`` + ``above``."""
        modules = [position_layer, *(m for m, _ in above)]
        outputs = []
        for trace in self.ctx.traces:
            calls: list[LayerCall] = [trace.calls[low], *(trace.calls[i] for _m, i in above)]
            outputs.append(run_layers(modules, trace.hidden[low], calls))
        return outputs

    def _score(
        self, committed: tuple[Window, ...], low: int, high: int, above: Sequence[tuple[nn.Module, int]]
    ) -> float:
        key = (committed, low, high)
        if key not in self._memo:
            self.evaluations += 1
            if low == high:
                layer = self.ctx.layers[low]
            else:
                layer = consolidate(
                    self.ctx.layers, self.ctx.spec, self.ctx.traces, low, high, self.ctx.rule, self.ctx.ridge
                )
            self._memo[key] = self.score(self.ctx, self._finals(layer, low, above))
        return self._memo[key]

    def sweep(self, threshold: float, cap: int | None = None, progress: bool = False) -> SearchResult:
        """Select windows top-down at ``threshold``; with ``cap``, stop growing once ``cap`` layers go."""
        count = len(self.ctx.layers)
        above: list[tuple[nn.Module, int]] = [(self.ctx.layers[count - 1], count - 1)]
        committed: tuple[Window, ...] = ()
        result = SearchResult(windows=[], threshold=threshold)
        high = count - 2
        baseline = 1.0
        bar = tqdm(total=count - 2, desc="window search", disable=not progress, leave=False)
        while high >= 1:
            low = high
            if self.criterion == "incremental":
                baseline = self._score(committed, high, high, above)
            while low - 1 >= 1 and (cap is None or result.removed + (high - low) < cap):
                similarity = self._score(committed, low - 1, high, above)
                relative = similarity / baseline if self.criterion == "incremental" else similarity
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
            if low < high:
                layer = consolidate(
                    self.ctx.layers, self.ctx.spec, self.ctx.traces, low, high, self.ctx.rule, self.ctx.ridge
                )
                committed = ((low, high), *committed)
                result.windows.insert(0, (low, high))
            else:
                layer = self.ctx.layers[high]
            above.insert(0, (layer, low))
            bar.update(high - low + 1)
            high = low - 1
        bar.close()
        return result

    def for_target(self, removed: int, progress: bool = False) -> SearchResult:
        """The least permissive threshold whose capped sweep removes exactly ``removed`` layers (bisection)."""
        mergeable = len(self.ctx.layers) - 2
        if not 1 <= removed <= mergeable - 1:
            raise ImpossibleTargetError(
                f"removing {removed} layers",
                mergeable,
                f"between 1 and {mergeable - 1} of {len(self.ctx.layers)} layers can be removed",
            )
        lo, hi = 0.0, 1.0  # log-space bisection on 1 - threshold would be nicer; similarity is in (0, 1]
        best = self.sweep(0.0, cap=removed)
        if best.removed < removed:
            raise ImpossibleTargetError(
                f"removing {removed} layers", mergeable, "no set of windows reaches it"
            )
        for _ in range(14):
            mid = (lo + hi) / 2
            trial = self.sweep(mid, cap=removed)
            if trial.removed >= removed:
                lo, best = mid, trial
            else:
                hi = mid
        return best

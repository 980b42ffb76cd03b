"""Perplexity on held-out text, and the plain layer-dropping baselines a merge has to beat.

Baselines drop the same number of layers as the merge removed, chosen from the same calibration traces by
the published rules: ShortGPT's Block Influence (drop the layers whose output is most like their input) and
PruneMe's angular distance (drop the consecutive block whose input and output are closest). Like the merge,
they never drop the first or the last layer, so both sides choose from the same layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swm_hub.core.calibration import blocks_by_kind
from swm_hub.core.errors import ResultFileError
from swm_hub.core.files import SIMILARITY_JSON
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import DROP_BASELINES, CalibrationOptions, EvalOptions, check_block_length
from swm_hub.core.similarity import io_redundancy, mean_cosine
from swm_hub.core.texts import TextSource
from swm_hub.results.evaluation import MERGED_PREFIX, EvalReport, PerplexityRow
from swm_hub.results.plan import MergePlan
from swm_hub.results.similarity import SimilarityReport
from swm_hub.runtime.execution import Loss, batch_losses, execution_of
from swm_hub.runtime.layer_trace import BatchTrace, flat_hidden
from swm_hub.runtime.loading import pull_for
from swm_hub.runtime.tracing import calibration_batches

logger = logging.getLogger(__name__)

EVAL_BATCH = 8
DEFAULT_EVAL = EvalOptions()

DropRule = Callable[[Sequence[BatchTrace], int], list[int]]


def perplexity(
    model: nn.Module, batches: Sequence[torch.Tensor], progress: bool = False, label: str = ""
) -> float:
    """Exp of the mean next-token negative log-likelihood over every predicted token of every block."""
    return _perplexity_of(batch_losses(model, batches, progress, label))


def _perplexity_of(losses: Sequence[Loss]) -> float:
    """Weight every predicted token alike, however the tokens were split into batches."""
    return math.exp(sum(loss for loss, _ in losses) / sum(count for _, count in losses))


def drop_by_block_influence(traces: Sequence[BatchTrace], count: int) -> list[int]:
    """ShortGPT: the ``count`` inner layers with the lowest 1 - cos(input, output)."""
    layers = len(traces[0].hidden) - 1
    influence = [io_redundancy(flat_hidden(traces, i), flat_hidden(traces, i + 1)) for i in range(layers)]
    return least_influential(influence, count)


def least_influential(influence: Sequence[float], count: int) -> list[int]:
    """The ``count`` inner layers (never the first or the last) of lowest Block Influence, in layer order."""
    inner = range(1, len(influence) - 1)
    return sorted(sorted(inner, key=influence.__getitem__)[:count])


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
class HeldoutBatches:
    """Held-out blocks in batches that never mix kinds, so each kind's perplexity can be read off the losses."""

    by_kind: dict[str, list[torch.Tensor]]

    @property
    def batches(self) -> list[torch.Tensor]:
        return [batch for batches in self.by_kind.values() for batch in batches]

    def row(
        self, name: str, layers: int, losses: Sequence[Loss], dropped: Sequence[int] = ()
    ) -> PerplexityRow:
        """The table row of a model whose losses on ``batches`` (in their order) are ``losses``."""
        remaining = iter(losses)
        by_kind = {
            kind: _perplexity_of([next(remaining) for _ in batches]) for kind, batches in self.by_kind.items()
        }
        return PerplexityRow(name, layers, _perplexity_of(losses), tuple(dropped), by_kind)


def evaluate(
    model_dir: Path,
    options: EvalOptions = DEFAULT_EVAL,
    progress: bool = False,
    base: LoadedModel | None = None,
    drops: Mapping[str, Sequence[int]] | None = None,
    merged: LoadedModel | None = None,
    plan: MergePlan | None = None,
) -> EvalReport:
    """Perplexity of a compressed folder, its base model (named in its plan) and the drop baselines.

    ``base`` saves loading the base model again when the caller already holds it (``compress --eval``), and
    ``drops`` (see ``drop_choices``) tracing it again when the caller chose the baselines' layers already;
    ``merged`` and ``plan``, the folder's model (pulled as ``options.execution`` says) and plan, save reading
    them back. Models are pulled as ``options.execution`` says; layer-wise, none of them is ever whole in
    memory. On the shipped held-out corpus the blocks are shared evenly by its kinds and every row gives each
    kind's perplexity. The zero-shot tasks of the options are not run here (see ``zeroshot.zero_shot``).
    """
    plan = plan or MergePlan.in_folder(model_dir)
    execution, seq_len, blocks, text = options.execution, options.seq_len, options.blocks, options.source
    merged = merged or pull_for(str(model_dir), None, execution)
    check_block_length(merged.config, seq_len)
    heldout = heldout_batches(merged.tokenizer, text, blocks, seq_len)
    merged_row = heldout.row(
        f"{MERGED_PREFIX}{plan.method}, {plan.merge} rule",
        plan.layers_after,
        execution_of(merged).losses(heldout.batches, progress, "merged"),
    )
    del merged
    base = base or pull_for(plan.model, plan.revision, execution)
    base_row = heldout.row(
        f"base: {base.source.display_name}",
        plan.num_layers,
        execution_of(base).losses(heldout.batches, progress, "base"),
    )
    return EvalReport(
        text=text.label,
        blocks=blocks,
        seq_len=seq_len,
        rows=[
            base_row,
            merged_row,
            *_baseline_rows(model_dir, base, plan, options.baselines, heldout, progress, drops),
        ],
    )


def _baseline_rows(
    folder: Path,
    base: LoadedModel,
    plan: MergePlan,
    baselines: Sequence[str],
    heldout: HeldoutBatches,
    progress: bool,
    drops: Mapping[str, Sequence[int]] | None = None,
) -> list[PerplexityRow]:
    """One row per drop rule, chosen from the calibration traces the merge itself was planned on."""
    if drops is None or not set(baselines) <= drops.keys():
        drops = _drop_choices_of(folder, base, plan, baselines, progress)
    rows = []
    for rule in baselines:
        dropped = list(drops[rule])
        losses = execution_of(base).losses(heldout.batches, progress, rule, skip=dropped)
        rows.append(heldout.row(rule, plan.layers_after, losses, dropped))
    return rows


def drop_choices(
    traces: Sequence[BatchTrace], removed: int, baselines: Sequence[str] = DROP_BASELINES
) -> dict[str, list[int]]:
    """The layers each drop rule removes, ``removed`` of them, chosen on the calibration ``traces``."""
    return {rule: DROP_RULES[rule](traces, removed) for rule in baselines}


def _drop_choices_of(
    folder: Path, base: LoadedModel, plan: MergePlan, baselines: Sequence[str], progress: bool
) -> dict[str, list[int]]:
    """``drop_choices`` from the folder's similarity report where it holds the rule's scores, else traced.

    The merge saved the report of its own calibration traces: Block Influence per layer is in it (to six
    decimals), so drop-bi alone needs no second trace of the base model. drop-angular's scores of whole
    blocks are not in it, and a folder without the report (a ``--plan`` run of a rule that needs no
    calibration) has none: those trace, and a trace made anyway ranks drop-bi too, at full precision.
    """
    reported = _reported_block_influence(folder, plan) if set(baselines) == {"drop-bi"} else None
    if reported:
        return {"drop-bi": least_influential(reported, plan.removed)}
    return _traced_drop_choices(base, plan, baselines, progress)


def _reported_block_influence(folder: Path, plan: MergePlan) -> list[float] | None:
    """The per-layer Block Influence of similarity.json, when it was measured on this plan's base and text."""
    if not (folder / SIMILARITY_JSON).is_file():
        return None
    try:
        report = SimilarityReport.load(folder)
    except ResultFileError as exc:
        logger.debug("drop-bi is traced again: %s", exc)
        return None
    if report.num_layers != plan.num_layers or report.calibration != plan.calibration:
        return None
    return report.io_redundancy


def _traced_drop_choices(
    base: LoadedModel, plan: MergePlan, baselines: Sequence[str], progress: bool
) -> dict[str, list[int]]:
    """``drop_choices`` on the base model's traces of the plan's calibration text, traced here."""
    if not baselines:
        return {}
    recorded = CalibrationOptions.recorded(plan.calibration, CalibrationOptions.batch_size)
    calibration = calibration_batches(base.tokenizer, recorded)
    with execution_of(base).traces(calibration, progress) as traces:
        return drop_choices(traces, plan.removed, baselines)


def heldout_batches(tokenizer: Any, text: TextSource, blocks: int, seq_len: int) -> HeldoutBatches:
    """``blocks`` held-out blocks shared evenly by the kinds of ``text``, in batches of ``EVAL_BATCH``."""
    return HeldoutBatches(
        {
            kind: [ids[start : start + EVAL_BATCH] for start in range(0, ids.shape[0], EVAL_BATCH)]
            for kind, ids in blocks_by_kind(tokenizer, text, blocks, seq_len).items()
        }
    )

"""The fair comparison of healing: the merged model and the layer-dropping baseline, each healed the same way.

A healed merged model beats an unhealed drop baseline by construction; the question users ask is whether
merging still wins once both are healed with the same budget. This measures held-out perplexity (overall
and per kind of text) of the base model, of the merged model before and after healing, and of ShortGPT's
Block Influence dropping of as many layers before and after the same heal, into a ``HealComparison``.
It lives in the pipeline because it joins three stages: the merge stage builds the dropped model, the
evaluate stage chooses its layers and measures perplexity, and the heal stage, which is handed this
comparer, heals both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from torch import nn
from transformers import PreTrainedModel

from swm_hub.core.model import LoadedModel
from swm_hub.core.options import CalibrationOptions
from swm_hub.core.texts import TextSource
from swm_hub.results.evaluation import PerplexityRow
from swm_hub.results.heal import HealComparison, HealComparisonRow
from swm_hub.results.plan import MergePlan
from swm_hub.runtime.execution import batch_losses
from swm_hub.runtime.layer_trace import BatchTrace
from swm_hub.runtime.tracing import calibration_batches, trace_calibration
from swm_hub.stages.evaluate import (
    DROP_RULES,
    HeldoutBatches,
    heldout_batches,
    windows_for_dropped,
)
from swm_hub.stages.heal import HealFunction, HealResult
from swm_hub.stages.merge import build_merged_model

COMPARE_BLOCKS = 48
COMPARE_SEQ_LEN = 256
DROP_RULE = "drop-bi"


def drop_plan_for(plan: MergePlan, traces: Sequence[BatchTrace], rule: str = DROP_RULE) -> MergePlan:
    """The plan of dropping as many layers as ``plan`` removed, chosen by ``rule`` on ``traces``.

    Dropped layers are windows kept by their lowest layer with the ``drop`` rule, so the baseline is built,
    healed and saved like a merged model.
    """
    dropped = DROP_RULES[rule](traces, plan.removed)
    return replace(
        plan, windows=windows_for_dropped(dropped), merge="drop", method=rule, trials=[], heal=None
    )


@dataclass
class HealComparer:
    """Compares healing for one base model: held-out blocks, the base's row and calibration traces measured once.

    ``text`` is the held-out text (the shipped held-out split by default); the training text of both healed
    models is their plan's calibration text.
    """

    base: LoadedModel
    text: TextSource = field(default_factory=lambda: TextSource(split="heldout"))
    blocks: int = COMPARE_BLOCKS
    seq_len: int = COMPARE_SEQ_LEN
    progress: bool = False
    _traces: dict[CalibrationOptions, list[BatchTrace]] = field(default_factory=dict, repr=False)

    @cached_property
    def heldout(self) -> HeldoutBatches:
        return heldout_batches(self.base.tokenizer, self.text, self.blocks, self.seq_len)

    @cached_property
    def base_row(self) -> PerplexityRow:
        return self.measure(
            self.base.model, f"base: {self.base.source.display_name}", self.base.config.num_hidden_layers
        )

    def measure(self, model: nn.Module, name: str, layers: int) -> PerplexityRow:
        """Held-out perplexity of ``model``, overall and per kind."""
        return self.heldout.row(name, layers, batch_losses(model, self.heldout.batches, self.progress, name))

    def traces(self, calibration: CalibrationOptions) -> list[BatchTrace]:
        """The base model's calibration traces (kept: a plan and its drop baseline use the same ones)."""
        if calibration not in self._traces:
            batches = calibration_batches(self.base.tokenizer, calibration)
            self._traces[calibration] = trace_calibration(self.base.model, batches, self.progress)
        return self._traces[calibration]

    def drop_baseline(self, plan: MergePlan) -> tuple[PreTrainedModel, MergePlan]:
        """The drop baseline of ``plan`` as a model of its own, and its plan."""
        calibration = CalibrationOptions.recorded(plan.calibration, CalibrationOptions.batch_size)
        drop_plan = drop_plan_for(plan, self.traces(calibration))
        return build_merged_model(self.base, drop_plan, []), drop_plan

    def compare(
        self,
        plan: MergePlan,
        student: PreTrainedModel,
        tokens: int,
        heal_student: HealFunction,
        heal_baseline: HealFunction,
    ) -> tuple[PreTrainedModel, HealResult, HealComparison]:
        """Heal ``student`` and the drop baseline (a budget of ``tokens`` each), and measure all.

        The two functions heal alike; the student's may keep checkpoints that the baseline's must not share.
        Returns the healed student, its heal result, and the comparison.
        """
        name = f"merged: {plan.method}, {plan.merge} rule"
        before = self.measure(student, name, plan.layers_after)
        healed, result = heal_student(student, plan)
        after = self.measure(healed, name, plan.layers_after)
        dropped, drop_plan = self.drop_baseline(plan)
        drop_before = self.measure(dropped, DROP_RULE, plan.layers_after)
        dropped_healed, _ = heal_baseline(dropped, drop_plan)
        drop_after = self.measure(dropped_healed, DROP_RULE, plan.layers_after)
        gone = tuple(layer for low, high in drop_plan.windows for layer in range(low + 1, high + 1))
        comparison = HealComparison(
            text=self.text.label,
            blocks=self.blocks,
            seq_len=self.seq_len,
            tokens=tokens,
            rows=[_row(self.base_row, None), _row(before, after), _row(drop_before, drop_after, gone)],
        )
        return healed, result, comparison


def _row(
    before: PerplexityRow, after: PerplexityRow | None, dropped: tuple[int, ...] = ()
) -> HealComparisonRow:
    return HealComparisonRow(
        name=before.name,
        layers=before.layers,
        before=before.perplexity,
        after=after.perplexity if after is not None else None,
        dropped=dropped,
        before_by_kind=dict(before.by_kind),
        after_by_kind=dict(after.by_kind) if after is not None else {},
    )

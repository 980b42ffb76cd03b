"""The sections every card has, composed from the merge plan alone: the base model, the method, the windows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from swm_hub.core.merge_rules import MERGE_RULES
from swm_hub.core.options import METHODS
from swm_hub.results.plan import MergePlan
from swm_hub.stages.card.context import BaseInfo, MethodInfo, WindowRow
from swm_hub.stages.card.public_text import public_name

HUB_URL: str = "https://huggingface.co"


def base_info(plan: MergePlan) -> BaseInfo:
    """The base model by its Hub id, linked, when it has one; else by the name it was given, made public."""
    hub_id = plan.base_model
    label = hub_id or public_name(plan.model)
    url = f"{HUB_URL}/{hub_id}" if hub_id else None
    return BaseInfo(label=label, hub_id=hub_id, revision=plan.revision, url=url)


def method_info(plan: MergePlan) -> MethodInfo:
    """The preset and rule with their descriptions; a name this release does not know is shown bare."""
    preset = METHODS.get(plan.method)
    rule = MERGE_RULES.get(plan.merge)
    return MethodInfo(
        name=plan.method,
        summary=preset.summary if preset is not None else None,
        merge=plan.merge,
        merge_summary=rule.summary if rule is not None else None,
        merge_reference=rule.reference if rule is not None else None,
        score=plan.score,
        threshold=plan.threshold,
        target=_target_text(plan),
    )


def _target_text(plan: MergePlan) -> str:
    target = plan.target
    if target.get("target_layers") is not None:
        return f"keep {target['target_layers']} layers"
    if target.get("ratio") is not None:
        return f"remove a fraction {target['ratio']} of the layers"
    if target.get("threshold") is not None:
        return f"similarity threshold {target['threshold']}"
    return "the method's default threshold"


def window_rows(plan: MergePlan) -> list[WindowRow]:
    """Each window with its index in the new model and the similarity the search accepted it at."""
    rows = []
    removed_below = 0
    for low, high in plan.windows:
        rows.append(
            WindowRow(
                first=low,
                last=high,
                size=high - low + 1,
                new_index=low - removed_below,
                similarity=_accepted_similarity(plan.trials, low, high),
            )
        )
        removed_below += high - low
    return rows


def _accepted_similarity(trials: Sequence[Mapping[str, Any]], low: int, high: int) -> float | None:
    """The score of the last passing trial of exactly this window: the one the final sweep committed."""
    for trial in reversed(trials):
        if trial.get("low") == low and trial.get("high") == high and trial.get("passed"):
            value = trial.get("similarity")
            return float(value) if isinstance(value, int | float) else None
    return None

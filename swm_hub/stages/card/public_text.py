"""How a public card names what the user ran: models, texts and the command that reproduces the run.

A card is published, the user's folders are not: a local path is named by its last component, and the
shipped corpus by its kinds.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from swm_hub.core.options import METHODS, MergeOptions
from swm_hub.core.packaged_models import DEMO_NAMES
from swm_hub.core.texts import TextSource
from swm_hub.results.plan import PLAN_FILE, MergePlan


def public_name(model: str) -> str:
    """A local path is named by its last component: a card is public, the user's folders are not."""
    if model in DEMO_NAMES or not _is_local_path(model):
        return model
    return Path(model).name


def _is_local_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or Path(text).expanduser().exists()


def described_text(label: str) -> str:
    """A text as a reader of the card knows it: the shipped corpus by its kinds, a user's file by its name."""
    source = TextSource.from_label(label)
    if source.path is not None:
        return f"`{public_name(label)}`"
    split = "held-out" if source.split == "heldout" else source.split
    evenly = ", sampled evenly" if len(source.kinds) > 1 else ""
    return f"the {split} split of swm-hub's shipped corpus ({', '.join(source.kinds)}{evenly})"


def calibration_text(calibration: Mapping[str, Any]) -> str:
    label = described_text(str(calibration.get("text", "?")))
    samples, seq_len = calibration.get("samples"), calibration.get("seq_len")
    tokens = calibration.get("tokens")
    if samples is None or seq_len is None:
        return label
    total = f", {tokens:,} tokens" if isinstance(tokens, int) else ""
    return f"{samples} blocks of {seq_len} tokens{total} from {label}"


def reproduce_command(plan: MergePlan, out_name: str, with_plan: bool = False) -> str:
    """The ``swm-hub compress`` command that searches again, or (``with_plan``) applies this plan."""
    model = public_name(plan.model)
    parts = ["swm-hub", "compress", model]
    if plan.revision and "@" not in plan.model:
        parts += ["--revision", plan.revision]
    if with_plan:
        parts += ["--plan", PLAN_FILE]
    else:
        parts += _target_options(plan.target)
        parts += ["--method", plan.method]
        preset = METHODS.get(plan.method)
        if preset is None or plan.merge != preset.merge:
            parts += ["--merge", plan.merge]
        if plan.ridge != MergeOptions.ridge:
            parts += ["--ridge", f"{plan.ridge:g}"]
        parts += _calibration_options(plan.calibration)
    parts += ["--out", out_name]
    return shlex.join(parts)


def _target_options(target: Mapping[str, Any]) -> list[str]:
    for key, option in (
        ("target_layers", "--target-layers"),
        ("ratio", "--ratio"),
        ("threshold", "--threshold"),
    ):
        value = target.get(key)
        if value is not None:
            return [option, f"{value:g}" if isinstance(value, float) else str(value)]
    return []


def _calibration_options(calibration: Mapping[str, Any]) -> list[str]:
    options = []
    label = calibration.get("text")
    source = TextSource.from_label(str(label)) if label is not None else TextSource()
    if source.path is not None:
        options += ["--calib", public_name(str(label))]
    elif source != TextSource():
        options += ["--calib-kinds", ",".join(source.kinds)]
    for key, option in (("samples", "--samples"), ("seq_len", "--seq-len")):
        if calibration.get(key) is not None:
            options += [option, str(calibration[key])]
    return options

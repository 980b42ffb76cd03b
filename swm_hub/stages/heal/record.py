"""What a heal writes down: the identity a resumed run must share, and the record the plan keeps."""

from __future__ import annotations

from typing import Any

import torch

from swm_hub.core.options import HealOptions
from swm_hub.core.version import __version__
from swm_hub.results.plan import MergePlan
from swm_hub.stages.heal.teacher import block_fingerprint
from swm_hub.stages.heal.training import TrainingLog


def autocast_name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "off"


def run_identity(
    plan: MergePlan,
    options: HealOptions,
    mode: str,
    text: str,
    blocks: torch.Tensor,
    autocast: torch.dtype | None,
) -> dict[str, Any]:
    """Everything a resumed run must share with the interrupted one for the two to make one run."""
    record = options.record()
    record.pop("checkpoint_every")
    record.pop("teacher_cache")
    if mode != "disk":
        record.pop("top_k")
    return {
        "model": plan.model,
        "windows": [list(window) for window in plan.windows],
        "merge": plan.merge,
        "text": text,
        "blocks": block_fingerprint(blocks),
        "teacher": mode,
        "dtype": options.execution.dtype,
        **record,
        "autocast": autocast_name(autocast),  # what ran, not what was asked: auto depends on the machine
    }


def heal_record(
    plan: MergePlan,
    options: HealOptions,
    log: TrainingLog,
    text: str,
    blocks: torch.Tensor,
    mode: str,
    adapted: int,
    trainable: int,
    accelerator: Any,
    autocast: torch.dtype | None,
) -> dict[str, Any]:
    """What the plan records of the heal: budget, options, text, seed, loss curve summary and speed."""
    record: dict[str, Any] = {
        "teacher": plan.model,
        "tokens": options.tokens,
        "tokens_seen": log.tokens,
        "steps": log.step,
        "seed": options.seed,
        "options": options.record(),
        "text": text,
        "blocks": int(blocks.shape[0]),
        "teacher_cache": mode,
        "adapted_modules": adapted,
        "trainable_parameters": trainable,
        "loss": log.summary(),
        "seconds": round(log.seconds, 3),
        "tokens_per_s": round(log.tokens / max(log.seconds, 1e-9), 1),
        "processes": int(accelerator.num_processes),
        "dtype": options.execution.dtype,
        "autocast": autocast_name(autocast),
        "resumed_at": log.resumed_at,
        "swm_hub_version": __version__,
    }
    if plan.heal is not None:
        record["previous"] = plan.heal
    return record

"""The merge stage: choose windows, consolidate each into one layer, and write a loadable model folder.

The merged model is never assembled by slicing the live model's ``ModuleList`` (each layer keeps a stale
``layer_idx``): its state dict and rewritten config are written to a temporary folder, reloaded with plain
``AutoModelForCausalLM.from_pretrained`` as a check, and only then moved into place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel

from swm_hub.analyze import (
    SimilarityReport,
    analyze_traces,
    calibration_batches,
    calibration_record,
    trace_calibration,
)
from swm_hub.architectures import ArchitectureSpec, spec_for_config
from swm_hub.calibration import TextSource
from swm_hub.checkpoint import (
    build_model,
    output_folder,
    refuse_existing_output,
    save_model_folder,
    state_dict_for,
    verify_folder_loads,
)
from swm_hub.config_rewrite import kept_layers, rewrite_config
from swm_hub.consolidate import MERGE_RULES, consolidate
from swm_hub.errors import ImpossibleTargetError
from swm_hub.layer_trace import BatchTrace, LogitHead, decoder_layers
from swm_hub.options import CalibrationOptions, MergeOptions
from swm_hub.plan import PLAN_FILE, MergePlan
from swm_hub.pull import LoadedModel
from swm_hub.search import SearchContext, SearchResult, WindowSearch, reference_outputs

if TYPE_CHECKING:
    from swm_hub.evaluate import EvalReport
    from swm_hub.push import PushResult

logger = logging.getLogger(__name__)

REPORT_METRIC = "linear_cka"
REPORT_TOKENS = 1024


@dataclass(frozen=True)
class MergeResult:
    """What the merge stage wrote, with the counts a card or a summary needs."""

    output_dir: Path
    plan: MergePlan
    params_before: int
    params_after: int
    evaluation: EvalReport | None = None
    pushed: PushResult | None = None


def layers_to_remove(options: MergeOptions, num_layers: int) -> int | None:
    """How many layers the target asks to remove, or None when a threshold decides.

    Windows never include the first or the last layer, so at most ``num_layers - 3`` layers can go (all
    inner layers merged into one) and at least three stay.
    """
    if options.target_layers is not None:
        requested, removed = f"--target-layers {options.target_layers}", num_layers - options.target_layers
    elif options.ratio is not None:
        requested, removed = f"--ratio {options.ratio}", round(num_layers * options.ratio)
    else:
        return None
    most = num_layers - 3
    if not 1 <= removed <= most:
        raise ImpossibleTargetError(
            requested,
            num_layers,
            f"the model has {num_layers} layers; keep between 3 and {num_layers - 1} "
            f"(remove between 1 and {most}), e.g. --target-layers {max(3, num_layers - max(1, num_layers // 5))}",
        )
    return removed


def search_context(
    loaded: LoadedModel, traces: Sequence[BatchTrace], rule: str, ridge: float
) -> SearchContext:
    model = loaded.model
    spec = spec_for_config(model.config)
    head = LogitHead(model)
    return SearchContext(
        layers=list(decoder_layers(model, spec)),
        spec=spec,
        traces=traces,
        head=head,
        reference=reference_outputs(traces, head),
        rule=MERGE_RULES[rule],
        ridge=ridge,
    )


def _run_search(ctx: SearchContext, options: MergeOptions, progress: bool) -> SearchResult:
    preset = options.preset
    search = WindowSearch(ctx, preset.score, preset.criterion)
    removed = layers_to_remove(options, len(ctx.layers))
    if removed is not None:
        return search.for_target(removed, progress=progress)
    threshold = options.threshold if options.threshold is not None else preset.default_threshold
    result = search.sweep(threshold, progress=progress)
    if not result.windows:
        raise ImpossibleTargetError(
            f"--threshold {threshold}",
            len(ctx.layers),
            "no window keeps that similarity, so nothing would be removed; lower the threshold "
            "or ask for a layer count with --target-layers",
        )
    return result


def plan_merge(
    loaded: LoadedModel, traces: Sequence[BatchTrace], options: MergeOptions, progress: bool
) -> MergePlan:
    """Search windows on calibration traces and record the decision with every score behind it."""
    rule = options.merge_rule
    ctx = search_context(loaded, traces, rule, options.ridge)
    result = _run_search(ctx, options, progress)
    preset = options.preset
    config = loaded.model.config
    return MergePlan(
        model=loaded.source.ref,
        base_model=loaded.source.base_model,
        revision=loaded.source.revision,
        model_type=config.model_type,
        num_layers=len(ctx.layers),
        windows=result.windows,
        method=options.method,
        score=preset.score,
        criterion=preset.criterion,
        merge=rule,
        ridge=options.ridge,
        threshold=result.threshold,
        target={
            "threshold": options.threshold,
            "target_layers": options.target_layers,
            "ratio": options.ratio,
        },
        calibration=calibration_record(TextSource(path=options.calibration.text), options.calibration),
        trials=result.trials,
    )


def merged_state_dict(
    loaded: LoadedModel, spec: ArchitectureSpec, plan: MergePlan, traces: Sequence[BatchTrace]
) -> dict[str, torch.Tensor]:
    """The original state dict with each window's lowest layer replaced by its consolidation, renumbered."""
    model = loaded.model
    layers: list[nn.Module] = list(decoder_layers(model, spec))
    state = dict(model.state_dict())
    rule = MERGE_RULES[plan.merge]
    for low, high in plan.windows:
        layer = consolidate(layers, spec, traces, low, high, rule, plan.ridge)
        for name, tensor in layer.state_dict().items():
            state[f"{spec.layers_path}.{low}.{name}"] = tensor
    return state_dict_for(kept_layers(plan.num_layers, plan.windows), state, spec.layers_path)


def build_merged_model(loaded: LoadedModel, plan: MergePlan, traces: Sequence[BatchTrace]) -> PreTrainedModel:
    """The merged model in memory, built from its state dict and rewritten config as a fresh load would be."""
    model = loaded.model
    spec = spec_for_config(model.config)
    config = rewrite_config(model.config.to_dict(), kept_layers(plan.num_layers, plan.windows))
    merged = build_model(config, merged_state_dict(loaded, spec, plan, traces))
    merged.generation_config = model.generation_config
    merged.train(False)
    return merged


def write_merged(
    loaded: LoadedModel,
    plan: MergePlan,
    traces: Sequence[BatchTrace],
    out: Path,
    overwrite: bool,
    report: SimilarityReport | None = None,
) -> MergeResult:
    """Write the merged model, its tokenizer, generation config and plan to ``out``, checked by a reload."""
    model = loaded.model
    merged = build_merged_model(loaded, plan, traces)
    with output_folder(out, overwrite) as temp:
        save_model_folder(merged, loaded.tokenizer, temp, extra_files={PLAN_FILE: plan.to_json()})
        if report is not None:
            report.save(temp)
        verify_folder_loads(temp, plan.layers_after)
    return MergeResult(
        output_dir=out,
        plan=plan,
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in merged.parameters()),
    )


def calibration_of(plan: MergePlan | None, options: MergeOptions) -> CalibrationOptions:
    """The calibration to run: the options' own, or the one a saved plan records, so a refit is reproduced."""
    if plan is None:
        return options.calibration
    label = str(plan.calibration["text"])
    text = None if label == TextSource().label else Path(label)
    return CalibrationOptions(
        text=text,
        samples=int(plan.calibration["samples"]),
        seq_len=int(plan.calibration["seq_len"]),
        batch_size=options.calibration.batch_size,
    )


def merge(
    loaded: LoadedModel,
    out: Path,
    options: MergeOptions,
    plan: MergePlan | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeResult:
    """Compress ``loaded`` into ``out``: search (unless a plan is given), consolidate, write, verify.

    A saved plan skips the search; its ``fit`` rule still runs one calibration pass, because the refit is
    computed from calibration activations (the other rules need none).
    """
    num_layers = len(decoder_layers(loaded.model, spec_for_config(loaded.model.config)))
    if plan is not None:
        plan.check_fits(loaded.model.config.model_type, num_layers)
        kept_layers(num_layers, plan.windows)
    else:
        layers_to_remove(options, num_layers)
    refuse_existing_output(out, overwrite)
    traces: list[BatchTrace] = []
    if plan is None or MERGE_RULES[plan.merge].refit:
        batches = calibration_batches(loaded.tokenizer, calibration_of(plan, options))
        traces = trace_calibration(loaded.model, batches, progress)
    if plan is None:
        plan = plan_merge(loaded, traces, options, progress)
    logger.debug("merging windows %s (%d layers removed)", plan.windows, plan.removed)
    report = _similarity_report(loaded, traces, plan) if traces else None
    return write_merged(loaded, plan, traces, out, overwrite, report)


def _similarity_report(
    loaded: LoadedModel, traces: Sequence[BatchTrace], plan: MergePlan
) -> SimilarityReport:
    """The analysis of the traces the merge ran on anyway, saved beside the model for its card."""
    return analyze_traces(traces, REPORT_METRIC, REPORT_TOKENS, loaded.source.display_name, plan.calibration)

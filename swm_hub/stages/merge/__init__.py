"""The merge stage: choose windows, consolidate each into one layer, and write a loadable model folder.

The merged model is never assembled by slicing the live model's ``ModuleList`` (each layer keeps a stale
``layer_idx``): its state dict and rewritten config are written to a temporary folder, reloaded with plain
``AutoModelForCausalLM.from_pretrained`` as a check, and only then moved into place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from swm_hub.core.architectures import ArchitectureSpec, spec_for, spec_for_config
from swm_hub.core.config_rewrite import kept_layers, rewrite_config
from swm_hub.core.errors import ImpossibleTargetError, InvalidMergeError, InvalidOptionError
from swm_hub.core.merge_rules import MERGE_RULES
from swm_hub.core.model import LoadedModel, decoder_layers
from swm_hub.core.options import METHODS, CalibrationOptions, MergeOptions, check_block_length
from swm_hub.core.shards import TensorSpec, cast_floating
from swm_hub.results.plan import PLAN_FILE, MergePlan
from swm_hub.results.similarity import SimilarityReport
from swm_hub.runtime.checkpoint import (
    build_model,
    build_skeleton,
    output_folder,
    save_model_folder,
    save_streamed_folder,
    state_dict_for,
    untied_state_keys,
    verify_folder_headers,
    verify_folder_loads,
)
from swm_hub.runtime.execution import execution_of
from swm_hub.runtime.layer_trace import BatchTrace, LogitHead
from swm_hub.runtime.layerwise import StreamedLayers
from swm_hub.runtime.tracing import (
    analyze_traces,
    calibration_batches,
    calibration_record,
)
from swm_hub.stages.merge.rules import consolidate, refit_kind
from swm_hub.stages.merge.windows import (
    SearchContext,
    SearchResult,
    WindowSearch,
    most_removable,
    reference_outputs,
)

logger = logging.getLogger(__name__)

REPORT_METRIC = "linear_cka"
TraceUser = Callable[[Sequence[BatchTrace], MergePlan], None]
"""Given the calibration traces a merge ran on and its plan, while the traces exist (see ``merge_into``)."""
REPORT_TOKENS = 1024


@dataclass(frozen=True)
class MergeResult:
    """What the merge stage wrote, with the counts a card or a summary needs."""

    output_dir: Path
    plan: MergePlan
    params_before: int
    params_after: int


def layers_to_remove(options: MergeOptions, num_layers: int) -> int | None:
    """How many layers the target asks to remove, or None when a threshold decides (checked before any work)."""
    if options.target_layers is not None:
        requested, removed = f"--target-layers {options.target_layers}", num_layers - options.target_layers
    elif options.ratio is not None:
        requested, removed = f"--ratio {options.ratio}", round(num_layers * options.ratio)
    else:
        return None
    most = most_removable(num_layers)
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
        layers=loaded.layers,
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
        calibration=calibration_record(options.calibration.source, options.calibration),
        trials=result.trials,
    )


def merged_state_dict(
    loaded: LoadedModel,
    spec: ArchitectureSpec,
    plan: MergePlan,
    traces: Sequence[BatchTrace],
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The original state dict with each window's lowest layer replaced by its consolidation, renumbered."""
    model = loaded.model
    layers: list[nn.Module] = list(decoder_layers(model, spec))
    state = dict(model.state_dict())
    rule = MERGE_RULES[plan.merge]
    for low, high in plan.windows:
        layer = consolidate(layers, spec, traces, low, high, rule, plan.ridge, progress)
        for name, tensor in layer.state_dict().items():
            state[f"{spec.layers_path}.{low}.{name}"] = tensor
    return state_dict_for(kept_layers(plan.num_layers, plan.windows), state, spec.layers_path)


def build_merged_model(
    loaded: LoadedModel,
    plan: MergePlan,
    traces: Sequence[BatchTrace],
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> PreTrainedModel:
    """The merged model in memory, built from its state dict and rewritten config as a fresh load would be.

    With ``dtype``, its floating tensors are cast to it (copies; the loaded model is left as it is).
    """
    model = loaded.model
    spec = spec_for_config(model.config)
    config = rewrite_config(model.config.to_dict(), kept_layers(plan.num_layers, plan.windows))
    state = merged_state_dict(loaded, spec, plan, traces, progress)
    if dtype is not None:
        state = {name: cast_floating(tensor, dtype) for name, tensor in state.items()}
    merged = build_model(config, state)
    merged.generation_config = model.generation_config
    merged.train(False)
    return merged


def write_merged(
    loaded: LoadedModel,
    plan: MergePlan,
    traces: Sequence[BatchTrace],
    folder: Path,
    report: SimilarityReport | None = None,
    progress: bool = False,
    reload: bool = True,
) -> MergeResult:
    """Write the merged model, its tokenizer, generation config and plan into ``folder``, and check them.

    ``folder`` is the temporary folder of ``output_folder``. A model in memory is saved whole and reloaded
    as a check (unless ``reload`` is False: the caller pulls the folder next, see ``pull_written``); a
    streamed one is written layer by layer and checked against its config from the safetensors headers, so
    that neither step holds the whole model. A non-finite tensor is refused before it is written.
    """
    extra_files = {PLAN_FILE: plan.to_json()}
    if isinstance(loaded.streamed, StreamedLayers):
        params_after = _save_streamed(loaded, loaded.streamed, plan, traces, folder, extra_files, progress)
    else:
        params_after = _save_whole(loaded, plan, traces, folder, extra_files, progress, reload)
    if report is not None:
        report.save(folder)
    return MergeResult(
        output_dir=folder,
        plan=plan,
        params_before=sum(p.numel() for p in loaded.model.parameters()),
        params_after=params_after,
    )


def refuse_non_finite(name: str, tensor: torch.Tensor, plan: MergePlan) -> None:
    """A NaN or infinity in a written tensor makes the model useless, however well it loads."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidMergeError(
            f"the merged tensor {name} holds NaN or infinite values (windows {plan.windows}, rule "
            f"{plan.merge}, ridge {plan.ridge}): nothing was written; try another --merge rule or a larger --ridge"
        )


def _refuse_non_finite_state(state: Mapping[str, torch.Tensor], plan: MergePlan) -> None:
    for name, tensor in state.items():
        refuse_non_finite(name, tensor, plan)


def _save_whole(
    loaded: LoadedModel,
    plan: MergePlan,
    traces: Sequence[BatchTrace],
    folder: Path,
    extra: dict[str, str],
    progress: bool,
    reload: bool,
) -> int:
    merged = build_merged_model(loaded, plan, traces, loaded.save_dtype, progress)
    _refuse_non_finite_state(merged.state_dict(), plan)
    save_model_folder(merged, loaded.tokenizer, folder, extra_files=extra)
    if reload:
        verify_folder_loads(folder, plan.layers_after)
    return sum(p.numel() for p in merged.parameters())


def _save_streamed(
    loaded: LoadedModel,
    layers: StreamedLayers,
    plan: MergePlan,
    traces: Sequence[BatchTrace],
    folder: Path,
    extra: dict[str, str],
    progress: bool,
) -> int:
    """Write the merged model tensor by tensor, building each kept or consolidated layer only when its turn comes.

    The merged model exists only as a skeleton on the meta device, built from the rewritten config: it
    names the tensors and gives their shapes.
    """
    config = rewrite_config(loaded.model.config.to_dict(), kept_layers(plan.num_layers, plan.windows))
    dtype = loaded.save_dtype
    config["dtype"] = str(dtype).removeprefix("torch.")
    skeleton = build_skeleton(config, dtype)
    skeleton.generation_config = loaded.model.generation_config
    state = skeleton.state_dict()
    prefix = f"{spec_for_config(skeleton.config).layers_path}."
    # Layers first: the embeddings and head were read lazily from the shards and have barely been touched,
    # so writing them last keeps them out of memory while the layers are consolidated.
    names = sorted(untied_state_keys(skeleton), key=lambda name: not name.startswith(prefix))
    specs = [TensorSpec(name, tuple(state[name].shape), state[name].dtype) for name in names]
    tensors = tqdm(
        _merged_tensors(loaded, layers, plan, traces, specs, progress),
        desc="writing",
        total=len(specs),
        unit="tensor",
        disable=not progress,
        leave=False,
    )
    save_streamed_folder(folder, skeleton, specs, tensors, loaded.tokenizer, extra_files=extra)
    verify_folder_headers(folder, plan.layers_after)
    return sum(p.numel() for p in skeleton.parameters())


def _merged_tensors(
    loaded: LoadedModel,
    layers: StreamedLayers,
    plan: MergePlan,
    traces: Sequence[BatchTrace],
    specs: Sequence[TensorSpec],
    progress: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's tensors as ``specs`` name and type them, one layer in memory at a time."""
    spec = spec_for_config(loaded.model.config)
    outer = loaded.model.state_dict()
    kept = kept_layers(plan.num_layers, plan.windows)
    window_top = dict(plan.windows)
    rule = MERGE_RULES[plan.merge]
    prefix = f"{spec.layers_path}."
    position = -1
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype in ((planned.name, planned.dtype) for planned in specs):
        if not name.startswith(prefix):
            yield name, outer[name].to(dtype)
            continue
        number, _, rest = name[len(prefix) :].partition(".")
        if int(number) != position:
            position = int(number)
            low = kept[position]
            tensors = {}  # drop the previous layer before building the next
            layer = (
                consolidate(layers, spec, traces, low, window_top[low], rule, plan.ridge, progress)
                if low in window_top
                else layers[low]
            )
            tensors = layer.state_dict()
            del layer
        tensor = tensors[rest].to(dtype)
        refuse_non_finite(name, tensor, plan)
        yield name, tensor


def calibration_of(plan: MergePlan | None, options: MergeOptions) -> CalibrationOptions:
    """The calibration to run: the options' own, or the one a saved plan records, so a refit is reproduced."""
    if plan is None:
        return options.calibration
    return CalibrationOptions.recorded(plan.calibration, options.calibration.batch_size)


def merge(
    loaded: LoadedModel,
    out: Path,
    options: MergeOptions,
    plan: MergePlan | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeResult:
    """Compress ``loaded`` into ``out``: search (unless a plan is given), consolidate, write, verify, move.

    Everything is written into a temporary folder beside ``out`` that replaces it only once it has passed
    its checks (see ``checkpoint.output_folder``).
    """
    check_merge_inputs(loaded, options, plan)
    with output_folder(out, overwrite, protected=[loaded.source.path]) as temp:
        result = merge_into(loaded, temp, options, plan, progress)
    return replace(result, output_dir=Path(out))


def check_merge_inputs(loaded: LoadedModel, options: MergeOptions, plan: MergePlan | None) -> None:
    """What can be refused before calibrating: a plan or a target that does not fit, an offloaded model."""
    num_layers = len(loaded.layers)
    if plan is not None:
        plan.check_fits(loaded.model.config.model_type, num_layers)
        kept_layers(num_layers, plan.windows)
    else:
        layers_to_remove(options, num_layers)
    if plan is None or MERGE_RULES[plan.merge].refit:
        check_block_length(loaded.config, calibration_of(plan, options).seq_len)
    _refuse_offloaded(loaded)


def merge_into(
    loaded: LoadedModel,
    folder: Path,
    options: MergeOptions,
    plan: MergePlan | None = None,
    progress: bool = False,
    with_traces: TraceUser | None = None,
    reload: bool = True,
) -> MergeResult:
    """Search (unless a plan is given), consolidate, and write the checked result into ``folder``.

    ``folder`` is a temporary folder the caller moves into place. A saved plan skips the search; its ``fit``
    rule still runs one calibration pass, because the refit is computed from calibration activations (the
    other rules need none). ``with_traces`` gets those traces and the plan while they exist, so that the
    pipeline can derive more from them (the drop baselines' layers) without tracing the model again.
    ``reload=False`` leaves the reload check of a whole model to a caller that pulls the folder next.
    """
    check_merge_inputs(loaded, options, plan)
    batches: list[torch.Tensor] = []
    if plan is None or MERGE_RULES[plan.merge].refit:
        batches = calibration_batches(loaded.tokenizer, calibration_of(plan, options))
    with execution_of(loaded).traces(batches, progress) as traces:
        if plan is None:
            plan = plan_merge(loaded, traces, options, progress)
            _refuse_missed_target(plan, options)
        warn_past_measured_wins(plan)
        logger.debug("merging windows %s (%d layers removed)", plan.windows, plan.removed)
        report = _similarity_report(loaded, traces, plan) if traces else None
        if with_traces is not None and traces:
            with_traces(traces, plan)
        return write_merged(loaded, plan, traces, folder, report, progress, reload)


def _refuse_missed_target(plan: MergePlan, options: MergeOptions) -> None:
    """The search promises exactly the asked count; a shortfall (non-finite scores, say) must not pass as done."""
    wanted = layers_to_remove(options, plan.num_layers)
    if wanted is not None and plan.removed != wanted:
        raise InvalidMergeError(
            f"the search removed {plan.removed} layers (windows {plan.windows}) instead of the {wanted} asked "
            "for: the similarity scores could not reach the target; nothing was written"
        )


def warn_past_measured_wins(plan: MergePlan) -> None:
    """A cut where the method measured a loss to dropping, or deeper than any it was measured at: say so."""
    preset = METHODS.get(plan.method)
    if preset is None or plan.merge != preset.merge:
        return
    kind = refit_kind(spec_for(plan.model_type))
    measured = preset.measured.get(kind)
    advice = "check this model with --eval against the drop baselines, or remove fewer layers"
    if measured is None:
        logger.warning(
            "warning: %s with a %s refit (the one %s gets) was not measured against plain layer dropping "
            "(README, Quality); %s",
            plan.method,
            kind,
            plan.model_type,
            advice,
        )
        return
    fraction = plan.removed / plan.num_layers
    if fraction > measured.deepest_win + 1e-9:
        logger.warning(
            "warning: %d of %d layers removed is past the deepest cut (%.0f%% of the layers) at which %s "
            "measured better than plain layer dropping on every kind of held-out text (%s; README, Quality); %s",
            plan.removed,
            plan.num_layers,
            100 * measured.deepest_win,
            plan.method,
            measured.model,
            advice,
        )
    for low, high, lost in measured.losses:
        if low < fraction < high:
            logger.warning(
                "warning: %s %s (%s; README, Quality); %s", plan.method, lost, measured.model, advice
            )


def _refuse_offloaded(loaded: LoadedModel) -> None:
    """A merge saves the weights, which accelerate keeps out of reach once it offloaded them; say so up front."""
    offloaded = execution_of(loaded).offloaded_modules()
    if offloaded:
        raise InvalidOptionError(
            f"the model does not fit in the GPUs' memory: accelerate offloaded {len(offloaded)} module(s) "
            f"({', '.join(offloaded[:3])}{', ...' if len(offloaded) > 3 else ''}) to the CPU or disk, where a "
            "merge cannot read their weights; use --execution layerwise, which needs one layer on the GPU at a time"
        )


def _similarity_report(
    loaded: LoadedModel, traces: Sequence[BatchTrace], plan: MergePlan
) -> SimilarityReport:
    """The analysis of the traces the merge ran on anyway, saved beside the model for its card."""
    return analyze_traces(traces, REPORT_METRIC, REPORT_TOKENS, loaded.source.display_name, plan.calibration)

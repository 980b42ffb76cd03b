"""The model card: a README.md for a compressed folder, filled only from the results saved in that folder.

``build_context`` reads what the stages wrote (``swm_plan.json`` always; ``similarity.json`` and
``similarity.png``, ``eval.json``, ``bench.json`` and ``onnx/`` when those stages ran), the weights' own
headers (``ParamCounts``) and the base model's licence (``core.license``) into one typed ``CardContext``;
each result is read by its type in ``swm_hub.results``, so the card only composes sections from objects. A
section whose results were not measured is ``None`` in the context and absent from the card: nothing is
estimated or filled in. ``render_context`` renders the packaged Jinja template with ``StrictUndefined``, so
a value the template needs and the context lacks fails instead of rendering blank, and puts the Hub
metadata (``ModelCardData``) on top.

The Hub reads ``base_model_relation`` from the metadata, and accepts only ``adapter``, ``merge``,
``quantized`` and ``finetune`` (huggingface/hub-docs ``docs/hub/model-cards.md``, "Specifying a base
model"; huggingface_hub 0.36 passes the key through without checking it). A merged-depth model is one base
model's weights, changed (the ``fit`` rule even refits them on data): that is ``finetune``. ``merge`` would
file it among merges of several models, and leaving the key out lets the Hub guess, which it does from the
files (ONNX files have made it guess ``quantized``). The pruning itself is said by the ``pruned`` tag.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from swm_hub.core.atomic import write_text_atomically
from swm_hub.core.errors import ResultFileError, ResultFileVersionError
from swm_hub.core.files import BENCH_FILE, CARD_FILE, EVAL_FILE, ONNX_FOLDER, SIMILARITY_JSON, SIMILARITY_PNG
from swm_hub.core.license import LicenseInfo, base_license
from swm_hub.core.merge_rules import MERGE_RULES, PAPER_URL
from swm_hub.core.options import METHODS, MergeOptions
from swm_hub.core.packaged_models import DEMO_NAMES
from swm_hub.core.texts import TextSource
from swm_hub.results.bench import BenchFile, Measure, SavedBench, Stat
from swm_hub.results.evaluation import EvalReport, ratios_to_best_drop
from swm_hub.results.heal import HealInfo, heal_info
from swm_hub.results.plan import PLAN_FILE, MergePlan, default_repo_name
from swm_hub.results.similarity import SimilarityReport
from swm_hub.results.weights import ParamCounts

__all__ = [
    "BASE_MODEL_RELATION",
    "CARD_FILE",
    "CARD_TAGS",
    "CITATION",
    "BaseInfo",
    "CardContext",
    "HeatmapInfo",
    "LatencyTable",
    "MethodInfo",
    "PerplexityInfo",
    "PerplexityLine",
    "WindowRow",
    "build_context",
    "card_metadata",
    "render_card",
    "render_context",
    "render_template",
    "reproduce_command",
    "write_card",
]

logger = logging.getLogger(__name__)

TEMPLATE_NAME: str = "model_card.md.j2"

BASE_MODEL_RELATION: str = "finetune"
"""The Hub's relation for one base model's weights, changed; see the module docstring."""
CARD_TAGS: tuple[str, ...] = ("swm", "pruned", "sliding-window-merging", "layer-merging")
HUB_URL: str = "https://huggingface.co"

PAPER_TITLE: str = "Sliding-Window Merging for Compacting Patch-Redundant Layers in LLMs"
CITATION: str = """\
@misc{ding2025slidingwindowmerging,
  title         = {Sliding-Window Merging for Compacting Patch-Redundant Layers in {LLMs}},
  author        = {Ding, Xuan and Sun, Rui and Zhang, Yunjian and Yan, Xiu and Zhou, Yueqi and Huang, Kaihao
                   and Fu, Suzhong and Aviles-Rivero, Angelica I. and Xie, Chuanlong and Zhu, Yao},
  year          = {2025},
  eprint        = {2502.19159},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2502.19159}
}"""

# How the latency table names the measures of swm_hub.stages.bench; other keys are shown by their own name.
LATENCY_LABELS: Mapping[str, str] = {
    "prefill_ms": "prefill (ms)",
    "decode_ms_per_token": "decode (ms/token)",
    "end_to_end_ms": "end to end (ms)",
    "end_to_end_cpu_ms": "end-to-end CPU time (ms)",
    "tokens_per_s": "tokens/s",
    "peak_memory_mb": "peak memory (MB)",
    "weights_mb": "weights (MB)",
}


# --- the context -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseInfo:
    """The model that was compressed: how to name it, and its Hub id when it has one."""

    label: str
    hub_id: str | None
    revision: str | None
    url: str | None


@dataclass(frozen=True)
class MethodInfo:
    """The method preset, the consolidation rule and the threshold the search settled on."""

    name: str
    summary: str | None
    merge: str
    merge_summary: str | None
    merge_reference: str | None
    score: str
    threshold: float | None
    target: str


@dataclass(frozen=True)
class WindowRow:
    """One merged window: original layers ``first..last`` (inclusive) became layer ``new_index``."""

    first: int
    last: int
    size: int
    new_index: int
    similarity: float | None


@dataclass(frozen=True)
class HeatmapInfo:
    """The heatmap image and, when similarity.json is there, what it measured."""

    image: str
    metric: str | None
    tokens: int | None
    text: str | None


@dataclass(frozen=True)
class PerplexityLine:
    """One row of the perplexity table; ``vs_base`` is the change against the base model, in percent."""

    name: str
    layers: int
    perplexity: float
    vs_base: float | None
    dropped: str
    is_drop_baseline: bool
    by_kind: list[float]


@dataclass(frozen=True)
class PerplexityInfo:
    """eval.json: held-out perplexity of the base, this model and the plain layer-dropping baselines."""

    text: str
    blocks: int
    seq_len: int
    rows: list[PerplexityLine]
    merged: PerplexityLine | None
    drop_baselines: list[PerplexityLine]
    kinds: list[str]
    worst_kind: str | None
    worst_ratio: float | None


@dataclass(frozen=True)
class LatencyTable:
    """One latency measurement: a column per model, a row per measure, as bench.json holds them."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    summary: str | None


@dataclass(frozen=True)
class CardContext:
    """Everything the template shows; optional sections are None when their results were not measured."""

    model_name: str
    load_id: str
    repo_id: str | None
    base: BaseInfo
    model_type: str
    layers_before: int
    layers_after: int
    removed: int
    params: ParamCounts | None
    method: MethodInfo
    calibration: str
    windows: list[WindowRow]
    heatmap: HeatmapInfo | None
    perplexity: PerplexityInfo | None
    latency: list[LatencyTable] | None
    onnx_folder: str | None
    reproduce: str
    reproduce_plan: str
    license: LicenseInfo
    tags: list[str]
    paper_url: str
    paper_title: str
    citation: str
    swm_hub_version: str
    heal: HealInfo | None = None
    """The heal record of the plan (and heal.json's comparison); None for a model that was not healed."""

    def for_repo(self, repo_id: str) -> CardContext:
        """The same card naming the Hub repository ``repo_id`` (title and loading code)."""
        return replace(self, repo_id=repo_id, load_id=repo_id, model_name=repo_id.split("/")[-1])


# --- public entry points -----------------------------------------------------------------------------------


def render_card(folder: Path, repo_id: str | None = None) -> str:
    """The README.md text for a compressed folder (``repo_id``: the Hub id the loading code should name).

    Raises:
        UnknownModelError: the folder has no swm_plan.json.
        PlanMismatchError: swm_plan.json cannot be parsed.
        ResultFileError: similarity.json or eval.json exists but cannot be read (an unreadable bench.json
            only leaves the latency section out).
        ResultFileVersionError: a result file was written by a newer swm-hub.
        jinja2.UndefinedError: the template needs a value the context lacks (a bug, not a user error).
    """
    return render_context(build_context(Path(folder), repo_id))


def write_card(folder: Path, repo_id: str | None = None, name: str | None = None) -> Path:
    """Write README.md into ``folder`` atomically (a temporary file beside it, then ``os.replace``).

    ``name`` is the folder's name once it is in place, for a card written into ``compress``'s temporary
    folder (whose own name would otherwise appear in the loading and reproducing commands).
    """
    folder = Path(folder)
    content = render_context(build_context(folder, repo_id, name))
    target = write_text_atomically(folder / CARD_FILE, content)
    logger.debug("wrote %s", target)  # the commands say where the folder (or card) went
    return target


def render_context(context: CardContext) -> str:
    """Metadata block plus the rendered template, checked by parsing it back with ``ModelCard``."""
    values = {item.name: getattr(context, item.name) for item in fields(context)}
    values["metadata"] = card_metadata(context).to_yaml()
    content = render_template(values)
    ModelCard(content, ignore_metadata_errors=False)  # raises if the YAML block does not parse
    return content


def render_template(values: Mapping[str, Any]) -> str:
    """Render the packaged template; a name it uses that ``values`` lacks raises ``jinja2.UndefinedError``."""
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML; table cells are escaped by the ``cell`` filter
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["cell"] = _cell
    environment.filters["count"] = _count
    template_text = resources.files(__name__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    return environment.from_string(template_text).render(**values)


def card_metadata(context: CardContext) -> ModelCardData:
    """The YAML metadata the Hub reads: base model and relation, library, task, tags and licence."""
    extra: dict[str, Any] = {}
    if context.base.hub_id is not None:
        extra["base_model"] = context.base.hub_id
        extra["base_model_relation"] = BASE_MODEL_RELATION
    return ModelCardData(
        license=context.license.license,
        license_name=context.license.name,
        license_link=context.license.link,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(context.tags),
        **extra,
    )


# --- building the context ----------------------------------------------------------------------------------


def build_context(folder: Path, repo_id: str | None = None, name: str | None = None) -> CardContext:
    """Read every result file in ``folder`` into a ``CardContext`` (see ``render_card`` for errors).

    ``name`` stands for ``folder.name`` in the commands the card shows (see ``write_card``).
    """
    folder = Path(folder)
    name = name or folder.name
    plan = MergePlan.in_folder(folder)
    onnx = folder / ONNX_FOLDER
    has_onnx = onnx.is_dir() and any(onnx.glob("*.onnx"))
    context = CardContext(
        model_name=default_repo_name(plan),
        load_id=name,
        repo_id=None,
        base=_base_info(plan),
        model_type=plan.model_type,
        layers_before=plan.num_layers,
        layers_after=plan.layers_after,
        removed=plan.removed,
        params=ParamCounts.in_folder(folder, plan),
        method=_method_info(plan),
        calibration=_calibration_text(plan.calibration),
        windows=_window_rows(plan),
        heatmap=_heatmap(folder),
        perplexity=_perplexity(folder, plan),
        latency=_latency(folder),
        heal=heal_info(folder, plan),
        onnx_folder=ONNX_FOLDER if has_onnx else None,
        reproduce=reproduce_command(plan, name),
        reproduce_plan=reproduce_command(plan, name, with_plan=True),
        license=base_license(plan.model, plan.base_model, plan.revision),
        tags=[*CARD_TAGS, plan.model_type, *(["onnx"] if has_onnx else [])],
        paper_url=PAPER_URL,
        paper_title=PAPER_TITLE,
        citation=CITATION,
        swm_hub_version=plan.swm_hub_version,
    )
    return context if repo_id is None else context.for_repo(repo_id)


def _base_info(plan: MergePlan) -> BaseInfo:
    hub_id = plan.base_model
    label = hub_id or _public_name(plan.model)
    url = f"{HUB_URL}/{hub_id}" if hub_id else None
    return BaseInfo(label=label, hub_id=hub_id, revision=plan.revision, url=url)


def _public_name(model: str) -> str:
    """A local path is named by its last component: a card is public, the user's folders are not."""
    if model in DEMO_NAMES or not _is_local_path(model):
        return model
    return Path(model).name


def _is_local_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or Path(text).expanduser().exists()


def _method_info(plan: MergePlan) -> MethodInfo:
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


def _described_text(label: str) -> str:
    """A text as a reader of the card knows it: the shipped corpus by its kinds, a user's file by its name."""
    source = TextSource.from_label(label)
    if source.path is not None:
        return f"`{_public_name(label)}`"
    split = "held-out" if source.split == "heldout" else source.split
    evenly = ", sampled evenly" if len(source.kinds) > 1 else ""
    return f"the {split} split of swm-hub's shipped corpus ({', '.join(source.kinds)}{evenly})"


def _calibration_text(calibration: Mapping[str, Any]) -> str:
    label = _described_text(str(calibration.get("text", "?")))
    samples, seq_len = calibration.get("samples"), calibration.get("seq_len")
    tokens = calibration.get("tokens")
    if samples is None or seq_len is None:
        return label
    total = f", {tokens:,} tokens" if isinstance(tokens, int) else ""
    return f"{samples} blocks of {seq_len} tokens{total} from {label}"


def _window_rows(plan: MergePlan) -> list[WindowRow]:
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


def reproduce_command(plan: MergePlan, out_name: str, with_plan: bool = False) -> str:
    """The ``swm-hub compress`` command that searches again, or (``with_plan``) applies this plan."""
    model = _public_name(plan.model)
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
        options += ["--calib", _public_name(str(label))]
    elif source != TextSource():
        options += ["--calib-kinds", ",".join(source.kinds)]
    for key, option in (("samples", "--samples"), ("seq_len", "--seq-len")):
        if calibration.get(key) is not None:
            options += [option, str(calibration[key])]
    return options


# --- result files ------------------------------------------------------------------------------------------


def _heatmap(folder: Path) -> HeatmapInfo | None:
    """The heatmap when the PNG is there; what it measured when similarity.json is there too."""
    if not (folder / SIMILARITY_PNG).is_file():
        return None
    if not (folder / SIMILARITY_JSON).is_file():
        return HeatmapInfo(image=SIMILARITY_PNG, metric=None, tokens=None, text=None)
    report = SimilarityReport.load(folder)
    tokens = report.calibration.get("tokens")
    return HeatmapInfo(
        image=SIMILARITY_PNG,
        metric=report.metric,
        tokens=tokens if isinstance(tokens, int) else None,
        text=_calibration_text(report.calibration) if "text" in report.calibration else None,
    )


def _perplexity(folder: Path, plan: MergePlan) -> PerplexityInfo | None:
    """eval.json's rows; the first is the base model's when it has all the layers and drops none."""
    if not (folder / EVAL_FILE).is_file():
        return None
    report = EvalReport.load(folder)
    first = report.rows[0]
    same_kinds = all(row.by_kind.keys() == first.by_kind.keys() for row in report.rows)
    kinds = report.kinds if same_kinds else []
    base = first.perplexity if first.layers == plan.num_layers and not first.dropped else None
    lines = [
        PerplexityLine(
            name=row.name,
            layers=row.layers,
            perplexity=row.perplexity,
            vs_base=None if base is None or index == 0 else 100.0 * (row.perplexity / base - 1.0),
            dropped=", ".join(map(str, row.dropped)),
            is_drop_baseline=bool(row.dropped),
            by_kind=[row.by_kind[kind] for kind in kinds],
        )
        for index, row in enumerate(report.rows)
    ]
    merged = next(
        (line for line in lines if line.layers == plan.layers_after and not line.is_drop_baseline), None
    )
    drops = [line for line in lines if line.is_drop_baseline]
    worst = _worst_kind(merged, drops, kinds)
    return PerplexityInfo(
        text=_described_text(report.text),
        blocks=report.blocks,
        seq_len=report.seq_len,
        rows=lines,
        merged=merged,
        drop_baselines=drops,
        kinds=kinds,
        worst_kind=worst[0] if worst else None,
        worst_ratio=worst[1] if worst else None,
    )


def _worst_kind(
    merged: PerplexityLine | None, drops: Sequence[PerplexityLine], kinds: Sequence[str]
) -> tuple[str, float] | None:
    """The kind of text on which this model fares worst against the best drop baseline, and that ratio."""
    if merged is None or not drops or not kinds:
        return None
    ratios = ratios_to_best_drop(
        dict(zip(kinds, merged.by_kind, strict=True)),
        [dict(zip(kinds, d.by_kind, strict=True)) for d in drops],
    )
    worst = max(ratios, key=ratios.__getitem__)
    return worst, ratios[worst]


def _latency(folder: Path) -> list[LatencyTable] | None:
    """One table per report of bench.json; a file the card cannot use leaves the section out, with a warning.

    Latency is measured on another machine than the one that writes the card, often by hand, so an odd
    bench.json is not worth failing the card over; one written by a newer swm-hub is, as for every file.
    """
    if not (folder / BENCH_FILE).is_file():
        return None
    try:
        saved = BenchFile.load(folder)
    except ResultFileVersionError:
        raise
    except ResultFileError as exc:
        logger.warning("%s: the card has no latency section", exc)
        return None
    return [_latency_table(report) for report in saved.reports]


def _latency_table(report: SavedBench) -> LatencyTable:
    """A column per model, a row per measure any of them has, in the order the file first names them."""
    columns = [
        f"{_public_name(model.name)} ({model.layers} layers)"
        if model.layers is not None
        else _public_name(model.name)
        for model in report.models
    ]
    measures = dict.fromkeys(key for model in report.models for key in model.measures)
    rows = [
        [LATENCY_LABELS.get(key, key.replace("_", " "))]
        + [_measure_text(model.measures[key]) if key in model.measures else "–" for model in report.models]
        for key in measures
    ]
    return LatencyTable(title=_latency_title(report), columns=columns, rows=rows, summary=_speedup(report))


def _measure_text(measure: Measure) -> str:
    if isinstance(measure, Stat):
        return f"{_number(measure.median)} [{_number(measure.min)}–{_number(measure.max)}]"
    return _number(measure)


def _number(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _latency_title(report: SavedBench) -> str:
    parts = []
    if report.backend or report.device:
        parts.append(" on ".join(part for part in (report.backend, report.device) if part))
    if report.dtype:
        parts.append(report.dtype + (", compiled static cache" if report.compiled else ""))
    if report.prompt_tokens is not None and report.new_tokens is not None:
        parts.append(f"{report.prompt_tokens}-token prompt, {report.new_tokens} new tokens")
    if report.runs is not None:
        parts.append(f"median [min–max] of {report.runs} runs")
    return ", ".join(parts) or "latency"


def _speedup(report: SavedBench) -> str | None:
    measured, ideal = report.measured_speedup, report.ideal_speedup
    if measured is not None and ideal is not None:
        return f"measured end-to-end speedup {measured:.2f}x; ideal (layers before / after) {ideal:.2f}x"
    return None


# --- template filters --------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _count(value: int) -> str:
    """A parameter count with thousands separators."""
    return f"{value:,}"

"""The sections a card has when their stages ran: the heatmap, the perplexity table and the latency tables.

Each is composed from the result object its stage saved (``SimilarityReport``, ``EvalReport``,
``BenchFile``), and is None when that file is not in the folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from swm_hub.core.errors import ResultFileError, ResultFileVersionError
from swm_hub.core.files import BENCH_FILE, EVAL_FILE, SIMILARITY_JSON, SIMILARITY_PNG
from swm_hub.results.bench import BenchFile, Measure, SavedBench, Stat
from swm_hub.results.evaluation import EvalReport, ratios_to_best_drop
from swm_hub.results.plan import MergePlan
from swm_hub.results.similarity import SimilarityReport
from swm_hub.stages.card.context import HeatmapInfo, LatencyTable, PerplexityInfo, PerplexityLine
from swm_hub.stages.card.public_text import calibration_text, described_text, public_name

logger = logging.getLogger(__name__)

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


def heatmap_info(folder: Path) -> HeatmapInfo | None:
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
        text=calibration_text(report.calibration) if "text" in report.calibration else None,
    )


def perplexity_info(folder: Path, plan: MergePlan) -> PerplexityInfo | None:
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
        text=described_text(report.text),
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


def latency_tables(folder: Path) -> list[LatencyTable] | None:
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
        f"{public_name(model.name)} ({model.layers} layers)"
        if model.layers is not None
        else public_name(model.name)
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

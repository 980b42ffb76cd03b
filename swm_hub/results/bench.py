"""The bench report: the latency of a model (and of its original beside it), its tables, and ``bench.json``.

``BenchReport`` is what the bench stage measured; ``save`` and ``save_json`` write it with a
``schema_version``. ``BenchFile.load`` reads a bench.json back for the model card in every shape the file has
had: one report (``swm-hub bench --json``), a list of them, or ``{"reports": [...]}`` (the printout of
benchmarks/latency.py); a report whose models are a list of ``rows`` with their measures under ``metrics``;
a measure that is a number or ``{"median", "min", "max"}``. What does not fit is left out, never guessed.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swm_hub.core.errors import ResultFileError
from swm_hub.core.files import BENCH_FILE
from swm_hub.results.schema import SCHEMA_KEY, check_schema, read_result, result_path

SCHEMA_VERSION: int = 1
"""1: ``BenchReport.to_dict``; the release before wrote the same fields without a version."""

_NOT_MEASURES: frozenset[str] = frozenset({"name", "layers", "runs_end_to_end_ms", "metrics"})
"""Keys of a model's entry that are not a measure to show (the per-run times are the runs behind a Stat)."""


@dataclass(frozen=True)
class Stat:
    """Median, minimum and maximum of one measure over the timed runs."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """Summarize the per-run values of a measure."""
        return cls(median=float(statistics.median(values)), min=float(min(values)), max=float(max(values)))

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max}


@dataclass(frozen=True)
class ModelBench:
    """The measures of one model.

    Attributes:
        name: the model as given (a name, a folder or an ONNX export folder).
        layers: its number of decoder layers.
        weights_mb: the size of its weights in memory (torch) or on disk (ONNX files).
        per_token_weights_mb: the weights one decoding step reads: the layers and the LM head, without an
            input embedding that is only gathered (one row per token); None where the backend cannot tell.
        prefill_ms: one forward pass over the prompt, to the first token's logits.
        decode_ms_per_token: ``(end_to_end - prefill) / (new_tokens - 1)``.
        end_to_end_ms: ``generate`` from the prompt to the last new token.
        tokens_per_s: new tokens over the end-to-end time.
        peak_memory_mb: weights plus the run's peak working memory (see the module docstring).
        end_to_end_cpu_ms: the process's CPU time (all threads, user and system) over the end-to-end run.
            On a CPU shared with other work it does not count the time the run waited for a core, so its
            ratio estimates the speedup better than wall time there; on CUDA it is host time only.
        runs_end_to_end_ms: the end-to-end time of each timed run, in order.
    """

    name: str
    layers: int
    weights_mb: float
    per_token_weights_mb: float | None
    prefill_ms: Stat
    decode_ms_per_token: Stat
    end_to_end_ms: Stat
    tokens_per_s: Stat
    peak_memory_mb: Stat
    end_to_end_cpu_ms: Stat
    runs_end_to_end_ms: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": self.layers,
            "weights_mb": self.weights_mb,
            "per_token_weights_mb": self.per_token_weights_mb,
            "prefill_ms": self.prefill_ms.to_dict(),
            "decode_ms_per_token": self.decode_ms_per_token.to_dict(),
            "end_to_end_ms": self.end_to_end_ms.to_dict(),
            "tokens_per_s": self.tokens_per_s.to_dict(),
            "peak_memory_mb": self.peak_memory_mb.to_dict(),
            "end_to_end_cpu_ms": self.end_to_end_cpu_ms.to_dict(),
            "runs_end_to_end_ms": list(self.runs_end_to_end_ms),
        }


# (label, field, whether larger is better) of each table row.
_ROWS: tuple[tuple[str, str, bool], ...] = (
    ("prefill (ms)", "prefill_ms", False),
    ("decode (ms/token)", "decode_ms_per_token", False),
    ("end-to-end {p}/{n} (ms)", "end_to_end_ms", False),
    ("tokens/s", "tokens_per_s", True),
    ("peak memory (MB)", "peak_memory_mb", False),
    ("end-to-end CPU time (ms)", "end_to_end_cpu_ms", False),
)


@dataclass(frozen=True)
class BenchReport:
    """A benchmark's settings, the model's measures, and the baseline's with the speedups when given.

    ``speedup`` maps each measure to baseline over model (model over baseline for tokens/s), so above 1 is
    better for every entry; ``measured_speedup`` is the end-to-end one, and ``ideal_speedup`` is the
    baseline's layers over the model's. ``weight_ratio`` is the baseline's per-token weights over the
    model's: what a decode bound by reading weights gains, since the LM head does not shrink.
    """

    backend: str
    device: str
    dtype: str
    compiled: bool
    prompt_tokens: int
    new_tokens: int
    runs: int
    warmup: int
    memory_method: str
    model: ModelBench
    baseline: ModelBench | None = None
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> dict[str, float] | None:
        if self.baseline is None:
            return None
        return {
            name: _gain(getattr(self.baseline, name).median, getattr(self.model, name).median, higher_better)
            for _, name, higher_better in _ROWS
        }

    @property
    def measured_speedup(self) -> float | None:
        """Baseline end-to-end median over the model's."""
        speedup = self.speedup
        return speedup["end_to_end_ms"] if speedup is not None else None

    @property
    def ideal_speedup(self) -> float | None:
        """Layers before over layers after: what removing layers would buy if nothing else cost time."""
        if self.baseline is None:
            return None
        return self.baseline.layers / self.model.layers

    @property
    def weight_ratio(self) -> float | None:
        """Per-token weights before over after (layers and LM head), where both backends report them."""
        before = self.baseline.per_token_weights_mb if self.baseline is not None else None
        after = self.model.per_token_weights_mb
        return before / after if before and after else None

    @property
    def speedup_efficiency(self) -> float | None:
        """Measured end-to-end speedup as a fraction of the ideal one."""
        measured, ideal = self.measured_speedup, self.ideal_speedup
        return measured / ideal if measured is not None and ideal is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            SCHEMA_KEY: SCHEMA_VERSION,
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "compiled": self.compiled,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "runs": self.runs,
            "warmup": self.warmup,
            "memory_method": self.memory_method,
            "model": self.model.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline is not None else None,
            "speedup": self.speedup,
            "measured_speedup": self.measured_speedup,
            "ideal_speedup": self.ideal_speedup,
            "weight_ratio": self.weight_ratio,
            "speedup_efficiency": self.speedup_efficiency,
            "environment": self.environment,
        }

    def to_json(self) -> str:
        """The report as one line of JSON."""
        return json.dumps(self.to_dict(), sort_keys=False)

    def save(self, folder: Path) -> Path:
        """Write ``bench.json`` into a model folder, where the model card finds it."""
        return self.save_json(Path(folder) / BENCH_FILE)

    def save_json(self, path: Path) -> Path:
        """Write the report as JSON to ``path`` (a file the caller named; its folder is created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def title(self) -> str:
        path = "compiled static cache" if self.compiled else "eager"
        return (
            f"{self.backend} on {self.device} ({self.dtype}, {path}): {self.prompt_tokens}-token prompt, "
            f"{self.new_tokens} new tokens, median [min-max] of {self.runs} runs after {self.warmup} warm-up"
        )

    def rows(self) -> list[list[str]]:
        """Header and body cells of the table: measure, baseline, model, gain."""
        columns = [self.baseline, self.model] if self.baseline is not None else [self.model]
        header = ["measure"] + [f"{bench.name} ({bench.layers} layers)" for bench in columns]
        if self.baseline is not None:
            header.append("gain")
        body = []
        speedup = self.speedup
        for label, name, _ in _ROWS:
            row = [label.format(p=self.prompt_tokens, n=self.new_tokens)]
            row += [_cell(getattr(bench, name)) for bench in columns]
            if speedup is not None:
                row.append(f"{speedup[name]:.2f}x")
            body.append(row)
        return [header, *body]

    def summary(self) -> str | None:
        """The line that compares the measured speedup with the ideal one."""
        if self.baseline is None:
            return None
        line = (
            f"ideal speedup {self.baseline.layers}/{self.model.layers} layers = {self.ideal_speedup:.2f}x; "
            f"measured end-to-end {self.measured_speedup:.2f}x = {self.speedup_efficiency:.2f} of ideal"
        )
        speedup = self.speedup
        if self.device == "cpu" and speedup is not None:
            line += f" (by CPU time {speedup['end_to_end_cpu_ms']:.2f}x)"
        ratio = self.weight_ratio
        if ratio is not None and speedup is not None:
            line += (
                f"; per-token weights (layers + LM head) ratio {ratio:.2f}x: decode "
                f"{speedup['decode_ms_per_token'] / ratio:.2f} and end-to-end {speedup['end_to_end_ms'] / ratio:.2f} of it"
            )
        return line

    def table_lines(self) -> list[str]:
        """A plain-text table (title, header, one line per measure, then the speedup summary)."""
        rows = self.rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [self.title()]
        for index, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
        summary = self.summary()
        if summary is not None:
            lines.append(summary)
        return lines


def _gain(baseline: float, model: float, higher_better: bool) -> float:
    if higher_better:
        return model / baseline if baseline > 0 else float("inf")
    return baseline / model if model > 0 else float("inf")


def _cell(stat: Stat) -> str:
    digits = 1 if stat.median >= 10 else 2
    return f"{stat.median:.{digits}f} [{stat.min:.{digits}f}-{stat.max:.{digits}f}]"


# --- reading bench.json back ---------------------------------------------------------------------------

Measure = Stat | float
"""A measure as a file holds it: median, min and max over the runs, or one number (or a median alone)."""


@dataclass(frozen=True)
class MeasuredModel:
    """One model of a saved report: its name, its layers when recorded, and its measures in file order."""

    name: str
    layers: int | None
    measures: dict[str, Measure]


@dataclass(frozen=True)
class SavedBench:
    """One report of a bench.json as read back; a setting the file does not record is None.

    ``models`` has the baseline first, as the card's columns show them.
    """

    backend: str | None
    device: str | None
    dtype: str | None
    compiled: bool
    prompt_tokens: int | None
    new_tokens: int | None
    runs: int | None
    models: list[MeasuredModel]
    measured_speedup: float | None
    ideal_speedup: float | None


@dataclass(frozen=True)
class BenchFile:
    """The reports of a bench.json that hold at least one model with one measure."""

    reports: list[SavedBench]

    @classmethod
    def load(cls, folder_or_path: Path | str) -> BenchFile:
        """Read bench.json, in any of the shapes of the module docstring, from a model folder or the file.

        Raises:
            ResultFileError: the file cannot be read, is not JSON, or holds no measure that can be shown.
            ResultFileVersionError: a newer swm-hub wrote it (or a report in it).
        """
        path = result_path(folder_or_path, BENCH_FILE)
        data = read_result(path, SCHEMA_VERSION)
        if isinstance(data, dict) and isinstance(data.get("reports"), list):
            raw_reports = data["reports"]
        else:
            raw_reports = data if isinstance(data, list) else [data]
        for raw in raw_reports:
            check_schema(path, raw, SCHEMA_VERSION)
        reports = [report for raw in raw_reports if (report := _saved_bench(raw)) is not None]
        if not reports:
            raise ResultFileError(path, "it holds no latency measures")
        return cls(reports=reports)


def _saved_bench(raw: Any) -> SavedBench | None:
    """A report of the file, or None when it has no model with a measure."""
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("rows"), list):
        entries = [row for row in raw["rows"] if isinstance(row, dict)]
    else:
        entries = [raw[key] for key in ("baseline", "model") if isinstance(raw.get(key), dict)]
    models = [_measured_model(entry) for entry in entries]
    if not models or not any(model.measures for model in models):
        return None
    return SavedBench(
        backend=_text(raw.get("backend")),
        device=_text(raw.get("device")),
        dtype=_text(raw.get("dtype")),
        compiled=bool(raw.get("compiled")),
        prompt_tokens=_whole(raw.get("prompt_tokens")),
        new_tokens=_whole(raw.get("new_tokens")),
        runs=_whole(raw.get("runs")),
        models=models,
        measured_speedup=_number(raw.get("measured_speedup")),
        ideal_speedup=_number(raw.get("ideal_speedup")),
    )


def _measured_model(entry: Mapping[str, Any]) -> MeasuredModel:
    values = entry["metrics"] if isinstance(entry.get("metrics"), dict) else entry
    measures = {
        str(key): measure
        for key, value in values.items()
        if key not in _NOT_MEASURES and (measure := _measure(value)) is not None
    }
    return MeasuredModel(
        name=str(entry.get("name", "?")), layers=_whole(entry.get("layers")), measures=measures
    )


def _measure(value: Any) -> Measure | None:
    if isinstance(value, dict):
        median, low, high = (_number(value.get(key)) for key in ("median", "min", "max"))
        if median is None:
            return None
        return Stat(median=median, min=low, max=high) if low is not None and high is not None else median
    return _number(value)


def _number(value: Any) -> float | None:
    """A number of the file (a bool is not one, though Python counts it as an int)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return str(value) if value else None

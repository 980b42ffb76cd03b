"""The zero-shot report: accuracies from lm-evaluation-harness, one row per task, and ``zeroshot.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from swm_hub.core.atomic import write_text_atomically
from swm_hub.core.errors import ResultFileError
from swm_hub.core.files import ZEROSHOT_FILE
from swm_hub.results.schema import SCHEMA_KEY, read_result, result_path

SCHEMA_VERSION: int = 1
"""1: the fields of ``ZeroShotReport``; the release before wrote the same fields without a version."""


@dataclass(frozen=True)
class TaskScore:
    """One task's zero-shot scores; ``None`` where the task does not report that metric."""

    task: str
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    samples: int | None = None


@dataclass(frozen=True)
class ZeroShotReport:
    """Zero-shot accuracies of one model on a list of tasks, as measured by lm-evaluation-harness."""

    model: str
    tasks: tuple[str, ...]
    limit: int | None
    scores: list[TaskScore]
    harness_version: str = ""

    def to_json(self) -> str:
        return json.dumps({SCHEMA_KEY: SCHEMA_VERSION, **asdict(self)}, indent=2) + "\n"

    def save(self, folder: Path) -> Path:
        """Write ``zeroshot.json`` into a folder through a temporary file, so a reader never sees half."""
        return write_text_atomically(folder / ZEROSHOT_FILE, self.to_json())

    @classmethod
    def load(cls, folder_or_path: Path | str) -> ZeroShotReport:
        """Read ``zeroshot.json`` (this release's or the previous one's) from its folder or the file itself.

        Raises:
            ResultFileError: the file cannot be read or is not a zero-shot report.
            ResultFileVersionError: a newer swm-hub wrote it.
        """
        path = result_path(folder_or_path, ZEROSHOT_FILE)
        data = read_result(path, SCHEMA_VERSION)
        try:
            limit = data["limit"]
            return cls(
                model=str(data["model"]),
                tasks=tuple(str(task) for task in data["tasks"]),
                limit=None if limit is None else int(limit),
                scores=[_score(raw) for raw in data["scores"]],
                harness_version=str(data.get("harness_version", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResultFileError(path, f"not a zero-shot report ({type(exc).__name__}: {exc})") from exc

    def table_lines(self) -> list[str]:
        """A plain table, one row per task, accuracies in percent with their standard errors."""
        limit = f", at most {self.limit} examples per task" if self.limit is not None else ""
        lines = [
            f"zero-shot accuracy of {self.model} (lm-evaluation-harness {self.harness_version}{limit})",
            f"{'task':<20} {'acc':>15} {'acc_norm':>15} {'examples':>9}",
        ]
        for score in self.scores:
            samples = "-" if score.samples is None else str(score.samples)
            lines.append(
                f"{score.task:<20} {_percent(score.acc, score.acc_stderr):>15} "
                f"{_percent(score.acc_norm, score.acc_norm_stderr):>15} {samples:>9}"
            )
        return lines


def _score(raw: Any) -> TaskScore:
    """A score as ``to_json`` writes it: every field of ``TaskScore`` by name, nothing else."""
    names = {item.name for item in fields(TaskScore)}
    if not isinstance(raw, dict) or not set(raw) <= names:
        raise ValueError(f"a score has the fields {sorted(names)}, got {raw!r}")
    return TaskScore(**raw)


def _percent(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    if stderr is None:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} ± {100 * stderr:.1f}"

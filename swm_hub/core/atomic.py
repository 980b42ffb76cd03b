"""The output folder's life: refused when unsafe, locked, written aside, swapped in once, recovered after a kill.

A run writes everything into a hidden temporary folder beside the target and moves it into place in one
step at the very end, so that ``--out`` is always either the previous folder or the complete new one. The
steps that make this hold when a run is killed, when two runs overlap, or when the disk fills up are here:

- every folder swm-hub writes carries a marker file, and ``--overwrite`` only ever replaces a marked folder;
- a lock file beside the target keeps a second run off the same ``--out``, and while it is held any
  temporary or set-aside folder of that target belongs to a run that died, so it is removed (or restored);
- the swap of a non-empty target is one ``renameat2(RENAME_EXCHANGE)`` on Linux; where the filesystem has
  none, it is two renames, and the next run puts the old folder back if the kill came between them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from swm_hub.core.errors import (
    ForeignOutputError,
    InsufficientSpaceError,
    OutputBusyError,
    OutputExistsError,
    OutputWriteError,
    SwmHubError,
    UnsafeOutputError,
)
from swm_hub.core.version import __version__

__all__ = [
    "MARKER_FILE",
    "PAUSE_ENV",
    "check_free_space",
    "exchange",
    "exit_on_sigterm",
    "is_marked",
    "mark",
    "output_lock",
    "pause_point",
    "recover_interrupted",
    "refuse_existing_output",
    "refuse_unsafe_target",
    "swap_in",
    "write_errors_reported",
]

logger = logging.getLogger(__name__)

MARKER_FILE = ".swm-hub-output"
"""Written first into every folder swm-hub creates; hidden, so a push never uploads it."""
PAUSE_ENV = "SWM_HUB_PAUSE_AT"
"""Names a point (``before-move``, ``between-renames``, ``calibrating``) where a run stops, for kill tests."""
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


# --- refusals --------------------------------------------------------------------------------------------


def refuse_unsafe_target(target: Path, protected: Sequence[Path]) -> None:
    """Refuse a target that is, or contains, an input of the run or the working directory.

    Replacing such a folder would delete the model being read (or the user's current folder) whatever the
    marker says, so these are refused with or without ``--overwrite``.
    """
    resolved = Path(target).resolve()
    named = [(Path(path), f"the input {path}") for path in protected]
    for path, what in [*named, (Path.cwd(), "the working directory")]:
        inner = path.resolve()
        if inner == resolved:
            raise UnsafeOutputError(Path(target), f"it is {what}")
        if resolved in inner.parents:
            raise UnsafeOutputError(Path(target), f"it contains {what}")


def refuse_existing_output(target: Path, overwrite: bool) -> None:
    """Refuse a target holding files unless told to overwrite, and then only one that swm-hub wrote."""
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir() or target.is_symlink():
        raise OutputExistsError(target)
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(target)
    if not is_marked(target):
        raise ForeignOutputError(target, MARKER_FILE)


def mark(folder: Path) -> None:
    """Record that swm-hub made ``folder``: the only kind of folder ``--overwrite`` replaces."""
    record = {"written_by": "swm-hub", "version": __version__, "pid": os.getpid()}
    (folder / MARKER_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")


def is_marked(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file()


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse a run whose output cannot fit, before the hours of work that would end in ENOSPC."""
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    if needed > free:
        raise InsufficientSpaceError(folder, what, needed, free)


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def write_errors_reported(target: Path) -> Iterator[None]:
    """Turn the OS refusing a write (full disk, read-only mount, permissions) into one ``error:`` line."""
    try:
        yield
    except OSError as error:
        if isinstance(error, SwmHubError) or error.errno not in WRITE_ERRNOS:
            raise
        raise OutputWriteError(target, error) from error


# --- the lock --------------------------------------------------------------------------------------------


def lock_file(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on a file beside ``target`` for the block; a second holder is refused.

    The file is deleted on release, so a run that opened it just before must check, once it holds the lock,
    that the path still names the file it locked; otherwise two runs could each lock a different file.
    """
    path = lock_file(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputBusyError(target, holder) from None
        if _still_names(path, fd):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _still_names(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock_holder(fd: int) -> str:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f" (pid {pid})" if pid.isdigit() else ""


# --- recovery of killed runs -----------------------------------------------------------------------------


def siblings(target: Path, role: str) -> list[Path]:
    """The hidden ``.{name}.{role}-*`` folders beside ``target`` that runs on it create."""
    pattern = f".{glob.escape(target.name)}.{role}-*"
    return sorted(path for path in target.parent.glob(pattern) if path.is_dir() and not path.is_symlink())


def recover_interrupted(target: Path) -> None:
    """Undo what killed runs on ``target`` left; call it holding the lock, when no other run can be writing.

    A set-aside ``old`` folder with no target means the kill came between the two renames of a fallback
    swap: the old folder is put back. With the target present it is a finished swap's leftover. Temporary
    folders are unfinished outputs. Only marked (or empty) folders are deleted; anything else is named.
    """
    aside = siblings(target, "old")
    if aside and not (target.exists() or target.is_symlink()):
        restored = next((path for path in aside if is_marked(path)), None)
        if restored is not None:
            os.replace(restored, target)
            logger.warning("restored %s from %s, left by an interrupted --overwrite", target, restored.name)
            aside.remove(restored)
    for path in [*aside, *siblings(target, "tmp")]:
        _remove_leftover(path)


def _remove_leftover(path: Path) -> None:
    if is_marked(path) or not any(path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, left by an interrupted swm-hub run", path)
    else:
        logger.warning(
            "%s looks left by an interrupted run but has no swm-hub marker: remove it by hand", path
        )


# --- the move --------------------------------------------------------------------------------------------


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_RENAMEAT2 = _load_renameat2()


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step; False where the OS or filesystem has no such operation."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(second))


def swap_in(temp: Path, target: Path, aside: Path) -> None:
    """Put the finished ``temp`` where the non-empty ``target`` is, and delete the old folder.

    One exchange where there is one; otherwise the target is first renamed to ``aside`` (which
    ``recover_interrupted`` puts back if the run dies before the second rename).
    """
    if exchange(temp, target):
        shutil.rmtree(temp, ignore_errors=True)
        return
    os.replace(target, aside)
    try:
        pause_point("between-renames")
        os.replace(temp, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():
        logger.warning("could not delete %s, the previous output folder; remove it by hand", aside)


# --- signals and test hooks ------------------------------------------------------------------------------


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind the stack like Ctrl-C does, so temporary folders and caches are removed.

    Without a handler Python dies on SIGTERM at once and every ``finally`` is skipped. SystemExit runs them
    and exits with the conventional 128 + 15 without a traceback.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_terminated)


def _exit_terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def pause_point(name: str) -> None:
    """Stop here while ``SWM_HUB_PAUSE_AT`` names this point, so a test can kill the run at a chosen moment."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    print(f"swm-hub: paused at {name}", file=sys.stderr, flush=True)
    while True:
        time.sleep(1)


def write_text_atomically(path: Path, text: str) -> Path:
    """Write ``path`` through a temporary file beside it, so a reader sees the old text or the new, never half."""
    temp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path

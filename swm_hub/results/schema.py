"""How a result file is found, read and checked against the schema versions this release knows.

A file without ``schema_version`` is one the release before versioned files wrote (version 0); each result
module reads those too. A version above the newest one a module knows is refused, not guessed at: only a
newer swm-hub can tell what its fields mean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from swm_hub.core.errors import ResultFileError, ResultFileVersionError

SCHEMA_KEY: str = "schema_version"


def result_path(folder_or_path: Path | str, file_name: str) -> Path:
    """The result file itself, given either it or the model folder that holds it under ``file_name``."""
    path = Path(folder_or_path)
    return path / file_name if path.is_dir() else path


def read_result(path: Path, newest: int) -> Any:
    """The parsed JSON of ``path``, refused when unreadable or when a part of it is of a newer schema.

    Raises:
        ResultFileError: the file cannot be read, is not JSON, or its ``schema_version`` is no whole number.
        ResultFileVersionError: a ``schema_version`` above ``newest``.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResultFileError(path, f"not readable JSON ({exc})") from exc
    check_schema(path, data, newest)
    return data


def check_schema(path: Path, data: Any, newest: int) -> None:
    """Refuse ``data`` (one object of a result file) when its schema is newer than ``newest``."""
    if not isinstance(data, dict) or SCHEMA_KEY not in data:
        return
    version = data[SCHEMA_KEY]
    if type(version) is not int or version < 1:
        raise ResultFileError(path, f"its {SCHEMA_KEY} {version!r} is not a whole number above 0")
    if version > newest:
        raise ResultFileVersionError(path, version, newest)

"""The name the user runs swm-hub by, so that every command we print for them to run is spelt that way."""

from __future__ import annotations

import sys
from pathlib import Path

COMMAND: str = "swm-hub"
EXTENSION_EXECUTABLE: str = "hf-swm"
"""The console script that the ``hf`` CLI runs for ``hf swm ...`` once swm-hub is installed as its extension."""
EXTENSION_COMMAND: str = "hf swm"


def program_name(executable: str | None = None) -> str:
    """How the user runs swm-hub: ``hf swm`` when run as the ``hf`` CLI's extension, else ``swm-hub``.

    ``hf swm ...`` starts the ``hf-swm`` executable (by its path, with no other trace of ``hf``), so the name
    it was started by (``sys.argv[0]`` by default) is what tells. A command to retry must be spelt that way:
    the extension's own virtual environment, which holds ``swm-hub`` too, is not on the user's PATH.
    """
    name = Path(sys.argv[0] if executable is None else executable).name
    return EXTENSION_COMMAND if name.removesuffix(".exe") == EXTENSION_EXECUTABLE else COMMAND

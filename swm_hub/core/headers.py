"""The package's one safetensors header reader: names, dtype codes and shapes, with no weight read.

It opens files the way numpy would, so reading a header loads no torch: the model card counts parameters
of a folder being pushed without it. ``shards`` turns these entries into torch-typed tensor specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from swm_hub.core.errors import CorruptWeightsError

REDOWNLOAD = "download the model again (or re-save it with save_pretrained(..., safe_serialization=True))"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as a safetensors header lists it: its name, the spec's dtype code (``BF16``) and shape."""

    name: str
    code: str
    shape: tuple[int, ...]


def read_entries(path: Path) -> list[HeaderEntry]:
    """Every tensor of one file's header; safetensors also checks the file covers its offsets.

    Raises:
        CorruptWeightsError: the file is not a readable safetensors file.
    """
    try:
        with safe_open(str(path), framework="numpy") as handle:
            names: list[str] = handle.keys()  # safe_open is not iterable itself
            views = [(name, handle.get_slice(name)) for name in names]
            return [HeaderEntry(name, view.get_dtype(), tuple(view.get_shape())) for name, view in views]
    except (SafetensorError, OSError) as exc:
        raise CorruptWeightsError(
            path, f"not a readable safetensors file: its header is unreadable ({exc}); {REDOWNLOAD}"
        ) from exc

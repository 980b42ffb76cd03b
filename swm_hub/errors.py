"""Every error swm-hub raises on purpose.

Each one subclasses the builtin a caller would naturally catch, carries the fields a message needs, and is
turned into a one-line message with a next step by ``cli.main``; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class SwmHubError(Exception):
    """Base of the errors that the CLI reports as one line and exit code 1."""


class UnknownModelError(SwmHubError, LookupError):
    """A model source that is neither a readable local path nor a reachable Hub repository."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot find model {source!r}: {reason}")


class UnsupportedArchitectureError(SwmHubError, ValueError):
    """A model whose ``model_type`` has no entry in the architecture registry."""

    def __init__(self, model_type: str, supported: Sequence[str]) -> None:
        self.model_type = model_type
        self.supported = tuple(supported)
        super().__init__(
            f"architecture {model_type!r} is not supported; supported model types: {', '.join(self.supported)}"
        )


class ImpossibleTargetError(SwmHubError, ValueError):
    """A compression target that would remove no layer, or more layers than can be merged."""

    def __init__(self, requested: str, available: int, detail: str) -> None:
        self.requested = requested
        self.available = available
        super().__init__(f"impossible target {requested}: {detail}")


class InvalidOptionError(SwmHubError, ValueError):
    """An option value outside its range, or a combination of options that contradict each other."""


class CalibrationDataError(SwmHubError, ValueError):
    """Calibration or evaluation text that cannot be read or is too short to use."""


class CorruptWeightsError(SwmHubError, OSError):
    """Model files that exist but cannot be parsed (truncated safetensors, broken GGUF, bad config)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read the weights at {self.path}: {reason}")


class OutputExistsError(SwmHubError, FileExistsError):
    """An output folder that already holds files and was not released with ``--overwrite``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"output folder {path} already exists and is not empty")


class PlanMismatchError(SwmHubError, ValueError):
    """A saved merge plan that does not fit the model it is applied to."""

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


class ExportUnsupportedError(SwmHubError, ValueError):
    """A model that the ONNX exporter cannot export: its type, the reason, and the types that can be exported."""

    def __init__(self, model_type: str, reason: str, supported: Sequence[str]) -> None:
        self.model_type = model_type
        self.reason = reason
        self.supported = tuple(supported)
        super().__init__(
            f"cannot export model type {model_type!r} to ONNX: {reason}; exportable model types: "
            f"{', '.join(self.supported)}"
        )


class GenaiExportUnsupportedError(ExportUnsupportedError):
    """A model that onnxruntime-genai's model builder refuses, or whose export onnxruntime-genai cannot run.

    A subclass, so that a caller catching ``ExportUnsupportedError`` catches both exporters' refusals; only
    the message names the other target.
    """

    def __init__(self, model_type: str, reason: str, supported: Sequence[str]) -> None:
        super().__init__(model_type, reason, supported)
        self.args = (
            f"cannot export model type {model_type!r} with onnxruntime-genai: {reason}; model types it "
            f"exports: {', '.join(self.supported)}",
        )


class ExportMismatchError(SwmHubError, ValueError):
    """An ONNX export whose outputs differ from the torch model's by more than the tolerance.

    Attributes:
        path: the folder of the export that failed validation (a temporary folder, deleted afterwards).
        diffs: max absolute difference per output name, for every output compared (passing ones too).
        atol: the tolerance each difference was held to.
        failed: the names of the outputs over the tolerance, in output order.
    """

    def __init__(self, path: Path | str, diffs: dict[str, float], atol: float) -> None:
        self.path = str(path)
        self.diffs = dict(diffs)
        self.atol = atol
        self.failed = tuple(name for name, diff in self.diffs.items() if not diff <= atol)
        worst = ", ".join(f"{name} {self.diffs[name]:.3g}" for name in self.failed[:4])
        more = f" and {len(self.failed) - 4} more" if len(self.failed) > 4 else ""
        super().__init__(
            f"the ONNX export does not match the torch model: max abs difference over atol {atol:g} in "
            f"{len(self.failed)} of {len(self.diffs)} outputs ({worst}{more})"
        )


class DeviceUnavailableError(SwmHubError, RuntimeError):
    """A device (or an execution provider for it) that was asked for but is not present on this machine."""

    def __init__(self, requested: str, reason: str) -> None:
        self.requested = requested
        self.reason = reason
        super().__init__(f"device {requested!r} is not available: {reason}")


class MissingDependencyError(SwmHubError, ImportError):
    """An optional package that a command needs but that is not installed."""

    def __init__(self, package: str, install: str) -> None:
        self.package = package
        self.install = install
        super().__init__(f"the package {package} is needed for this and is not installed: {install}")


class MissingTokenError(SwmHubError, PermissionError):
    """A push with no Hugging Face token in any of the usual places (argument, HF_TOKEN, the login file).

    Attributes:
        retry_command: the command that retries the push once a token is set up.
    """

    def __init__(self, retry_command: str) -> None:
        self.retry_command = retry_command
        super().__init__(
            "no Hugging Face token found: log in with `hf auth login`, or set HF_TOKEN to a token with write "
            f"access, then retry: {retry_command}"
        )


class PushError(SwmHubError, OSError):
    """A push that failed on the way to the Hub (network, server, invalid upload); nothing local was changed.

    Attributes:
        repo_id: the repository the push was for, when it was known.
        reason: what went wrong and what to do, without any token.
        retry_command: the exact command that retries the push.
    """

    def __init__(self, repo_id: str | None, reason: str, retry_command: str) -> None:
        self.repo_id = repo_id
        self.reason = reason
        self.retry_command = retry_command
        target = f" to {repo_id}" if repo_id else ""
        super().__init__(
            f"push{target} failed: {reason}; the local folder is unchanged; retry with: {retry_command}"
        )


class PushPermissionError(PushError, PermissionError):
    """A push the Hub refused: the token is invalid (401) or may not write to the repository (403)."""


class ResultFileError(SwmHubError, ValueError):
    """A result file in an output folder (similarity.json, eval.json) that exists but cannot be read."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read the result file {self.path}: {reason}; regenerate it or delete it")


class ResultFileVersionError(ResultFileError):
    """A result file that a newer swm-hub wrote, in a schema this release does not know.

    A subclass, so that a caller catching ``ResultFileError`` catches it too; only the message differs, since
    the file is fine and regenerating it with this release would lose what the newer one measured.

    Attributes:
        found: the file's ``schema_version``; newest: the newest this release reads.
    """

    def __init__(self, path: Path | str, found: int, newest: int) -> None:
        super().__init__(path, f"schema_version {found} is newer than {newest}")
        self.found = found
        self.newest = newest
        self.args = (
            f"cannot read the result file {self.path}: a newer swm-hub wrote it (schema_version {found}; "
            f"this release reads up to {newest}): upgrade swm-hub (pip install --upgrade swm-hub)",
        )


class UnsafeOutputError(SwmHubError, ValueError):
    """An ``--out`` whose replacement would destroy an input: the model, a folder holding it, or the working directory."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"refusing --out {path}: {reason}; choose another --out")


class ForeignOutputError(SwmHubError, FileExistsError):
    """A non-empty ``--out`` that swm-hub did not write, so ``--overwrite`` may not delete it."""

    def __init__(self, path: Path, marker: str) -> None:
        self.path = path
        super().__init__(
            f"output folder {path} holds files that swm-hub did not write (it has no {marker} marker), so "
            "--overwrite will not delete it: remove it yourself or choose another --out"
        )


class OutputBusyError(SwmHubError, RuntimeError):
    """Another run holds the lock on the same output folder."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        super().__init__(
            f"another swm-hub run{holder} is writing {path}: wait for it to finish or choose another --out"
        )


class OutputWriteError(SwmHubError, OSError):
    """The operating system refused a write for the output: disk full, read-only filesystem, no permission."""

    def __init__(self, path: Path, cause: OSError) -> None:
        self.path = path
        where = f" ({cause.filename})" if cause.filename else ""
        super().__init__(
            f"cannot write the output {path}: {cause.strerror or cause}{where}; nothing was moved into place"
        )
        self.errno = cause.errno


class InsufficientSpaceError(SwmHubError, OSError):
    """Less free space than a run will need where it writes, found before any work is done."""

    def __init__(self, path: Path, what: str, needed: int, free: int) -> None:
        self.path = path
        self.needed = needed
        self.free = free
        super().__init__(
            f"not enough free space for {what} in {path}: about {needed / 1e6:,.1f} MB needed, "
            f"{free / 1e6:,.1f} MB free"
        )


class PushCheckError(SwmHubError, PermissionError):
    """A ``compress --push`` that cannot succeed, found before the model is loaded: no token, no write access."""

    def __init__(self, repo: str, reason: str) -> None:
        self.repo = repo
        self.reason = reason
        super().__init__(f"cannot push to {repo}: {reason}; nothing was computed: fix that, or drop --push")


class InvalidMergeError(SwmHubError, ArithmeticError):
    """A merge whose result is unusable (non-finite tensors, a missed target); nothing is moved into place."""


class HealInterrupted(Exception):  # noqa: N818  (an interruption the user asked for, not an error)
    """Training stopped at a step boundary on Ctrl-C; a checkpoint to resume from was written.

    Attributes:
        step: the steps done (and saved); steps: the steps the budget asks for.
        checkpoint: the folder ``--resume`` continues from, or None when none could be written.
    """

    def __init__(self, step: int, steps: int, checkpoint: Path | None) -> None:
        self.step = step
        self.steps = steps
        self.checkpoint = checkpoint
        where = f"checkpoint in {checkpoint}" if checkpoint is not None else "no checkpoint could be written"
        super().__init__(f"heal interrupted after step {step} of {steps}; {where}")

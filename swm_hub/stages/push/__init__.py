"""The push stage: publish a compressed folder to the Hugging Face Hub in one commit.

The folder is only read, never written: a model card that is missing (or that is exactly the card
``swm-hub card`` would write, which names the folder rather than the repository) is rendered in memory
with the repository id and uploaded from there. Hidden files and temporary files (what an interrupted
``compress`` or ``export`` leaves behind) are not uploaded. The list of files is computed once, so
``--dry-run`` shows exactly what a push would send, without a token or a network call.

Every failure leaves as a ``PushError`` (or its ``PushPermissionError`` / ``MissingTokenError`` kin) whose
message says what to do and carries the exact command that retries, spelt the way the user runs swm-hub
(``swm-hub push ...``, or ``hf swm push ...`` through the ``hf`` CLI); the token is never part of a message,
a log line, or the messages of the errors it is raised from (which a debug traceback prints).
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RevisionNotFoundError,
)

from swm_hub.core.errors import (
    InvalidOptionError,
    MissingTokenError,
    PushError,
    PushPermissionError,
    SwmHubError,
)
from swm_hub.core.files import CARD_FILE
from swm_hub.core.hub_http import HTTP_ERRORS, chain, http_status, transport_reason
from swm_hub.core.options import PushOptions
from swm_hub.core.program import program_name
from swm_hub.results.plan import MergePlan, default_repo_name
from swm_hub.results.push import PushResult, UploadFile, size_text

__all__ = [
    "default_repo_id",
    "push",
    "retry_command",
    "upload_files",
]

logger = logging.getLogger(__name__)

TEMP_SUFFIXES: tuple[str, ...] = (".tmp", ".temp", ".incomplete", ".lock", ".part", ".partial", ".swp", "~")
"""File name endings that mark a file as unfinished; such files are never uploaded."""
SKIPPED_DIRS: frozenset[str] = frozenset({"__pycache__"})
USER_PLACEHOLDER: str = "<your-username>"
DEFAULT_PUSH = PushOptions()
_DETAIL_CHARS = 300
# What a failed push raises: HTTP and connection errors, file errors, and a failed upload (a RuntimeError).
_FAILURES: tuple[type[Exception], ...] = (OSError, ValueError, RuntimeError, *HTTP_ERRORS)

CardRenderer = Callable[[Path, "str | None"], str]
"""A folder's model card for a Hub repository id (None: the card as ``swm-hub card`` writes it locally).

The pipeline passes the card stage's ``render_card``; push itself knows nothing of how a card is composed.
"""


def push(
    folder: Path,
    options: PushOptions = DEFAULT_PUSH,
    token: str | None = None,
    endpoint: str | None = None,
    card: CardRenderer | None = None,
) -> PushResult:
    """Upload every file of a compressed folder (weights, ONNX, card, plan, heatmap) in one commit.

    Args:
        folder: a folder written by ``swm-hub compress``.
        options: the target (see ``PushOptions``): ``repo_id`` defaults to ``<user>/<base-name>-swm-<N>L`` for
            the token's user; ``private`` applies to a repository it creates; ``revision`` is a branch,
            created from the default branch when missing (unless ``create_pr``); ``dry_run`` lists what
            would be uploaded, with sizes, with no token and no network call.
        token: a Hub token; default the one ``huggingface_hub`` finds (``HF_TOKEN``, then the login file).
        endpoint: the Hub's URL; it must be HF_ENDPOINT's (default https://huggingface.co), which is how
            another Hub is chosen (see ``_check_endpoint``).
        card: renders the model card for the target repository (see ``CardRenderer``); without it the
            folder's README.md is uploaded as it is.

    Raises:
        UnknownModelError: ``folder`` is not a folder written by ``swm-hub compress``.
        InvalidOptionError: ``endpoint`` is not the one HF_ENDPOINT configures.
        MissingTokenError: no token was given or found.
        PushPermissionError: the Hub refused the token (401) or its write access (403).
        PushError: the Hub could not be reached or refused the upload for another reason.
    """
    folder = Path(folder)
    plan = MergePlan.in_folder(folder, verb="push")
    repo_id, revision, create_pr = options.repo_id, options.revision, options.create_pr
    retry = retry_command(folder, options)
    if options.dry_run:
        shown = repo_id or f"{USER_PLACEHOLDER}/{default_repo_name(plan)}"
        files = _with_card(folder, upload_files(folder), shown, card)[0]
        return PushResult(repo_id=shown, revision=revision, create_pr=create_pr, dry_run=True, files=files)
    _check_endpoint(endpoint)
    token = token or get_token()
    if not token:
        raise MissingTokenError(retry)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        if repo_id is None:
            repo_id = default_repo_id(folder, token, endpoint)
            retry = retry_command(folder, replace(options, repo_id=repo_id))
        files, card_bytes = _with_card(folder, upload_files(folder), repo_id, card)
        message = options.commit_message or _default_message(plan, repo_id)
        logger.info("pushing %d files (%s) to %s", len(files), size_text(sum(f.size for f in files)), repo_id)
        repo_url = api.create_repo(repo_id, private=options.private, exist_ok=True, repo_type="model")
        if revision is not None and not create_pr and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # huggingface_hub drops files the revision already holds, and makes no commit (nor pull request)
        # when none is left: comparing the head before and after is how that shows.
        head = api.repo_info(repo_id, revision=revision).sha
        info = api.create_commit(
            repo_id,
            operations=list(_operations(files, card_bytes)),
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        )
    except _FAILURES as exc:
        if isinstance(exc, SwmHubError):
            raise
        _scrub_chain(exc, token)
        raise _push_error(exc, repo_id, revision, api.endpoint, retry, token) from exc
    logger.info("pushed %s", info.commit_url)
    return PushResult(
        repo_id=repo_id,
        revision=revision,
        create_pr=create_pr,
        dry_run=False,
        files=files,
        repo_url=str(repo_url),
        commit_url=info.commit_url,
        pr_url=info.pr_url,
        changed=info.oid != head,
    )


def default_repo_id(folder: Path, token: str | None = None, endpoint: str | None = None) -> str:
    """``<user>/<base-name>-swm-<N>L``: the token's user (asked of the Hub) and the plan's base model.

    Raises:
        UnknownModelError: ``folder`` has no readable plan.
        huggingface_hub / httpx errors: the Hub cannot be asked (``push`` turns them into ``PushError``).
    """
    plan = MergePlan.in_folder(folder, verb="push")
    user = HfApi(endpoint=endpoint).whoami(token=token)["name"]
    return f"{user}/{default_repo_name(plan)}"


def retry_command(folder: Path, options: PushOptions = DEFAULT_PUSH) -> str:
    """The ``push`` command that repeats this push (never with a token: that comes from the login)."""
    parts = [*shlex.split(program_name()), "push", str(folder)]
    if options.repo_id is not None:
        parts += ["--repo-id", options.repo_id]
    if options.private:
        parts.append("--private")
    if options.revision is not None:
        parts += ["--revision", options.revision]
    if options.create_pr:
        parts.append("--create-pr")
    if options.commit_message is not None:
        parts += ["--commit-message", options.commit_message]
    return shlex.join(parts)


def upload_files(folder: Path) -> list[UploadFile]:
    """Every regular file under ``folder``, in path order, except hidden and temporary ones.

    Symbolic links to files are followed (their target's content is uploaded); links to folders are not.
    """
    files = []
    for path in _walk(Path(folder)):
        relative = path.relative_to(folder).as_posix()
        files.append(UploadFile(path_in_repo=relative, size=path.stat().st_size, source=path))
    return sorted(files, key=lambda file: file.path_in_repo)


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith(".") or name.endswith(TEMP_SUFFIXES) or not path.is_file():
                continue
            yield path


def _check_endpoint(endpoint: str | None) -> None:
    """Refuse an endpoint other than HF_ENDPOINT's, before a commit that would be misreported as failed.

    huggingface_hub 0.36 parses the commit URL the Hub answers against ``constants.ENDPOINT`` (set from
    HF_ENDPOINT at import), whatever endpoint the call used; on another host it raises after the commit
    has been made.
    """
    configured = constants.ENDPOINT.rstrip("/")
    if endpoint is not None and endpoint.rstrip("/") != configured:
        raise InvalidOptionError(
            f"the endpoint {endpoint} is not the one huggingface_hub is configured for ({configured}): "
            f"set HF_ENDPOINT={endpoint} instead"
        )


def _with_card(
    folder: Path, files: list[UploadFile], repo_id: str, render: CardRenderer | None
) -> tuple[tuple[UploadFile, ...], bytes | None]:
    """The files with the model card to upload: the folder's own README.md, or one rendered for ``repo_id``.

    The folder's README.md is replaced (in the upload only) when it is exactly the card ``swm-hub card``
    renders without a repository id, i.e. generated and not edited since; an edited card is uploaded as is.
    """
    existing = folder / CARD_FILE
    card: bytes | None = None
    if render is not None and (not existing.is_file() or _unedited(existing, render)):
        card = render(folder, repo_id).encode("utf-8")
    kept = [file for file in files if card is None or file.path_in_repo != CARD_FILE]
    if card is not None:
        kept.append(UploadFile(path_in_repo=CARD_FILE, size=len(card), source=None))
    return tuple(sorted(kept, key=lambda file: file.path_in_repo)), card


def _unedited(existing: Path, render: CardRenderer) -> bool:
    """Whether the folder's README.md is still exactly the card swm-hub renders for it (not edited)."""
    try:
        return existing.read_text(encoding="utf-8") == render(existing.parent, None)
    except (SwmHubError, OSError, ValueError) as exc:
        logger.warning("uploading %s as it is: the card cannot be rendered again (%s)", existing, exc)
        return False


def _operations(files: tuple[UploadFile, ...], card: bytes | None) -> Iterator[CommitOperationAdd]:
    for file in files:
        content: str | bytes = str(file.source) if file.source is not None else (card or b"")
        yield CommitOperationAdd(path_in_repo=file.path_in_repo, path_or_fileobj=content)


def _default_message(plan: MergePlan, repo_id: str) -> str:
    base = plan.base_model or repo_id.split("/")[-1]
    return (
        f"Upload {base} merged by Sliding-Window Merging: {plan.num_layers} -> {plan.layers_after} layers "
        f"(swm-hub {plan.swm_hub_version})"
    )


# --- failures ----------------------------------------------------------------------------------------------


def _push_error(
    exc: BaseException, repo_id: str | None, revision: str | None, endpoint: str, retry: str, token: str
) -> PushError:
    """The typed error for a failed push, decided by exception type and HTTP status, never by message text.

    The chain is read down to the first error that says what happened: huggingface_hub raises a failed
    upload as a ``RuntimeError`` from it, and an invalid token from ``whoami`` as a second HTTP error.
    """
    target = repo_id or "the repository"
    for error in chain(exc):
        if isinstance(error, OfflineModeIsEnabled):
            return PushError(repo_id, "offline mode is on (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE", retry)
        status = http_status(error)
        if status is not None:
            return _http_error(error, status, target, repo_id, revision, endpoint, retry)
        transport = transport_reason(error, endpoint)
        if transport is not None:
            return PushError(repo_id, transport, retry)
    return PushError(repo_id, _scrub(f"{type(exc).__name__}: {exc}", token), retry)


def _http_error(
    error: BaseException,
    status: int,
    target: str,
    repo_id: str | None,
    revision: str | None,
    endpoint: str,
    retry: str,
) -> PushError:
    detail = _detail(error)
    if isinstance(error, DisabledRepoError):
        return PushError(
            repo_id,
            f"{target} has been disabled on the Hub (HTTP {status}{detail}): push to another --repo-id",
            retry,
        )
    if isinstance(error, GatedRepoError):
        return PushPermissionError(
            repo_id,
            f"{target} is gated (HTTP {status}{detail}): accept its conditions on {endpoint}/{target} with the "
            f"token's account, or push to your own namespace with --repo-id {USER_PLACEHOLDER}/<name>",
            retry,
        )
    if status == 401:
        return PushPermissionError(
            repo_id,
            f"the Hub rejected the token (HTTP 401{detail}): log in again with `hf auth login` or set "
            "HF_TOKEN to a valid token",
            retry,
        )
    if status == 403:
        return PushPermissionError(
            repo_id,
            f"the token may not write to {target} (HTTP 403{detail}): use a token with write access "
            "(https://huggingface.co/settings/tokens), or push to your own namespace with "
            f"--repo-id {USER_PLACEHOLDER}/<name>",
            retry,
        )
    if isinstance(error, RevisionNotFoundError):
        return PushError(repo_id, f"{target} has no revision {revision!r} (HTTP {status}{detail})", retry)
    if status == 404:
        return PushError(
            repo_id, f"the Hub has no repository {target} that this token can see (HTTP 404{detail})", retry
        )
    if status >= 500:
        return PushError(repo_id, f"the Hub answered HTTP {status}{detail}: try again later", retry)
    return PushError(repo_id, f"the Hub refused the upload (HTTP {status}{detail})", retry)


def _detail(error: BaseException) -> str:
    """The Hub's own one-line explanation, when it sent one (``_scrub_chain`` took the token out)."""
    message = error.server_message if isinstance(error, HfHubHTTPError) else None
    if not message:
        return ""
    return ": " + " ".join(message.split())[:_DETAIL_CHARS]


def _scrub_chain(exc: BaseException, token: str) -> None:
    """Take the token out of the messages of the errors a push error is raised from.

    A server may echo what it was sent, and ``SWM_HUB_DEBUG=1`` prints the whole chain with its messages.
    """
    for error in chain(exc):
        error.args = tuple(_scrub(arg, token) if isinstance(arg, str) else arg for arg in error.args)
        if isinstance(error, HfHubHTTPError) and error.server_message:
            error.server_message = _scrub(error.server_message, token)


def _scrub(text: str, token: str) -> str:
    """Remove the token from text that comes from elsewhere (a server message, an exception)."""
    return text.replace(token, "<token>") if token else text

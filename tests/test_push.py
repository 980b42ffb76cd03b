"""The push stage end to end over HTTP on loopback, against the Hub-compatible server in hub_server.py.

A tiny merged model is pushed with the real huggingface_hub client (create repo, preupload, LFS batch,
upload and verify, commit), downloaded back with snapshot_download through the same endpoint, and loaded
with transformers. Failures must each give a typed error with the command that retries, leave the folder as
it was, and never show the token: no token, offline mode, a token refused by whoami (401), create_repo (401,
403) or the commit (gated, disabled), a repository or revision the Hub does not have (404), a Hub in
trouble (503), no server, a connection dropped mid-transfer, a server that does not answer in time.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_TEXT
from hub_server import HubHTTPError, HubServer, no_retry_waits, online_client, use_endpoint
from huggingface_hub import HfApi, ModelCard, get_session, snapshot_download
from transformers import AutoModelForCausalLM

from swm_hub import cli
from swm_hub.core.errors import (
    InvalidOptionError,
    MissingTokenError,
    PushError,
    PushPermissionError,
    UnknownModelError,
)
from swm_hub.core.options import CalibrationOptions, MergeOptions, PushOptions
from swm_hub.core.program import program_name
from swm_hub.results.plan import PLAN_FILE, MergePlan, default_repo_name
from swm_hub.results.push import PushResult
from swm_hub.runtime.loading import pull
from swm_hub.stages.card import CARD_FILE, render_card, write_card
from swm_hub.stages.merge import merge
from swm_hub.stages.push import push as push_stage
from swm_hub.stages.push import retry_command, upload_files

TOKEN = "hf_test_secret_token_123"
READ_TOKEN = "hf_test_read_only_token_456"
USER = "tester"
LOGGERS = ("huggingface_hub", "swm_hub", "httpx", "httpx2", "httpcore", "httpcore2", "hub_server")


def push(folder: Path, token: str | None = None, endpoint: str | None = None, **options: Any) -> PushResult:
    """The push stage with the card renderer the pipeline gives it, and its options given as keywords."""
    return push_stage(folder, PushOptions(**options), token=token, endpoint=endpoint, card=render_card)


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressed(tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as `swm-hub compress` writes it: weights, config, tokenizer, plan, similarity report."""
    calib = tmp_path_factory.mktemp("push-calib") / "calib.txt"
    calib.write_text(TINY_TEXT * 20, encoding="utf-8")
    options = MergeOptions(
        target_layers=4, calibration=CalibrationOptions(text=calib, samples=4, seq_len=16, batch_size=2)
    )
    out = tmp_path_factory.mktemp("push-model") / "tiny-llama-swm"
    merge(pull(str(tiny_model_dir("llama"))), out, options)
    return out


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    with online_client(monkeypatch, tmp_path):
        yield


@pytest.fixture
def hub(online: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer({TOKEN: (USER, "write"), READ_TOKEN: (USER, "read")}) as server:
        use_endpoint(monkeypatch, server.url)
        yield server


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every log line of the client, the HTTP library, the server and swm-hub, at DEBUG."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (hidden ones too) with its hash and modification time."""
    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def assert_token_hidden(error: BaseException, logs: pytest.LogCaptureFixture, token: str) -> None:
    assert token not in str(error)
    assert token not in repr(error.args)
    assert token not in getattr(error, "retry_command", "")
    assert token not in logs.text


# --- the happy path ----------------------------------------------------------------------------------------


def test_push_then_download_and_load(
    hub: HubServer, compressed: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    before = fingerprint(compressed)
    plan = MergePlan.from_file(compressed / PLAN_FILE)

    result = push(compressed, token=TOKEN, endpoint=hub.url)

    repo_id = f"{USER}/{default_repo_name(plan)}"
    assert result.repo_id == repo_id
    assert repo_id.endswith(f"-swm-{plan.layers_after}L")
    assert not result.dry_run and result.commit_url
    assert fingerprint(compressed) == before  # nothing written, not even a README.md
    assert not (compressed / CARD_FILE).exists()

    # one commit on top of the repository's initial one, holding every file; weights went through LFS
    repo = hub.state.repos[repo_id]
    head = repo.commits[repo.refs["main"]]
    assert result.commit_url == f"{hub.url}/{repo_id}/commit/{head.oid}"
    assert repo.commits[head.parent].parent is None  # type: ignore[index]
    local = {file.path_in_repo for file in upload_files(compressed)}
    assert {"config.json", PLAN_FILE, "similarity.json", "similarity.png"} <= local
    assert set(head.files) == local | {CARD_FILE}
    assert head.files["model.safetensors"].lfs
    assert not head.files[PLAN_FILE].lfs
    methods = [request for request in hub.state.requests if request[0] in ("POST", "PUT")]
    assert [path for _, path in methods if path.endswith("/commit/main")] == [
        f"/api/models/{repo_id}/commit/main"
    ]
    assert any(path.endswith(".git/info/lfs/objects/batch") for _, path in methods)
    assert any(method == "PUT" and path.startswith("/__lfs/upload/") for method, path in methods)

    # download through the same endpoint, compare, load
    snapshot = Path(snapshot_download(repo_id, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache"))
    for name in local:
        assert (snapshot / name).read_bytes() == (compressed / name).read_bytes(), name
    assert sorted(HfApi(endpoint=hub.url).list_repo_files(repo_id, token=TOKEN)) == sorted(head.files)
    card = (snapshot / CARD_FILE).read_text(encoding="utf-8")
    assert card == render_card(compressed, repo_id)
    assert TOKEN not in card
    assert f'model_id = "{repo_id}"' in card
    tags = ModelCard(card).data["tags"]
    assert "swm" in tags and "pruned" in tags

    pushed = AutoModelForCausalLM.from_pretrained(snapshot)
    original = AutoModelForCausalLM.from_pretrained(compressed)
    assert pushed.config.num_hidden_layers == plan.layers_after
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(pushed(ids).logits, original(ids).logits)
    assert TOKEN not in logs.text


def test_a_pull_request_with_nothing_new_is_not_reported_as_opened(hub: HubServer, compressed: Path) -> None:
    repo_id = f"{USER}/tiny-unchanged"
    push(compressed, repo_id=repo_id, token=TOKEN, endpoint=hub.url)
    again = push(compressed, repo_id=repo_id, create_pr=True, token=TOKEN, endpoint=hub.url)

    assert "refs/pr/1" not in hub.state.repos[repo_id].refs
    assert not again.changed and again.pr_url is None
    assert again.lines()[0].startswith(f"nothing to push: {repo_id} already holds these")
    assert not any("uploaded" in line or "pull request:" in line for line in again.lines())


def test_push_to_a_branch_and_as_a_pull_request(hub: HubServer, compressed: Path, tmp_path: Path) -> None:
    repo_id = f"{USER}/tiny-branches"
    on_branch = push(compressed, repo_id=repo_id, revision="dev", token=TOKEN, endpoint=hub.url, private=True)
    proposed = push(compressed, repo_id=repo_id, create_pr=True, token=TOKEN, endpoint=hub.url)

    repo = hub.state.repos[repo_id]
    assert repo.private
    assert on_branch.commit_url == f"{hub.url}/{repo_id}/commit/{repo.refs['dev']}"
    assert proposed.commit_url == f"{hub.url}/{repo_id}/commit/{repo.refs['refs/pr/1']}"
    assert not repo.commits[repo.refs["main"]].files  # neither push touched the default branch
    assert proposed.pr_url is not None and proposed.pr_url.endswith("/discussions/1")
    assert any("pull request" in line for line in proposed.lines())
    snapshot = snapshot_download(
        repo_id, revision="refs/pr/1", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache"
    )
    assert AutoModelForCausalLM.from_pretrained(snapshot).config.num_hidden_layers == 4


def test_card_is_rendered_for_the_repo_unless_edited(
    hub: HubServer, compressed: Path, tmp_path: Path
) -> None:
    folder = copy_of(compressed, tmp_path)
    write_card(folder)  # what `swm-hub card DIR` writes: it names the folder, not a repository
    repo_id = f"{USER}/tiny-card"

    push(folder, repo_id=repo_id, token=TOKEN, endpoint=hub.url)
    uploaded = hub.state.repos[repo_id].commits[hub.state.repos[repo_id].refs["main"]].files[CARD_FILE]
    assert uploaded.content.decode() == render_card(folder, repo_id)
    assert (folder / CARD_FILE).read_text(encoding="utf-8") == render_card(folder)  # the file is untouched

    edited = render_card(folder) + "\nA note the author added by hand.\n"
    (folder / CARD_FILE).write_text(edited, encoding="utf-8")
    push(folder, repo_id=repo_id, token=TOKEN, endpoint=hub.url)
    uploaded = hub.state.repos[repo_id].commits[hub.state.repos[repo_id].refs["main"]].files[CARD_FILE]
    assert uploaded.content.decode() == edited


# --- dry run -----------------------------------------------------------------------------------------------


def test_dry_run_lists_files_and_sizes_without_any_request(
    hub: HubServer, compressed: Path, tmp_path: Path
) -> None:
    folder = copy_of(compressed, tmp_path)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "leftover.bin").write_bytes(b"x")
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "model.safetensors.incomplete").write_bytes(b"x")
    (folder / ".onnx.tmp-1234").mkdir()
    (folder / ".onnx.tmp-1234" / "model.onnx").write_bytes(b"x")
    before = fingerprint(folder)

    result = push(folder, dry_run=True, endpoint=hub.url)  # no token anywhere: a dry run needs none

    assert isinstance(result, PushResult) and result.dry_run
    assert hub.state.requests == []
    names = [file.path_in_repo for file in result.files]
    assert names == sorted([file.path_in_repo for file in upload_files(compressed)] + [CARD_FILE])
    assert not any("incomplete" in name or name.startswith(".") or "tmp" in name for name in names)
    for file in result.files:
        if file.source is not None:
            assert file.size == file.source.stat().st_size
    card = next(file for file in result.files if file.path_in_repo == CARD_FILE)
    assert card.source is None and card.size > 0
    plan = MergePlan.from_file(folder / PLAN_FILE)
    assert result.repo_id == f"<your-username>/{default_repo_name(plan)}"
    text = "\n".join(result.lines())
    assert text.startswith("dry run: would upload")
    assert all(name in text for name in names)
    assert fingerprint(folder) == before


def test_the_push_command_loads_no_torch(compressed: Path, tmp_path: Path) -> None:
    """``swm-hub push --dry-run``, card rendering included, runs in a process that never imports torch."""
    folder = copy_of(compressed, tmp_path)
    code = (
        "import sys\n"
        "from swm_hub.cli import main\n"
        f"sys.argv = ['swm-hub', 'push', {str(folder)!r}, '--dry-run']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "print('torch loaded' if 'torch' in sys.modules or 'transformers' in sys.modules else 'no torch')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "dry run: would upload" in done.stdout and CARD_FILE in done.stdout
    assert done.stdout.rstrip().endswith("no torch")


# --- failures ----------------------------------------------------------------------------------------------


def assert_failed_cleanly(
    error: PushError, folder: Path, before: dict[str, tuple[str, int]], logs: pytest.LogCaptureFixture
) -> None:
    """One message with the retry command in it, the folder as it was, the token nowhere."""
    assert error.retry_command.startswith(f"swm-hub push {folder}")
    assert error.retry_command in str(error)
    assert "the local folder is unchanged" in str(error)
    assert fingerprint(folder) == before
    assert_token_hidden(error, logs, TOKEN)


def test_without_a_card_renderer_the_folder_is_uploaded_as_it_is(hub: HubServer, compressed: Path) -> None:
    """The push stage renders no card itself: the pipeline hands it one; without it nothing is generated."""
    rendered = push(compressed, dry_run=True, endpoint=hub.url)
    plain = push_stage(compressed, PushOptions(dry_run=True), endpoint=hub.url)

    assert [file.path_in_repo for file in plain.files] == [
        file.path_in_repo for file in upload_files(compressed)
    ]
    assert all(file.source is not None for file in plain.files)
    assert any(file.source is None for file in rendered.files)


def test_no_token_raises_missing_token_error(hub: HubServer, compressed: Path) -> None:
    with pytest.raises(MissingTokenError) as caught:
        push(compressed, repo_id=f"{USER}/x", endpoint=hub.url)
    message = str(caught.value)
    assert "`hf auth login`" in message and "HF_TOKEN" in message
    assert "huggingface-cli" not in message
    assert caught.value.retry_command == f"swm-hub push {compressed} --repo-id {USER}/x"
    assert caught.value.retry_command in message
    assert isinstance(caught.value, PermissionError)
    assert hub.state.requests == []


@pytest.mark.parametrize(
    ("token", "repo_id"),
    [(READ_TOKEN, None), (TOKEN, "someone-else/tiny")],
    ids=["read-only-token", "foreign-namespace"],
)
def test_refused_write_is_a_permission_error_without_the_token(
    hub: HubServer, compressed: Path, logs: pytest.LogCaptureFixture, token: str, repo_id: str | None
) -> None:
    before = fingerprint(compressed)
    with pytest.raises(PushPermissionError) as caught:
        push(compressed, repo_id=repo_id, token=token, endpoint=hub.url)
    error = caught.value
    message = str(error)
    assert "HTTP 403" in message and "write access" in message
    assert error.retry_command.startswith(f"swm-hub push {compressed} --repo-id ")
    assert error.retry_command in message
    assert isinstance(error, PushError) and isinstance(error, PermissionError)
    assert_token_hidden(error, logs, token)
    assert fingerprint(compressed) == before
    assert not hub.state.repos


@pytest.mark.parametrize(
    ("repo_id", "refused_by"),
    [(None, "/api/whoami-v2"), (f"{USER}/tiny", "/api/repos/create")],
    ids=["whoami", "create-repo"],
)
def test_invalid_token_is_a_permission_error(
    hub: HubServer,
    compressed: Path,
    logs: pytest.LogCaptureFixture,
    repo_id: str | None,
    refused_by: str,
) -> None:
    token = "hf_not_a_token_the_server_knows_789"
    with pytest.raises(PushPermissionError) as caught:
        push(compressed, repo_id=repo_id, token=token, endpoint=hub.url)
    assert "HTTP 401" in str(caught.value) and "`hf auth login`" in str(caught.value)
    assert caught.value.retry_command == retry_command(compressed, PushOptions(repo_id))
    assert refused_by in [path for _, path in hub.state.requests]
    assert_token_hidden(caught.value, logs, token)


# (server method, path, error, expected type, words in the message)
REFUSALS: list[tuple[str, str, str, HubHTTPError, type[PushError], str]] = [
    (
        "commit-to-a-missing-repo",
        "POST",
        rf"/api/models/{USER}/tiny/preupload/main",
        HubHTTPError(404, "Repository not found", code="RepoNotFound"),
        PushError,
        f"the Hub has no repository {USER}/tiny that this token can see (HTTP 404",
    ),
    (
        "gated",
        "POST",
        rf"/api/models/{USER}/tiny/preupload/main",
        HubHTTPError(403, f"Access to model {USER}/tiny is restricted.", code="GatedRepo"),
        PushPermissionError,
        f"{USER}/tiny is gated (HTTP 403",
    ),
    (
        "disabled",
        "POST",
        rf"/api/models/{USER}/tiny/preupload/main",
        HubHTTPError(403, "Access to this resource is disabled."),
        PushError,
        "has been disabled on the Hub",
    ),
    (
        "hub-down",
        "POST",
        "/api/repos/create",
        HubHTTPError(503, "Service Unavailable"),
        PushError,
        "the Hub answered HTTP 503: Service Unavailable: try again later",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "answer", "kind", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSALS],
)
def test_hub_refusals_are_typed_push_errors(
    hub: HubServer,
    compressed: Path,
    logs: pytest.LogCaptureFixture,
    method: str,
    path: str,
    answer: HubHTTPError,
    kind: type[PushError],
    expected: str,
) -> None:
    hub.fail(method, path, error=answer)
    before = fingerprint(compressed)
    with pytest.raises(PushError) as caught:
        push(compressed, repo_id=f"{USER}/tiny", token=TOKEN, endpoint=hub.url)
    assert type(caught.value) is kind
    assert expected in str(caught.value)
    assert_failed_cleanly(caught.value, compressed, before, logs)


def test_pull_request_to_a_missing_revision_names_it(
    hub: HubServer, compressed: Path, logs: pytest.LogCaptureFixture
) -> None:
    before = fingerprint(compressed)
    with pytest.raises(PushError) as caught:
        push(
            compressed, repo_id=f"{USER}/tiny", revision="nope", create_pr=True, token=TOKEN, endpoint=hub.url
        )
    assert f"{USER}/tiny has no revision 'nope' (HTTP 404" in str(caught.value)
    assert caught.value.retry_command.endswith("--revision nope --create-pr")
    assert_failed_cleanly(caught.value, compressed, before, logs)


@pytest.mark.parametrize(
    ("method", "path", "repo_id"),
    [
        ("GET", "/api/whoami-v2", None),
        ("PUT", r"/__lfs/upload/.*", f"{USER}/tiny"),
        ("POST", rf"/api/models/{USER}/tiny/commit/main", f"{USER}/tiny"),
    ],
    ids=["whoami", "lfs-upload", "create-commit"],
)
def test_connection_dropped_mid_transfer_is_a_push_error(
    hub: HubServer,
    compressed: Path,
    logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    repo_id: str | None,
) -> None:
    waits = no_retry_waits(monkeypatch)
    hub.fail(method, path, drop=True)
    before = fingerprint(compressed)
    with pytest.raises(PushError) as caught:
        push(compressed, repo_id=repo_id, token=TOKEN, endpoint=hub.url)
    assert "was dropped mid-transfer (RemoteProtocolError)" in str(caught.value)
    assert not isinstance(caught.value, PermissionError)
    assert any(request[0] == method for request in hub.state.requests)
    if method == "PUT":  # huggingface_hub retries an upload 5 times (1, 2, 4, 8, 8 s apart), then gives up
        assert sorted(set(waits)) == [1, 2, 4, 8]
    assert_failed_cleanly(caught.value, compressed, before, logs)


def test_a_hub_that_does_not_answer_in_time_is_a_push_error(
    hub: HubServer, compressed: Path, logs: pytest.LogCaptureFixture
) -> None:
    # huggingface_hub's own client waits forever; a user sets a timeout on it (get_session/set_client_factory)
    get_session().timeout = 0.5
    hub.fail("POST", "/api/repos/create", stall=10)
    before = fingerprint(compressed)
    with pytest.raises(PushError) as caught:
        push(compressed, repo_id=f"{USER}/tiny", token=TOKEN, endpoint=hub.url)
    assert "did not answer in time (ReadTimeout)" in str(caught.value)
    assert_failed_cleanly(caught.value, compressed, before, logs)


def test_unreachable_hub_is_a_push_error_and_the_folder_is_kept(
    online: None, compressed: Path, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    use_endpoint(monkeypatch, dead)
    before = fingerprint(compressed)
    with pytest.raises(PushError) as caught:
        push(compressed, repo_id=f"{USER}/tiny", private=True, token=TOKEN, endpoint=dead)
    error = caught.value
    assert not isinstance(error, PermissionError)
    assert f"cannot reach the Hub at {dead} (ConnectError)" in str(error)
    assert error.retry_command == f"swm-hub push {compressed} --repo-id {USER}/tiny --private"
    assert_failed_cleanly(error, compressed, before, logs)


def test_offline_mode_is_reported_with_its_variable(compressed: Path, logs: pytest.LogCaptureFixture) -> None:
    with pytest.raises(PushError) as caught:  # the test session itself is offline (conftest.py)
        push(compressed, repo_id=f"{USER}/tiny", token=TOKEN)
    assert "HF_HUB_OFFLINE" in str(caught.value)
    assert_token_hidden(caught.value, logs, TOKEN)


@pytest.mark.parametrize("debug", ["0", "1"])
def test_a_token_the_server_echoes_is_hidden_from_message_and_debug_traceback(
    hub: HubServer,
    compressed: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    debug: str,
) -> None:
    echo = f"token {TOKEN} may not write to {USER}/tiny"
    hub.fail("POST", rf"/api/models/{USER}/tiny/preupload/main", error=HubHTTPError(403, echo))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("SWM_HUB_DEBUG", debug)
    monkeypatch.setattr(sys, "argv", ["swm-hub", "push", str(compressed), "--repo-id", f"{USER}/tiny"])
    with pytest.raises((SystemExit, PushPermissionError)) as caught:
        cli.main()
    err = capsys.readouterr().err
    shown = err + "".join(traceback.format_exception(caught.value))  # with the errors it was raised from
    assert TOKEN not in shown
    assert "token <token> may not write" in shown  # the server's message, with the token taken out
    if debug == "1":
        assert isinstance(caught.value, PushPermissionError)
        assert "HfHubHTTPError" in shown
    else:
        assert isinstance(caught.value, SystemExit) and caught.value.code == 1
        assert "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1


def test_a_folder_without_a_plan_is_refused_before_any_request(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="swm_plan.json"):
        push(tmp_path, token=TOKEN, endpoint=hub.url)
    assert hub.state.requests == []


def test_an_endpoint_other_than_hf_endpoint_is_refused_before_any_request(
    hub: HubServer, compressed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_endpoint(monkeypatch, "https://huggingface.co")
    with pytest.raises(InvalidOptionError, match="HF_ENDPOINT"):
        push(compressed, token=TOKEN, endpoint=hub.url)
    assert hub.state.requests == []


def test_retry_command_quotes_what_the_shell_would_split() -> None:
    command = retry_command(Path("my models/out"), PushOptions("me/x", True, "dev", True, "it's done"))
    assert command == (
        "swm-hub push 'my models/out' --repo-id me/x --private --revision dev --create-pr "
        "--commit-message 'it'\"'\"'s done'"
    )


@pytest.mark.parametrize(
    ("executable", "expected"),
    [
        ("/home/me/.local/share/hf/extensions/hf-swm/venv/bin/hf-swm", "hf swm"),
        ("C:/Users/me/hf-swm.exe", "hf swm"),
        ("/usr/local/bin/swm-hub", "swm-hub"),
        ("/work/swm_hub/__main__.py", "swm-hub"),
    ],
)
def test_program_name_follows_the_executable(executable: str, expected: str) -> None:
    assert program_name(executable) == expected


def test_retry_command_says_hf_swm_when_run_as_the_hf_extension(
    hub: HubServer, compressed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["/opt/hf/extensions/hf-swm/venv/bin/hf-swm", "push", str(compressed)])
    with pytest.raises(MissingTokenError) as caught:
        push(compressed, repo_id=f"{USER}/x", private=True, endpoint=hub.url)
    assert caught.value.retry_command == f"hf swm push {compressed} --repo-id {USER}/x --private"
    assert str(caught.value).endswith(f"retry: hf swm push {compressed} --repo-id {USER}/x --private")
    with pytest.raises(UnknownModelError, match="push a folder written by `hf swm compress`"):
        push(compressed.parent, endpoint=hub.url)

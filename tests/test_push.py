"""The push stage end to end over HTTP on loopback, against the Hub-compatible server in hub_server.py.

A tiny merged model is pushed with the real huggingface_hub client (create repo, preupload, LFS batch,
upload and verify, commit), downloaded back with snapshot_download through the same endpoint, and loaded
with transformers. Failures (no token, a refused token, no server, offline mode) must each give a typed
error with the command that retries, leave the folder as it was, and never show the token.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import TINY_TEXT
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.utils import reset_sessions
from transformers import AutoModelForCausalLM

from swm_hub.errors import (
    InvalidOptionError,
    MissingTokenError,
    PushError,
    PushPermissionError,
    UnknownModelError,
)
from swm_hub.merge import merge
from swm_hub.model_cards import CARD_FILE, default_repo_name, render_card, write_card
from swm_hub.options import CalibrationOptions, MergeOptions
from swm_hub.plan import PLAN_FILE, MergePlan
from swm_hub.pull import pull
from swm_hub.push import PushResult, push, retry_command, upload_files

TOKEN = "hf_test_secret_token_123"
READ_TOKEN = "hf_test_read_only_token_456"
USER = "tester"
LOGGERS = ("huggingface_hub", "swm_hub", "urllib3", "hub_server")


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
    """Lift the test session's offline mode for huggingface_hub, with no token from the developer's login.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into ``constants``, and mounts an adapter that
    refuses every request on each per-thread session it caches; so the constant is patched and the
    sessions are dropped on the way in and again on the way out, once the constant is restored.
    """
    constants = huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-login" / "stored_tokens"))
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    reset_sessions()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline
        reset_sessions()


@pytest.fixture
def hub(online: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer({TOKEN: (USER, "write"), READ_TOKEN: (USER, "read")}) as server:
        use_endpoint(monkeypatch, server.url)
        yield server


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """What HF_ENDPOINT=url does at import: huggingface_hub parses commit URLs against ``ENDPOINT`` and
    builds download URLs from the template (copied into ``file_download``), whatever endpoint a call names."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)


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
    assert not result.dry_run and result.commit_oid and result.commit_url
    assert fingerprint(compressed) == before  # nothing written, not even a README.md
    assert not (compressed / CARD_FILE).exists()

    # one commit on top of the repository's initial one, holding every file; weights went through LFS
    repo = hub.state.repos[repo_id]
    head = repo.commits[repo.refs["main"]]
    assert head.oid == result.commit_oid
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
    data = ModelCard(card).data
    assert "swm" in data.tags and "pruned" in data.tags

    pushed = AutoModelForCausalLM.from_pretrained(snapshot)
    original = AutoModelForCausalLM.from_pretrained(compressed)
    assert pushed.config.num_hidden_layers == plan.layers_after
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(pushed(ids).logits, original(ids).logits)
    assert TOKEN not in logs.text


def test_push_to_a_branch_and_as_a_pull_request(hub: HubServer, compressed: Path, tmp_path: Path) -> None:
    repo_id = f"{USER}/tiny-branches"
    on_branch = push(compressed, repo_id=repo_id, revision="dev", token=TOKEN, endpoint=hub.url, private=True)
    proposed = push(compressed, repo_id=repo_id, create_pr=True, token=TOKEN, endpoint=hub.url)

    repo = hub.state.repos[repo_id]
    assert repo.private
    assert repo.refs["dev"] == on_branch.commit_oid
    assert repo.refs["refs/pr/1"] == proposed.commit_oid
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


# --- failures ----------------------------------------------------------------------------------------------


def test_no_token_raises_missing_token_error(hub: HubServer, compressed: Path) -> None:
    with pytest.raises(MissingTokenError) as caught:
        push(compressed, repo_id=f"{USER}/x", endpoint=hub.url)
    message = str(caught.value)
    assert "huggingface-cli login" in message and "HF_TOKEN" in message
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


def test_invalid_token_is_a_permission_error(
    hub: HubServer, compressed: Path, logs: pytest.LogCaptureFixture
) -> None:
    token = "hf_not_a_token_the_server_knows_789"
    with pytest.raises(PushPermissionError) as caught:
        push(compressed, token=token, endpoint=hub.url)
    assert "HTTP 401" in str(caught.value) and "huggingface-cli login" in str(caught.value)
    assert caught.value.retry_command == f"swm-hub push {compressed}"
    assert_token_hidden(caught.value, logs, token)


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
    assert "cannot reach the Hub" in str(error) and "the local folder is unchanged" in str(error)
    assert error.retry_command == f"swm-hub push {compressed} --repo-id {USER}/tiny --private"
    assert_token_hidden(error, logs, TOKEN)
    assert fingerprint(compressed) == before


def test_offline_mode_is_reported_with_its_variable(compressed: Path, logs: pytest.LogCaptureFixture) -> None:
    reset_sessions()  # the session of this thread must be the offline one the test run configures
    with pytest.raises(PushError) as caught:
        push(compressed, repo_id=f"{USER}/tiny", token=TOKEN)
    assert "HF_HUB_OFFLINE" in str(caught.value)
    assert_token_hidden(caught.value, logs, TOKEN)


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
    command = retry_command(Path("my models/out"), "me/x", True, "dev", True, "it's done")
    assert command == (
        "swm-hub push 'my models/out' --repo-id me/x --private --revision dev --create-pr "
        "--commit-message 'it'\"'\"'s done'"
    )

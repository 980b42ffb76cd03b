"""Shared fixtures: an offline environment and tiny random models of every supported architecture."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_TOKEN"] = ""
os.environ["NO_COLOR"] = "1"
os.environ["COLUMNS"] = "200"
os.environ.setdefault("SWM_HUB_QUIET", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from swm_hub.core.options import CalibrationOptions  # noqa: E402

TINY_LAYERS = 6
TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A tiny model reads tiny text, and the merged model must "
    "still load and generate. Layers that compute nearly the same function can be consolidated into one. "
) * 4

# Per-architecture overrides on top of the common tiny shape: the keys each config class names differently.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3},
    "qwen3": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 16},
    "gemma3_text": {"head_dim": 8, "sliding_window": 16, "sliding_window_pattern": 3},
    "phi3": {"pad_token_id": 0},
    "gpt2": {"n_embd": 32, "n_layer": TINY_LAYERS, "n_head": 4, "n_positions": 128},
    "gpt_neox": {"rotary_pct": 0.5},
}
COMMON = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": TINY_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "vocab_size": 300,
    "tie_word_embeddings": False,
}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a fixed sentence: offline, deterministic, and real enough to encode prose."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=COMMON["vocab_size"],
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny_model(model_type: str, seed: int = 0) -> Any:
    """A random ``*ForCausalLM`` of ``model_type`` with six layers of width 32."""
    config = AutoConfig.for_model(model_type, **{**COMMON, **TINY_CONFIGS[model_type]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny_model(model_type: str, folder: Path) -> Path:
    """Write a tiny model, its tokenizer and generation config, as ``save_pretrained`` would for a user."""
    model = build_tiny_model(model_type)
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Return a factory: model_type -> folder holding a saved tiny model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = save_tiny_model(model_type, tmp_path_factory.mktemp(f"tiny-{model_type}"))
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> CalibrationOptions:
    """A small calibration set from a text file, the way a user passes --calib."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TINY_TEXT * 20, encoding="utf-8")
    return CalibrationOptions(text=path, samples=4, seq_len=16, batch_size=2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(autouse=True)
def _no_stray_files() -> Iterator[None]:
    """Fail a test that leaves files in the working directory (it must write under tmp_path)."""
    before = set(os.listdir("."))
    yield
    created = set(os.listdir(".")) - before
    assert not created, f"test left files behind: {sorted(created)}"

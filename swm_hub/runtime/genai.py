"""Run an onnxruntime-genai export: load its folder and generate greedily with onnxruntime-genai's generator.

Running a genai folder is execution, not export, so it lives in the runtime layer: the benchmark
(``swm-hub bench --backend genai``) times it, and the genai export (``swm_hub.stages.export.genai``), which
only builds the folder, validates what it built by generating with it. Neither stage imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swm_hub.core.errors import CorruptWeightsError, MissingDependencyError, UnknownModelError

__all__ = [
    "GENAI_CONFIG_FILE",
    "GENAI_SUBFOLDER",
    "GenaiModel",
    "GenaiOutput",
    "genai_folder",
    "require_genai",
]

GENAI_SUBFOLDER: str = "genai"
GENAI_CONFIG_FILE: str = "genai_config.json"
_INSTALL: str = "pip install 'swm-hub[genai]'"
_PRECISION_DTYPES: Mapping[str, torch.dtype] = {
    "int4": torch.int4,  # type: ignore[attr-defined]  # in torch since 2.5, not in its stubs
    "int8": torch.int8,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ONNX_FLOAT_NAMES: Mapping[int, str] = {1: "float32", 10: "float16", 16: "bfloat16"}


def require_genai() -> Any:
    """The ``onnxruntime_genai`` module, or an error with the command that installs it."""
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime-genai", _INSTALL) from exc
    return onnxruntime_genai


def genai_folder(name: str | Path) -> Path:
    """The export folder: ``name`` itself when it holds ``genai_config.json``, else its ``genai/`` subfolder."""
    path = Path(name).expanduser()
    for folder in (path, path / GENAI_SUBFOLDER):
        if (folder / GENAI_CONFIG_FILE).is_file():
            return folder.absolute()
    raise UnknownModelError(
        str(name),
        f"{path} holds no {GENAI_CONFIG_FILE} and no {GENAI_SUBFOLDER}/ subfolder with one: run "
        f"`swm-hub export {path} --format genai`",
    )


@dataclass(frozen=True)
class GenaiOutput:
    """The prefill's result in the shape a transformers model returns: ``logits`` of ``[1, 1, vocab]``."""

    logits: torch.Tensor


class GenaiModel:
    """An onnxruntime-genai export, loaded, with its own greedy generation loop.

    Besides ``greedy`` it answers the two calls the benchmark makes of a transformers model (``__call__``
    for the prefill, ``generate`` for a whole generation), so that both are timed the same way. Batch 1,
    no padding: the attention mask is all ones and genai builds its own.
    """

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        genai = require_genai()
        self.folder = Path(folder)
        self.config = _read_genai_config(self.folder)
        try:
            settings = genai.Config(str(self.folder))
            if threads is not None:
                options = {"session_options": {"intra_op_num_threads": threads}}
                settings.overlay(json.dumps({"model": {"decoder": options}}))
            self._model = genai.Model(settings)
        except RuntimeError as exc:
            raise CorruptWeightsError(
                self.folder, f"onnxruntime-genai cannot load the export ({exc})"
            ) from exc
        self._genai = genai

    @property
    def layers(self) -> int:
        """Decoder layers, as the export's config declares them."""
        return int(self.config["model"]["decoder"]["num_hidden_layers"])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids genai stops at (the config's and the tokenizer's end of sequence)."""
        eos = self.config["model"].get("eos_token_id", ())
        return tuple(int(token) for token in (eos if isinstance(eos, list) else [eos]))

    @property
    def weights_mb(self) -> float:
        """Size of the ONNX graph and its external weights on disk."""
        return sum(file.stat().st_size for file in self.folder.glob("*.onnx*") if file.is_file()) / 2**20

    @property
    def precision(self) -> str:
        """``int4``/``int8`` when the graph holds ``MatMulNBits`` weights, else its logits' float type."""
        import onnx

        graph = onnx.load(
            str(self.folder / self.config["model"]["decoder"]["filename"]), load_external_data=False
        )
        for node in graph.graph.node:
            if node.op_type == "MatMulNBits":
                bits = next(attribute.i for attribute in node.attribute if attribute.name == "bits")
                return f"int{bits}"
        logits = next(output for output in graph.graph.output if output.name == "logits")
        return _ONNX_FLOAT_NAMES.get(logits.type.tensor_type.elem_type, "unknown")

    @property
    def dtype(self) -> torch.dtype:
        """``precision`` as a torch dtype, for reports that name dtypes."""
        return _PRECISION_DTYPES.get(self.precision, torch.float32)

    def greedy(
        self,
        prompt: Sequence[int],
        new_tokens: int,
        min_new_tokens: int | None = None,
        keep_logits: bool = False,
    ) -> tuple[list[int], list[np.ndarray]]:
        """Generate greedily after ``prompt``: the new tokens, and with ``keep_logits`` each step's logits.

        End of sequence is suppressed until ``min_new_tokens`` (default ``new_tokens``) are out, as
        transformers' ``min_new_tokens`` does. The logits of a step are those the step chose its token from.
        """
        generator = self._generator(
            len(prompt), new_tokens, new_tokens if min_new_tokens is None else min_new_tokens
        )
        generator.append_tokens(list(prompt))
        tokens: list[int] = []
        logits: list[np.ndarray] = []
        while len(tokens) < new_tokens and not generator.is_done():
            if keep_logits:
                logits.append(np.array(generator.get_logits())[0, -1])
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, logits

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = True
    ) -> GenaiOutput:
        """The prefill: the prompt in, the logits of its last position out."""
        generator = self._generator(int(input_ids.shape[-1]), 1, 0)
        generator.append_tokens(_one_sequence(input_ids))
        return GenaiOutput(logits=torch.from_numpy(np.array(generator.get_logits())))

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: Any = None,
    ) -> torch.Tensor:
        """Greedy generation of ``generation_config.max_new_tokens``: the prompt and the new tokens, ``[1, n]``."""
        new_tokens = int(generation_config.max_new_tokens)
        minimum = getattr(generation_config, "min_new_tokens", None)
        prompt = _one_sequence(input_ids)
        tokens, _ = self.greedy(prompt, new_tokens, minimum)
        return torch.tensor([prompt + tokens], dtype=torch.long)

    def _generator(self, prompt_tokens: int, new_tokens: int, min_new_tokens: int) -> Any:
        params = self._genai.GeneratorParams(self._model)
        params.set_search_options(
            do_sample=False,
            max_length=prompt_tokens + new_tokens,
            min_length=prompt_tokens + min_new_tokens,
        )
        return self._genai.Generator(self._model, params)


def _one_sequence(input_ids: torch.Tensor) -> list[int]:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"GenaiModel runs batch 1; got input_ids of shape {list(input_ids.shape)}")
    return [int(token) for token in input_ids[0].tolist()]


def _read_genai_config(folder: Path) -> dict[str, Any]:
    file = folder / GENAI_CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        data["model"]["decoder"]["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptWeightsError(file, f"not a readable onnxruntime-genai config ({exc!r})") from exc
    config: dict[str, Any] = data
    return config

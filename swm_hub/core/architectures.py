"""What swm-hub must know about each decoder architecture, as data.

Depth merging needs little per architecture: where the decoder layers sit (everything under
``{layers_path}.{i}.`` belongs to layer i), where the final norm sits (to turn a hidden state into logits),
which config key counts the layers, and which config fields describe one layer each and so must be rewritten
when layers go. Those fields come in kinds, each with its own rewrite (see ``config_rewrite``). Nothing
outside this module branches on ``model_type``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from swm_hub.core.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    """One family of decoder-only causal LMs, keyed by ``model_type``.

    Attributes:
        layers_path: dotted attribute path of the decoder ``ModuleList`` in the ``*ForCausalLM`` model; it is
            also the state-dict prefix of the layers.
        final_norm_path: dotted path of the norm applied after the last layer, before the LM head.
        count_key: the ``config.json`` key that holds the number of layers.
        layer_indexed_fields: lists with one entry per layer (``layer_types``); keep the surviving entries.
        cutoff_fields: a layer number below which something applies (``max_window_layers``); recompute.
        logit_softcap_key: config key of a final logit soft-capping (Gemma 2/3), applied after the LM head.
        mlp_out_path: the MLP's output projection inside a layer, whose output is added to the residual stream
            as is; the least-squares consolidation refits it. None where a norm follows it (Gemma 2/3), which
            makes the fit non-linear: the fit rule trains the layer by gradient steps there instead.
        onnx_atol: the largest absolute difference allowed between torch and ONNX Runtime outputs (logits and
            KV cache) of a float32 export; float16 exports use ``onnx_atol_fp16``. SmolLM2-135M's logits
            differ by up to 1e-4 (sums in another order), so 1e-3 leaves room for larger models while a wrong
            mask or cache still fails by orders of magnitude.
        onnx_atol_fp16: the same tolerance for float16 exports (float16 steps are 0.016 between 16 and 32).
    """

    layers_path: str
    final_norm_path: str
    count_key: str = "num_hidden_layers"
    layer_indexed_fields: tuple[str, ...] = ()
    cutoff_fields: tuple[str, ...] = ()
    logit_softcap_key: str | None = None
    mlp_out_path: str | None = "mlp.down_proj"
    onnx_atol: float = 1e-3
    onnx_atol_fp16: float = 1e-1


_LLAMA_LIKE = ArchitectureSpec(layers_path="model.layers", final_norm_path="model.norm")
_QWEN = ArchitectureSpec(
    layers_path="model.layers",
    final_norm_path="model.norm",
    layer_indexed_fields=("layer_types",),
    cutoff_fields=("max_window_layers",),
)
_GEMMA = ArchitectureSpec(
    layers_path="model.layers",
    final_norm_path="model.norm",
    layer_indexed_fields=("layer_types",),
    logit_softcap_key="final_logit_softcapping",
    mlp_out_path=None,
)

ARCHITECTURES: Mapping[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "qwen2": _QWEN,
    "qwen3": _QWEN,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt2": ArchitectureSpec(
        layers_path="transformer.h",
        final_norm_path="transformer.ln_f",
        count_key="n_layer",
        mlp_out_path="mlp.c_proj",
    ),
    "gpt_neox": ArchitectureSpec(
        layers_path="gpt_neox.layers",
        final_norm_path="gpt_neox.final_layer_norm",
        mlp_out_path="mlp.dense_4h_to_h",
    ),
}


def supported_model_types() -> tuple[str, ...]:
    """The model types that swm-hub can merge, sorted for messages."""
    return tuple(sorted(ARCHITECTURES))


def spec_for(model_type: str | None) -> ArchitectureSpec:
    """The registry entry of ``model_type``, or an error naming what is supported."""
    if model_type is None or model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(str(model_type), supported_model_types())
    return ARCHITECTURES[model_type]


def spec_for_config(config: Any) -> ArchitectureSpec:
    """The registry entry of a transformers ``PretrainedConfig`` (or anything with ``model_type``)."""
    return spec_for(getattr(config, "model_type", None))

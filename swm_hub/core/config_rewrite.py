"""The config of a merged model: the layer count and every per-layer field, rewritten by kind.

After merging, the surviving layers are described by ``kept``: for each new layer position, the original
index of the layer that represents it. A merged window ``l..h`` is represented by its lowest layer ``l``,
whose own per-layer settings (attention type, ...) it keeps. Which fields need which rewrite comes only from
the architecture registry, so a new architecture is a new registry entry, not a new branch here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from swm_hub.core.architectures import ArchitectureSpec, spec_for
from swm_hub.core.errors import PlanMismatchError

__all__ = ["check_kept", "kept_layers", "rewrite_config"]

_ALIAS_COUNT_KEY = "num_hidden_layers"


def kept_layers(num_layers: int, windows: Sequence[tuple[int, int]]) -> list[int]:
    """Turn inclusive merge windows into ``kept``, refusing windows that would merge an end layer away.

    Layer 0 may start a window (it then represents it); the last layer may sit in no window, because a
    window is represented by its lowest layer and the last layer would vanish into a lower one.
    """
    if num_layers < 1:
        raise PlanMismatchError(f"a model needs at least one layer, got {num_layers}")
    ordered = sorted(windows)
    for start, end in ordered:
        _check_window(start, end, num_layers)
    for (start, end), (next_start, next_end) in zip(ordered, ordered[1:], strict=False):
        if next_start <= end:
            raise PlanMismatchError(f"merge windows {start}..{end} and {next_start}..{next_end} overlap")
    merged_away = {index for start, end in ordered for index in range(start + 1, end + 1)}
    return [index for index in range(num_layers) if index not in merged_away]


def _check_window(start: int, end: int, num_layers: int) -> None:
    """Refuse a window that merges nothing or reaches past the second-to-last layer."""
    if end <= start:
        raise PlanMismatchError(f"merge window {start}..{end} must span at least two layers")
    if start < 0 or end > num_layers - 2:
        raise PlanMismatchError(
            f"merge window {start}..{end} must lie within layers 0..{num_layers - 2} "
            f"(the last layer {num_layers - 1} is never merged away)"
        )


def check_kept(kept: Sequence[int], num_layers: int) -> None:
    """Refuse a ``kept`` list that no set of merge windows could have produced for ``num_layers`` layers.

    Every rewrite below relies on these properties (positions are monotonic, both ends survive), so they
    are checked once, up front, instead of producing a config that loads but means something else.
    """
    if not kept:
        raise PlanMismatchError("the list of kept layers is empty")
    if any(later <= earlier for earlier, later in zip(kept, kept[1:], strict=False)):
        raise PlanMismatchError(f"kept layers must be strictly increasing, got {list(kept)}")
    if kept[0] != 0 or kept[-1] != num_layers - 1:
        raise PlanMismatchError(
            f"kept layers must start at layer 0 and end at the last layer {num_layers - 1}, got {list(kept)}"
        )


def rewrite_config(config: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """Return a new ``config.to_dict()``-style dict describing only the ``kept`` layers.

    Works on the dict rather than a config object so that what is written is exactly what
    ``from_pretrained`` will read back; the input is left untouched.
    """
    spec = spec_for(config.get("model_type"))
    num_layers = _layer_count(config, spec)
    check_kept(kept, num_layers)
    new = copy.deepcopy(config)
    new[spec.count_key] = len(kept)
    if spec.count_key != _ALIAS_COUNT_KEY and config.get(_ALIAS_COUNT_KEY) is not None:
        new[_ALIAS_COUNT_KEY] = len(kept)
    for field in spec.layer_indexed_fields:
        entries = _per_layer_entries(config, field, num_layers)
        if entries is not None:
            new[field] = [entries[index] for index in kept]
    for field in spec.cutoff_fields:
        if config.get(field) is not None:
            new[field] = sum(1 for index in kept if index < config[field])
    return new


def _layer_count(config: dict[str, Any], spec: ArchitectureSpec) -> int:
    count = config.get(spec.count_key)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise PlanMismatchError(f"config key {spec.count_key!r} must hold the layer count, got {count!r}")
    return count


def _per_layer_entries(config: dict[str, Any], field: str, num_layers: int) -> list[Any] | None:
    """The field's one-entry-per-layer list, derived by the config class when the dict leaves it implicit.

    Configs such as Gemma 3 may carry only a pattern scalar; the class expands it, and its expansion is the
    only one guaranteed to match what transformers would have built for the original model.
    """
    entries = config.get(field)
    if entries is None:
        # Imported here: the plan reads this module, and reading a plan (push, card) should not load torch.
        from transformers import AutoConfig

        entries = getattr(AutoConfig.for_model(**config), field, None)
        if entries is None:
            return None
    if not isinstance(entries, (list, tuple)) or len(entries) != num_layers:
        raise PlanMismatchError(
            f"config field {field!r} should have one entry per layer ({num_layers}): {entries!r}"
        )
    return list(entries)

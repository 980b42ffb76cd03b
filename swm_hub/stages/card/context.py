"""What the model card shows, as typed values: one dataclass per section, and ``CardContext`` holding them.

The template reads only these, so what a card can say is fixed here, and a section whose results were not
measured is ``None`` rather than a blank the template would have to guess around.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from swm_hub.core.license import LicenseInfo
from swm_hub.results.heal import HealInfo
from swm_hub.results.weights import ParamCounts


@dataclass(frozen=True)
class BaseInfo:
    """The model that was compressed: how to name it, and its Hub id when it has one."""

    label: str
    hub_id: str | None
    revision: str | None
    url: str | None


@dataclass(frozen=True)
class MethodInfo:
    """The method preset, the consolidation rule and the threshold the search settled on."""

    name: str
    summary: str | None
    merge: str
    merge_summary: str | None
    merge_reference: str | None
    score: str
    threshold: float | None
    target: str


@dataclass(frozen=True)
class WindowRow:
    """One merged window: original layers ``first..last`` (inclusive) became layer ``new_index``."""

    first: int
    last: int
    size: int
    new_index: int
    similarity: float | None


@dataclass(frozen=True)
class HeatmapInfo:
    """The heatmap image and, when similarity.json is there, what it measured."""

    image: str
    metric: str | None
    tokens: int | None
    text: str | None


@dataclass(frozen=True)
class PerplexityLine:
    """One row of the perplexity table; ``vs_base`` is the change against the base model, in percent."""

    name: str
    layers: int
    perplexity: float
    vs_base: float | None
    dropped: str
    is_drop_baseline: bool
    by_kind: list[float]


@dataclass(frozen=True)
class PerplexityInfo:
    """eval.json: held-out perplexity of the base, this model and the plain layer-dropping baselines."""

    text: str
    blocks: int
    seq_len: int
    rows: list[PerplexityLine]
    merged: PerplexityLine | None
    drop_baselines: list[PerplexityLine]
    kinds: list[str]
    worst_kind: str | None
    worst_ratio: float | None


@dataclass(frozen=True)
class LatencyTable:
    """One latency measurement: a column per model, a row per measure, as bench.json holds them."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    summary: str | None


@dataclass(frozen=True)
class CardContext:
    """Everything the template shows; optional sections are None when their results were not measured."""

    model_name: str
    load_id: str
    repo_id: str | None
    base: BaseInfo
    model_type: str
    layers_before: int
    layers_after: int
    removed: int
    params: ParamCounts | None
    method: MethodInfo
    calibration: str
    windows: list[WindowRow]
    heatmap: HeatmapInfo | None
    perplexity: PerplexityInfo | None
    latency: list[LatencyTable] | None
    onnx_folder: str | None
    reproduce: str
    reproduce_plan: str
    license: LicenseInfo
    tags: list[str]
    paper_url: str
    paper_title: str
    citation: str
    swm_hub_version: str
    heal: HealInfo | None = None
    """The heal record of the plan (and heal.json's comparison); None for a model that was not healed."""

    def for_repo(self, repo_id: str) -> CardContext:
        """The same card naming the Hub repository ``repo_id`` (title and loading code)."""
        return replace(self, repo_id=repo_id, load_id=repo_id, model_name=repo_id.split("/")[-1])

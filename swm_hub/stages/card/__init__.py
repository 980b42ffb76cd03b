"""The model card: a README.md for a compressed folder, filled only from the results saved in that folder.

``build_context`` reads what the stages wrote (``swm_plan.json`` always; ``similarity.json`` and
``similarity.png``, ``eval.json``, ``bench.json`` and ``onnx/`` when those stages ran), the weights' own
headers (``ParamCounts``) and the base model's licence (``core.license``) into one typed ``CardContext``;
each result is read by its type in ``swm_hub.results``, so the card only composes sections from objects. A
section whose results were not measured is ``None`` in the context and absent from the card: nothing is
estimated or filled in. ``render_context`` renders the packaged Jinja template with ``StrictUndefined``, so
a value the template needs and the context lacks fails instead of rendering blank, and puts the Hub
metadata (``ModelCardData``) on top.

The package: ``context`` holds the section types, ``plan_sections`` composes the sections every card has
from the plan, ``measured`` those of the stages that ran, and ``public_text`` the names and commands a
public card may show; this module joins them and renders.

The Hub reads ``base_model_relation`` from the metadata, and accepts only ``adapter``, ``merge``,
``quantized`` and ``finetune`` (huggingface/hub-docs ``docs/hub/model-cards.md``, "Specifying a base
model"; huggingface_hub 0.36 passes the key through without checking it). A merged-depth model is one base
model's weights, changed (the ``fit`` rule even refits them on data): that is ``finetune``. ``merge`` would
file it among merges of several models, and leaving the key out lets the Hub guess, which it does from the
files (ONNX files have made it guess ``quantized``). The pruning itself is said by the ``pruned`` tag.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from swm_hub.core.atomic import write_text_atomically
from swm_hub.core.files import CARD_FILE, ONNX_FOLDER
from swm_hub.core.license import base_license
from swm_hub.core.merge_rules import PAPER_URL
from swm_hub.results.heal import heal_info
from swm_hub.results.plan import MergePlan, default_repo_name
from swm_hub.results.weights import ParamCounts
from swm_hub.stages.card.context import (
    BaseInfo,
    CardContext,
    HeatmapInfo,
    LatencyTable,
    MethodInfo,
    PerplexityInfo,
    PerplexityLine,
    WindowRow,
)
from swm_hub.stages.card.measured import heatmap_info, latency_tables, perplexity_info
from swm_hub.stages.card.plan_sections import base_info, method_info, window_rows
from swm_hub.stages.card.public_text import calibration_text, reproduce_command

__all__ = [
    "BASE_MODEL_RELATION",
    "CARD_FILE",
    "CARD_TAGS",
    "CITATION",
    "BaseInfo",
    "CardContext",
    "HeatmapInfo",
    "LatencyTable",
    "MethodInfo",
    "PerplexityInfo",
    "PerplexityLine",
    "WindowRow",
    "build_context",
    "card_metadata",
    "render_card",
    "render_context",
    "render_template",
    "reproduce_command",
    "write_card",
]

logger = logging.getLogger(__name__)

TEMPLATE_NAME: str = "model_card.md.j2"

BASE_MODEL_RELATION: str = "finetune"
"""The Hub's relation for one base model's weights, changed; see the module docstring."""
CARD_TAGS: tuple[str, ...] = ("swm", "pruned", "sliding-window-merging", "layer-merging")

PAPER_TITLE: str = "Sliding-Window Merging for Compacting Patch-Redundant Layers in LLMs"
CITATION: str = """\
@misc{ding2025slidingwindowmerging,
  title         = {Sliding-Window Merging for Compacting Patch-Redundant Layers in {LLMs}},
  author        = {Ding, Xuan and Sun, Rui and Zhang, Yunjian and Yan, Xiu and Zhou, Yueqi and Huang, Kaihao
                   and Fu, Suzhong and Aviles-Rivero, Angelica I. and Xie, Chuanlong and Zhu, Yao},
  year          = {2025},
  eprint        = {2502.19159},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2502.19159}
}"""


# --- public entry points -----------------------------------------------------------------------------------


def render_card(folder: Path, repo_id: str | None = None) -> str:
    """The README.md text for a compressed folder (``repo_id``: the Hub id the loading code should name).

    Raises:
        UnknownModelError: the folder has no swm_plan.json.
        PlanMismatchError: swm_plan.json cannot be parsed.
        ResultFileError: similarity.json or eval.json exists but cannot be read (an unreadable bench.json
            only leaves the latency section out).
        ResultFileVersionError: a result file was written by a newer swm-hub.
        jinja2.UndefinedError: the template needs a value the context lacks (a bug, not a user error).
    """
    return render_context(build_context(Path(folder), repo_id))


def write_card(folder: Path, repo_id: str | None = None, name: str | None = None) -> Path:
    """Write README.md into ``folder`` atomically (a temporary file beside it, then ``os.replace``).

    ``name`` is the folder's name once it is in place, for a card written into ``compress``'s temporary
    folder (whose own name would otherwise appear in the loading and reproducing commands).
    """
    folder = Path(folder)
    content = render_context(build_context(folder, repo_id, name))
    target = write_text_atomically(folder / CARD_FILE, content)
    logger.debug("wrote %s", target)  # the commands say where the folder (or card) went
    return target


def render_context(context: CardContext) -> str:
    """Metadata block plus the rendered template, checked by parsing it back with ``ModelCard``."""
    values = {item.name: getattr(context, item.name) for item in fields(context)}
    values["metadata"] = card_metadata(context).to_yaml()
    content = render_template(values)
    ModelCard(content, ignore_metadata_errors=False)  # raises if the YAML block does not parse
    return content


def render_template(values: Mapping[str, Any]) -> str:
    """Render the packaged template; a name it uses that ``values`` lacks raises ``jinja2.UndefinedError``."""
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML; table cells are escaped by the ``cell`` filter
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["cell"] = _cell
    environment.filters["count"] = _count
    template_text = resources.files(__name__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    return environment.from_string(template_text).render(**values)


def card_metadata(context: CardContext) -> ModelCardData:
    """The YAML metadata the Hub reads: base model and relation, library, task, tags and licence."""
    extra: dict[str, Any] = {}
    if context.base.hub_id is not None:
        extra["base_model"] = context.base.hub_id
        extra["base_model_relation"] = BASE_MODEL_RELATION
    return ModelCardData(
        license=context.license.license,
        license_name=context.license.name,
        license_link=context.license.link,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(context.tags),
        **extra,
    )


# --- building the context ----------------------------------------------------------------------------------


def build_context(folder: Path, repo_id: str | None = None, name: str | None = None) -> CardContext:
    """Read every result file in ``folder`` into a ``CardContext`` (see ``render_card`` for errors).

    ``name`` stands for ``folder.name`` in the commands the card shows (see ``write_card``).
    """
    folder = Path(folder)
    name = name or folder.name
    plan = MergePlan.in_folder(folder)
    onnx = folder / ONNX_FOLDER
    has_onnx = onnx.is_dir() and any(onnx.glob("*.onnx"))
    context = CardContext(
        model_name=default_repo_name(plan),
        load_id=name,
        repo_id=None,
        base=base_info(plan),
        model_type=plan.model_type,
        layers_before=plan.num_layers,
        layers_after=plan.layers_after,
        removed=plan.removed,
        params=ParamCounts.in_folder(folder, plan),
        method=method_info(plan),
        calibration=calibration_text(plan.calibration),
        windows=window_rows(plan),
        heatmap=heatmap_info(folder),
        perplexity=perplexity_info(folder, plan),
        latency=latency_tables(folder),
        heal=heal_info(folder, plan),
        onnx_folder=ONNX_FOLDER if has_onnx else None,
        reproduce=reproduce_command(plan, name),
        reproduce_plan=reproduce_command(plan, name, with_plan=True),
        license=base_license(plan.model, plan.base_model, plan.revision),
        tags=[*CARD_TAGS, plan.model_type, *(["onnx"] if has_onnx else [])],
        paper_url=PAPER_URL,
        paper_title=PAPER_TITLE,
        citation=CITATION,
        swm_hub_version=plan.swm_hub_version,
    )
    return context if repo_id is None else context.for_repo(repo_id)


# --- template filters --------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _count(value: int) -> str:
    """A parameter count with thousands separators."""
    return f"{value:,}"

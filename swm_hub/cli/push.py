"""``swm-hub push``: upload a compressed folder to the Hub in one commit."""

from __future__ import annotations

from typing import Any

from swm_hub.cli.common import FolderArg, echo, with_options
from swm_hub.core.options import PUSH_HELP, PushOptions

EXAMPLES = """\b
Examples:
  swm-hub push smollm2-swm-24L --dry-run
  swm-hub push smollm2-swm-24L --repo-id me/smollm2-swm-24L --private
  swm-hub push smollm2-swm-24L --create-pr --commit-message "Re-merged with --ratio 0.3"
"""


@with_options("settings", PushOptions, PUSH_HELP)
def push(
    model_dir: FolderArg,
    settings: dict[str, Any] | None = None,
) -> None:
    """Upload a compressed folder to the Hub in one commit: weights, ONNX, card, plan and heatmap.

    The token comes from the usual huggingface_hub places (HF_TOKEN, or 'hf auth login').
    """
    options = PushOptions(**(settings or {}))
    from swm_hub.pipeline.push import push_folder

    echo(push_folder(model_dir, options).lines())

"""``swm-hub push``: upload a compressed folder to the Hub in one commit."""

from __future__ import annotations

from typing import Annotated

import typer

from swm_hub.cli.common import FolderArg, echo
from swm_hub.core.options import PushOptions

EXAMPLES = """\b
Examples:
  swm-hub push smollm2-swm-24L --dry-run
  swm-hub push smollm2-swm-24L --repo-id me/smollm2-swm-24L --private
  swm-hub push smollm2-swm-24L --create-pr --commit-message "Re-merged with --ratio 0.3"
"""


def push(
    model_dir: FolderArg,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="default: <user>/<base-name>-swm-<N>L", show_default=False)
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="branch to push to", show_default=False)
    ] = None,
    create_pr: Annotated[
        bool, typer.Option("--create-pr", help="open a pull request instead of committing")
    ] = False,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", help="commit title", show_default=False)
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be uploaded, upload nothing")
    ] = False,
) -> None:
    """Upload a compressed folder to the Hub in one commit: weights, ONNX, card, plan and heatmap.

    The token comes from the usual huggingface_hub places (HF_TOKEN, or 'hf auth login').
    """
    options = PushOptions(repo_id, private, revision, create_pr, commit_message, dry_run)
    from swm_hub.pipeline.push import push_folder

    echo(push_folder(model_dir, options).lines())

"""The one switch for progress bars and chatter: ours, huggingface_hub's and transformers'."""

from __future__ import annotations

import logging
import os

from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]


def quiet_requested(flag: bool) -> bool:
    """``--quiet`` or a non-empty ``SWM_HUB_QUIET`` other than 0 silences bars."""
    return flag or os.environ.get("SWM_HUB_QUIET", "") not in ("", "0")


def configure(quiet: bool) -> bool:
    """Set bars and log levels for a command; returns whether our own bars should show.

    transformers is imported here, by the commands that run a model, so that ``--help`` does without it.
    """
    from transformers.utils import logging as transformers_logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    if quiet:
        disable_progress_bars()
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return not quiet

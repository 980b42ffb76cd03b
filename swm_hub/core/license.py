"""The licence of a base model, as its own files on this machine state it.

A model name is a demo name, a GGUF file, a folder or a Hub id, and each says its licence in its own place:
the GGUF metadata, the folder's model card, or the model card in the Hub cache. The card of a compressed
model restates it; nothing here goes online, so a card can be written (and a folder pushed) offline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, try_to_load_from_cache

from swm_hub.core.files import CARD_FILE
from swm_hub.core.packaged_models import demo_gguf_on_disk

logger = logging.getLogger(__name__)

UNKNOWN_LICENSE: str = "other"

_LicenseFound = tuple[str, str | None, str | None]


@dataclass(frozen=True)
class LicenseInfo:
    """The base model's licence as its own files state it; ``source`` is None when none could be read."""

    license: str
    name: str | None
    link: str | None
    source: str | None


def base_license(model: str, hub_id: str | None, revision: str | None) -> LicenseInfo:
    """The licence of ``model`` (the name as the user typed it) from its files, or ``other`` with no source.

    ``hub_id`` and ``revision`` name the Hub repository the weights come from, whose cached card is the
    last place asked.
    """
    for source, reader in _license_sources(model, hub_id, revision):
        try:
            found = reader()
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            logger.debug("no licence from %s: %s", source, exc)
            continue
        if found is not None:
            license_id, name, link = found
            return LicenseInfo(license=license_id, name=name, link=link, source=source)
    return LicenseInfo(license=UNKNOWN_LICENSE, name=None, link=None, source=None)


def _license_sources(
    model: str, hub_id: str | None, revision: str | None
) -> list[tuple[str, Callable[[], _LicenseFound | None]]]:
    """(description, reader) pairs, most direct first; each reader returns the licence or None."""
    sources: list[tuple[str, Callable[[], _LicenseFound | None]]] = []
    local = Path(model).expanduser()
    demo_file = demo_gguf_on_disk(model)
    if demo_file is not None:
        sources.append(("the metadata of its GGUF file", lambda: _gguf_license(demo_file)))
    elif local.is_file() and local.suffix.lower() == ".gguf":
        sources.append(("the metadata of its GGUF file", lambda: _gguf_license(local)))
    elif local.is_dir():
        sources.append(("its model card", lambda: _card_license(local / CARD_FILE)))
    if hub_id is not None:
        sources.append(("its model card on the Hub", lambda: _cached_card_license(hub_id, revision)))
    return sources


def _gguf_license(file: Path) -> _LicenseFound | None:
    import gguf

    field = gguf.GGUFReader(file).get_field("general.license")
    value = field.contents() if field is not None else None
    return (value, None, None) if isinstance(value, str) and value.strip() else None


def _card_license(readme: Path) -> _LicenseFound | None:
    if not readme.is_file():
        return None
    data = ModelCard.load(readme, ignore_metadata_errors=True).data
    license_id = data.get("license")
    if not isinstance(license_id, str) or not license_id.strip():
        return None
    name, link = data.get("license_name"), data.get("license_link")
    return (
        license_id,
        name if isinstance(name, str) else None,
        link if isinstance(link, str) else None,
    )


def _cached_card_license(hub_id: str, revision: str | None) -> _LicenseFound | None:
    """The base model's README.md if the Hub cache holds it; never goes online."""
    cached = try_to_load_from_cache(hub_id, CARD_FILE, revision=revision)
    return _card_license(Path(cached)) if isinstance(cached, str) else None

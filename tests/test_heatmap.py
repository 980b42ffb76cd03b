"""The heatmap writes a real, readable PNG for shallow and deep models."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
import torch

from swm_hub.results.heatmap import save_heatmap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def near_one_matrix(count: int) -> torch.Tensor:
    """CKA-like values packed just under 1, with a block structure, as real models give."""
    index = torch.arange(count, dtype=torch.float64)
    return 1.0 - 1e-4 * (index[:, None] - index[None, :]).abs() / count


@pytest.mark.parametrize("count", [6, 40])
def test_writes_a_png_with_per_layer_bars(tmp_path: Path, count: int) -> None:
    per_layer = [0.01 * (i % 7) for i in range(count)]
    path = save_heatmap(
        near_one_matrix(count),
        tmp_path / "figures" / f"cka_{count}.png",
        title=f"linear CKA, {count} layers",
        per_layer=per_layer,
        per_layer_label="1 - cos(in, out)",
    )
    assert path == tmp_path / "figures" / f"cka_{count}.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200
    assert image.shape[1] > 200


def test_writes_without_bars_and_with_labels(tmp_path: Path) -> None:
    labels = [f"L{i}" for i in range(8)]
    path = save_heatmap(torch.eye(8), tmp_path / "plain.png", title="cosine", labels=labels)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_constant_matrix_still_draws(tmp_path: Path) -> None:
    path = save_heatmap(torch.ones(6, 6), tmp_path / "flat.png", title="flat")
    assert path.stat().st_size > 0


def test_rejects_wrong_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="square"):
        save_heatmap(torch.ones(3, 4), tmp_path / "x.png", title="x")
    with pytest.raises(ValueError, match="labels"):
        save_heatmap(torch.eye(4), tmp_path / "x.png", title="x", labels=["a"])
    with pytest.raises(ValueError, match="per-layer"):
        save_heatmap(torch.eye(4), tmp_path / "x.png", title="x", per_layer=[1.0])
    assert not (tmp_path / "x.png").exists()

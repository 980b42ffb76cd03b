"""Invariants of the similarity engine that a wrong formula would break."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from swm_hub.core import similarity
from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.options import METRICS, AnalyzeOptions
from swm_hub.core.similarity import (
    PAIRWISE_METRICS,
    angular_distance,
    io_redundancy,
    linear_cka,
    mean_cosine,
    rbf_cka,
    sample_rows,
    similarity_matrix,
)

CKA_METRICS = [linear_cka, rbf_cka]


def random_rows(n: int, d: int, seed: int) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_rotation(d: int, seed: int) -> Tensor:
    q, _ = torch.linalg.qr(random_rows(d, d, seed))
    return q


def correlated_pair(n: int = 60, d: int = 16) -> tuple[Tensor, Tensor]:
    """Two inputs that share structure but are not equal, so CKA sits strictly between 0 and 1."""
    x = random_rows(n, d, 1)
    y = torch.tanh(x @ random_rows(d, d + 4, 2)) + 0.5 * random_rows(n, d + 4, 3)
    return x, y


def slow_unbiased_hsic(gram_k: Tensor, gram_l: Tensor) -> float:
    """The Song et al. (2012) formula written out with loops and full matrices."""
    n = gram_k.shape[0]
    k, m = gram_k.clone(), gram_l.clone()
    for i in range(n):
        k[i, i] = 0.0
        m[i, i] = 0.0
    ones = torch.ones(n, 1, dtype=torch.float64)
    trace = sum(float((k @ m)[i, i]) for i in range(n))
    term2 = float(ones.T @ k @ ones) * float(ones.T @ m @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * float(ones.T @ k @ m @ ones)
    return (trace + term2 - term3) / (n * (n - 3))


def slow_linear_cka(x: Tensor, y: Tensor) -> float:
    k, m = x @ x.T, y @ y.T
    return slow_unbiased_hsic(k, m) / math.sqrt(slow_unbiased_hsic(k, k) * slow_unbiased_hsic(m, m))


def test_the_options_name_exactly_the_metrics_computed() -> None:
    assert tuple(similarity.PAIRWISE_METRICS) == METRICS
    with pytest.raises(InvalidOptionError, match="valid metrics: linear_cka, rbf_cka, cosine, angular"):
        AnalyzeOptions(metric="pearson")


def test_linear_cka_matches_the_formula_written_out() -> None:
    x, y = correlated_pair(n=12, d=5)
    expected = slow_linear_cka(x, y)
    assert 0.05 < abs(expected) < 0.99  # a non-trivial value, so agreement means something
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("cka", CKA_METRICS)
def test_cka_of_identical_inputs_is_one(cka: object) -> None:
    x = random_rows(40, 8, 0)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)  # type: ignore[operator]


@pytest.mark.parametrize("cka", CKA_METRICS)
def test_cka_is_invariant_to_isotropic_scaling_and_rotation(cka: object) -> None:
    x, y = correlated_pair()
    base = cka(x, y)  # type: ignore[operator]
    assert 0.1 < base < 0.99
    assert cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)  # type: ignore[operator]
    assert cka(x @ random_rotation(x.shape[1], 7), y) == pytest.approx(base, abs=1e-10)  # type: ignore[operator]
    assert cka(x, 0.01 * y @ random_rotation(y.shape[1], 8)) == pytest.approx(base, abs=1e-10)  # type: ignore[operator]


def test_cka_does_not_depend_on_float32_input() -> None:
    x, y = correlated_pair()
    assert linear_cka(x.float(), y.float()) == pytest.approx(linear_cka(x, y), abs=1e-6)


def test_linear_cka_is_invariant_to_a_constant_offset() -> None:
    x, y = correlated_pair()
    shifted = x + 25.0 * torch.ones(x.shape[1], dtype=torch.float64)
    assert linear_cka(shifted, y) == pytest.approx(linear_cka(x, y), abs=1e-9)


def test_rbf_cka_is_invariant_to_a_constant_offset() -> None:
    x, y = correlated_pair()
    assert rbf_cka(x + 3.0, y) == pytest.approx(rbf_cka(x, y), abs=1e-9)


def test_linear_cka_of_independent_inputs_is_near_zero() -> None:
    value = linear_cka(random_rows(500, 32, 10), random_rows(500, 32, 11))
    assert abs(value) < 0.1


def test_rbf_bandwidth_scale_changes_the_score() -> None:
    x, y = correlated_pair()
    assert rbf_cka(x, y, sigma_scale=0.3) != pytest.approx(rbf_cka(x, y, sigma_scale=3.0), abs=1e-3)


def test_rbf_cka_ignores_duplicate_rows_when_choosing_the_bandwidth() -> None:
    x, y = correlated_pair()
    repeated_x = torch.cat([x, x[:1].expand(200, -1)])
    repeated_y = torch.cat([y, y[:1].expand(200, -1)])
    # Most pairs are now at distance 0: a median over all pairs would give sigma = 0 and NaN.
    value = rbf_cka(repeated_x, repeated_y)
    assert math.isfinite(value)
    assert 0.1 < value <= 1.0


@pytest.mark.parametrize("cka", CKA_METRICS)
def test_cka_needs_four_rows(cka: object) -> None:
    x = random_rows(3, 5, 0)
    with pytest.raises(ValueError, match="at least 4 rows"):
        cka(x, x)  # type: ignore[operator]


@pytest.mark.parametrize("cka", CKA_METRICS)
def test_cka_rejects_constant_inputs(cka: object) -> None:
    constant = torch.ones(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError):
        cka(constant, random_rows(10, 4, 0))  # type: ignore[operator]


def test_mismatched_rows_and_non_matrices_are_rejected() -> None:
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(random_rows(10, 4, 0), random_rows(11, 4, 1))
    with pytest.raises(ValueError, match="2-D"):
        mean_cosine(torch.ones(2, 3, 4), torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="same number of features"):
        mean_cosine(torch.ones(2, 3), torch.ones(2, 4))


def test_sigma_scale_must_be_positive() -> None:
    x = random_rows(10, 4, 0)
    with pytest.raises(InvalidOptionError):
        rbf_cka(x, x, sigma_scale=0.0)


def test_cosine_and_angle_on_hand_built_vectors() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    orthogonal = torch.tensor([[0.0, 5.0], [-3.0, 0.0]])
    opposite = torch.tensor([[-2.0, 0.0], [0.0, -0.5]])
    assert mean_cosine(x, orthogonal) == pytest.approx(0.0, abs=1e-15)
    assert angular_distance(x, orthogonal) == pytest.approx(0.5, abs=1e-15)
    assert mean_cosine(x, opposite) == pytest.approx(-1.0, abs=1e-15)
    assert angular_distance(x, opposite) == pytest.approx(1.0, abs=1e-15)
    assert angular_distance(x, 4.0 * x) == pytest.approx(0.0, abs=1e-7)
    diagonal = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert mean_cosine(x, diagonal) == pytest.approx(math.sqrt(0.5))
    assert angular_distance(x, diagonal) == pytest.approx(0.25)


def test_cosine_averages_over_rows() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert mean_cosine(x, y) == pytest.approx(0.5)
    assert angular_distance(x, y) == pytest.approx(0.25)


def test_io_redundancy() -> None:
    x = random_rows(20, 6, 0)
    assert io_redundancy(x, x) == pytest.approx(0.0, abs=1e-12)
    assert io_redundancy(x, -x) == pytest.approx(2.0, abs=1e-12)
    assert io_redundancy(x, x + 0.1 * random_rows(20, 6, 1)) < io_redundancy(x, random_rows(20, 6, 2))


def test_sample_rows_is_deterministic_ordered_and_shared_across_layers() -> None:
    x = torch.arange(100.0)[:, None].expand(100, 3)
    picked = sample_rows(x, 10, seed=3)
    assert picked.shape == (10, 3)
    assert torch.equal(picked, sample_rows(x, 10, seed=3))
    assert torch.all(picked[1:, 0] > picked[:-1, 0])
    assert torch.equal(sample_rows(2.0 * x, 10, seed=3), 2.0 * picked)
    assert not torch.equal(picked, sample_rows(x, 10, seed=4))
    assert sample_rows(x, 100) is x
    with pytest.raises(InvalidOptionError):
        sample_rows(x, 0)


@pytest.mark.parametrize("metric", sorted(PAIRWISE_METRICS))
def test_similarity_matrix_is_symmetric_with_unit_diagonal(metric: str) -> None:
    base = random_rows(30, 8, 0)
    features = [base + 0.3 * k * random_rows(30, 8, k + 1) for k in range(4)]
    matrix = similarity_matrix(features, metric)
    assert matrix.shape == (4, 4)
    assert torch.equal(matrix, matrix.T)
    assert torch.equal(matrix.diagonal(), torch.ones(4, dtype=torch.float64))
    for i, j in [(0, 1), (0, 3), (2, 3)]:
        assert matrix[i, j].item() == pytest.approx(
            PAIRWISE_METRICS[metric](features[i], features[j]), abs=1e-12
        )
    assert matrix[0, 1] > matrix[0, 3]  # more noise, less similar: higher means more similar for every metric


def test_angular_metric_is_a_similarity() -> None:
    x = torch.tensor([[1.0, 0.0]])
    assert PAIRWISE_METRICS["angular"](x, torch.tensor([[-1.0, 0.0]])) == pytest.approx(0.0)
    assert PAIRWISE_METRICS["angular"](x, torch.tensor([[0.0, 1.0]])) == pytest.approx(0.5)


def test_similarity_matrix_of_one_or_no_input() -> None:
    assert similarity_matrix([random_rows(5, 2, 0)], "linear_cka").tolist() == [[1.0]]
    assert similarity_matrix([], "cosine").shape == (0, 0)


def test_similarity_matrix_checks_rows_for_cka() -> None:
    with pytest.raises(ValueError, match="same number of rows"):
        similarity_matrix([random_rows(10, 2, 0), random_rows(11, 2, 1)], "linear_cka")
    with pytest.raises(ValueError, match="at least 4 rows"):
        similarity_matrix([random_rows(3, 2, 0), random_rows(3, 2, 1)], "rbf_cka")


def test_unknown_metric_names_the_valid_ones() -> None:
    with pytest.raises(InvalidOptionError, match="linear_cka, rbf_cka, cosine, angular"):
        similarity_matrix([random_rows(5, 2, 0)], "pearson")


def spread_layers(count: int, n: int = 12, d: int = 5) -> list[Tensor]:
    """Inputs that drift apart with their index, so every pair has its own score."""
    base = random_rows(n, d, 0)
    return [base + 0.4 * k * random_rows(n, d, k + 1) for k in range(count)]


def scores_by_pair(scores: Iterator[tuple[int, int, float]]) -> dict[tuple[int, int], float]:
    """Collect (i, j, score) triples, failing on a pair scored twice."""
    collected: dict[tuple[int, int], float] = {}
    for i, j, value in scores:
        assert (i, j) not in collected, f"pair {(i, j)} scored twice"
        collected[i, j] = value
    return collected


@pytest.mark.parametrize("metric", ["linear_cka", "rbf_cka"])
@pytest.mark.parametrize("block_size", [1, 2, 3, 7, 10])
def test_blocked_cka_scores_every_pair_once_as_the_pairwise_function(metric: str, block_size: int) -> None:
    features = spread_layers(7)
    scores = scores_by_pair(similarity._kernel_pair_scores(features, metric, block_size))
    assert sorted(scores) == [(i, j) for i in range(7) for j in range(i + 1, 7)]
    for (i, j), value in scores.items():
        assert value == pytest.approx(PAIRWISE_METRICS[metric](features[i], features[j]), abs=1e-12)


def test_blocked_cka_needs_room_for_a_pair() -> None:
    with pytest.raises(ValueError, match="block_size"):
        list(similarity._kernel_pair_scores(spread_layers(3), "linear_cka", 0))


class LiveStatsCounter:
    """Wraps the kernel-statistics builder and records how many of its results were alive at once."""

    def __init__(self, build: Any) -> None:
        self.build = build
        self.alive = 0
        self.most_alive = 0
        self.built = 0

    def __call__(self, gram: Tensor) -> Any:
        stats = self.build(gram)
        self.built += 1
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(stats, self.release)
        return stats

    def release(self) -> None:
        self.alive -= 1


@pytest.mark.parametrize("metric", ["linear_cka", "rbf_cka"])
def test_similarity_matrix_holds_no_more_kernels_than_the_budget(
    monkeypatch: pytest.MonkeyPatch, metric: str
) -> None:
    features = spread_layers(7)
    expected = similarity_matrix(features, metric)
    counter = LiveStatsCounter(similarity._gram_stats)
    monkeypatch.setattr(similarity, "_gram_stats", counter)
    monkeypatch.setattr(similarity, "_KERNEL_BUDGET_BYTES", 3 * 12 * 12 * 8)
    matrix = similarity_matrix(features, metric)
    assert counter.most_alive == 3
    assert counter.built > 7  # some kernels were rebuilt rather than kept
    assert counter.alive == 0
    assert torch.equal(matrix, expected)


def test_a_budget_below_two_kernels_still_holds_a_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    features = spread_layers(5)
    expected = similarity_matrix(features, "linear_cka")
    counter = LiveStatsCounter(similarity._gram_stats)
    monkeypatch.setattr(similarity, "_gram_stats", counter)
    monkeypatch.setattr(similarity, "_KERNEL_BUDGET_BYTES", 1)
    assert torch.equal(similarity_matrix(features, "linear_cka"), expected)
    assert counter.most_alive == 2


def test_the_default_budget_holds_sixteen_kernels_of_1024_tokens() -> None:
    assert similarity._block_size_for(1024) + 1 == 16
    assert similarity._block_size_for(100_000) + 1 == 2
    assert similarity._block_size_for(16) + 1 > 1000


def rows_with_zeros(n: int, d: int) -> tuple[Tensor, Tensor]:
    """float32 rows with a zero row in x only, in y only and in both, so every zero case is covered."""
    x, y = random_rows(n, d, 20).float(), random_rows(n, d, 21).float()
    x[1] = 0.0
    y[4] = 0.0
    x[7] = y[7] = 0.0
    return x, y


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 11, 50])
def test_chunked_row_cosines_equal_one_whole_cosine_similarity(chunk_rows: int) -> None:
    x, y = rows_with_zeros(11, 6)
    whole = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=1)
    chunked = similarity._cosines_in_chunks(x, y, chunk_rows)
    assert chunked.dtype == torch.float64
    assert chunked.shape == (11,)
    assert torch.allclose(chunked, whole, rtol=0.0, atol=1e-12)
    assert chunked[1].item() == chunked[4].item() == chunked[7].item() == 0.0


def test_row_cosines_convert_and_compare_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = rows_with_zeros(11, 6)
    expected = float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=1).mean())
    seen: list[tuple[int, ...]] = []
    cosine_similarity = torch.nn.functional.cosine_similarity

    def recording(a: Tensor, b: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
        seen.append(tuple(a.shape))
        assert a.dtype == b.dtype == torch.float64
        return cosine_similarity(a, b, dim=dim, eps=eps)

    monkeypatch.setattr(torch.nn.functional, "cosine_similarity", recording)
    monkeypatch.setattr(similarity, "_COSINE_CHUNK_ELEMENTS", 4 * 6 + 5)
    assert mean_cosine(x, y) == pytest.approx(expected, abs=1e-12)
    assert seen == [(4, 6), (4, 6), (3, 6)]


def test_rows_wider_than_a_chunk_are_compared_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(similarity, "_COSINE_CHUNK_ELEMENTS", 2)
    x, y = rows_with_zeros(9, 6)
    expected = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=1)
    assert io_redundancy(x, y) == pytest.approx(1.0 - float(expected.mean()), abs=1e-12)

"""How alike two sets of hidden states are: CKA, cosine and angular scores as pure tensor math.

Every function takes 2-D tensors ``[n_rows, features]`` whose rows are tokens, paired row by row between
the two inputs (row i of both inputs comes from the same token). Work is done in float64 because the
interesting CKA values of real models sit above 0.999 and differ in the fourth decimal; float32 rounding
in the large cancelling HSIC terms would swamp that. Nothing here reads files or touches a model.

Memory stays bounded however many inputs or rows come in: a CKA matrix keeps at most
``_KERNEL_BUDGET_BYTES`` of ``n x n`` kernel matrices at once (never fewer than two) and rebuilds the
others when their pairs come up, and row-wise cosines convert and compare ``_COSINE_CHUNK_ELEMENTS``
elements at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.options import check_metric

MIN_CKA_ROWS = 4
"""The unbiased HSIC estimator divides by ``n (n - 3)`` and ``(n - 1)(n - 2)``, so it needs four rows."""

_DEGENERATE_RTOL = 1e-12
"""Self-HSIC below this fraction of the mean squared kernel value is rounding noise around zero."""

_DUPLICATE_RTOL = 1e-12
"""Squared distances below this fraction of the rows' squared norms are duplicates blurred by rounding."""

_KERNEL_BUDGET_BYTES = 128 * 2**20
"""Kernel matrices a CKA matrix may hold at once: sixteen float64 kernels of 1024 tokens.

Holding one kernel per input would grow with the number of layers (252 MB for 30 layers of 1024 tokens,
671 MB for 80); past this budget kernels are rebuilt instead, trading time for a fixed peak. Building a
kernel costs more than scoring a pair, so time follows the number of builds: with 16 kernels 30 layers
take 45 builds instead of 30, with 8 kernels (64 MB) already 80.
"""

_COSINE_CHUNK_ELEMENTS = 2**20
"""Elements of each input converted to float64 and compared at once by the row-wise cosines.

``cosine_similarity`` makes several temporaries the size of its inputs, so over whole inputs the
transient grows with the token count (580 MB measured for 4096 x 4096 float32); per chunk it stays
near 40 MB.
"""


@dataclass(frozen=True)
class _GramStats:
    """The parts of one kernel matrix that every HSIC term needs, computed once and scored many times.

    ``similarity_matrix`` scores each of these against a whole block of inputs before dropping it, so a
    matrix over L layers builds about ``L (L + b) / (2 b)`` kernels for blocks of b, not ``L (L - 1)``.
    """

    gram: Tensor
    row_sums: Tensor
    total: float
    self_hsic: float


def _check_rows(x: Tensor, name: str) -> None:
    """Reject anything that is not a row matrix, so a forgotten flatten fails here and not in a matmul."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [n_rows, features], got shape {tuple(x.shape)}")


def _as_rows(x: Tensor, name: str) -> Tensor:
    """A checked row matrix in the float64 every score is computed in."""
    _check_rows(x, name)
    return x.to(torch.float64)


def _check_pair_shapes(x: Tensor, y: Tensor, min_rows: int = 1) -> None:
    """Both inputs must describe the same tokens, so their row counts must agree."""
    _check_rows(x, "x")
    _check_rows(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < min_rows:
        raise ValueError(f"this estimator needs at least {min_rows} rows, got {x.shape[0]}")


def _check_pair(x: Tensor, y: Tensor, min_rows: int = 1) -> tuple[Tensor, Tensor]:
    """The checked pair in float64, for the scores that need whole inputs at once."""
    _check_pair_shapes(x, y, min_rows)
    return x.to(torch.float64), y.to(torch.float64)


def _check_same_width(x: Tensor, y: Tensor) -> None:
    """Row-wise cosines compare vectors of one space, so the feature counts must agree too."""
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}")


def _linear_gram(x: Tensor) -> Tensor:
    """Dot products between tokens: the kernel of linear CKA."""
    return x @ x.T


def _squared_distances(x: Tensor) -> Tensor:
    """Pairwise squared distances via one matmul; exact zeros for duplicate rows despite rounding."""
    sq_norms = x.square().sum(dim=1)
    scale = sq_norms[:, None] + sq_norms[None, :]
    d2 = (scale - 2.0 * _linear_gram(x)).clamp_min_(0.0)
    d2[d2 <= _DUPLICATE_RTOL * scale] = 0.0
    return d2.fill_diagonal_(0.0)


def _median_bandwidth(d2: Tensor) -> float:
    """The median heuristic: a bandwidth at the typical distance keeps the kernel neither flat nor spiky.

    Zero distances (repeated tokens give identical rows) are left out, or many repeats would pull the
    median to zero and every kernel entry but the duplicates towards zero with it.
    """
    upper = d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), diagonal=1)]
    nonzero = upper[upper > 0]
    if nonzero.numel() == 0:
        raise ValueError("all rows are identical, so the RBF bandwidth (median distance) is undefined")
    return math.sqrt(float(nonzero.median()))


def _rbf_gram(x: Tensor, sigma_scale: float = 1.0) -> Tensor:
    """Gaussian kernel with its own median bandwidth, so layers of very different norms stay comparable."""
    if not sigma_scale > 0:
        raise InvalidOptionError(f"sigma_scale must be positive, got {sigma_scale}")
    d2 = _squared_distances(x)
    sigma = sigma_scale * _median_bandwidth(d2)
    return torch.exp(d2 / (-2.0 * sigma * sigma))


def _unbiased_hsic(trace_kl: float, total_k: float, total_l: float, row_dot: float, n: int) -> float:
    """Song et al. (2012) unbiased HSIC from its three summaries of two zero-diagonal kernels."""
    correction = total_k * total_l / ((n - 1) * (n - 2)) - 2.0 * row_dot / (n - 2)
    return (trace_kl + correction) / (n * (n - 3))


def _gram_stats(gram: Tensor) -> _GramStats:
    """Zero the diagonal in place (the unbiased estimator excludes self-pairs) and keep its summaries."""
    n = gram.shape[0]
    gram.fill_diagonal_(0.0)
    row_sums = gram.sum(dim=1)
    total = float(row_sums.sum())
    trace_kk = float(torch.dot(gram.reshape(-1), gram.reshape(-1)))
    self_hsic = _unbiased_hsic(trace_kk, total, total, float(torch.dot(row_sums, row_sums)), n)
    if self_hsic <= _DEGENERATE_RTOL * trace_kk / (n * n):
        raise ValueError("an input does not vary across rows, so its CKA with anything is undefined")
    return _GramStats(gram=gram, row_sums=row_sums, total=total, self_hsic=self_hsic)


def _cka_from_stats(a: _GramStats, b: _GramStats) -> float:
    """Normalised HSIC; clamped because rounding may step just past the Cauchy-Schwarz bound of 1."""
    n = a.gram.shape[0]
    trace_kl = float(torch.dot(a.gram.reshape(-1), b.gram.reshape(-1)))
    cross = _unbiased_hsic(trace_kl, a.total, b.total, float(torch.dot(a.row_sums, b.row_sums)), n)
    return max(-1.0, min(1.0, cross / math.sqrt(a.self_hsic * b.self_hsic)))


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA with the unbiased HSIC estimator (minibatch CKA, Nguyen et al. 2021).

    The biased estimator drifts towards 1 for wide features and few rows, which hides exactly the
    differences between layers we look for; the unbiased one is near 0 for unrelated inputs (it can be
    slightly negative) and 1 for inputs equal up to rotation and isotropic scaling.

    Args:
        x: ``[n, p]`` hidden states, one row per token.
        y: ``[n, q]`` hidden states of the same tokens; ``q`` may differ from ``p``.

    Returns:
        The CKA value in [-1, 1].

    Raises:
        ValueError: fewer than four rows, mismatched rows, or an input without variation across rows.
    """
    x64, y64 = _check_pair(x, y, MIN_CKA_ROWS)
    return _cka_from_stats(_gram_stats(_linear_gram(x64)), _gram_stats(_linear_gram(y64)))


def rbf_cka(x: Tensor, y: Tensor, sigma_scale: float = 1.0) -> float:
    """CKA with Gaussian kernels, which also sees non-linear agreement that linear CKA misses.

    Each input gets its own bandwidth, ``sigma_scale`` times the median of its non-zero pairwise
    distances, so the score does not depend on the overall norm of either input.

    Args:
        x: ``[n, p]`` hidden states, one row per token.
        y: ``[n, q]`` hidden states of the same tokens.
        sigma_scale: multiplier of the median-distance bandwidth; smaller looks at finer neighbourhoods.

    Returns:
        The CKA value in [-1, 1].

    Raises:
        ValueError: fewer than four rows, mismatched rows, or an input whose rows are all identical.
        InvalidOptionError: ``sigma_scale`` is not positive.
    """
    x64, y64 = _check_pair(x, y, MIN_CKA_ROWS)
    return _cka_from_stats(_gram_stats(_rbf_gram(x64, sigma_scale)), _gram_stats(_rbf_gram(y64, sigma_scale)))


def _rows_per_chunk(width: int) -> int:
    """Rows whose elements fit ``_COSINE_CHUNK_ELEMENTS``; at least one, so any width makes progress."""
    return max(1, _COSINE_CHUNK_ELEMENTS // max(1, width))


def _float64_cosines(x: Tensor, y: Tensor) -> Tensor:
    """``cosine_similarity`` clamps each norm at its ``eps`` before dividing, so a zero row scores 0."""
    return torch.nn.functional.cosine_similarity(x.to(torch.float64), y.to(torch.float64), dim=1)


def _cosines_in_chunks(x: Tensor, y: Tensor, chunk_rows: int) -> Tensor:
    """Float64 cosines of ``chunk_rows`` rows at a time, so only the ``[n]`` result grows with n.

    Each row's cosine depends on that row alone, so chunking changes no value.
    """
    starts = range(0, x.shape[0], chunk_rows)
    return torch.cat([_float64_cosines(x[s : s + chunk_rows], y[s : s + chunk_rows]) for s in starts])


def _row_cosines(x: Tensor, y: Tensor) -> Tensor:
    """Cosine per token; a zero row counts as orthogonal rather than dividing by zero."""
    _check_pair_shapes(x, y)
    _check_same_width(x, y)
    return _cosines_in_chunks(x, y, _rows_per_chunk(x.shape[1]))


def mean_cosine(x: Tensor, y: Tensor) -> float:
    """Mean over tokens of the cosine between paired rows, in [-1, 1].

    Unlike CKA this compares each token with itself, so it sees a layer's effect on the residual stream
    directly; it is the score of the reference SWM code and of ShortGPT's Block Influence.
    """
    return float(_row_cosines(x, y).mean())


def angular_distance(x: Tensor, y: Tensor) -> float:
    """Mean over tokens of the angle between paired rows divided by pi: 0 same direction, 1 opposite.

    PruneMe ranks blocks by this; an angle averages more evenly than a cosine, which is flat near 1.
    """
    cosines = _row_cosines(x, y).clamp(-1.0, 1.0)
    return float(torch.arccos(cosines).mean()) / math.pi


def io_redundancy(layer_input: Tensor, layer_output: Tensor) -> float:
    """Block Influence (ShortGPT) / Layer Redundancy: ``1 - mean_cosine(input, output)``.

    Low means the layer barely turns the residual stream, so removing it should cost little.
    """
    return 1.0 - mean_cosine(layer_input, layer_output)


def sample_rows(x: Tensor, max_rows: int, seed: int = 0) -> Tensor:
    """Keep at most ``max_rows`` rows, chosen at random but reproducibly, in their original order.

    CKA costs O(n^2) memory per input, so large calibration sets are thinned first. The choice depends
    only on the row count and ``seed``: hidden states of different layers of one batch keep the same
    tokens, which CKA needs because it pairs rows.

    Raises:
        InvalidOptionError: ``max_rows`` is below 1.
    """
    if max_rows < 1:
        raise InvalidOptionError(f"max_rows must be at least 1, got {max_rows}")
    n = x.shape[0]
    if n <= max_rows:
        return x
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(n, generator=generator)[:max_rows].sort().values
    return x[keep.to(x.device)]


def _angular_similarity(x: Tensor, y: Tensor) -> float:
    """Angular distance turned around so that, like every table entry, higher means more alike."""
    return 1.0 - angular_distance(x, y)


PAIRWISE_METRICS: Mapping[str, Callable[[Tensor, Tensor], float]] = MappingProxyType(
    {
        "linear_cka": linear_cka,
        "rbf_cka": rbf_cka,
        "cosine": mean_cosine,
        "angular": _angular_similarity,
    }
)
"""Similarity scores by name; for each, HIGHER means MORE SIMILAR and a thing scores 1 with itself.

``"angular"`` is ``1 - angular_distance`` (1 same direction, 0.5 orthogonal, 0 opposite), not the
distance itself.
"""

_KERNELS: Mapping[str, Callable[[Tensor], Tensor]] = MappingProxyType(
    {"linear_cka": _linear_gram, "rbf_cka": _rbf_gram}
)
"""Metrics whose per-input kernel matrix can be built once and reused across all pairs."""


_PairScore = tuple[int, int, float]
"""``(i, j, score)`` for inputs ``i < j``."""


def _common_cka_rows(features: Sequence[Tensor]) -> int:
    """Check every input before any kernel is built, since later inputs are reached only after much work."""
    for k, f in enumerate(features):
        _check_rows(f, f"features[{k}]")
    rows = {f.shape[0] for f in features}
    if len(rows) > 1:
        raise ValueError(f"all inputs must have the same number of rows, got {sorted(rows)}")
    n_rows = rows.pop()
    if n_rows < MIN_CKA_ROWS:
        raise ValueError(f"CKA needs at least {MIN_CKA_ROWS} rows")
    return n_rows


def _block_size_for(n_rows: int) -> int:
    """Inputs per block: the budget's kernels less the one streamed past the block, but at least one."""
    kernels_in_budget = _KERNEL_BUDGET_BYTES // (n_rows * n_rows * torch.float64.itemsize)
    return max(2, kernels_in_budget) - 1


def _kernel_stats(features: Sequence[Tensor], metric: str, k: int) -> _GramStats:
    """The statistics of input ``k``'s kernel, built afresh each time a block needs them."""
    return _gram_stats(_KERNELS[metric](_as_rows(features[k], f"features[{k}]")))


def _scores_against(
    block: Sequence[_GramStats], start: int, j: int, other: _GramStats
) -> Iterator[_PairScore]:
    """Input ``j`` against every member of the block starting at input ``start``."""
    for offset, stats in enumerate(block):
        yield start + offset, j, _cka_from_stats(stats, other)


def _block_scores(features: Sequence[Tensor], metric: str, start: int, stop: int) -> Iterator[_PairScore]:
    """Pairs within inputs ``[start, stop)``, then each later input streamed past them and dropped.

    The block and each streamed kernel live only in this generator's (and its helper's) frame, so they
    are freed as soon as it finishes: the next kernel or block is never built while these are alive.
    """
    block = [_kernel_stats(features, metric, k) for k in range(start, stop)]
    for offset in range(1, len(block)):
        yield from _scores_against(block[:offset], start, start + offset, block[offset])
    for j in range(stop, len(features)):
        yield from _scores_against(block, start, j, _kernel_stats(features, metric, j))


def _kernel_pair_scores(features: Sequence[Tensor], metric: str, block_size: int) -> Iterator[_PairScore]:
    """Every pair ``i < j`` once, holding at most ``block_size + 1`` kernel statistics at a time.

    Keeping one kernel per input would make memory grow with the number of inputs. Instead consecutive
    inputs form blocks whose kernels are kept while every later input's kernel is built, scored against
    the whole block and dropped; later blocks rebuild what they need. Each score is the same
    ``_cka_from_stats`` of the same two kernels as without blocks, so the results are identical.

    Raises:
        ValueError: ``block_size`` is below 1, which would leave no room to score a pair.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    for start in range(0, len(features), block_size):
        yield from _block_scores(features, metric, start, min(start + block_size, len(features)))


def _pair_scores(features: Sequence[Tensor], metric: str) -> Iterator[_PairScore]:
    """Score every pair ``i < j``, through blocks of kernel statistics where the metric has kernels."""
    if metric in _KERNELS:
        return _kernel_pair_scores(features, metric, _block_size_for(_common_cka_rows(features)))
    pair = PAIRWISE_METRICS[metric]
    count = len(features)
    return ((i, j, pair(features[i], features[j])) for i in range(count) for j in range(i + 1, count))


def similarity_matrix(features: Sequence[Tensor], metric: str) -> Tensor:
    """Symmetric ``[L, L]`` matrix of ``metric`` between every pair of inputs (e.g. layer outputs).

    Only the upper triangle is computed and mirrored; the diagonal is 1 by definition, since every
    metric in ``PAIRWISE_METRICS`` scores a thing with itself as 1. For the CKA metrics the ``n x n``
    float64 kernel matrices held at once fit ``_KERNEL_BUDGET_BYTES`` (128 MB: 16 kernels of 1024 rows)
    whatever L is, but never fewer than two (``2 * n^2 * 8`` bytes), plus the transient of building one;
    kernels that do not fit are rebuilt, so time grows past the budget. Thin the rows with ``sample_rows``.

    Args:
        features: one ``[n, features]`` tensor per layer, all with the same rows (tokens).
        metric: a key of ``PAIRWISE_METRICS``.

    Returns:
        A float64 CPU tensor, higher meaning more similar.

    Raises:
        InvalidOptionError: ``metric`` is not a key of ``PAIRWISE_METRICS``.
    """
    check_metric(metric)
    count = len(features)
    matrix = torch.eye(count, dtype=torch.float64)
    if count < 2:
        return matrix
    for i, j, score in _pair_scores(features, metric):
        matrix[i, j] = matrix[j, i] = score
    return matrix

"""How alike two sets of hidden states are: CKA, cosine and angular scores as pure tensor math.

Every function takes 2-D tensors ``[n_rows, features]`` whose rows are tokens, paired row by row between
the two inputs (row i of both inputs comes from the same token). Work is done in float64 because the
interesting CKA values of real models sit above 0.999 and differ in the fourth decimal; float32 rounding
in the large cancelling HSIC terms would swamp that. Nothing here reads files or touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from swm_hub.errors import InvalidOptionError

MIN_CKA_ROWS = 4
"""The unbiased HSIC estimator divides by ``n (n - 3)`` and ``(n - 1)(n - 2)``, so it needs four rows."""

_DEGENERATE_RTOL = 1e-12
"""Self-HSIC below this fraction of the mean squared kernel value is rounding noise around zero."""

_DUPLICATE_RTOL = 1e-12
"""Squared distances below this fraction of the rows' squared norms are duplicates blurred by rounding."""


@dataclass(frozen=True)
class _GramStats:
    """The parts of one kernel matrix that every HSIC term needs, computed once per input.

    ``similarity_matrix`` builds these once per layer and reuses them for all pairs, so a matrix over L
    layers costs L kernel matrices instead of L (L - 1).
    """

    gram: Tensor
    row_sums: Tensor
    total: float
    self_hsic: float


def _as_rows(x: Tensor, name: str) -> Tensor:
    """Reject anything that is not a row matrix, so a forgotten flatten fails here and not in a matmul."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [n_rows, features], got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def _check_pair(x: Tensor, y: Tensor, min_rows: int = 1) -> tuple[Tensor, Tensor]:
    """Both inputs must describe the same tokens, so their row counts must agree."""
    x64, y64 = _as_rows(x, "x"), _as_rows(y, "y")
    if x64.shape[0] != y64.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x64.shape[0]} and {y64.shape[0]}")
    if x64.shape[0] < min_rows:
        raise ValueError(f"this estimator needs at least {min_rows} rows, got {x64.shape[0]}")
    return x64, y64


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


def _row_cosines(x: Tensor, y: Tensor) -> Tensor:
    """Cosine per token; a zero row counts as orthogonal rather than dividing by zero."""
    x64, y64 = _check_pair(x, y)
    _check_same_width(x64, y64)
    return torch.nn.functional.cosine_similarity(x64, y64, dim=1)


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


def _check_metric(metric: str) -> None:
    """Name the valid metrics, since the name usually comes from a command-line option."""
    if metric not in PAIRWISE_METRICS:
        raise InvalidOptionError(
            f"unknown similarity metric {metric!r}; valid metrics: {', '.join(PAIRWISE_METRICS)}"
        )


def _pair_scorer(features: Sequence[Tensor], metric: str) -> Callable[[int, int], float]:
    """Score pairs by index, preparing kernel statistics once per input where the metric allows it."""
    if metric not in _KERNELS:
        pair = PAIRWISE_METRICS[metric]
        return lambda i, j: pair(features[i], features[j])
    build = _KERNELS[metric]
    rows = {f.shape[0] for f in features}
    if len(rows) > 1:
        raise ValueError(f"all inputs must have the same number of rows, got {sorted(rows)}")
    if rows.pop() < MIN_CKA_ROWS:
        raise ValueError(f"CKA needs at least {MIN_CKA_ROWS} rows")
    stats = [_gram_stats(build(_as_rows(f, f"features[{k}]"))) for k, f in enumerate(features)]
    return lambda i, j: _cka_from_stats(stats[i], stats[j])


def similarity_matrix(features: Sequence[Tensor], metric: str) -> Tensor:
    """Symmetric ``[L, L]`` matrix of ``metric`` between every pair of inputs (e.g. layer outputs).

    Only the upper triangle is computed and mirrored; the diagonal is 1 by definition, since every
    metric in ``PAIRWISE_METRICS`` scores a thing with itself as 1. For the CKA metrics one kernel matrix
    per input is kept in memory: ``L * n^2 * 8`` bytes, so thin the rows with ``sample_rows`` first.

    Args:
        features: one ``[n, features]`` tensor per layer, all with the same rows (tokens).
        metric: a key of ``PAIRWISE_METRICS``.

    Returns:
        A float64 CPU tensor, higher meaning more similar.

    Raises:
        InvalidOptionError: ``metric`` is not a key of ``PAIRWISE_METRICS``.
    """
    _check_metric(metric)
    count = len(features)
    matrix = torch.eye(count, dtype=torch.float64)
    if count < 2:
        return matrix
    score = _pair_scorer(features, metric)
    for i in range(count):
        for j in range(i + 1, count):
            matrix[i, j] = matrix[j, i] = score(i, j)
    return matrix

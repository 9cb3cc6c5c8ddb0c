"""Nearest-neighbour video retrieval (the paper's Table 3 protocol).

For every test video, the k training videos whose features are most cosine-similar are
retrieved; R@k is the percentage of test videos with at least one same-label video among
them. Features are centred by the *training* mean before L2-normalisation: the pooled output
of a ReLU backbone lives in the positive orthant, where all cosines are high and dominated by
the shared mean direction; removing it makes cosine similarity reflect the differences
between videos. The test split never contributes to that mean.

"Chance" is not 1/C here: random convolutional features already capture colour and texture.
Chance is what the same retrieval scores when the training labels are randomly permuted
(``chance_R@1``), which keeps the label frequencies but breaks the link to the features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 50)
# How many train neighbours of each test video the retrieval figure shows.
FIGURE_NEIGHBOURS = 5


def center_and_normalise(train_feats: torch.Tensor, test_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the training mean from both splits, then L2-normalise every row.

    Args:
        train_feats: (N_train, D) training features.
        test_feats: (N_test, D) test features; they never influence the mean.

    Returns:
        (train, test), both float with unit-norm rows (a zero row stays zero).
    """
    _check_features(train_feats, "train_feats")
    _check_features(test_feats, "test_feats")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_feats.shape[1]} vs {test_feats.shape[1]}")
    # float64 stays float64; half precision is promoted so the mean and norms are accurate.
    dtype = train_feats.dtype if train_feats.dtype == torch.float64 else torch.float32
    train = train_feats.to(dtype)
    train_mean = train.mean(dim=0, keepdim=True)
    test = test_feats.to(device=train.device, dtype=dtype)
    return F.normalize(train - train_mean, dim=1), F.normalize(test - train_mean, dim=1)


def nearest_neighbours(
    train: torch.Tensor, test: torch.Tensor, k: int, *, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar training rows for every test row, most similar first.

    Inputs must already be L2-normalised (see :func:`center_and_normalise`), so the dot
    product is the cosine. Test rows are processed ``chunk_size`` at a time, so only a
    (chunk_size, N_train) similarity block is ever held in memory (10k x 10k fits easily).

    Args:
        train: (N_train, D) normalised training features.
        test: (N_test, D) normalised test features.
        k: number of neighbours; if larger than N_train, all N_train are returned.

    Returns:
        indices: (N_test, min(k, N_train)) long, row indices into ``train``.
        similarities: (N_test, min(k, N_train)) the matching cosine similarities, descending.
    """
    _check_features(train, "train")
    _check_features(test, "test")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    k_eff = min(k, train.shape[0])
    test = test.to(device=train.device, dtype=train.dtype)
    index_chunks, similarity_chunks = [], []
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ train.T
        top = similarity.topk(k_eff, dim=1, largest=True, sorted=True)
        index_chunks.append(top.indices)
        similarity_chunks.append(top.values)
    if not index_chunks:  # no test rows
        empty = test.new_zeros((0, k_eff))
        return empty.long(), empty
    return torch.cat(index_chunks), torch.cat(similarity_chunks)


def per_query_hits(
    neighbour_labels: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> torch.Tensor:
    """Whether each test video has a same-label video among its first k neighbours.

    Args:
        neighbour_labels: (N_test, k_max) labels of the retrieved training videos, most
            similar first. When a k exceeds k_max, all k_max columns are used: callers pass
            min(max(ks), N_train) columns, so "k larger than the training set" means
            "retrieve the whole training set".
        test_labels: (N_test,) labels of the test videos.
        ks: the cut-offs.

    Returns:
        (N_test, len(ks)) bool; column j answers "hit within the first ks[j]".
    """
    if neighbour_labels.dim() != 2:
        raise ValueError(f"neighbour_labels must be (N_test, k_max), got {tuple(neighbour_labels.shape)}")
    if test_labels.shape != (neighbour_labels.shape[0],):
        raise ValueError(f"test_labels must be ({neighbour_labels.shape[0]},), got {tuple(test_labels.shape)}")
    if neighbour_labels.shape[1] == 0:
        raise ValueError("neighbour_labels has no columns: at least one neighbour is needed")
    _check_ks(ks)
    same_label = neighbour_labels == test_labels.to(neighbour_labels.device)[:, None]
    # A hit within the first k <=> the running "any" over columns is true at column k-1.
    hit_within = same_label.cummax(dim=1).values
    columns = [min(k, hit_within.shape[1]) - 1 for k in ks]
    return hit_within[:, columns]


def recall_at_k(
    neighbour_labels: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """R@k in percent (0-100) for every k in ``ks``, keyed ``"R@k"``.

    See :func:`per_query_hits` for the arguments and for k larger than the neighbour list.
    """
    return _recall_from_hits(per_query_hits(neighbour_labels, test_labels, ks), ks)


def _recall_from_hits(hits: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Percent of rows that hit, per column of a :func:`per_query_hits` result."""
    if hits.shape[0] == 0:
        raise ValueError("recall is undefined without test videos")
    rates = hits.float().mean(dim=0) * 100.0
    return {f"R@{k}": float(rate) for k, rate in zip(ks, rates)}


def retrieval_metrics(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chance_seed: int = 0,
    *,
    num_chance_permutations: int = 5,
    chunk_size: int = 1024,
) -> dict:
    """The whole retrieval evaluation on cached (video-level) features.

    Returns a dict with
        ``"R@k"`` for every k (float, percent), ``"num_train"``, ``"num_test"`` (int),
        ``"chance_R@1"`` (float, percent): R@1 with the training labels randomly permuted,
            averaged over ``num_chance_permutations`` permutations drawn from ``chance_seed``;
        ``"neighbours"``: (N_test, min(5, N_train)) long tensor, the top training indices of
            every test video, for the qualitative figure (not JSON: drop before writing);
        ``"hits"``: (N_test, len(ks)) bool tensor from :func:`per_query_hits`, the per-video
            outcomes that a bootstrap over test videos resamples (not JSON either).
    """
    train_labels = torch.as_tensor(train_labels)
    test_labels = torch.as_tensor(test_labels)
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError("train_labels must have one label per training feature row")
    if test_labels.shape != (test_feats.shape[0],):
        raise ValueError("test_labels must have one label per test feature row")
    _check_ks(ks)
    if num_chance_permutations < 1:
        raise ValueError("num_chance_permutations must be at least 1")

    train, test = center_and_normalise(train_feats, test_feats)
    k_max = max(max(ks), FIGURE_NEIGHBOURS)
    indices, _ = nearest_neighbours(train, test, k_max, chunk_size=chunk_size)
    indices = indices.cpu()
    train_labels, test_labels = train_labels.cpu(), test_labels.cpu()

    hits = per_query_hits(train_labels[indices], test_labels, ks)
    metrics: dict = _recall_from_hits(hits, ks)
    metrics["num_train"] = int(train_feats.shape[0])
    metrics["num_test"] = int(test_feats.shape[0])
    metrics["chance_R@1"] = chance_recall_at_1(
        indices[:, 0], train_labels, test_labels, seed=chance_seed, num_permutations=num_chance_permutations
    )
    metrics["neighbours"] = indices[:, :FIGURE_NEIGHBOURS]
    metrics["hits"] = hits
    return metrics


def chance_recall_at_1(
    top1_indices: torch.Tensor,
    train_labels: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    seed: int = 0,
    num_permutations: int = 5,
) -> float:
    """R@1 (percent) of the same retrieval after randomly permuting the training labels.

    The neighbours stay fixed; only which label sits on which training video changes. The
    expectation is sum_c p_train(c) * p_test(c), i.e. about 100/C for balanced classes.
    Averaged over ``num_permutations`` permutations drawn from a generator seeded with ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    rates = []
    for _ in range(num_permutations):
        permuted = train_labels[torch.randperm(train_labels.shape[0], generator=generator)]
        rates.append((permuted[top1_indices] == test_labels).float().mean() * 100.0)
    return float(torch.stack(rates).mean())


def _check_features(feats: torch.Tensor, name: str) -> None:
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (N, D)")
    if feats.shape[0] == 0 and name.startswith("train"):
        raise ValueError(f"{name} is empty: nothing to retrieve from")


def _check_ks(ks: Sequence[int]) -> None:
    if len(ks) == 0 or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}")

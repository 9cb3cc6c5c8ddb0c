"""Retrieval metrics (R@k, chance) and bootstrap confidence intervals, on hand-built cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from tricoclr.eval.retrieval import (
    center_and_normalise,
    nearest_neighbours,
    per_query_hits,
    recall_at_k,
    retrieval_metrics,
)
from tricoclr.eval.stats import bootstrap_ci, mean_and_ci_over_seeds


def separable_toy_set(num_classes=10, train_per_class=20, test_per_class=10, dim=16, seed=0):
    """Tight clusters around far-apart random centres: every class is trivially separable."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * 5.0

    def draw(per_class):
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        feats = centres[labels] + 0.05 * torch.randn(labels.numel(), dim, generator=generator)
        return feats, labels

    return (*draw(train_per_class), *draw(test_per_class))


# Train vectors already centred (their mean is the origin) so the cosines below are exact.
TRAIN_FEATS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
TRAIN_LABELS = torch.tensor([0, 1, 2, 1])
# q0 = (2, 1): cosines 0.894, 0.447, -0.894, -0.447 -> order 0, 1, 3, 2 -> labels 0, 1, 1, 2.
# q1 = (-1, -3): cosines -0.316, -0.949, 0.316, 0.949 -> order 3, 2, 0, 1 -> labels 1, 2, 0, 1.
TEST_FEATS = torch.tensor([[2.0, 1.0], [-1.0, -3.0]])
TEST_LABELS = torch.tensor([1, 1])


def test_nearest_neighbours_hand_built_order_and_cosines():
    train, test = center_and_normalise(TRAIN_FEATS, TEST_FEATS)
    indices, similarities = nearest_neighbours(train, test, k=4)
    assert indices.tolist() == [[0, 1, 3, 2], [3, 2, 0, 1]]
    expected = torch.tensor([[2, 1, -1, -2], [3, 1, -1, -3]]) / torch.tensor([[math.sqrt(5)], [math.sqrt(10)]])
    torch.testing.assert_close(similarities, expected)


def test_retrieval_metrics_hand_built_recall():
    metrics = retrieval_metrics(TRAIN_FEATS, TRAIN_LABELS, TEST_FEATS, TEST_LABELS, ks=(1, 2, 50))
    # q0 misses at rank 1 (label 0) and hits at rank 2; q1 hits at rank 1.
    assert metrics["R@1"] == pytest.approx(50.0)
    assert metrics["R@2"] == pytest.approx(100.0)
    # k = 50 exceeds the 4 training videos: all of them are retrieved.
    assert metrics["R@50"] == pytest.approx(100.0)
    assert metrics["num_train"] == 4 and metrics["num_test"] == 2
    assert metrics["neighbours"].tolist() == [[0, 1, 3, 2], [3, 2, 0, 1]]
    assert metrics["hits"].tolist() == [[False, True, True], [True, True, True]]


def test_recall_at_k_hand_built_labels():
    neighbour_labels = torch.tensor([[0, 1, 2], [2, 2, 2], [1, 0, 0]])
    test_labels = torch.tensor([0, 1, 0])
    hits = per_query_hits(neighbour_labels, test_labels, ks=(1, 2, 3))
    assert hits.tolist() == [[True, True, True], [False, False, False], [False, True, True]]
    recalls = recall_at_k(neighbour_labels, test_labels, ks=(1, 2, 3, 10))
    assert recalls == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 200 / 3, "R@10": 200 / 3})


def test_centring_uses_only_the_train_mean():
    generator = torch.Generator().manual_seed(1)
    train_feats = torch.rand(50, 8, generator=generator) + 2.0
    test_a = torch.rand(20, 8, generator=generator)
    test_b = test_a * 10.0 + 7.0  # a very different test distribution
    train_a, centred_a = center_and_normalise(train_feats, test_a)
    train_b, centred_b = center_and_normalise(train_feats, test_b)
    torch.testing.assert_close(train_a, train_b)
    train_mean = train_feats.mean(dim=0)
    torch.testing.assert_close(centred_a, F.normalize(test_a - train_mean, dim=1))
    torch.testing.assert_close(centred_b, F.normalize(test_b - train_mean, dim=1))
    torch.testing.assert_close(train_a.norm(dim=1), torch.ones(50))


def test_chunked_neighbours_equal_unchunked():
    generator = torch.Generator().manual_seed(2)
    train, test = center_and_normalise(
        torch.randn(300, 16, generator=generator), torch.randn(257, 16, generator=generator)
    )
    chunked = nearest_neighbours(train, test, k=7, chunk_size=64)
    whole = nearest_neighbours(train, test, k=7, chunk_size=10_000)
    assert torch.equal(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])
    # k larger than the training set returns every training video.
    assert nearest_neighbours(train[:3], test, k=10)[0].shape == (257, 3)


def test_separable_set_has_perfect_recall_but_chance_stays_near_one_over_c():
    num_classes = 10
    train_feats, train_labels, test_feats, test_labels = separable_toy_set(
        num_classes, train_per_class=200, test_per_class=100
    )
    metrics = retrieval_metrics(train_feats, train_labels, test_feats, test_labels)
    assert metrics["R@1"] == 100.0 and metrics["R@50"] == 100.0
    # Balanced classes: permuted labels agree with probability 1/C (std ~0.4 points here).
    assert metrics["chance_R@1"] == pytest.approx(100.0 / num_classes, abs=2.0)
    assert metrics["neighbours"].shape == (1000, 5)
    assert metrics["hits"].shape == (1000, 5)


def test_chance_is_deterministic_in_the_seed():
    train_feats, train_labels, test_feats, test_labels = separable_toy_set()
    first = retrieval_metrics(train_feats, train_labels, test_feats, test_labels, chance_seed=3)
    second = retrieval_metrics(train_feats, train_labels, test_feats, test_labels, chance_seed=3)
    assert first["chance_R@1"] == second["chance_R@1"]


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_mean_and_narrows_with_more_items():
    generator = torch.Generator().manual_seed(4)
    small = (torch.rand(100, generator=generator) < 0.4).float() * 100
    large = (torch.rand(10_000, generator=generator) < 0.4).float() * 100
    mean_small, low_small, high_small = bootstrap_ci(small, num_resamples=500)
    mean_large, low_large, high_large = bootstrap_ci(large, num_resamples=500)
    assert mean_small == pytest.approx(float(small.mean()))
    assert low_small < mean_small < high_small
    assert low_large < mean_large < high_large
    assert high_large - low_large < (high_small - low_small) / 3  # ~1/sqrt(100) as wide
    assert bootstrap_ci(small, num_resamples=500) == (mean_small, low_small, high_small)


def test_bootstrap_ci_of_constant_values_is_a_point():
    assert bootstrap_ci(torch.full((30,), 7.0), num_resamples=50) == pytest.approx((7.0, 7.0, 7.0))


def test_bootstrap_over_runs_resamples_items_jointly():
    generator = torch.Generator().manual_seed(5)
    values = torch.rand(200, generator=generator)
    # Identical runs: the joint resample gives exactly the single-run interval.
    assert bootstrap_ci(torch.stack([values] * 3), seed=1) == pytest.approx(bootstrap_ci(values, seed=1))
    mean, _, _ = bootstrap_ci(torch.stack([values, values + 1.0]))
    assert mean == pytest.approx(float(values.mean()) + 0.5)


def test_mean_and_ci_over_seeds_reports_seed_spread():
    summary = mean_and_ci_over_seeds([torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.0, 0.0])])
    assert summary["mean"] == pytest.approx(0.5)
    assert summary["per_seed"] == [1.0, 0.0]
    assert summary["seed_std"] == pytest.approx(math.sqrt(0.5))
    assert summary["num_seeds"] == 2
    # Every item averages to 0.5 over the seeds, so resampling items cannot move the mean.
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((0.5, 0.5))

"""Linear probe: selection on held-out training data only, exact accuracies on toy sets."""

import inspect

import pytest
import torch

from tricoclr.eval.linear_probe import (
    evaluate_probe,
    per_item_correct,
    stratified_split,
    topk_accuracy,
    train_linear_probe,
)

FAST_GRID = dict(lrs=(1e-2, 1e-1), weight_decays=(0.0, 1e-3), max_epochs=15, batch_size=64)


def separable_toy_set(num_classes=8, train_per_class=30, test_per_class=10, dim=12, seed=0):
    """Tight clusters around far-apart random centres, offset like non-negative pooled features."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * 4.0 + 10.0

    def draw(per_class):
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        return centres[labels] + 0.1 * torch.randn(labels.numel(), dim, generator=generator), labels

    return (*draw(train_per_class), *draw(test_per_class))


def test_separable_set_gives_perfect_top1():
    train_feats, train_labels, test_feats, test_labels = separable_toy_set()
    probe = train_linear_probe(train_feats, train_labels, num_classes=8, **FAST_GRID)
    assert evaluate_probe(probe, test_feats, test_labels) == {"top1": 100.0, "top5": 100.0}
    selection = probe.selection
    assert selection["val_top1"] == 100.0
    assert selection["lr"] in FAST_GRID["lrs"] and selection["weight_decay"] in FAST_GRID["weight_decays"]
    assert 1 <= selection["epochs"] <= FAST_GRID["max_epochs"]
    assert (selection["num_fit"], selection["num_val"]) == (8 * 24, 8 * 6)
    # Standardisation statistics come from the whole training split.
    torch.testing.assert_close(probe.mean, train_feats.mean(dim=0))


def test_selection_cannot_read_test_data():
    # By construction: nothing named like test data can be passed to the selection.
    parameters = inspect.signature(train_linear_probe).parameters
    assert not any("test" in name for name in parameters)

    train_feats, train_labels, test_feats, test_labels = separable_toy_set(seed=1)
    first = train_linear_probe(train_feats, train_labels, num_classes=8, seed=3, **FAST_GRID)
    true_scores = evaluate_probe(first, test_feats, test_labels)
    garbled_labels = (test_labels + 1) % 8  # every test label wrong
    second = train_linear_probe(train_feats, train_labels, num_classes=8, seed=3, **FAST_GRID)
    assert second.selection == first.selection
    assert torch.equal(second.classifier.weight, first.classifier.weight)
    assert torch.equal(second.classifier.bias, first.classifier.bias)
    # The garbled labels change only the reported score, never the probe.
    assert evaluate_probe(second, test_feats, garbled_labels)["top1"] == 0.0
    assert true_scores["top1"] == 100.0


def test_stratified_split_keeps_class_proportions_and_one_fit_example():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    fit, val = stratified_split(labels, val_fraction=0.2, seed=7)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(16))
    assert torch.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    assert torch.bincount(labels[fit], minlength=3).tolist() == [8, 4, 1]
    again = stratified_split(labels, val_fraction=0.2, seed=7)
    assert torch.equal(again[0], fit) and torch.equal(again[1], val)


def test_topk_accuracy_hand_built():
    logits = torch.tensor([[0.1, 0.5, 0.2], [0.9, 0.0, 0.3]])
    labels = torch.tensor([2, 0])
    # Row 0 ranks 1, 2, 0 (label 2 second); row 1 ranks 0 first.
    assert topk_accuracy(logits, labels, ks=(1, 2)) == {"top1": 50.0, "top2": 100.0}
    # Three classes: top-5 is capped at all classes, so it is 100.
    assert topk_accuracy(logits, labels, ks=(5,)) == {"top5": 100.0}
    assert per_item_correct(logits, labels, ks=(1, 2)).tolist() == [[False, True], [True, True]]


def test_rejects_labels_outside_the_classes():
    train_feats, train_labels, _, _ = separable_toy_set()
    with pytest.raises(ValueError):
        train_linear_probe(train_feats, train_labels, num_classes=4, **FAST_GRID)

"""Linear probe on frozen, cached backbone features (the paper's Table 2 protocol).

Model selection never sees the test split: :func:`train_linear_probe` receives only the
training split, holds out a stratified part of it, grid-searches learning rate x weight
decay x stopping epoch on that held-out part, then retrains on the whole training split.
The test split enters only through :func:`evaluate_probe`, after every choice is made
(CoCLR's released code picked the linear-probe epoch on the test set; this cannot).

Choices, all deterministic given ``seed``:
- Optimiser: Adam (``weight_decay`` is its L2 coefficient) on mini-batches of cached
  features; the classifier starts at zero, so no weight initialisation draws random numbers
  (softmax regression is convex: the start only affects speed).
- Features are standardised per dimension with statistics of the data being fitted: the fit
  part during selection, the whole training split for the final model.
- The selected epoch count is reused as-is for the final fit on the whole training split
  (which has 1/(1 - val_fraction) times more steps per epoch); the usual convention, and it
  keeps the number of passes over each example fixed.
- Ties in held-out top-1 go to the earliest grid entry (lrs, then weight decays, in the
  order given) and then to the fewest epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LinearProbe:
    """A trained linear classifier plus the feature standardisation it expects.

    Attributes:
        classifier: ``nn.Linear(D, num_classes)``, applied to standardised features.
        mean, std: (D,) standardisation statistics of the training split (mean 0, std 1
            when the probe was trained with ``standardise=False``).
        selection: the chosen ``lr``, ``weight_decay``, ``epochs`` and the held-out top-1
            (percent) that chose them, ``val_top1``; also ``num_fit`` and ``num_val``.
    """

    classifier: nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    selection: dict = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Class scores (N, num_classes) for raw (unstandardised) features (N, D)."""
        weight = self.classifier.weight
        feats = feats.to(device=weight.device, dtype=weight.dtype)
        return self.classifier((feats - self.mean.to(weight.device)) / self.std.to(weight.device))


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split row indices into (fit, held-out) parts with the class proportions preserved.

    Each class sends round(n_c * val_fraction) of its rows, chosen at random from ``seed``,
    to the held-out part, but always keeps at least one row for fitting (so a class seen
    once is never unseen during fitting). Both index tensors are sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = torch.as_tensor(labels).cpu()
    generator = torch.Generator().manual_seed(seed)
    fit_parts, val_parts = [], []
    for label in labels.unique(sorted=True):
        rows = (labels == label).nonzero().flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        num_val = min(round(rows.numel() * val_fraction), rows.numel() - 1)
        val_parts.append(rows[:num_val])
        fit_parts.append(rows[num_val:])
    fit, val = torch.cat(fit_parts).sort().values, torch.cat(val_parts).sort().values
    if val.numel() == 0:
        raise ValueError("the held-out part is empty: too few training examples per class")
    return fit, val


def feature_statistics(feats: torch.Tensor, standardise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (N, D) -> (D,), (D,); identity stats if not standardising.

    Constant dimensions get std 1 instead of 0, so they map to 0 rather than NaN.
    """
    if not standardise:
        return feats.new_zeros(feats.shape[1]), feats.new_ones(feats.shape[1])
    std = feats.std(dim=0, unbiased=False) if feats.shape[0] > 1 else feats.new_ones(feats.shape[1])
    return feats.mean(dim=0), torch.where(std > 1e-8, std, torch.ones_like(std))


def train_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3),
    max_epochs: int = 100,
    batch_size: int = 256,
    standardise: bool = True,
) -> LinearProbe:
    """Select hyper-parameters on a held-out part of the training split, then fit on all of it.

    Args:
        train_feats: (N, D) cached features of the training split.
        train_labels: (N,) integer labels in [0, num_classes).
        num_classes: number of classes (the classifier's width).
        val_fraction: share of each class held out for selection.
        seed: fixes the split and the mini-batch order (the same order for every grid entry).
        lrs, weight_decays: the grid; every (lr, weight_decay) pair is trained for
            ``max_epochs`` epochs and scored on the held-out part after each epoch.
        max_epochs: the longest training considered.
        batch_size: mini-batch size over cached features.
        standardise: standardise features per dimension before the classifier.

    Returns:
        A :class:`LinearProbe` trained on the whole training split with the selected lr,
        weight decay and number of epochs. See the module docstring for the choices.
    """
    train_labels = torch.as_tensor(train_labels).to(train_feats.device).long()
    _check_training_inputs(train_feats, train_labels, num_classes, max_epochs, batch_size, lrs, weight_decays)
    train_feats = train_feats.float()

    fit_rows, val_rows = stratified_split(train_labels, val_fraction, seed)
    fit_rows, val_rows = fit_rows.to(train_feats.device), val_rows.to(train_feats.device)
    mean, std = feature_statistics(train_feats[fit_rows], standardise)
    fit_x = (train_feats[fit_rows] - mean) / std
    val_x = (train_feats[val_rows] - mean) / std
    fit_y, val_y = train_labels[fit_rows], train_labels[val_rows]

    best = {"val_top1": -1.0}
    for lr in lrs:
        for weight_decay in weight_decays:
            curve = _fit_linear(
                fit_x,
                fit_y,
                num_classes,
                lr=lr,
                weight_decay=weight_decay,
                epochs=max_epochs,
                batch_size=batch_size,
                seed=seed,
                val=(val_x, val_y),
            )[1]
            for epoch, val_top1 in enumerate(curve, start=1):
                if val_top1 > best["val_top1"]:  # strict: ties keep the earlier, shorter run
                    best = {"lr": float(lr), "weight_decay": float(weight_decay), "epochs": epoch, "val_top1": val_top1}

    mean, std = feature_statistics(train_feats, standardise)
    classifier, _ = _fit_linear(
        (train_feats - mean) / std,
        train_labels,
        num_classes,
        lr=best["lr"],
        weight_decay=best["weight_decay"],
        epochs=best["epochs"],
        batch_size=batch_size,
        seed=seed,
    )
    selection = dict(best, num_fit=int(fit_rows.numel()), num_val=int(val_rows.numel()))
    return LinearProbe(classifier=classifier, mean=mean, std=std, selection=selection)


def _fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    seed: int,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[nn.Linear, list[float]]:
    """Train a zero-initialised linear classifier with Adam; return it and held-out top-1 per epoch."""
    classifier = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.zero_()
    optimiser = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    curve: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for start in range(0, x.shape[0], batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(x[batch]), y[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if val is not None:
            with torch.no_grad():
                curve.append(topk_accuracy(classifier(val[0]), val[1], ks=(1,))["top1"])
    return classifier.eval().requires_grad_(False), curve


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent, keyed ``"top{k}"``; k is capped at the number of classes.

    With fewer than k classes every label is within the top k, so the capped value is 100.
    """
    correct = per_item_correct(logits, labels, ks)
    return {f"top{k}": float(correct[:, j].float().mean() * 100.0) for j, k in enumerate(ks)}


def per_item_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """(N, len(ks)) bool: whether each item's label is among its top-k scores (k capped at C).

    The per-item form is what a bootstrap over test items resamples.
    """
    if logits.shape[0] == 0:
        raise ValueError("accuracy is undefined without examples")
    k_max = min(max(ks), logits.shape[1])
    ranked = logits.topk(k_max, dim=1).indices
    hit_within = (ranked == labels.to(logits.device)[:, None]).cummax(dim=1).values
    return hit_within[:, [min(k, k_max) - 1 for k in ks]].cpu()


def evaluate_probe(probe: LinearProbe, test_feats: torch.Tensor, test_labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of a trained probe: ``{"top1": ..., "top5": ...}``.

    With fewer than 5 classes, top-5 is computed over all classes and is therefore 100.
    """
    return topk_accuracy(probe.logits(test_feats), torch.as_tensor(test_labels).long(), ks=(1, 5))


def _check_training_inputs(feats, labels, num_classes, max_epochs, batch_size, lrs, weight_decays) -> None:
    if feats.dim() != 2 or labels.shape != (feats.shape[0],):
        raise ValueError("train_feats must be (N, D) and train_labels (N,)")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if max_epochs < 1 or batch_size < 1:
        raise ValueError("max_epochs and batch_size must be at least 1")
    if len(lrs) == 0 or len(weight_decays) == 0:
        raise ValueError("the lr and weight-decay grids must not be empty")

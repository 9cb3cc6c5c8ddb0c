"""Confidence intervals for evaluation metrics that are means over test items.

R@k and top-k accuracy are averages of per-video outcomes (hit or miss), so their
uncertainty from the finite test set is estimated with a percentile bootstrap over test
videos. With several training seeds evaluated on the *same* test videos, one resample of
test videos is applied to every run jointly and the statistic is the average over runs:
the interval then describes the seed-averaged metric's test-set uncertainty. The spread
between seeds is a separate quantity, reported by :func:`mean_and_ci_over_seeds`.
"""

from __future__ import annotations

import torch

# Resamples are drawn in blocks of this many so memory stays at block x N values.
_RESAMPLE_BLOCK = 64


def bootstrap_ci(
    per_item_values: torch.Tensor,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of a mean over test items.

    Args:
        per_item_values: (N,) values for N test items (e.g. 0/1 hits, times 100 for percent),
            or (runs, N) for several runs over the same items: items are resampled jointly
            across runs and each resample's statistic is the mean over runs of the run means.
        num_resamples: bootstrap resamples (each draws N items with replacement).
        confidence: central coverage of the interval, e.g. 0.95.
        seed: seeds the resampling, so the interval is reproducible.

    Returns:
        (mean, low, high) as floats; ``mean`` is the statistic on the original items.
    """
    values = torch.as_tensor(per_item_values).double()
    if values.dim() == 1:
        values = values[None]
    if values.dim() != 2 or values.shape[1] == 0:
        raise ValueError(f"per_item_values must be (N,) or (runs, N) with N > 0, got {tuple(values.shape)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError("num_resamples must be at least 1")

    num_items = values.shape[1]
    generator = torch.Generator().manual_seed(seed)
    statistics = []
    for start in range(0, num_resamples, _RESAMPLE_BLOCK):
        block = min(_RESAMPLE_BLOCK, num_resamples - start)
        items = torch.randint(num_items, (block, num_items), generator=generator)
        # values[:, items]: (runs, block, N) -> mean over items, then over runs.
        statistics.append(values[:, items].mean(dim=2).mean(dim=0))
    statistics = torch.cat(statistics)
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(statistics, torch.tensor([tail, 1.0 - tail], dtype=statistics.dtype))
    return float(values.mean()), float(low), float(high)


def mean_and_ci_over_seeds(
    per_item_values_by_seed: torch.Tensor | list[torch.Tensor],
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """Summarise one metric measured for several seeds on the same test items.

    Args:
        per_item_values_by_seed: (runs, N) tensor, or a list of ``runs`` (N,) tensors.

    Returns:
        ``mean`` (over seeds and items), ``ci_low``/``ci_high`` (joint bootstrap over items,
        see :func:`bootstrap_ci`), ``seed_std`` (sample std of the per-seed means; 0 for one
        seed), ``per_seed`` (list of per-seed means), ``num_seeds``.
    """
    if isinstance(per_item_values_by_seed, (list, tuple)):
        values = torch.stack([torch.as_tensor(v).double() for v in per_item_values_by_seed])
    else:
        values = torch.as_tensor(per_item_values_by_seed).double()
        if values.dim() == 1:
            values = values[None]
    mean, low, high = bootstrap_ci(values, num_resamples, confidence, seed)
    per_seed = values.mean(dim=1)
    seed_std = float(per_seed.std()) if per_seed.numel() > 1 else 0.0
    return {
        "mean": mean,
        "ci_low": low,
        "ci_high": high,
        "seed_std": seed_std,
        "per_seed": [float(v) for v in per_seed],
        "num_seeds": int(per_seed.numel()),
    }


def confidence_interval(per_video_hits: torch.Tensor) -> list[float]:
    """[low, high] 95% percentile-bootstrap interval (percent) of the mean of (N,) per-video hits
    (0/1) over test videos (:func:`bootstrap_ci`)."""
    _, low, high = bootstrap_ci(per_video_hits.float() * 100.0)
    return [low, high]

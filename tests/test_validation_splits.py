"""The learnability harness's validation split: a recipe chosen on it is chosen on training videos only."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import torch
from conftest import REPO


def _harness():
    path = REPO / "benchmarks" / "demo_learnability.py"
    spec = importlib.util.spec_from_file_location("demo_learnability", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data(classes=3, videos_per_class=7, n_train=4):
    # the harness stores videos class by class, the first n_train of each class for training
    labels = torch.arange(classes).repeat_interleave(videos_per_class)
    train = (torch.arange(classes * videos_per_class) % videos_per_class) < n_train
    return {"labels": labels, "train": train}


def test_validation_split_uses_training_videos_only_and_every_class_on_both_sides():
    split = _harness().evaluation_split
    data = _data()
    gallery, queries = split(data, SimpleNamespace(eval_on="validation", videos_per_class=7))
    train = set(torch.nonzero(data["train"]).flatten().tolist())
    assert set(gallery.tolist()) | set(queries.tolist()) == train
    assert not set(gallery.tolist()) & set(queries.tolist())
    for c in range(3):
        assert (data["labels"][gallery] == c).sum() == 2 and (data["labels"][queries] == c).sum() == 2


def test_test_split_queries_the_held_out_videos_against_all_training_ones():
    data = _data()
    gallery, queries = _harness().evaluation_split(data, SimpleNamespace(eval_on="test", videos_per_class=7))
    assert gallery.tolist() == torch.nonzero(data["train"]).flatten().tolist()
    assert queries.tolist() == torch.nonzero(~data["train"]).flatten().tolist()

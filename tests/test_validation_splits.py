"""Validation splits inside the training videos (the learnability harness, benchmarks/recipe_validation.py):
a recipe chosen on them is chosen without reading a test video."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data(classes=3, videos_per_class=7, n_train=4):
    # the harness stores videos class by class, the first n_train of each class for training
    labels = torch.arange(classes).repeat_interleave(videos_per_class)
    train = (torch.arange(classes * videos_per_class) % videos_per_class) < n_train
    return {"labels": labels, "train": train}


def test_validation_split_uses_training_videos_only_and_every_class_on_both_sides():
    split = _benchmark("demo_learnability").evaluation_split
    data = _data()
    gallery, queries = split(data, SimpleNamespace(eval_on="validation", videos_per_class=7))
    train = set(torch.nonzero(data["train"]).flatten().tolist())
    assert set(gallery.tolist()) | set(queries.tolist()) == train
    assert not set(gallery.tolist()) & set(queries.tolist())
    for c in range(3):
        assert (data["labels"][gallery] == c).sum() == 2 and (data["labels"][queries] == c).sum() == 2


def test_test_split_queries_the_held_out_videos_against_all_training_ones():
    data = _data()
    gallery, queries = _benchmark("demo_learnability").evaluation_split(
        data, SimpleNamespace(eval_on="test", videos_per_class=7)
    )
    assert gallery.tolist() == torch.nonzero(data["train"]).flatten().tolist()
    assert queries.tolist() == torch.nonzero(~data["train"]).flatten().tolist()


def test_validation_lists_alternate_each_class_and_refuse_a_test_list(tmp_path):
    listing = tmp_path / "trainlist01.txt"
    listing.write_text("A/a0.mp4 1\nA/a1.mp4 1\nB/b0.mp4 2\nA/a2.mp4 1\n\nB/b1.mp4 2\n")
    gallery, queries = _benchmark("recipe_validation").validation_lists(listing)
    assert gallery == ["A/a0.mp4 1", "B/b0.mp4 2", "A/a2.mp4 1"] and queries == ["A/a1.mp4 1", "B/b1.mp4 2"]
    listing.write_text("A/a0.mp4\n")
    with pytest.raises(ValueError, match="no class index"):
        _benchmark("recipe_validation").validation_lists(listing)


def _sources(store):
    return {json.loads(line)["source"] for line in (store / "manifest.jsonl").read_text().splitlines()}


def test_recipe_validation_trains_and_evaluates_on_training_videos_only(tmp_path):
    out = tmp_path / "val"
    command = [sys.executable, str(REPO / "benchmarks" / "recipe_validation.py"), "--out", str(out), "--quick"]
    command += ["--seeds", "1", "--workers", "1", "--variant", "a=", "--variant", "b=data.crop_scale=[0.5,1.0]"]
    subprocess.run(command, check=True, cwd=tmp_path, timeout=600)
    splits = out / "synth" / "splits"
    train = {line.split()[0] for line in (splits / "trainlist01.txt").read_text().splitlines()}
    test = {line.strip() for line in (splits / "testlist01.txt").read_text().splitlines()}
    stores = {name: _sources(out / "prepared" / name) for name in ("train", "gallery", "queries")}
    assert stores["train"] == train and not train & test
    assert stores["gallery"] | stores["queries"] == train and not stores["gallery"] & stores["queries"]
    results = json.loads((out / "results.json").read_text())
    assert results["variants"] == {"a": "", "b": "data.crop_scale=[0.5,1.0]"}
    rows = {row["model"]: row for row in results["rows"]}
    assert {"random init", "InfoNCE (a)", "CoCLR (b)", "TriCoCLR (b)"} <= set(rows)
    assert all(row["seeds"] == 1 and 0 <= row["R@1"] <= 100 for row in rows.values())
    differences = {c["difference"]: c for c in results["comparisons"]}
    assert "TriCoCLR (b) − TriCoCLR (a)" in differences and len(differences) == 4
    # the variant's overrides reached its runs and only its runs
    shipped = yaml.safe_load((REPO / "configs" / "small.yaml").read_text())["data"]["crop_scale"]
    for variant, scale in (("a", shipped), ("b", [0.5, 1.0])):
        config = yaml.safe_load((out / variant / "runs" / "seed0" / "pretrain" / "config.yaml").read_text())
        assert config["data"]["crop_scale"] == scale

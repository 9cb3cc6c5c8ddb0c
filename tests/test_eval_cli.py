"""`tricoclr eval retrieval|linear|finetune` and `tricoclr export`, end to end on real prepared stores.

Random encoders come from a shrunken tiny config (4-frame clips at 32 px) so every command runs in
seconds on two CPU cores; the trained encoder comes from two real training steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides
from PIL import Image

from data_tools.cli import main as data_main
from tricoclr.cli import main
from tricoclr.config import dump_config, load_config
from tricoclr.eval.features import EvalError, extract_features
from tricoclr.eval.report import retrieval_figure
from tricoclr.models.encoder import Encoder, save_encoder
from tricoclr.trainer import Trainer

RECALL_KEYS = ["R@1", "R@5", "R@10", "R@20", "R@50"]
SMALL_DATA = {"clip_frames": 4, "clip_stride": 2, "size": 32, "spectrogram_steps": 32}
# What a results JSON records: every clip key (CLIP_KEYS), the ones not in SMALL_DATA at their defaults.
SMALL_CLIP = {**SMALL_DATA, "min_gap_frames": 0, "short_policy": "overlap"}


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_config(train_lmdb, tmp_path_factory) -> Path:
    """configs/tiny.yaml with the test-sized clips: the architecture of every random encoder here."""
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    dump_config(load_config("configs/tiny.yaml", tiny_overrides(train_lmdb, path.parent / "unused")), path)
    return path


@pytest.fixture(scope="module")
def trained_rgb(train_lmdb, tmp_path_factory) -> Path:
    """The latest RGB encoder of a two-step InfoNCE run (its metadata carries the clip settings)."""
    out = tmp_path_factory.mktemp("run") / "infonce"
    Trainer(load_config("configs/tiny.yaml", tiny_overrides(train_lmdb, out, modalities="[rgb]", max_steps=2))).run()
    return out / "encoders" / "rgb.safetensors"


def _prepare(videos: Path, out: Path, *options) -> Path:
    """A fast in-process prepare (no flow unless asked)."""
    argv = [
        "prepare",
        videos,
        "--out",
        out,
        "--format",
        "lmdb",
        "--size",
        64,
        "--workers",
        0,
        "--no-progress",
        *options,
    ]
    if "--flow" not in options:
        argv += ["--flow", "none"]
    assert data_main([str(a) for a in argv]) == 0
    return out


def _test_list_subsets(synth: Path, tmp: Path) -> tuple[Path, Path]:
    """The test split in two halves, each a UCF101 list beside a copy of classInd.txt."""
    lines = (synth / "splits" / "testlist01.txt").read_text().splitlines()
    halves = []
    for name, part in (("first", lines[: len(lines) // 2]), ("second", lines[len(lines) // 2 :])):
        folder = tmp / name
        folder.mkdir()
        shutil.copy(synth / "splits" / "classInd.txt", folder / "classInd.txt")
        (folder / "testlist01.txt").write_text("\n".join(part) + "\n")
        halves.append(folder / "testlist01.txt")
    return halves[0], halves[1]


@pytest.fixture(scope="module")
def partly_audible_test_store(synth_dataset, tmp_path_factory) -> Path:
    """The test videos as two parts: the first half with audio, the second prepared without."""
    tmp = tmp_path_factory.mktemp("partly_audible")
    first, second = _test_list_subsets(synth_dataset, tmp)
    root = tmp / "store"
    _prepare(synth_dataset / "videos", root / "part-00000-of-00002", "--list", first)
    _prepare(synth_dataset / "videos", root / "part-00001-of-00002", "--list", second, "--no-audio")
    return root


def _eval(task: str, encoder, train, test, out: Path, *options) -> dict:
    assert (
        main(
            [
                "eval",
                task,
                "--encoder",
                str(encoder),
                "--train",
                str(train),
                "--test",
                str(test),
                "--json",
                str(out),
                "--workers",
                "0",
                *map(str, options),
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


def _random_encoder_file(path: Path, seed: int, backbone: str = "tiny3d") -> Path:
    torch.manual_seed(seed)
    save_encoder(Encoder(backbone, 3), path, modality="rgb", extra={"data": SMALL_DATA})
    return path


class ForwardCounter:
    """Counts module forward calls in this process (a global hook: sees encoders built inside the CLI)."""

    def __enter__(self):
        self.calls = 0
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._count)
        return self

    def _count(self, module, inputs, output):
        self.calls += 1

    def __exit__(self, *exc):
        self._handle.remove()


def _check_recalls(metrics: dict, num_train: int, num_test: int) -> None:
    recalls = [metrics[k] for k in RECALL_KEYS]
    assert all(0.0 <= r <= 100.0 for r in recalls)
    assert recalls == sorted(recalls), "R@k cannot decrease with k"
    assert metrics["R@50"] == 100.0  # 50 > the training set: every class is retrieved
    assert 0.0 <= metrics["chance_R@1"] <= 100.0
    assert (metrics["num_train"], metrics["num_test"]) == (num_train, num_test)
    low, high = metrics["R@1_ci"]
    assert low <= metrics["R@1"] <= high


# ---- retrieval --------------------------------------------------------------------------------


def test_retrieval_of_a_random_encoder_writes_json_table_figure_and_projector(
    train_lmdb, test_lmdb, small_config, tmp_path
):
    out = tmp_path / "results" / "random.json"
    metrics = _eval(
        "retrieval",
        "random",
        train_lmdb,
        test_lmdb,
        out,
        "--config",
        small_config,
        "--cache-dir",
        tmp_path / "cache",
        "--png",
        tmp_path / "figure.png",
        "--projector",
        tmp_path / "projector",
    )
    _check_recalls(metrics, num_train=12, num_test=4)
    assert metrics["excluded"] == {"train": 0, "test": 0}
    assert metrics["data"] == SMALL_CLIP and metrics["model"] == "random init"

    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0].split("|")[1:-1] == [
        f" {c} " for c in ["model", "RGB", "Flow", "Audio", "RGBDiff", *RECALL_KEYS, "chance_R@1"]
    ]
    assert table[2].startswith("| random init | ✓ |  |  |  | ") and len(table) == 3

    # One row per test class (4), a query and its 5 neighbours per row: the report's documented size.
    expected = retrieval_figure(
        [torch.zeros(3, 8, 8)] * 4, [[torch.zeros(3, 8, 8)] * 5] * 4, [0] * 4, [[0] * 5] * 4, tmp_path / "blank.png"
    ).size
    with Image.open(tmp_path / "figure.png") as figure:
        assert figure.size == expected
        assert len(figure.convert("RGB").getcolors(maxcolors=1 << 20)) > 1000  # real frames, not a blank canvas

    embedding = tmp_path / "projector" / "00000" / "embeddings"
    assert (tmp_path / "projector" / "projector_config.pbtxt").exists()
    assert len((embedding / "tensors.tsv").read_text().splitlines()) == 4
    class_names = json.loads((test_lmdb / "classes.json").read_text())["names"]
    assert sorted((embedding / "metadata.tsv").read_text().split()) == sorted(class_names)
    assert (embedding / "sprite.png").exists()


def _console_command() -> list[str]:
    """The installed `tricoclr` script, else the module (the checkout may not be pip-installed)."""
    script = Path(sys.executable).parent / "tricoclr"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tricoclr.cli"]


def test_retrieval_of_a_trained_encoder_from_the_command_line(trained_rgb, train_lmdb, test_lmdb, tmp_path):
    out = tmp_path / "trained.json"
    command = [
        *_console_command(),
        "eval",
        "retrieval",
        "--encoder",
        trained_rgb,
        "--train",
        train_lmdb,
        "--test",
        test_lmdb,
        "--json",
        out,
        "--workers",
        "0",
        "--cache-dir",
        tmp_path / "cache",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(c) for c in command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())
    _check_recalls(metrics, num_train=12, num_test=4)
    # The clip settings come from the encoder file, not from any config; the row names the run.
    assert metrics["data"] == SMALL_CLIP
    assert metrics["model"] == "infonce (pretrain-rgb)" and metrics["trained_with"] == ["rgb"]
    assert "| infonce (pretrain-rgb) | ✓ |" in result.stdout


def test_audio_and_flow_encoders_are_evaluated_and_inaudible_videos_counted(
    train_lmdb, test_lmdb, partly_audible_test_store, small_config, tmp_path
):
    audio = _eval(
        "retrieval",
        "random",
        train_lmdb,
        partly_audible_test_store,
        tmp_path / "audio.json",
        "--config",
        small_config,
        "--modality",
        "audio",
        "--no-cache",
    )
    _check_recalls(audio, num_train=12, num_test=2)
    assert audio["excluded"] == {"train": 0, "test": 2} and audio["modality"] == "audio"
    flow = _eval(
        "retrieval",
        "random",
        train_lmdb,
        test_lmdb,
        tmp_path / "flow.json",
        "--config",
        small_config,
        "--modality",
        "flow",
        "--no-cache",
        "--png",
        tmp_path / "flow.png",
    )
    _check_recalls(flow, num_train=12, num_test=4)
    assert (tmp_path / "flow.png").exists()  # thumbnails are RGB frames whatever the modality
    assert "[flow encoder]" in (tmp_path / "flow.md").read_text()


def test_table_marks_every_modality_of_a_cooperative_stage(train_lmdb, test_lmdb, tmp_path):
    run = tmp_path / "tricoclr_run"
    run.mkdir()
    dump_config(load_config("configs/tiny.yaml", ["modalities=[rgb,flow,audio]"]), run / "config.yaml")
    torch.manual_seed(0)
    encoder_file = run / "encoders" / "cycle1-rgb" / "rgb.safetensors"
    save_encoder(Encoder("tiny3d", 3), encoder_file, modality="rgb", extra={"stage": "cycle1-rgb", "data": SMALL_DATA})
    metrics = _eval("retrieval", encoder_file, train_lmdb, test_lmdb, tmp_path / "coop.json", "--no-cache")
    assert metrics["trained_with"] == ["rgb", "flow", "audio"]
    assert "| tricoclr_run (cycle1-rgb) | ✓ | ✓ | ✓ |" in (tmp_path / "coop.md").read_text()


# ---- features: determinism and the cache ------------------------------------------------------


def test_feature_extraction_is_deterministic(test_lmdb):
    torch.manual_seed(0)
    encoder = Encoder("tiny3d", 3)
    first = extract_features(encoder, "rgb", test_lmdb, SMALL_DATA)
    second = extract_features(encoder, "rgb", test_lmdb, SMALL_DATA, workers=2)
    assert first["ids"] == second["ids"] and len(first["ids"]) == 4
    assert torch.equal(first["features"], second["features"])
    assert torch.equal(first["labels"], second["labels"]) and torch.equal(first["thumbnails"], second["thumbnails"])
    assert first["features"].shape == (4, encoder.feature_dim) and first["excluded"] == 0


def test_features_do_not_depend_on_the_store_format(train_lmdb, train_wds):
    torch.manual_seed(0)
    encoder = Encoder("tiny3d", 3)
    from_lmdb = extract_features(encoder, "rgb", train_lmdb, SMALL_DATA)
    from_webdataset = extract_features(encoder, "rgb", train_wds, SMALL_DATA)
    assert from_lmdb["ids"] == from_webdataset["ids"]
    assert torch.equal(from_lmdb["features"], from_webdataset["features"])
    assert torch.equal(from_lmdb["labels"], from_webdataset["labels"])


def test_the_cache_is_used_and_keyed_by_the_encoder_file(train_lmdb, test_lmdb, tmp_path):
    cache = tmp_path / "cache"
    first_file = _random_encoder_file(tmp_path / "a" / "rgb.safetensors", seed=1)

    def run(encoder, name):
        return _eval("retrieval", encoder, train_lmdb, test_lmdb, tmp_path / name, "--cache-dir", cache)

    with ForwardCounter() as computed:
        first = run(first_file, "first.json")
    assert computed.calls > 0 and len(list(cache.glob("*.safetensors"))) == 2  # train and test
    with ForwardCounter() as cached:
        again = run(first_file, "again.json")
    assert cached.calls == 0, "a repeated evaluation recomputed features"
    assert {k: again[k] for k in RECALL_KEYS} == {k: first[k] for k in RECALL_KEYS}

    other_file = _random_encoder_file(tmp_path / "b" / "rgb.safetensors", seed=2)
    with ForwardCounter() as recomputed:
        run(other_file, "other.json")
    assert recomputed.calls > 0 and len(list(cache.glob("*.safetensors"))) == 4


# ---- labels -----------------------------------------------------------------------------------


def test_stores_prepared_with_different_class_lists_are_refused(synth_dataset, train_lmdb, small_config, tmp_path):
    names = [line.split(" ", 1)[1] for line in (synth_dataset / "splits" / "classInd.txt").read_text().splitlines()]
    reordered = tmp_path / "classInd.txt"
    reordered.write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(reversed(names))))
    other = _prepare(
        synth_dataset / "videos",
        tmp_path / "other_test",
        "--list",
        synth_dataset / "splits" / "testlist01.txt",
        "--class-index",
        reordered,
        "--no-audio",
    )
    with pytest.raises(SystemExit, match="label mismatch.*another order"):
        _eval("retrieval", "random", train_lmdb, other, tmp_path / "x.json", "--config", small_config, "--no-cache")
    assert not (tmp_path / "x.json").exists()


def test_unlabelled_stores_are_refused(synth_dataset, train_lmdb, small_config, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for video in sorted((synth_dataset / "videos").rglob("*.mp4"))[:2]:
        os.symlink(video, flat / video.name)  # no class folders, no list: no labels
    unlabelled = _prepare(flat, tmp_path / "unlabelled", "--no-audio")
    with pytest.raises(SystemExit, match="no labels"):
        _eval("linear", "random", train_lmdb, unlabelled, tmp_path / "x.json", "--config", small_config, "--no-cache")
    with pytest.raises(EvalError, match="no label"):
        extract_features(Encoder("tiny3d", 3), "rgb", unlabelled, SMALL_DATA)


# ---- linear probe and fine-tuning -------------------------------------------------------------


def test_linear_probe_reports_top1_and_top5(train_lmdb, test_lmdb, small_config, tmp_path):
    metrics = _eval(
        "linear",
        "random",
        train_lmdb,
        test_lmdb,
        tmp_path / "linear.json",
        "--config",
        small_config,
        "--cache-dir",
        tmp_path / "cache",
    )
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    assert metrics["top5"] == 100.0  # 4 classes: all are within the top 5
    assert metrics["selection"]["num_fit"] + metrics["selection"]["num_val"] == metrics["num_train"] == 12
    assert metrics["num_test"] == 4
    assert "| random init | ✓ |" in (tmp_path / "linear.md").read_text()


def _finetune(train, test, config, json_path: Path, epochs: int, output_dir: Path) -> dict:
    return _eval(
        "finetune",
        "random",
        train,
        test,
        json_path,
        "--config",
        config,
        "--finetune-epochs",
        epochs,
        "--finetune-batch-size",
        4,
        "--output-dir",
        output_dir,
        "--max-clips",
        4,
    )


def test_finetune_checkpoints_and_resumes_exactly(train_lmdb, test_lmdb, small_config, tmp_path):
    resumed_dir = tmp_path / "resumed"
    first = _finetune(train_lmdb, test_lmdb, small_config, tmp_path / "f1.json", 1, resumed_dir)
    assert 0.0 <= first["top1"] <= 100.0 and first["num_test"] == 4 and first["resumed_from_epoch"] == 0
    state = json.loads((resumed_dir / "checkpoint" / "epoch.json").read_text())
    assert state["next_epoch"] == 1 and (resumed_dir / "checkpoint" / "model.safetensors").exists()

    second = _finetune(train_lmdb, test_lmdb, small_config, tmp_path / "f2.json", 2, resumed_dir)
    assert second["resumed_from_epoch"] == 1 and second["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (resumed_dir / "log.jsonl").read_text().splitlines()] == [1, 2]

    straight_dir = tmp_path / "straight"
    straight = _finetune(train_lmdb, test_lmdb, small_config, tmp_path / "f3.json", 2, straight_dir)
    from safetensors.torch import load_file

    resumed_weights = load_file(resumed_dir / "checkpoint" / "model.safetensors")
    straight_weights = load_file(straight_dir / "checkpoint" / "model.safetensors")
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)
    assert straight["top1"] == second["top1"]


def test_finetune_refuses_a_checkpoint_of_another_run(train_lmdb, test_lmdb, small_config, tmp_path):
    _finetune(train_lmdb, test_lmdb, small_config, tmp_path / "a.json", 1, tmp_path / "ft")
    with pytest.raises(SystemExit, match="another fine-tuning run.*seed"):
        _eval(
            "finetune",
            "random",
            train_lmdb,
            test_lmdb,
            tmp_path / "b.json",
            "--config",
            small_config,
            "--finetune-epochs",
            2,
            "--finetune-batch-size",
            4,
            "--output-dir",
            tmp_path / "ft",
            "--seed",
            3,
        )


def test_finetune_under_accelerate_launch(train_lmdb, test_lmdb, small_config, tmp_path):
    out = tmp_path / "launched.json"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "tricoclr.cli",
        "eval",
        "finetune",
        "--encoder",
        "random",
        "--config",
        small_config,
        "--train",
        train_lmdb,
        "--test",
        test_lmdb,
        "--json",
        out,
        "--workers",
        "0",
        "--finetune-epochs",
        "1",
        "--finetune-batch-size",
        "4",
        "--max-clips",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0.0 <= json.loads(out.read_text())["top1"] <= 100.0
    assert (tmp_path / "launched_finetune" / "checkpoint" / "epoch.json").exists()


# ---- export -----------------------------------------------------------------------------------


def test_export_loads_into_torchvision_s3d_with_equal_features(tmp_path):
    from torchvision.models.video import s3d

    torch.manual_seed(0)
    encoder = Encoder("s3d", 3).eval()
    save_encoder(encoder, tmp_path / "rgb.safetensors", modality="rgb")
    assert main(["export", "--encoder", str(tmp_path / "rgb.safetensors"), "--out", str(tmp_path / "s3d.pt")]) == 0

    model = s3d(weights=None).eval()
    model.avgpool = torch.nn.AdaptiveAvgPool3d(1)
    missing, unexpected = model.load_state_dict(torch.load(tmp_path / "s3d.pt", weights_only=True), strict=False)
    assert unexpected == [] and missing and all(key.startswith("classifier.") for key in missing)
    clip = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = model.avgpool(model.features(clip)).flatten(1)
        expected = encoder.features(clip)
    assert torch.allclose(exported, expected, atol=1e-5)


def test_export_of_a_non_s3d_encoder_is_a_clear_error(tmp_path):
    path = _random_encoder_file(tmp_path / "rgb.safetensors", seed=0)
    with pytest.raises(SystemExit, match="only s3d encoders"):
        main(["export", "--encoder", str(path), "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()

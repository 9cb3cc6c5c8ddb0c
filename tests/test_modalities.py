"""The built-in modalities as registry entries, and RGB difference (``rgbdiff``), the derived fourth:
its clips, a CoCLR run with it as the oracle, the M = 4 schedule, evaluation and export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import eval_retrieval, tiny_overrides

from tricoclr.cli import main
from tricoclr.config import load_config
from tricoclr.data import modalities as registry
from tricoclr.data.samples import StageViews, build_sample, finish_batch
from tricoclr.data.store import open_store
from tricoclr.data.stream_loader import WebDatasetPairStream
from tricoclr.method import build_schedule
from tricoclr.models.encoder import Encoder, load_encoder, save_encoder
from tricoclr.trainer import Trainer

SMALL = {
    "clip_frames": 4,
    "clip_stride": 2,
    "size": 32,
    "spectrogram_steps": 32,
    "crop_scale": (0.3, 1.0),
    "min_gap_frames": 0,
    "short_policy": "overlap",
}
TINY_RGBDIFF = {"model.backbones.rgbdiff": "tiny3d"}


def test_every_entry_declares_its_data_and_presentation():
    for name in ("rgb", "flow", "audio", "rgbdiff"):
        entry = registry.get(name)
        assert entry.layout in registry.LAYOUTS and entry.display_name.lower() == name
        assert bool(entry.stored_parts) != bool(entry.derived_from)
    assert registry.get("rgbdiff").derived_from == "rgb" and registry.stored_parts_of(["rgbdiff"]) == {"rgb"}
    assert registry.stored_parts_of(["rgb", "flow", "audio", "rgbdiff"]) == {"rgb", "flow", "audio"}


def test_a_malformed_entry_or_a_second_registration_is_refused():
    rgb = registry.get("rgb")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(rgb)
    with pytest.raises(ValueError, match="layout"):
        registry.Modality("x", "cube", 1, "tiny3d", rgb.read, rgb.augment, rgb.present, stored_parts=("rgb",))
    with pytest.raises(ValueError, match="either read stored parts or be derived"):
        registry.Modality("x", "video", 1, "tiny3d", rgb.read, rgb.augment, rgb.present)
    with pytest.raises(ValueError, match="unregistered"):
        registry.register(
            registry.Modality("x", "video", 3, "tiny3d", rgb.read, rgb.augment, rgb.present, derived_from="depth")
        )
    with pytest.raises(ValueError, match="built in"):
        registry.unregister("rgb")


def test_rgbdiff_is_the_difference_of_the_views_rgb_crop_before_jitter(train_lmdb):
    record = next(open_store(train_lmdb).iter_records())
    both = build_sample(record, 0, 0, 7, StageViews(("rgbdiff",), ("rgb",)), SMALL)
    alone = build_sample(record, 0, 0, 7, StageViews(("rgbdiff",)), SMALL)
    # The same crop and flip as the view's RGB clip, whether or not RGB is in the stage.
    assert torch.equal(both["rgbdiff.view2"], both["rgb.view2"])
    assert torch.equal(alone["rgbdiff.view2"], both["rgb.view2"])
    assert not torch.equal(alone["rgbdiff.view1"], alone["rgbdiff.view2"])
    batch = {key: value[None] if isinstance(value, torch.Tensor) else value for key, value in both.items()}
    batch["rgb.view2.params"] = {k: v[None] for k, v in both["rgb.view2.params"].items()}
    finished = finish_batch(batch, StageViews(("rgbdiff",), ("rgb",)), "cpu")
    frames = both["rgb.view2"].float() / 255
    expected = frames[:, 1:] - frames[:, :-1]  # (3, T-1, H, W)
    assert finished["rgbdiff.view2"].shape == (1, 3, SMALL["clip_frames"] - 1, 32, 32)
    assert torch.allclose(finished["rgbdiff.view2"][0], expected)
    # RGB itself went through photometric jitter and normalisation; the difference did not.
    assert not torch.allclose(finished["rgb.view2"][0, :, 1:] - finished["rgb.view2"][0, :, :-1], expected)


def test_a_webdataset_stage_of_rgbdiff_alone_reads_the_stored_rgb(train_wds):
    stream = WebDatasetPairStream(
        train_wds, StageViews(("rgbdiff",)), SMALL, seed=0, batch_size=2, rank=0, world_size=1, num_workers=1
    )
    assert stream.wanted_modalities == {"meta", "rgb"}
    assert stream._wanted_member("v_x.rgb_00000.tcf") and not stream._wanted_member("v_x.flow_00000.tcf")


def _losses_finite(summary) -> bool:
    return all(torch.isfinite(torch.tensor([h["loss"] for h in summary["history"] if "loss" in h])))


def test_coclr_with_the_rgbdiff_oracle_trains_end_to_end(train_lmdb, tmp_path):
    out = tmp_path / "run"
    config = load_config(
        "configs/tiny.yaml",
        tiny_overrides(train_lmdb, out, modalities="[rgb,rgbdiff]", max_steps_per_stage=2, **TINY_RGBDIFF),
    )
    summary = Trainer(config).run()
    assert [p.name for p in build_schedule(config)] == [
        "pretrain-rgb",
        "pretrain-rgbdiff",
        "cycle1-rgb",
        "cycle1-rgbdiff",
    ]
    assert summary["global_step"] == 8 and _losses_finite(summary)
    encoder, meta = load_encoder(out / "encoders" / "cycle1-rgb" / "rgb.safetensors")
    assert meta["stage"] == "cycle1-rgb"
    _, meta = load_encoder(out / "encoders" / "rgbdiff.safetensors")
    assert meta["modality"] == "rgbdiff"


def test_four_modalities_train_each_against_three_frozen_samplers(train_lmdb, tmp_path):
    out = tmp_path / "run"
    config = load_config(
        "configs/tiny.yaml",
        tiny_overrides(train_lmdb, out, modalities="[rgb,flow,audio,rgbdiff]", max_steps_per_stage=1, **TINY_RGBDIFF),
    )
    schedule = build_schedule(config)
    assert len(schedule) == 8 and all(len(p.samplers) == 3 for p in schedule[4:])
    summary = Trainer(config).run()
    assert summary["global_step"] == 8 and _losses_finite(summary)
    for modality in ("rgb", "flow", "audio", "rgbdiff"):
        assert (out / "encoders" / f"cycle1-{modality}" / f"{modality}.safetensors").exists()


def test_an_rgbdiff_encoder_is_evaluated_and_exported(train_lmdb, test_lmdb, tmp_path):
    torch.manual_seed(0)
    encoder_file = tmp_path / "rgbdiff.safetensors"
    save_encoder(
        Encoder("tiny3d", 3),
        encoder_file,
        modality="rgbdiff",
        extra={"data": {k: SMALL[k] for k in ("clip_frames", "clip_stride", "size", "spectrogram_steps")}},
    )
    out = tmp_path / "retrieval.json"
    assert eval_retrieval(encoder_file, train_lmdb, test_lmdb, out, "--modality", "rgbdiff") == 0
    metrics = json.loads(out.read_text())
    assert metrics["modality"] == "rgbdiff" and metrics["num_test"] == 4 and 0 <= metrics["R@1"] <= 100
    assert "[rgbdiff encoder]" in out.with_suffix(".md").read_text()
    common = [
        "--encoder",
        str(encoder_file),
        "--train",
        str(train_lmdb),
        "--test",
        str(test_lmdb),
        "--workers",
        "0",
        "--modality",
        "rgbdiff",
    ]
    assert main(["eval", "linear", *common, "--no-cache", "--json", str(tmp_path / "linear.json")]) == 0
    assert (
        main(
            [
                "eval",
                "finetune",
                *common,
                "--json",
                str(tmp_path / "finetune.json"),
                "--finetune-epochs",
                "1",
                "--finetune-batch-size",
                "4",
                "--output-dir",
                str(tmp_path / "finetune"),
                "--max-clips",
                "2",
            ]
        )
        == 0
    )
    for task in ("linear", "finetune"):
        metrics = json.loads((tmp_path / f"{task}.json").read_text())
        assert metrics["modality"] == "rgbdiff" and 0 <= metrics["top1"] <= 100 and metrics["num_test"] == 4
    s3d_file = tmp_path / "s3d_rgbdiff.safetensors"
    save_encoder(Encoder("s3d", registry.get("rgbdiff").in_channels), s3d_file, modality="rgbdiff")
    assert main(["export", "--encoder", str(s3d_file), "--out", str(tmp_path / "export.safetensors")]) == 0
    assert (tmp_path / "export.safetensors").exists()


def test_a_record_reads_an_array_part_by_name(train_lmdb):
    record = next(open_store(train_lmdb).iter_records())
    spectrogram = record.array("audio")  # any stored array part; audio is the built-in one
    assert torch.equal(torch.from_numpy(spectrogram.astype("float32")), record.spectrogram())
    with pytest.raises(KeyError, match="no 'depth' part"):
        record.array("depth")


def test_every_built_in_modality_is_drawn_as_colour_images_in_unit_range():
    batches = {
        "rgb": torch.rand(2, 3, 4, 8, 8),
        "flow": torch.randn(2, 2, 4, 8, 8),
        "audio": torch.randn(2, 1, 16, 32),
        "rgbdiff": torch.randn(2, 3, 3, 8, 8),
    }
    for name, batch in batches.items():
        images = registry.get(name).draw(batch)
        assert images.shape[:2] == (2, 3) and images.dim() == 4, name
        assert float(images.min()) >= 0 and float(images.max()) <= 1, name
    # audio: upright (low frequencies, row 0 of the spectrogram, at the bottom of the image)
    spectrogram = torch.zeros(1, 1, 4, 5)
    spectrogram[0, 0, 0] = 1
    assert torch.equal(registry.get("audio").draw(spectrogram)[0, :, -1], torch.ones(3, 5))

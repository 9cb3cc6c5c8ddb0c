"""The typed config: every bad value fails at start naming its key; files, overrides and the saved
config.yaml keep their layout; old run configs still load; evaluation gets the whole clip spec."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import yaml
from conftest import REPO

from tricoclr.checkpoint import check_same_run, save_trained_encoder
from tricoclr.config import CLIP_KEYS, DEFAULTS, Config, ConfigError, dump_config, load_config
from tricoclr.data.sampling import ClipSpec, clip_spec_of
from tricoclr.eval.cli import trained_encoder
from tricoclr.method import StagePlan
from tricoclr.models import build_encoder

TINY = REPO / "configs" / "tiny.yaml"


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.schedule=linear", "optim.schedule"),  # was silently cosine
        ("method.topk=0", "method.topk"),  # was silently no mining
        ("method.temperature=0", "method.temperature"),  # was NaN after five steps
        ("method.temperature=-0.1", "method.temperature"),
        ("method.momentum=1.5", "method.momentum"),
        ("method.mask_self_probability=2", "method.mask_self_probability"),
        ("method.queue_size=many", "method.queue_size"),
        ("method.batchnorm=sync", "method.batchnorm"),
        ("method.same_video_positives=sometimes", "method.same_video_positives"),
        ("optim.name=lamb", "optim.name"),
        ("optim.lr=0", "optim.lr"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("optim.grad_clip=0", "optim.grad_clip"),
        ("data.short_policy=pad", "data.short_policy"),
        ("data.crop_scale=[0.9,0.1]", "data.crop_scale"),
        ("data.clip_frames=0", "data.clip_frames"),
        ("data.workers=-1", "data.workers"),
        ("model.flow_stem=zero", "model.flow_stem"),
        ("model.embed_dim=0", "model.embed_dim"),
        ("schedule.cycles=-1", "schedule.cycles"),
        ("schedule.pretrain_epochs={rgb: 1}", "schedule.pretrain_epochs"),
        ("monitor.knn_every_epochs=-1", "monitor.knn_every_epochs"),
        ("batch_size=0", "batch_size"),
        ("keep_checkpoints=0", "keep_checkpoints"),
        ("max_steps=-1", "max_steps"),
        ("resume=maybe", "resume"),
        ("method.topkk=3", "method.topkk"),  # unknown keys keep failing
        ("optim=adam", "optim"),  # a section given a value
    ],
)
def test_a_bad_value_fails_at_load_naming_its_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_values_keep_their_meaning_and_numbers_written_as_yaml_text_are_numbers():
    config = load_config(
        TINY, ["optim.schedule=constant", "optim.lr=3e-4", "schedule.pretrain_epochs={rgb: 2, flow: 1, audio: 1}"]
    )
    assert config.optim.schedule == "constant" and config.optim.lr == pytest.approx(3e-4)
    assert config["optim"]["lr"] == config.optim.lr  # read by key as well as by attribute
    assert config.schedule.pretrain_epochs == {"rgb": 2, "flow": 1, "audio": 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method.topk = 0  # frozen: a run's config does not change under it


def test_the_saved_config_has_the_file_layout_and_loads_back_equal(tmp_path):
    config = load_config(TINY, ["method.topk=3"])
    dump_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == list(DEFAULTS)  # same keys, same order, plain YAML values
    assert all(list(saved[s]) == list(DEFAULTS[s]) for s in DEFAULTS if isinstance(DEFAULTS[s], dict))
    assert saved["modalities"] == ["rgb", "flow", "audio"] and saved["data"]["crop_scale"] == [0.3, 1.0]
    assert load_config(tmp_path / "config.yaml") == config


def test_an_old_run_config_without_later_keys_still_resumes(tmp_path):
    config = load_config(TINY, [f"output_dir={tmp_path}"])
    old = config.to_dict()
    del old["method"]["oracle_similarity"], old["data"]["min_gap_frames"]  # keys added after it ran
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    check_same_run(config, tmp_path / "config.yaml")  # the defaults are what it ran with
    with pytest.raises(ConfigError, match=r"different config \(.*: method\.topk changed\)"):
        check_same_run(config.replace(method={"topk": 2}), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r": data\.clip_frames, optim\.lr, seed changed\)"):
        check_same_run(
            config.replace(seed=config.seed + 1, optim={"lr": 0.5}, data={"clip_frames": 2}), tmp_path / "config.yaml"
        )


def test_evaluation_rebuilds_the_whole_clip_spec_the_encoder_was_trained_with(tmp_path):
    config = load_config(
        TINY,
        [
            f"output_dir={tmp_path}",
            "data.min_gap_frames=3",
            "data.short_policy=skip",
            "data.clip_frames=6",
            "method.batchnorm=local",
        ],
    )
    expected = ClipSpec(frames=6, stride=2, min_gap_frames=3, short_policy="skip")
    assert clip_spec_of(config.data) == expected
    torch.manual_seed(0)
    encoder = build_encoder(config, "rgb")
    save_trained_encoder(config, StagePlan("pretrain-rgb", "rgb", (), 1), encoder, 7, snapshot=False)
    args = argparse.Namespace(
        encoder=str(tmp_path / "encoders" / "rgb.safetensors"), modality=None, config=str(TINY)
    )  # a config with other clip settings: the encoder's win
    loaded = trained_encoder(args)
    assert {k: loaded.config.data[k] for k in CLIP_KEYS} == {k: config.data[k] for k in CLIP_KEYS}
    assert clip_spec_of(loaded.config.data) == expected


def test_the_default_config_is_valid_and_complete():
    config = Config()
    assert config.to_dict() == DEFAULTS and Config.from_dict({}) == config

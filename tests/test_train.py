"""The trainer end to end on a real prepared store, and the method stage's invariants."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides

from tricoclr.config import ConfigError, load_config
from tricoclr.method import CooperativeStage, InfoNCEStage, StagePlan, build_schedule, build_stage, momentum_update
from tricoclr.models import build_encoder
from tricoclr.models.encoder import load_encoder
from tricoclr.trainer import Trainer


def test_schedule_reduces_with_the_number_of_modalities():
    def names(mods):
        return [p.name for p in build_schedule(load_config("configs/tiny.yaml", [f"modalities=[{mods}]"]))]

    assert names("rgb") == ["pretrain-rgb"]
    assert names("rgb,flow") == ["pretrain-rgb", "pretrain-flow", "cycle1-rgb", "cycle1-flow"]
    tri = build_schedule(load_config("configs/tiny.yaml", ["schedule.cycles=2"]))
    assert [p.name for p in tri][-3:] == ["cycle2-rgb", "cycle2-flow", "cycle2-audio"]
    assert tri[3].samplers == ("flow", "audio") and not tri[0].cooperative


def test_unknown_config_keys_fail_at_start():
    with pytest.raises(ConfigError, match="method.topkk"):
        load_config("configs/tiny.yaml", ["method.topkk=3"])
    with pytest.raises(ConfigError, match="unknown modality"):
        load_config("configs/tiny.yaml", ["modalities=[rgb,depth]"])
    config = load_config("configs/tiny.yaml", ["model.backbones.rgb=s3d"])
    assert config["model"]["backbones"] == {"rgb": "s3d", "flow": "tiny3d", "audio": "tiny2d", "rgbdiff": "tiny3d"}


def test_oracle_similarity_defaults_to_the_sum_of_cosines_and_is_validated():
    assert load_config("configs/tiny.yaml")["method"]["oracle_similarity"] == "cosine_sum"
    config = load_config("configs/tiny.yaml", ["method.oracle_similarity=standardized"])
    assert config["method"]["oracle_similarity"] == "standardized"
    with pytest.raises(ConfigError, match="method.oracle_similarity must be cosine_sum or standardized, got 'zscore'"):
        load_config("configs/tiny.yaml", ["method.oracle_similarity=zscore"])


def test_standardized_stage_mines_per_sampler_blocks():
    config, encoders = _tiny_encoders()
    config = config.replace(method={"queue_size": 8, "oracle_similarity": "standardized"})
    stage = CooperativeStage(StagePlan("cycle1-rgb", "rgb", ("flow", "audio"), 1), encoders, config.method)
    dims = (encoders["flow"].architecture["embed_dim"], encoders["audio"].architecture["embed_dim"])
    assert stage.oracle_dims == dims and stage.queue.oracle_dim == sum(dims)
    for _ in range(3):  # the last step mines from a full queue
        loss, stats = stage.training_step(_random_batch())
        stage.enqueue_pending()
    assert torch.isfinite(loss) and stats["positives_per_sample"] > 1


def _tiny_encoders():
    config = load_config("configs/tiny.yaml", ["method.batchnorm=local"])
    torch.manual_seed(0)
    return config, {m: build_encoder(config, m) for m in ("rgb", "flow", "audio")}


def _random_batch(batch_size=4):
    g = torch.Generator().manual_seed(1)
    return {
        "rgb.view1": torch.randn(batch_size, 3, 4, 32, 32, generator=g),
        "rgb.view2": torch.randn(batch_size, 3, 4, 32, 32, generator=g),
        "flow.view2": torch.randn(batch_size, 2, 4, 32, 32, generator=g),
        "audio.view2": torch.randn(batch_size, 1, 128, 32, generator=g),
        "video_index": torch.arange(batch_size),
        "label": torch.arange(batch_size) % 2,
    }


def test_frozen_samplers_are_bit_identical_after_a_step():
    config, encoders = _tiny_encoders()
    config = config.replace(method={"queue_size": 8})
    stage = CooperativeStage(StagePlan("cycle1-rgb", "rgb", ("flow", "audio"), 1), encoders, config.method)
    stage.train()
    before = {name: {k: v.clone() for k, v in encoders[name].state_dict().items()} for name in ("flow", "audio")}
    trained_before = {k: v.clone() for k, v in encoders["rgb"].state_dict().items()}
    optimizer = torch.optim.Adam([p for p in encoders["rgb"].parameters()], lr=1e-2)
    for _ in range(3):  # the queue fills (8 entries, batch 4): mining runs on the last step
        loss, _ = stage.training_step(_random_batch())
        loss.backward()
        for name in ("flow", "audio"):
            assert all(p.grad is None for p in encoders[name].parameters())
        optimizer.step()
        optimizer.zero_grad()
        stage.after_optimizer_step(encoders["rgb"], 0, 1)
    assert stage.queue.is_full
    for name in ("flow", "audio"):
        after = encoders[name].state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in after), f"{name} sampler changed"
        assert not encoders[name].training
    assert any(not torch.equal(trained_before[k], v) for k, v in encoders["rgb"].state_dict().items())


def test_momentum_update_is_an_ema():
    _, encoders = _tiny_encoders()
    target = build_encoder(load_config("configs/tiny.yaml", ["method.batchnorm=local"]), "rgb")
    source = encoders["rgb"]
    expected = [0.75 * t + 0.25 * s for t, s in zip(target.parameters(), source.parameters())]
    momentum_update(target, source, 0.75)
    assert all(torch.allclose(a, b) for a, b in zip(target.parameters(), expected))


def test_tiny_config_runs_every_stage_end_to_end(train_lmdb, tmp_path):
    out = tmp_path / "run"
    config = load_config("configs/tiny.yaml", tiny_overrides(train_lmdb, out, max_steps_per_stage=2))
    trainer = Trainer(config)
    summary = trainer.run()
    stages = [p.name for p in build_schedule(config)]
    assert [h["stage"] for h in summary["history"] if "loss" not in h] == stages
    assert summary["global_step"] == 2 * len(stages)
    for stage in stages:
        modality = stage.split("-")[1]
        encoder, meta = load_encoder(out / "encoders" / stage / f"{modality}.safetensors")
        assert meta["modality"] == modality and meta["stage"] == stage
    for modality in ("rgb", "flow", "audio"):
        assert (out / "encoders" / f"{modality}.safetensors").exists()
    assert (out / "config.yaml").exists() and json.loads((out / "run_info.json").read_text())["global_batch"] == 4
    assert list((out / "tb").rglob("events.out.tfevents.*"))
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_a_different_config_refuses_to_resume(train_lmdb, tmp_path):
    out = tmp_path / "run"
    Trainer(load_config("configs/tiny.yaml", tiny_overrides(train_lmdb, out, modalities="[rgb]", max_steps=1))).run()
    with pytest.raises(ConfigError, match="different config"):
        Trainer(load_config("configs/tiny.yaml", tiny_overrides(train_lmdb, out, modalities="[rgb]", seed=5))).run()


def test_a_rerun_of_a_complete_run_says_so(train_lmdb, tmp_path, caplog):
    out = tmp_path / "run"
    config = load_config("configs/tiny.yaml", tiny_overrides(train_lmdb, out, modalities="[rgb]", max_steps=1))
    Trainer(config).run()
    assert "nothing left to train" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tricoclr.train"):
        summary = Trainer(config).run()
    assert summary["global_step"] == 1 and "nothing left to train: the run in" in caplog.text


def test_a_run_saved_before_a_config_key_existed_resumes(train_lmdb, tmp_path):
    import yaml

    out = tmp_path / "run"
    Trainer(load_config("configs/tiny.yaml", tiny_overrides(train_lmdb, out, modalities="[rgb]", max_steps=1))).run()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["method"]["oracle_similarity"]  # as written before the key was added
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    summary = Trainer(
        load_config("configs/tiny.yaml", tiny_overrides(train_lmdb, out, modalities="[rgb]", max_steps=2))
    ).run()
    assert summary["global_step"] == 2
    # A key the old run did have still counts: a non-default value is still a different config.
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(ConfigError, match="different config"):
        Trainer(
            load_config(
                "configs/tiny.yaml",
                tiny_overrides(
                    train_lmdb, out, modalities="[rgb]", max_steps=3, **{"method.oracle_similarity": "standardized"}
                ),
            )
        ).run()


def test_train_py_runs_as_a_plain_script(train_lmdb, tmp_path):
    out = tmp_path / "script_run"
    command = [
        sys.executable,
        "tricoclr/train.py",
        "--config",
        "configs/tiny.yaml",
        *tiny_overrides(train_lmdb, out, modalities="[rgb]", max_steps=2),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The run stops inside its only stage: the latest encoder is saved, the stage snapshot is not.
    assert (out / "checkpoints").is_dir() and (out / "encoders" / "rgb.safetensors").exists()
    assert not (out / "encoders" / "pretrain-rgb").exists()


def test_a_stage_that_trains_one_modality_alone_is_an_infonce_stage_that_owns_its_step():
    config, encoders = _tiny_encoders()
    config = config.replace(method={"queue_size": 8, "momentum": 0.5, "momentum_final": 0.5})
    stage = build_stage(StagePlan("pretrain-rgb", "rgb", (), 1), encoders, config.method)
    assert type(stage) is InfoNCEStage and not hasattr(stage, "samplers")
    cooperative = build_stage(StagePlan("cycle1-rgb", "rgb", ("flow",), 1), encoders, config.method)
    assert isinstance(cooperative, CooperativeStage) and list(cooperative.samplers) == ["flow"]
    batch = _random_batch()
    momentum_before = [p.clone() for p in stage.momentum_encoder.parameters()]
    loss, stats = stage.training_step(batch)
    assert stats["positives_per_sample"] == 1  # InfoNCE: the key only
    with torch.no_grad():
        expected_keys = torch.nn.functional.normalize(stage.momentum_encoder(batch["rgb.view2"]).float(), dim=1)
    loss.backward()
    torch.optim.SGD(encoders["rgb"].parameters(), lr=0.1).step()
    stage.after_optimizer_step(encoders["rgb"], stage_step=0, total_steps=1)
    assert int(stage.queue.num_filled) == 4 and stage.queue.oracle_dim == 0
    assert torch.allclose(torch.nn.functional.normalize(stage.queue.keys[:4], dim=1), expected_keys, atol=1e-5)
    for before, after, source in zip(
        momentum_before, stage.momentum_encoder.parameters(), encoders["rgb"].parameters()
    ):
        assert torch.allclose(after, 0.5 * before + 0.5 * source.detach(), atol=1e-6)  # the EMA with mu 0.5

"""Configuration: YAML files over built-in defaults, plus ``dotted.key=value`` overrides.

Every key a run can use is listed in ``DEFAULTS``; an unknown key in a file or an override is an
error at start-up (a typo should fail now, not at hour six). Values given on the command line are
parsed as YAML, so ``modalities=[rgb,flow]`` and ``optim.lr=3e-4`` do what they look like.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

# Sources: "paper" = ../shared/paper, "CoCLR" = the CoCLR reference values (DESIGN.md, "Scale").
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/default",
    "modalities": ["rgb", "flow", "audio"],  # [rgb] InfoNCE, [rgb,flow] CoCLR, all three the paper
    "batch_size": 32,  # per rank and micro-step; global = batch_size x ranks x grad_accum_steps
    "grad_accum_steps": 1,
    "max_steps": None,  # stop after this many optimizer steps in total, across stages
    "max_steps_per_stage": None,  # cap every stage (smoke runs that still visit all stages)
    "checkpoint_every_steps": 500,
    "keep_checkpoints": 2,
    "log_every_steps": 10,
    "resume": True,  # resume from the newest checkpoint in output_dir
    "allow_config_change": False,  # resume even if the resolved config differs
    "deterministic": False,  # torch deterministic algorithms (slower; used by the resume tests)
    "data": {
        "path": None,  # a prepared store (tricoclr-data prepare): a path, or a URL (docs/url_stores.md)
        "val_path": None,  # a labelled prepared store for the online kNN monitor
        "workers": 4,
        "prefetch_factor": 2,
        "pin_memory": True,
        "clip_frames": 30,  # paper: 1 s at 30 fps
        "clip_stride": 1,
        "min_gap_frames": 0,
        "short_policy": "overlap",  # overlap | skip (videos too short for two clips)
        "size": 128,  # crop output, paper: 128x128
        "crop_scale": [0.2, 1.0],
        "spectrogram_steps": 128,  # audio slice length fed to the network
        "shuffle_buffer": 1000,  # webdataset only
        "missing_audio": "skip",  # skip videos without (audible) audio in stages that use audio
    },
    "model": {
        "embed_dim": 128,  # CoCLR
        "backbones": {"rgb": "s3d", "flow": "s3d", "audio": "resnet18"},  # paper
        "flow_stem": "adapt",  # adapt the 3-channel stem to 2 channels, or "pad" a zero channel
        "channels_last": False,
    },
    "method": {
        "temperature": 0.07,  # CoCLR
        "queue_size": 16384,  # CoCLR on K400 (2048 on UCF101)
        "topk": 5,  # paper, CoCLR
        "momentum": 0.999,  # CoCLR
        "momentum_final": 0.999,  # != momentum: cosine schedule from momentum to momentum_final
        "same_video_positives": True,  # cooperative stages only; always off in InfoNCE stages
        # InfoNCE stages: other clips of the anchor's video in the queue are "negative" (MoCo; the
        # queue is far smaller than the dataset) or "exclude"d from the loss (small datasets, where
        # the queue holds each video more than once; measured, docs/demo_data.md)
        "infonce_same_video": "negative",
        "mask_self_positive": False,  # CoCLR's later fix (its issue #43); measured in the demo
        "mask_self_probability": 0.9,  # CoCLR issue #43
        # How the oracle ranks queue entries: cosine_sum (DESIGN.md, the paper: o·o', a sum of
        # per-sampler cosines) | standardized (each sampler's cosines z-scored over the queue, then
        # summed, so a sampler with widely spread cosines does not decide alone); measured in the demo
        "oracle_similarity": "cosine_sum",
        "batchnorm": "global",  # global (statistics over all ranks) | local | shuffle
    },
    "schedule": {
        "pretrain_epochs": 200,  # paper: InfoNCE per modality (an int, or a {modality: epochs} map)
        "cycles": 2,  # paper
        "stage_epochs": 200,  # paper: epochs per cooperative stage
        "order": None,  # modalities trained in each cycle, in order; default: all, in list order
        "start_stage": None,  # run from this stage name (e.g. cycle1-flow); earlier ones skipped
    },
    "optim": {
        "name": "adam",  # CoCLR: Adam, lr 1e-3, wd 1e-5
        "lr": 1.0e-3,
        "weight_decay": 1.0e-5,
        "lr_reference_batch": None,  # if set: lr scales linearly with global_batch / this
        "warmup_steps": 0,
        "schedule": "cosine",  # cosine | constant, over each stage's steps
        "min_lr_ratio": 0.0,
        "grad_clip": None,
    },
    "monitor": {
        "knn_every_epochs": 1,
        "knn_k": 1,
        "augment_images": True,
    },
}


class ConfigError(ValueError):
    pass


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    """Merge ``update`` into ``base`` in place, refusing keys that ``base`` does not have."""
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{name}'")
        if name in _FREE_MAPS and isinstance(value, dict) and isinstance(base[key], dict):
            base[key] = {**base[key], **value}  # per-modality entries: any modality name is valid
        elif isinstance(base[key], dict) and name not in _FREE_MAPS:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' is a section; got {value!r}")
            _merge(base[key], value, prefix=f"{name}.")
        else:
            base[key] = value
    return base


# Sections keyed by modality name: a fourth modality adds its own entry without a schema change.
_FREE_MAPS = {"model.backbones", "schedule.pretrain_epochs"}


def parse_override(text: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': parsed value}}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    node: dict = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Defaults <- YAML file <- overrides, validated."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        with open(path) as f:
            from_file = yaml.safe_load(f) or {}
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping")
        _merge(config, from_file)
    for text in overrides:
        _merge(config, parse_override(text))
    validate(config)
    return config


def validate(config: dict) -> None:
    from tricoclr.mining import ORACLE_SIMILARITIES
    from tricoclr.modalities import MODALITIES

    mods = config["modalities"]
    if not isinstance(mods, list) or not mods:
        raise ConfigError("'modalities' must be a non-empty list, e.g. [rgb, flow, audio]")
    for name in mods:
        if name not in MODALITIES:
            raise ConfigError(f"unknown modality '{name}'; registered: {sorted(MODALITIES)}")
        # A modality the config does not mention gets its registry entry's default backbone, so a
        # new modality needs no config change; the resolved config records the choice.
        config["model"]["backbones"].setdefault(name, MODALITIES[name].default_backbone)
    if len(set(mods)) != len(mods):
        raise ConfigError(f"'modalities' lists a modality twice: {mods}")
    order = config["schedule"]["order"]
    if order is not None and (not order or len(set(order)) != len(order) or not set(order) <= set(mods)):
        raise ConfigError(f"schedule.order {order} must list distinct modalities out of {mods}")
    for key in ("batch_size", "grad_accum_steps", "checkpoint_every_steps"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"'{key}' must be a positive integer, got {config[key]!r}")
    if config["data"]["short_policy"] not in ("overlap", "skip"):
        raise ConfigError("data.short_policy must be 'overlap' or 'skip'")
    if config["data"]["missing_audio"] not in ("skip",):
        raise ConfigError("data.missing_audio must be 'skip'")
    if config["method"]["batchnorm"] not in ("global", "local", "shuffle"):
        raise ConfigError("method.batchnorm must be global, local or shuffle")
    if config["method"]["oracle_similarity"] not in ORACLE_SIMILARITIES:
        raise ConfigError(
            f"method.oracle_similarity must be {' or '.join(ORACLE_SIMILARITIES)}, got {config['method']['oracle_similarity']!r}"
        )
    if config["method"]["infonce_same_video"] not in ("negative", "exclude"):
        raise ConfigError("method.infonce_same_video must be 'negative' or 'exclude', "
                          f"got {config['method']['infonce_same_video']!r}")
    if config["optim"]["name"] not in ("adam", "adamw", "sgd"):
        raise ConfigError("optim.name must be adam, adamw or sgd")


def pretrain_epochs(config: dict, modality: str) -> float:
    value = config["schedule"]["pretrain_epochs"]
    return value[modality] if isinstance(value, dict) else value


def dump_config(config: dict, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)

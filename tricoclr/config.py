"""Configuration: YAML files over built-in defaults, plus ``dotted.key=value`` overrides.

Each section is a frozen dataclass below whose fields are the keys a run can use, with their
defaults and the source of each value ("paper" = the TriCoCLR paper, "CoCLR" = CoCLR's reference
values, docs/design.md). Every field is checked where it is defined (type, range, allowed values),
so a typo or an impossible value fails at start-up with a message naming the key, not at hour six.
An unknown key in a file or an override is an error too. Values given on the command line are
parsed as YAML, so ``modalities=[rgb,flow]`` and ``optim.lr=0.0003`` do what they look like (a
number YAML reads as text, such as ``3e-4``, is taken as the number).

Sections are read as attributes (``config.method.topk``) or by key (``config["method"]["topk"]``,
for code that takes a section as a mapping, such as the data layer's ``data_cfg``). The saved
``config.yaml`` is :meth:`Config.to_dict`: the same nested keys as the YAML files.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tricoclr.data import modalities as registry

# How the oracle ranks queue entries (tricoclr.mining): the paper's sum of per-sampler cosines, or
# the sum of per-sampler cosines z-scored over the queue (docs/design.md, "Oracle similarity").
ORACLE_SIMILARITIES = ("cosine_sum", "standardized")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# The data keys that decide how a clip is cut and presented: they travel with saved encoders, so
# evaluation presents clips as training did.
CLIP_KEYS = ("clip_frames", "clip_stride", "min_gap_frames", "short_policy", "size", "spectrogram_steps")


class ConfigError(ValueError):
    """A config key is unknown or has a value it cannot take; the message names the key."""


# ---- field checks (each raises ConfigError naming the key) ----------------------------------------


def _integer(key: str, value, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"'{key}' must be >= {minimum}, got {value!r}")


def _number(
    obj,
    name: str,
    key: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    optional: bool = False,
) -> None:
    """Checks obj.<name> is a number in [low, high] ((low, high] with ``low_open``); a numeric
    string (YAML 1.1 reads ``3e-4`` as text) is replaced by its float."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"'{key}' must be a number, got {value!r}") from None
        object.__setattr__(obj, name, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"'{key}' must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"'{key}' must be <= {high}, got {value!r}")


def _boolean(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")


def _choice(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be {_or(choices)}, got {value!r}")


def _text(key: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(f"'{key}' must be a non-empty string, got {value!r}")


def _or(choices: tuple) -> str:
    return " or ".join(choices) if len(choices) <= 2 else ", ".join(choices[:-1]) + " or " + choices[-1]


class Section:
    """Read access by key for code that takes a section as a mapping (``data_cfg["size"]``)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    def items(self):
        return [(key, getattr(self, key)) for key in self.keys()]

    def __contains__(self, key: str) -> bool:
        return key in self.keys()


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- the sections ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig(Section):
    path: str | None = None  # a prepared store (tricoclr-data prepare): a path, or a URL (docs/url_stores.md)
    val_path: str | None = None  # a labelled prepared store for the online kNN monitor
    workers: int = 4
    prefetch_factor: int = 2
    pin_memory: bool = True
    clip_frames: int = 30  # paper: 1 s at 30 fps
    clip_stride: int = 1
    min_gap_frames: int = 0
    short_policy: str = "overlap"  # overlap | skip (videos too short for two clips)
    size: int = 128  # crop output, paper: 128x128
    crop_scale: tuple = (0.2, 1.0)
    spectrogram_steps: int = 128  # audio slice length fed to the network
    shuffle_buffer: int = 1000  # webdataset only
    missing_audio: str = "skip"  # skip videos without (audible) audio in stages that use audio

    def __post_init__(self):
        _text("data.path", self.path, optional=True)
        _text("data.val_path", self.val_path, optional=True)
        _integer("data.workers", self.workers, 0)
        _integer("data.prefetch_factor", self.prefetch_factor, 1)
        _boolean("data.pin_memory", self.pin_memory)
        for key in ("clip_frames", "clip_stride", "size", "spectrogram_steps"):
            _integer(f"data.{key}", getattr(self, key), 1)
        _integer("data.min_gap_frames", self.min_gap_frames, 0)
        _integer("data.shuffle_buffer", self.shuffle_buffer, 0)
        _choice("data.short_policy", self.short_policy, ("overlap", "skip"))
        _choice("data.missing_audio", self.missing_audio, ("skip",))
        scale = self.crop_scale
        if (
            not isinstance(scale, (list, tuple))
            or len(scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            or not 0 < scale[0] <= scale[1] <= 1
        ):
            raise ConfigError(f"'data.crop_scale' must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
        object.__setattr__(self, "crop_scale", tuple(scale))


@dataclass(frozen=True)
class ModelConfig(Section):
    embed_dim: int = 128  # CoCLR
    backbones: dict = field(default_factory=lambda: {"rgb": "s3d", "flow": "s3d", "audio": "resnet18"})  # paper
    flow_stem: str = "adapt"  # adapt the 3-channel stem to 2 channels, or "pad" a zero channel
    # Speed options of the training step (benchmarks/train_step.py times each against plain fp32
    # eager; results agree within tolerance, not bit for bit). channels_last: the trained encoder,
    # its momentum copy and the samplers in channels-last (3-D convolutions) layout.
    channels_last: bool = False
    # torch.compile the step's forwards: the trained encoder's forward and backward (not under
    # DeepSpeed) and the whole no-grad part (momentum copy + samplers) as one graph.
    compile: bool = False
    # torch.compile's mode: default | reduce-overhead (CUDA graphs: static shapes, i.e. every batch
    # full, which the loaders give) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"

    def __post_init__(self):
        _integer("model.embed_dim", self.embed_dim, 1)
        if not isinstance(self.backbones, dict) or not all(isinstance(v, str) for v in self.backbones.values()):
            raise ConfigError(f"'model.backbones' must map modality names to backbone names, got {self.backbones!r}")
        _choice("model.flow_stem", self.flow_stem, ("adapt", "pad"))
        _boolean("model.channels_last", self.channels_last)
        _boolean("model.compile", self.compile)
        _choice("model.compile_mode", self.compile_mode, COMPILE_MODES)


@dataclass(frozen=True)
class MethodConfig(Section):
    temperature: float = 0.07  # CoCLR
    queue_size: int = 16384  # CoCLR on K400 (2048 on UCF101)
    topk: int = 5  # paper, CoCLR
    momentum: float = 0.999  # CoCLR
    momentum_final: float = 0.999  # != momentum: cosine schedule from momentum to momentum_final
    same_video_positives: bool = True  # cooperative stages only; always off in InfoNCE stages
    # InfoNCE stages: other clips of the anchor's video in the queue are "negative" (MoCo; the
    # queue is far smaller than the dataset) or "exclude"d from the loss (small datasets, where
    # the queue holds each video more than once; measured: no difference, docs/demo_data.md)
    infonce_same_video: str = "negative"
    mask_self_positive: bool = False  # CoCLR's later fix (its issue #43); measured in the demo
    mask_self_probability: float = 0.9  # CoCLR issue #43
    # How the oracle ranks queue entries: cosine_sum (the paper: o·o', a sum of per-sampler
    # cosines) | standardized (each sampler's cosines z-scored over the queue, then summed, so a
    # sampler with widely spread cosines does not decide alone); measured in the demo
    oracle_similarity: str = "cosine_sum"
    batchnorm: str = "global"  # global (statistics over all ranks) | local | shuffle

    def __post_init__(self):
        _number(self, "temperature", "method.temperature", 0, low_open=True)
        _integer("method.queue_size", self.queue_size, 1)
        _integer("method.topk", self.topk, 1)
        _number(self, "momentum", "method.momentum", 0, 1)
        _number(self, "momentum_final", "method.momentum_final", 0, 1)
        _number(self, "mask_self_probability", "method.mask_self_probability", 0, 1)
        for key in ("same_video_positives", "mask_self_positive"):
            _boolean(f"method.{key}", getattr(self, key))
        _choice("method.oracle_similarity", self.oracle_similarity, ORACLE_SIMILARITIES)
        _choice("method.infonce_same_video", self.infonce_same_video, ("negative", "exclude"))
        _choice("method.batchnorm", self.batchnorm, ("global", "local", "shuffle"))


@dataclass(frozen=True)
class ScheduleConfig(Section):
    pretrain_epochs: Any = 200  # paper: InfoNCE per modality (a number, or a {modality: epochs} map)
    cycles: int = 2  # paper
    stage_epochs: float = 200  # paper: epochs per cooperative stage
    order: tuple | None = None  # modalities trained in each cycle, in order; default: all, in list order
    start_stage: str | None = None  # run from this stage name (e.g. cycle1-flow); earlier ones skipped

    def __post_init__(self):
        epochs = self.pretrain_epochs
        if isinstance(epochs, dict):
            for name, value in epochs.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ConfigError(f"'schedule.pretrain_epochs.{name}' must be a number >= 0, got {value!r}")
        else:
            _number(self, "pretrain_epochs", "schedule.pretrain_epochs", 0)
        _integer("schedule.cycles", self.cycles, 0)
        _number(self, "stage_epochs", "schedule.stage_epochs", 0)
        if self.order is not None:
            if not isinstance(self.order, (list, tuple)):
                raise ConfigError(f"'schedule.order' must be a list of modalities, got {self.order!r}")
            object.__setattr__(self, "order", tuple(self.order))
        _text("schedule.start_stage", self.start_stage, optional=True)


@dataclass(frozen=True)
class OptimConfig(Section):
    name: str = "adam"  # CoCLR: Adam, lr 1e-3, wd 1e-5
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-5
    lr_reference_batch: int | None = None  # if set: lr scales linearly with global_batch / this
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant, over each stage's steps
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self):
        _choice("optim.name", self.name, ("adam", "adamw", "sgd"))
        _number(self, "lr", "optim.lr", 0, low_open=True)
        _number(self, "weight_decay", "optim.weight_decay", 0)
        _integer("optim.lr_reference_batch", self.lr_reference_batch, 1, optional=True)
        _integer("optim.warmup_steps", self.warmup_steps, 0)
        _choice("optim.schedule", self.schedule, ("cosine", "constant"))
        _number(self, "min_lr_ratio", "optim.min_lr_ratio", 0, 1)
        _number(self, "grad_clip", "optim.grad_clip", 0, low_open=True, optional=True)


@dataclass(frozen=True)
class MonitorConfig(Section):
    knn_every_epochs: int = 1  # 0: no online kNN monitor
    knn_k: int = 1
    augment_images: bool = True

    def __post_init__(self):
        _integer("monitor.knn_every_epochs", self.knn_every_epochs, 0)
        _integer("monitor.knn_k", self.knn_k, 1)
        _boolean("monitor.augment_images", self.augment_images)


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "method": MethodConfig,
    "schedule": ScheduleConfig,
    "optim": OptimConfig,
    "monitor": MonitorConfig,
}
# Sections keyed by modality name: a fourth modality adds its own entry without a schema change.
FREE_MAPS = {"model.backbones", "schedule.pretrain_epochs"}


@dataclass(frozen=True)
class Config(Section):
    seed: int = 0
    output_dir: str = "runs/default"
    modalities: tuple = ("rgb", "flow", "audio")  # [rgb] InfoNCE, [rgb,flow] CoCLR, all three the paper
    batch_size: int = 32  # per rank and micro-step; global = batch_size x ranks x grad_accum_steps
    grad_accum_steps: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps in total, across stages
    max_steps_per_stage: int | None = None  # cap every stage (smoke runs that still visit all stages)
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    resume: bool = True  # resume from the newest checkpoint in output_dir
    allow_config_change: bool = False  # resume even if the resolved config differs
    deterministic: bool = False  # torch deterministic algorithms (slower; used by the resume tests)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self):
        _integer("seed", self.seed)
        _text("output_dir", self.output_dir)
        for key in ("batch_size", "grad_accum_steps", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"'{key}' must be a positive integer, got {value!r}")
        _integer("max_steps", self.max_steps, 0, optional=True)
        _integer("max_steps_per_stage", self.max_steps_per_stage, 1, optional=True)
        for key in ("resume", "allow_config_change", "deterministic"):
            _boolean(key, getattr(self, key))
        self._check_modalities()

    def _check_modalities(self) -> None:
        mods = self.modalities
        if not isinstance(mods, (list, tuple)) or not mods:
            raise ConfigError("'modalities' must be a non-empty list, e.g. [rgb, flow, audio]")
        object.__setattr__(self, "modalities", tuple(mods))
        for name in mods:
            if name not in registry.MODALITIES:
                raise ConfigError(f"unknown modality '{name}'; registered: {sorted(registry.MODALITIES)}")
        if len(set(mods)) != len(mods):
            raise ConfigError(f"'modalities' lists a modality twice: {list(mods)}")
        order = self.schedule.order
        if order is not None and (not order or len(set(order)) != len(order) or not set(order) <= set(mods)):
            raise ConfigError(f"schedule.order {list(order)} must list distinct modalities out of {list(mods)}")
        if isinstance(self.schedule.pretrain_epochs, dict):
            missing = [m for m in mods if m not in self.schedule.pretrain_epochs]
            if missing:
                raise ConfigError(f"schedule.pretrain_epochs has no entry for {missing}")

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """A config from nested plain values (a YAML file's mapping). Keys it lacks take their
        defaults (an old run's config.yaml, written before a key existed, still loads); an
        unknown key is a ConfigError. A modality without a backbone gets its registry entry's
        default backbone, so a new modality needs no config change; the result records the choice."""
        merged = _merge(Config().to_dict(), values)
        merged["model"]["backbones"] = dict(merged["model"]["backbones"])
        for name in merged["modalities"] if isinstance(merged["modalities"], list) else ():
            if name in registry.MODALITIES:
                merged["model"]["backbones"].setdefault(name, registry.MODALITIES[name].default_backbone)
        sections = {name: section(**merged.pop(name)) for name, section in SECTIONS.items()}
        return cls(**merged, **sections)

    def to_dict(self) -> dict:
        """Nested plain values, in the order of the YAML files (lists, not tuples)."""
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: dict) -> Config:
        """A copy with some keys of some sections changed, validated: ``replace(data={"size": 64})``."""
        return Config.from_dict(_merge(self.to_dict(), sections))


DEFAULTS: dict[str, Any] = Config().to_dict()  # every key and its default, as plain values


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    """Merge ``update`` into ``base`` in place, refusing keys that ``base`` does not have."""
    if not isinstance(update, dict):
        raise ConfigError(f"config {prefix.rstrip('.') or 'file'} must hold a mapping, got {update!r}")
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{name}'")
        if name in FREE_MAPS and isinstance(value, dict) and isinstance(base[key], dict):
            base[key] = {**base[key], **value}  # per-modality entries: any modality name is valid
        elif isinstance(base[key], dict) and name not in FREE_MAPS:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' is a section; got {value!r}")
            _merge(base[key], value, prefix=f"{name}.")
        else:
            base[key] = copy.deepcopy(value)
    return base


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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- overrides, validated; ConfigError names the first bad key."""
    values: dict = {}
    if path is not None:
        with open(path) as f:
            from_file = yaml.safe_load(f) or {}
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping")
        values = _merge(Config().to_dict(), from_file)
    for text in overrides:
        values = _merge(values or Config().to_dict(), parse_override(text))
    return Config.from_dict(values)


def clip_settings(data) -> dict:
    """The CLIP_KEYS of a ``data`` section or of any mapping holding some of them; a key it lacks
    (e.g. an encoder saved before that key was recorded) takes its default."""
    defaults = DataConfig()
    return {key: data[key] if key in data else defaults[key] for key in CLIP_KEYS}


def pretrain_epochs(config: Config, modality: str) -> float:
    value = config.schedule.pretrain_epochs
    return value[modality] if isinstance(value, dict) else value


def dump_config(config: Config | dict, path: str | Path) -> None:
    """The config as YAML, in the layout of the files it was read from."""
    values = config.to_dict() if isinstance(config, Config) else config
    with open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)

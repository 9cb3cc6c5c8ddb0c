"""An encoder for a modality as a run's config describes it."""

from __future__ import annotations

import torch

from tricoclr.config import Config
from tricoclr.data import modalities as registry
from tricoclr.distributed import convert_to_global_batchnorm

from .encoder import Encoder


def build_encoder(config: Config, modality: str) -> Encoder:
    """The encoder of ``modality`` (``model.backbones``, ``model.embed_dim``; backbone options as
    the registry entry derives them from the model config, e.g. flow's S3D stem per
    ``model.flow_stem``), with global batch norm when ``method.batchnorm=global``. Weights come
    from torch's global generator: seed it first for reproducible initial weights."""
    spec = registry.get(modality)
    backbone = config.model.backbones[modality]
    options = spec.backbone_options(config.model, backbone)
    encoder = Encoder(backbone, spec.in_channels, embed_dim=config.model.embed_dim, backbone_options=options)
    if config.method.batchnorm == "global":
        convert_to_global_batchnorm(encoder)
    return encoder


def build_encoders(config: Config) -> dict[str, Encoder]:
    """Every modality's encoder in ``modalities`` order, each from torch's generator seeded with
    ``seed * 1000 + its index``: the same initial weights on every rank and for every world size."""
    encoders = {}
    for index, name in enumerate(config.modalities):
        torch.manual_seed(config.seed * 1000 + index)
        encoders[name] = build_encoder(config, name)
    return encoders

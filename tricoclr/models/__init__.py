"""Backbones (a registry of builders) and the encoder: backbone + projection head."""

from .backbones import BACKBONES, build_backbone, register_backbone
from .build import build_encoder, build_encoders
from .encoder import (
    Encoder,
    encoder_fingerprint,
    export_torchvision_s3d_state_dict,
    load_encoder,
    read_encoder_metadata,
    save_encoder,
)

__all__ = [
    "BACKBONES",
    "Encoder",
    "build_backbone",
    "build_encoder",
    "build_encoders",
    "encoder_fingerprint",
    "export_torchvision_s3d_state_dict",
    "load_encoder",
    "read_encoder_metadata",
    "register_backbone",
    "save_encoder",
]

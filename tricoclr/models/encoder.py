"""Encoder = backbone + projection head, and its self-describing safetensors file.

A saved encoder carries its architecture in the safetensors metadata, so ``load_encoder``
rebuilds it from the file alone (no config, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .backbones import build_backbone

ENCODER_FORMAT_VERSION = 1
_RESERVED_METADATA = {
    "format",
    "tricoclr_encoder_version",
    "modality",
    "backbone",
    "in_channels",
    "feature_dim",
    "embed_dim",
    "head_hidden",
    "backbone_options",
}


class Encoder(nn.Module):
    """f_m: a backbone and an MLP projection head whose output is L2-normalised.

    Head (MoCo v2 / CoCLR): Linear(feature_dim, head_hidden) -> ReLU -> Linear(head_hidden,
    embed_dim). ``head_hidden`` defaults to ``feature_dim``.

    ``features(x)`` gives the pooled backbone features (B, feature_dim) that evaluation uses;
    ``forward(x)`` gives the normalised embedding (B, embed_dim) that the losses use.
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        embed_dim: int = 128,
        head_hidden: int | None = None,
        backbone_options: dict | None = None,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.in_channels = int(in_channels)
        self.backbone_options = dict(backbone_options or {})
        self.backbone, self.feature_dim = build_backbone(backbone, self.in_channels, **self.backbone_options)
        self.embed_dim = int(embed_dim)
        self.head_hidden = int(head_hidden) if head_hidden is not None else self.feature_dim
        self.head = nn.Sequential(
            nn.Linear(self.feature_dim, self.head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(self.head_hidden, self.embed_dim),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)

    @property
    def architecture(self) -> dict:
        """Everything needed to rebuild this encoder (what ``save_encoder`` stores)."""
        return {
            "backbone": self.backbone_name,
            "in_channels": self.in_channels,
            "feature_dim": self.feature_dim,
            "embed_dim": self.embed_dim,
            "head_hidden": self.head_hidden,
            "backbone_options": dict(self.backbone_options),
        }


def save_encoder(encoder: Encoder, path, *, modality: str, extra: dict | None = None) -> None:
    """Write the encoder's weights and buffers to a safetensors file, atomically.

    Metadata (all strings): ``modality``, the ``architecture`` fields (``backbone_options`` as
    JSON), ``tricoclr_encoder_version``, ``format`` ("pt"), and ``extra`` (string values kept
    as is, others JSON-encoded; its keys must not shadow these).
    """
    extra = dict(extra or {})
    clashes = _RESERVED_METADATA & set(extra)
    if clashes:
        raise ValueError(f"extra metadata keys {sorted(clashes)} are reserved")
    architecture = encoder.architecture
    metadata = {
        "format": "pt",
        "tricoclr_encoder_version": str(ENCODER_FORMAT_VERSION),
        "modality": str(modality),
        "backbone": architecture["backbone"],
        "in_channels": str(architecture["in_channels"]),
        "feature_dim": str(architecture["feature_dim"]),
        "embed_dim": str(architecture["embed_dim"]),
        "head_hidden": str(architecture["head_hidden"]),
        "backbone_options": json.dumps(architecture["backbone_options"], sort_keys=True),
    }
    for key, value in extra.items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in encoder.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target, then rename: a crash never leaves a half-written encoder.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_encoder_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_encoder(path, map_location="cpu") -> tuple[Encoder, dict[str, str]]:
    """Rebuild an encoder from a ``save_encoder`` file alone; returns (encoder, metadata).

    The encoder is in eval mode on ``map_location``; metadata values are the stored strings.
    """
    metadata = read_encoder_metadata(path)
    if "tricoclr_encoder_version" not in metadata:
        raise ValueError(f"{path} is not a TriCoCLR encoder file (no tricoclr_encoder_version)")
    version = int(metadata["tricoclr_encoder_version"])
    if version > ENCODER_FORMAT_VERSION:
        raise ValueError(f"{path} has encoder format {version}; this code reads up to {ENCODER_FORMAT_VERSION}")
    encoder = Encoder(
        backbone=metadata["backbone"],
        in_channels=int(metadata["in_channels"]),
        embed_dim=int(metadata["embed_dim"]),
        head_hidden=int(metadata["head_hidden"]),
        backbone_options=json.loads(metadata["backbone_options"]),
    )
    if encoder.feature_dim != int(metadata["feature_dim"]):
        raise ValueError(
            f"{path}: rebuilt backbone has feature_dim {encoder.feature_dim}, file says {metadata['feature_dim']}"
        )
    encoder.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return encoder.to(map_location).eval(), metadata


def encoder_fingerprint(path) -> str:
    """sha256 of the file's bytes (hex), e.g. to key feature caches."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_torchvision_s3d_state_dict(encoder: Encoder) -> dict[str, torch.Tensor]:
    """The backbone of an S3D encoder as a state dict for ``torchvision.models.video.s3d``.

    Load it with ``strict=False``: only the classifier keys are missing. torchvision's S3D pools
    with a fixed AvgPool3d((2, 7, 7)); replace ``model.avgpool`` by ``nn.AdaptiveAvgPool3d(1)``
    for inputs other than 224². Needs a 3-channel stem (RGB, or flow with ``stem="pad"``).
    """
    if encoder.backbone_name != "s3d":
        raise ValueError(f"only s3d encoders export to torchvision's S3D, not {encoder.backbone_name!r}")
    stem = encoder.backbone.features[0][0][0]
    if stem.in_channels != 3:
        raise ValueError(f"torchvision's S3D takes 3 input channels; this stem takes {stem.in_channels}")
    prefix = "backbone."
    return {
        name[len(prefix) :]: tensor.detach().clone()
        for name, tensor in encoder.state_dict().items()
        if name.startswith(prefix + "features.")
    }

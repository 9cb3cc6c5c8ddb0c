"""Export an S3D encoder's backbone as a state dict for torchvision's `s3d` (`tricoclr export`).

    tricoclr export --encoder runs/x/encoders/cycle1-rgb/rgb.safetensors --out s3d_backbone.safetensors

Load it elsewhere with plain torchvision:

    model = torchvision.models.video.s3d(weights=None)
    model.avgpool = torch.nn.AdaptiveAvgPool3d(1)   # torchvision's fixed pool only fits 224 px
    missing, unexpected = model.load_state_dict(state, strict=False)   # missing: classifier.* only

The export is checked by loading it into exactly that model before the file is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from tricoclr.models.encoder import export_torchvision_s3d_state_dict, load_encoder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", required=True, help="an encoders/.../<modality>.safetensors file (S3D backbone)")
    parser.add_argument(
        "--out",
        required=True,
        help="output state dict: .safetensors, or .pt (tensors only; torch.load(..., weights_only=True))",
    )


def torchvision_s3d() -> torch.nn.Module:
    """torchvision's S3D with the adaptive pool the export expects."""
    from torchvision.models.video import s3d

    model = s3d(weights=None)
    model.avgpool = torch.nn.AdaptiveAvgPool3d(1)
    return model


def check_loads_into_torchvision(state: dict[str, torch.Tensor]) -> None:
    """Raise unless the state dict fills every torchvision S3D key except the classifier's."""
    missing, unexpected = torchvision_s3d().load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(f"export does not match torchvision's s3d: missing {missing[:5]}, unexpected {unexpected[:5]}")


def run(args) -> int:
    try:
        encoder, metadata = load_encoder(args.encoder)
        state = {k: v.contiguous() for k, v in export_torchvision_s3d_state_dict(encoder).items()}
        check_loads_into_torchvision(state)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"tricoclr export: error: {error}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        torch.save(state, out)
    else:
        save_file(state, str(out), metadata={"source": str(args.encoder), "modality": metadata.get("modality", "")})
    print(
        f"wrote {len(state)} tensors to {out}\n"
        "load with: m = torchvision.models.video.s3d(weights=None); m.avgpool = torch.nn.AdaptiveAvgPool3d(1); "
        "m.load_state_dict(state, strict=False)  # only classifier.* missing"
    )
    return 0

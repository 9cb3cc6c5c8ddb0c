"""Export an S3D encoder's backbone as a state dict for torchvision's `s3d` (`tricoclr export`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", required=True, help="an encoders/.../<modality>.safetensors file (S3D backbone)")
    parser.add_argument("--out", required=True,
                        help="output state dict: .safetensors, or .pt (tensors only; torch.load(..., weights_only=True))")


def run(args) -> int:
    from tricoclr.models.encoder import export_torchvision_s3d_state_dict, load_encoder

    encoder, metadata = load_encoder(args.encoder)
    state = {k: v.contiguous() for k, v in export_torchvision_s3d_state_dict(encoder).items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        torch.save(state, out)
    else:
        save_file(state, str(out), metadata={"source": str(args.encoder), "modality": metadata.get("modality", "")})
    print(f"wrote {len(state)} tensors to {out}\n"
          "load with: m = torchvision.models.video.s3d(weights=None); m.avgpool = torch.nn.AdaptiveAvgPool3d(1); "
          "m.load_state_dict(state, strict=False)  # only classifier.* missing")
    return 0

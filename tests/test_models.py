import hashlib
import json
import time

import pytest
import torch
import torchvision
from torch import nn

from tricoclr.models import (
    BACKBONES,
    Encoder,
    build_backbone,
    encoder_fingerprint,
    export_torchvision_s3d_state_dict,
    load_encoder,
    save_encoder,
)


def batch_norms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def first_conv(module):
    return next(m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))


@pytest.fixture(scope="module")
def s3d_rgb_encoder():
    """Shared: building S3D is the slow part of these tests on a busy CPU."""
    return Encoder("s3d", 3).eval()


@pytest.fixture(scope="module")
def s3d_flow_encoder():
    return Encoder("s3d", 2, backbone_options={"stem": "adapt"}).eval()


@pytest.mark.parametrize(
    "name, in_channels, shape, feature_dim",
    [
        ("tiny3d", 3, (2, 3, 4, 32, 32), 128),
        ("tiny3d", 2, (2, 2, 4, 32, 32), 128),
        ("tiny2d", 1, (2, 1, 32, 48), 128),
        ("resnet18", 1, (2, 1, 128, 128), 512),
        ("r3d_18", 3, (1, 3, 2, 16, 16), 512),
        ("r2plus1d_18", 2, (1, 2, 2, 16, 16), 512),
    ],
)
def test_backbone_maps_input_to_pooled_features(name, in_channels, shape, feature_dim):
    model, dim = build_backbone(name, in_channels)
    assert dim == feature_dim
    assert first_conv(model).in_channels == in_channels
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(shape)).shape == (shape[0], feature_dim)


def test_registry_and_unknown_names():
    assert {"s3d", "resnet18", "tiny3d", "tiny2d"} <= set(BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("no_such_net", 3)
    with pytest.raises(ValueError, match="unknown options"):
        build_backbone("r3d_18", 3, stem="pad")


def test_s3d_runs_at_128_pixels_with_bn_momentum_0_1(s3d_rgb_encoder):
    assert s3d_rgb_encoder.feature_dim == 1024
    norms = batch_norms(s3d_rgb_encoder)
    assert norms and all(norm.momentum == 0.1 for norm in norms)
    with torch.no_grad():
        assert s3d_rgb_encoder.features(torch.randn(1, 3, 8, 128, 128)).shape == (1, 1024)


def test_s3d_flow_stems(s3d_flow_encoder):
    assert first_conv(s3d_flow_encoder).in_channels == 2
    with torch.no_grad():
        assert s3d_flow_encoder.features(torch.randn(1, 2, 8, 32, 32)).shape == (1, 1024)
    padded, _ = build_backbone("s3d", 2, stem="pad")
    assert first_conv(padded).in_channels == 3
    padded.eval()
    flow = torch.randn(1, 2, 8, 32, 32)
    with torch.no_grad():
        with_zero_channel = torch.cat([flow, torch.zeros(1, 1, 8, 32, 32)], dim=1)
        expected = padded.pool(padded.features(with_zero_channel)).flatten(1)
        torch.testing.assert_close(padded(flow), expected)
    with pytest.raises(ValueError, match="stem"):
        build_backbone("s3d", 2, stem="crop")


def test_tiny3d_trains_a_batch_well_under_a_second():
    model, _ = build_backbone("tiny3d", 3)
    x = torch.randn(8, 3, 8, 64, 64)
    model(x).sum().backward()  # warm-up
    start = time.perf_counter()
    model(x).sum().backward()
    assert time.perf_counter() - start < 1.0


def test_encoder_outputs_and_architecture():
    encoder = Encoder("tiny3d", 3, embed_dim=16)
    x = torch.randn(2, 3, 4, 32, 32)
    assert encoder.features(x).shape == (2, 128)
    embedding = encoder(x)
    assert embedding.shape == (2, 16)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(2))
    assert [type(layer) for layer in encoder.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert encoder.head[0].out_features == 128  # head_hidden defaults to feature_dim
    assert encoder.architecture == {
        "backbone": "tiny3d",
        "in_channels": 3,
        "feature_dim": 128,
        "embed_dim": 16,
        "head_hidden": 128,
        "backbone_options": {},
    }


def test_save_and_load_rebuild_the_encoder_from_the_file_alone(tmp_path):
    encoder = Encoder("tiny2d", 1, embed_dim=8, head_hidden=32, backbone_options={"bn_momentum": 0.5})
    encoder.train()
    encoder(torch.randn(4, 1, 32, 32))  # move the BN running statistics away from their init
    encoder.eval()
    path = tmp_path / "encoders" / "audio.safetensors"
    save_encoder(encoder, path, modality="audio", extra={"stage": "coclr-audio", "epoch": 3})
    assert [p.name for p in path.parent.iterdir()] == ["audio.safetensors"]  # no temp file left

    loaded, metadata = load_encoder(path)
    assert metadata["modality"] == "audio" and metadata["backbone"] == "tiny2d"
    assert metadata["stage"] == "coclr-audio" and metadata["epoch"] == "3"
    assert json.loads(metadata["backbone_options"]) == {"bn_momentum": 0.5}
    assert all(isinstance(value, str) for value in metadata.values())
    assert loaded.architecture == encoder.architecture
    assert not loaded.training
    for (name, tensor), (_, tensor_loaded) in zip(encoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(tensor, tensor_loaded), name
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.features(x), encoder.features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="reserved"):
        save_encoder(encoder, path, modality="audio", extra={"backbone": "x"})


def test_fingerprint_is_the_sha256_of_the_file(tmp_path):
    encoder = Encoder("tiny2d", 1, embed_dim=8)
    path = tmp_path / "a.safetensors"
    save_encoder(encoder, path, modality="audio")
    assert encoder_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        encoder.head[2].bias.add_(1.0)
    save_encoder(encoder, path, modality="audio")
    assert encoder_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_loads_into_torchvision_s3d(s3d_rgb_encoder, s3d_flow_encoder):
    encoder = s3d_rgb_encoder
    state = export_torchvision_s3d_state_dict(encoder)
    stock = torchvision.models.video.s3d(weights=None)
    result = stock.load_state_dict(state, strict=False)
    assert set(result.missing_keys) == {"classifier.1.weight", "classifier.1.bias"}
    assert result.unexpected_keys == []
    stock.avgpool = nn.AdaptiveAvgPool3d(1)
    stock.eval()
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stock.avgpool(stock.features(x)).flatten(1), encoder.features(x))
    with pytest.raises(ValueError, match="3 input channels"):
        export_torchvision_s3d_state_dict(s3d_flow_encoder)
    with pytest.raises(ValueError, match="only s3d"):
        export_torchvision_s3d_state_dict(Encoder("tiny3d", 3))

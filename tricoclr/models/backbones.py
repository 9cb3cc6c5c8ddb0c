"""Backbones: a registry of builders ``(in_channels, **options) -> (module, feature_dim)``.

Each module maps an input batch to pooled features (B, feature_dim): video backbones take
(B, C, T, H, W), spectrogram backbones (B, C, F, T). All start from random weights. Swapping the
backbone is a config change: names not in ``BACKBONES`` fall back to any torchvision
classification or video model builder (``r3d_18``, ``r2plus1d_18``, ``mc3_18``, ``resnet34``...).

Every builder accepts ``bn_momentum`` (default 0.1), applied to all its batch norms: torchvision's
S3D uses 0.001, which leaves the running statistics near their initial values in short runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

Builder = Callable[..., "tuple[nn.Module, int]"]
BACKBONES: dict[str, Builder] = {}

DEFAULT_BN_MOMENTUM = 0.1


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        BACKBONES[name] = builder
        return builder

    return register


def build_backbone(name: str, in_channels: int, **options) -> tuple[nn.Module, int]:
    """Build a registered backbone, or fall back to ``torchvision.models.get_model(name)``."""
    if name in BACKBONES:
        return BACKBONES[name](in_channels, **options)
    return _torchvision_backbone(name, in_channels, **options)


# ---- helpers ---------------------------------------------------------------------------------


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.momentum = momentum


def _first_conv(module: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute name, conv) of the first convolution in registration order."""
    for path, child in module.named_modules():
        if isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and path:
            parent_path, _, name = path.rpartition(".")
            return module.get_submodule(parent_path), name, child
    raise ValueError(f"{type(module).__name__} has no convolution to adapt")


def _conv_with_in_channels(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, in_channels: int):
    """A freshly initialised copy of ``conv`` that takes ``in_channels`` input channels."""
    return type(conv)(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def adapt_stem(module: nn.Module, in_channels: int) -> None:
    """Rebuild the first convolution of ``module`` for ``in_channels`` inputs (random init)."""
    parent, name, conv = _first_conv(module)
    if conv.in_channels != in_channels:
        setattr(parent, name, _conv_with_in_channels(conv, in_channels))


def _check_options(name: str, options: dict, allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"backbone {name!r}: unknown options {sorted(unknown)}; allowed {sorted(allowed)}")


# ---- S3D -------------------------------------------------------------------------------------


class S3DBackbone(nn.Module):
    """torchvision's S3D feature extractor with an adaptive average pool.

    torchvision's fixed AvgPool3d((2, 7, 7)) only fits 224² inputs; the adaptive pool accepts any
    size (112², 128²...). ``features`` keeps torchvision's parameter names, so its weights load
    into ``torchvision.models.video.s3d`` (see ``encoder.export_torchvision_s3d_state_dict``).

    ``pad_to_channels``: inputs with fewer channels get constant zero channels appended up to
    this number before the stem (CoCLR's flow layout: x, y, 0); 0 disables padding.
    """

    def __init__(self, features: nn.Module, pad_to_channels: int = 0):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.pad_to_channels = pad_to_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        missing = self.pad_to_channels - x.shape[1]
        if missing > 0:
            padding = x.new_zeros(x.shape[0], missing, *x.shape[2:])
            x = torch.cat([x, padding], dim=1)
        return self.pool(self.features(x)).flatten(1)


@register_backbone("s3d")
def build_s3d(in_channels: int, *, stem: str = "adapt", bn_momentum: float = DEFAULT_BN_MOMENTUM):
    """S3D (1024-d features) for (B, C, T, H, W) inputs.

    ``stem`` matters only when in_channels != 3 (e.g. 2-channel flow):
    ``"adapt"`` (default) rebuilds the first convolution for C channels;
    ``"pad"`` keeps the 3-channel stem and appends zero channels to the input (CoCLR's layout,
    and the weights stay loadable into a stock torchvision S3D).
    """
    if stem not in ("adapt", "pad"):
        raise ValueError(f"s3d stem must be 'adapt' or 'pad', got {stem!r}")
    model = torchvision.models.video.s3d(weights=None)
    features = model.features
    pad_to_channels = 0
    if in_channels != 3:
        if stem == "adapt":
            adapt_stem(features, in_channels)
        elif in_channels < 3:
            pad_to_channels = 3
        else:
            raise ValueError(f"stem='pad' needs at most 3 input channels, got {in_channels}")
    backbone = S3DBackbone(features, pad_to_channels)
    set_bn_momentum(backbone, bn_momentum)
    return backbone, 1024


# ---- ResNet-18 for spectrograms --------------------------------------------------------------


@register_backbone("resnet18")
def build_resnet18(in_channels: int, *, bn_momentum: float = DEFAULT_BN_MOMENTUM):
    """torchvision ResNet-18 (512-d features) for (B, C, F, T) spectrograms; stem for C channels."""
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = _conv_with_in_channels(model.conv1, in_channels)
    model.fc = nn.Identity()
    set_bn_momentum(model, bn_momentum)
    return model, 512


# ---- tiny CPU backbones ----------------------------------------------------------------------

TINY_CHANNELS = (16, 32, 64, 128)


def _tiny_cnn(conv, norm, pool, in_channels: int, strides) -> nn.Sequential:
    layers: list[nn.Module] = []
    previous = in_channels
    for channels, stride in zip(TINY_CHANNELS, strides):
        layers += [
            conv(previous, channels, kernel_size=3, stride=stride, padding=1, bias=False),
            norm(channels),
            nn.ReLU(inplace=True),
        ]
        previous = channels
    layers += [pool(1), nn.Flatten(1)]
    return nn.Sequential(*layers)


@register_backbone("tiny3d")
def build_tiny3d(in_channels: int, *, bn_momentum: float = DEFAULT_BN_MOMENTUM):
    """Four conv3d-BN-ReLU blocks (16-32-64-128) + global average pool: 128-d features.

    For tests, the tiny config and CPU demos. Space is halved by every block (16x in all), time
    by the middle two (4x), so a (8, 3, 8, 64, 64) batch trains in a fraction of a second.
    """
    strides = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    model = _tiny_cnn(nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d, in_channels, strides)
    set_bn_momentum(model, bn_momentum)
    return model, TINY_CHANNELS[-1]


@register_backbone("tiny2d")
def build_tiny2d(in_channels: int, *, bn_momentum: float = DEFAULT_BN_MOMENTUM):
    """The 2D twin of ``tiny3d`` for (B, C, F, T) spectrograms: 128-d features."""
    model = _tiny_cnn(nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d, in_channels, (2, 2, 2, 2))
    set_bn_momentum(model, bn_momentum)
    return model, TINY_CHANNELS[-1]


# ---- generic torchvision fallback ------------------------------------------------------------

_FIXED_TO_ADAPTIVE_POOL = {
    nn.AvgPool1d: nn.AdaptiveAvgPool1d,
    nn.AvgPool2d: nn.AdaptiveAvgPool2d,
    nn.AvgPool3d: nn.AdaptiveAvgPool3d,
}


def _strip_classifier(model: nn.Module, name: str) -> int:
    """Replace the final Linear of the classifier by Identity; return its input width."""
    for attribute in ("fc", "classifier", "head", "heads"):
        classifier = getattr(model, attribute, None)
        if isinstance(classifier, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return classifier.in_features
        if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear):
            last = classifier[-1]
            classifier[-1] = nn.Identity()
            return last.in_features
    raise ValueError(
        f"torchvision model {name!r}: no fc/classifier/head ending in a Linear layer to remove; "
        "register a builder for it in tricoclr.models.backbones"
    )


class _FlattenOutput(nn.Module):
    """Wraps a torchvision model so that its output is always (B, features)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)


def _torchvision_backbone(name: str, in_channels: int, **options):
    """Any torchvision builder: classifier removed, average pool made adaptive, stem adapted."""
    _check_options(name, options, {"bn_momentum"})
    if name not in torchvision.models.list_models():
        raise ValueError(f"unknown backbone {name!r}: not in BACKBONES {sorted(BACKBONES)} nor a torchvision model")
    model = torchvision.models.get_model(name, weights=None)
    feature_dim = _strip_classifier(model, name)
    pool = getattr(model, "avgpool", None)
    if type(pool) in _FIXED_TO_ADAPTIVE_POOL:
        model.avgpool = _FIXED_TO_ADAPTIVE_POOL[type(pool)](1)
    adapt_stem(model, in_channels)
    set_bn_momentum(model, options.get("bn_momentum", DEFAULT_BN_MOMENTUM))
    return _FlattenOutput(model), feature_dim

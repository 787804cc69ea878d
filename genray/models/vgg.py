"""VGG19 feature extractor for perceptual losses (SRGAN content loss, style transfer), with the weight lookup
DESIGN.md fixes: an explicit `vgg_weights` URI (local or s3://) -> torchvision's cache -> download. Where none
works the error says so, unless untrained features are explicitly allowed (then a loud warning).
"""
from __future__ import annotations

import io
import os
import warnings

import torch
from torch import nn

from genray import storage

VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's file for VGG19_Weights.IMAGENET1K_V1
# Names of the ReLU outputs of torchvision's vgg19().features, by index.
LAYERS = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8,
    "relu3_1": 11, "relu3_2": 13, "relu3_3": 15, "relu3_4": 17,
    "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
    "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsError(RuntimeError):
    """No VGG19 weights could be found and untrained features were not allowed."""


def _features_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a full torchvision vgg19 state_dict ('features.0.weight', 'classifier...') or features-only ('0.weight')."""
    if any(k.startswith("features.") for k in state):
        return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    return state


def _read_state(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        return _features_state(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise VGGWeightsError(f"{source}: not a VGG19 state_dict ({type(err).__name__}: {err})") from None


def resolve_vgg19_state(weights_uri: str | None, allow_download: bool = True) -> tuple[dict | None, str]:
    """(features state_dict or None, where it came from / why it is missing)."""
    if weights_uri:  # [1] explicit URI: the air-gapped cluster's way
        return _read_state(storage.read_bytes(weights_uri), weights_uri), weights_uri
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG19_FILE)
    if os.path.isfile(cached):  # [2] torchvision's cache
        with open(cached, "rb") as f:
            return _read_state(f.read(), cached), cached
    if not allow_download:
        return None, f"no vgg_weights URI, none in torchvision's cache ({cached}), download disabled"
    try:  # [3] download through torchvision's weights API
        from torchvision.models import VGG19_Weights

        return _features_state(VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False)), "torchvision download"
    except Exception as err:  # noqa: BLE001 - offline machines fail in many ways
        return None, f"no vgg_weights URI, none in torchvision's cache ({cached}), download failed ({type(err).__name__})"


class VGGFeatures(nn.Module):
    """Frozen VGG19 features; forward(x) with x in [0, 1] (B, 3, H, W) -> {layer name: activation}."""

    def __init__(self, layers: tuple[str, ...], state: dict | None):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        unknown = [name for name in layers if name not in LAYERS]
        if unknown:
            raise ValueError(f"unknown VGG layers {unknown}; valid: {', '.join(LAYERS)}")
        self.layers = tuple(layers)
        last = max(LAYERS[name] for name in layers)
        # vgg19().features without building the 120M-parameter classifier we would throw away (seconds on CPU).
        features = make_layers(cfgs["E"], batch_norm=False)
        if state is not None:
            features.load_state_dict(state)
        self.features = features[: last + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey images: VGG sees three equal channels
        h = (x - self.mean) / self.std
        wanted = {LAYERS[name]: name for name in self.layers}
        out = {}
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in wanted:
                out[wanted[index]] = h
        return out


def load_vgg19_features(layers: tuple[str, ...], weights_uri: str | None = None, allow_untrained: bool = False,
                        allow_download: bool = True) -> tuple[VGGFeatures, str]:
    """(frozen feature extractor, source). Raises VGGWeightsError unless weights are found or untrained is allowed."""
    state, source = resolve_vgg19_state(weights_uri, allow_download)
    if state is None:
        if not allow_untrained:
            raise VGGWeightsError(
                f"VGG19 weights not found: {source}. Set vgg_weights to a local or s3:// copy of {VGG19_FILE} "
                "(torchvision's VGG19_Weights.IMAGENET1K_V1), or allow_untrained_vgg: true for smoke tests only.")
        warnings.warn(f"USING UNTRAINED VGG19 FEATURES ({source}): perceptual losses are not meaningful; "
                      "the model artefact records this.", stacklevel=2)
        source = "untrained"
    return VGGFeatures(layers, state), source

"""Style transfer: the fast feed-forward style network of Johnson et al. 2016 ("Perceptual Losses for Real-Time
Style Transfer", one network per style, trained with VGG19 content/style/TV losses) and, for the bulk jobs' Gatys
mode, Gatys et al. 2016's optimisation of the image itself (`gatys_transfer`). Images are [0, 1] floats inside.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from genray import storage
from genray.images import decode_image, make_grid, resize_side, to_float, to_uint8
from genray.models.data import RandomCrops
from genray.models.spec import ModelSpec, TrainState
from genray.models.vgg import LAYERS, VGGFeatures, load_vgg19_features

BUILTIN_PREFIX = "builtin:"
BUILTIN_STYLES = ("checkerboard", "stripes", "waves")  # generated in code: offline runs need no style file
EVAL_MAX_SIDE = 256  # held-out photos are shrunk to at most this side before evaluation
MIN_SIDE = 8  # smaller inputs are padded: two stride-2 convs must leave more than one pixel for InstanceNorm

# Gatys et al.: content at relu4_2, style at the first ReLU of every block.
GATYS_CONTENT_LAYER = "relu4_2"
GATYS_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
GATYS_LAYERS = (GATYS_CONTENT_LAYER, *GATYS_STYLE_LAYERS)  # what a VGGFeatures for gatys_transfer must expose


def _check_layers(layers: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in layers if name not in LAYERS]
    if unknown:
        raise ValueError(f"unknown VGG layers {unknown}; valid: {', '.join(LAYERS)}")
    if not layers:
        raise ValueError("at least one VGG layer is needed")
    return layers


class StyleNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["style_net"] = "style_net"
    # Any image (local path or s3://), or a pattern made in code: builtin:checkerboard|stripes|waves.
    style_image_uri: str = "builtin:waves"
    style_size: int = Field(default=256, ge=16)  # the style image is resized so its longer side is this
    image_size: int = Field(default=256, ge=16)  # side of the random content crops
    crops_per_image: int = Field(default=16, gt=0)  # crops of each content photo per epoch
    widths: tuple[int, int, int] = (32, 64, 128)  # 9x9 head, then the two stride-2 convs (Johnson: 32, 64, 128)
    num_residual: int = Field(default=5, ge=0)  # residual blocks at 1/4 resolution
    content_layers: tuple[str, ...] = ("relu2_2",)  # Johnson: relu2_2 (Gatys uses relu4_2)
    style_layers: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    # The three terms are MSEs (features; Gram matrices normalised by C*H*W; neighbouring pixels in [0, 1]),
    # weighted and summed; train_step reports the weighted terms, so loss = content + style + tv.
    content_weight: float = Field(default=1.0, ge=0)
    style_weight: float = Field(default=1e5, ge=0)
    tv_weight: float = Field(default=1.0, ge=0)
    vgg_weights: str | None = None  # local or s3:// copy of torchvision's vgg19-dcbb9e9d.pth (air-gapped clusters)
    allow_untrained_vgg: bool = False  # smoke tests only: random VGG features (model.json records vgg_pretrained 0)
    vgg_download: bool = True  # let torchvision download the weights when neither URI nor cache has them

    @field_validator("content_layers", "style_layers")
    @classmethod
    def _known_layers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_layers(value)

    @field_validator("style_image_uri")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if value.startswith(BUILTIN_PREFIX) and value.removeprefix(BUILTIN_PREFIX) not in BUILTIN_STYLES:
            raise ValueError(f"unknown built-in style {value!r}; valid: "
                             + ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_STYLES))
        return value

    @property
    def vgg_layers(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.content_layers) | set(self.style_layers), key=LAYERS.__getitem__))

    @classmethod
    def tiny(cls) -> "StyleNetConfig":
        # Shallow style layers keep the (untrained) VGG pass cheap on 32x32 crops.
        return cls(style_image_uri="builtin:checkerboard", style_size=32, image_size=32, crops_per_image=2,
                   widths=(4, 8, 8), num_residual=1, style_layers=("relu1_1", "relu2_1", "relu3_1"),
                   allow_untrained_vgg=True, vgg_download=False)


# --- the network -------------------------------------------------------------------------------------------

def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflection padding (no dark borders); replicate where the map is too small to reflect."""
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (pad, pad, pad, pad), mode=mode)


class ConvLayer(nn.Module):
    """Reflection-padded conv keeping H/stride x W/stride."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.pad = kernel // 2
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_pad(x, self.pad))


def _conv_norm_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(ConvLayer(cin, cout, kernel, stride), nn.InstanceNorm2d(cout, affine=True), nn.ReLU())


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_norm_relu(channels, channels, 3),
            ConvLayer(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Upsample(nn.Module):
    """Nearest x2 then conv: no ConvTranspose, so no checkerboard artefacts (Odena et al. 2016)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = _conv_norm_relu(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.interpolate(x, scale_factor=2, mode="nearest"))


class TransformerNet(nn.Module):
    """Johnson et al.'s image transformation network; (B, 3, H, W) in [0, 1] -> same shape in [0, 1].

    The output ends in a sigmoid rather than a clamp: a clamp has zero gradient wherever a pixel leaves [0, 1], so
    saturated pixels would stop learning; the sigmoid keeps a gradient everywhere and lands in the 'sigmoid' range.
    """

    def __init__(self, cfg: StyleNetConfig):
        super().__init__()
        w1, w2, w3 = cfg.widths
        self.down = nn.Sequential(
            _conv_norm_relu(3, w1, 9),  # (B, w1, H, W)
            _conv_norm_relu(w1, w2, 3, stride=2),  # (B, w2, H/2, W/2)
            _conv_norm_relu(w2, w3, 3, stride=2),  # (B, w3, H/4, W/4)
        )
        self.residual = nn.Sequential(*[ResidualBlock(w3) for _ in range(cfg.num_residual)])
        self.up = nn.Sequential(Upsample(w3, w2), Upsample(w2, w1))  # (B, w1, H, W)
        self.tail = ConvLayer(w1, 3, 9)  # logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The Predictor pads to multiples of 4 already; this covers direct calls on other sizes.
        h, w = x.shape[-2:]
        ph, pw = max(MIN_SIDE, -(-h // 4) * 4), max(MIN_SIDE, -(-w // 4) * 4)
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h), mode="replicate")
        y = torch.sigmoid(self.tail(self.up(self.residual(self.down(x)))))
        return y[..., :h, :w]


def build(cfg: StyleNetConfig) -> TransformerNet:
    return TransformerNet(cfg)


# --- losses ------------------------------------------------------------------------------------------------

def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C) feature correlations, normalised by C*H*W (so style images of any size compare)."""
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertically and horizontally neighbouring pixels; 0 for a constant image."""
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def style_loss(features: dict[str, torch.Tensor], style_grams: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the MSE between the Gram matrices of `features` and the style's (1, C, C) targets."""
    total = 0.0
    for layer, target in style_grams.items():
        g = gram_matrix(features[layer])
        total = total + F.mse_loss(g, target.expand_as(g))
    return total


def content_loss(features: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], layers) -> torch.Tensor:
    return sum(F.mse_loss(features[layer], targets[layer]) for layer in layers)


def perceptual_losses(output: torch.Tensor, content: torch.Tensor, vgg: VGGFeatures,
                      style_grams: dict[str, torch.Tensor], cfg: StyleNetConfig) -> dict[str, torch.Tensor]:
    """Weighted content / style / TV terms for stylised `output` of `content`, both (B, 3, H, W) in [0, 1]."""
    features = vgg(output)
    with torch.no_grad():
        targets = vgg(content)
    terms = {
        "content_loss": cfg.content_weight * content_loss(features, targets, cfg.content_layers),
        "style_loss": cfg.style_weight * style_loss(features, style_grams),
        "tv_loss": cfg.tv_weight * total_variation(output),
    }
    return {"loss": terms["content_loss"] + terms["style_loss"] + terms["tv_loss"], **terms}


# --- style images and the frozen VGG -----------------------------------------------------------------------

def builtin_style(name: str, size: int) -> np.ndarray:
    """A colourful size x size pattern made in code (uint8 HWC), so offline runs need no style file."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if name == "checkerboard":  # 8x8 squares, orange and deep blue
        on = ((np.floor(yy * 8) + np.floor(xx * 8)) % 2).astype(bool)
        image = np.where(on[..., None], np.array([240, 140, 30]), np.array([20, 40, 120]))
    elif name == "stripes":  # diagonal red / yellow / teal bands
        band = (np.floor((xx + yy) * 6) % 3).astype(int)
        image = np.array([[200, 30, 40], [250, 220, 60], [20, 140, 150]])[band]
    elif name == "waves":  # smooth interfering sinusoids, one phase per channel
        image = np.stack([127.5 + 127.5 * np.sin(2 * math.pi * (3 * xx + 2 * np.sin(2 * math.pi * yy)) + phase)
                          for phase in (0.0, 2.1, 4.2)], axis=-1)
    else:
        raise ValueError(f"unknown built-in style {name!r}; valid: {', '.join(BUILTIN_STYLES)}")
    return np.ascontiguousarray(np.rint(image).astype(np.uint8))


def read_style_image(uri: str, size: int) -> np.ndarray:
    """The style image (uint8 HWC RGB) with its longer side resized to `size`; `builtin:<name>` makes one."""
    if uri.startswith(BUILTIN_PREFIX):
        return builtin_style(uri.removeprefix(BUILTIN_PREFIX), size)
    return resize_side(decode_image(storage.read_bytes(uri), channels=3), size, longer=True)


@functools.lru_cache(maxsize=2)
def _cached_vgg(layers: tuple[str, ...], weights_uri: str | None, allow_untrained: bool,
                allow_download: bool) -> tuple[VGGFeatures, str]:
    # Building torchvision's vgg19 takes ~2 s (mostly the unused classifier), so a process builds each VGG once.
    # Untrained features come from a fixed seed (and leave the caller's RNG alone), so training and evaluation
    # see the same random VGG and the model's seeded initialisation does not depend on it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_vgg19_features(layers, weights_uri, allow_untrained, allow_download)


def load_vgg(cfg: StyleNetConfig, layers: tuple[str, ...] | None = None) -> tuple[VGGFeatures, str]:
    """(frozen VGG19 features, source) following cfg's weight lookup; raises VGGWeightsError when none is found.
    The module is shared within a process: it is frozen, and each user moves it to its own device."""
    return _cached_vgg(tuple(layers or cfg.vgg_layers), cfg.vgg_weights, cfg.allow_untrained_vgg, cfg.vgg_download)


@torch.no_grad()
def style_targets(vgg: VGGFeatures, style: np.ndarray, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Gram matrices (1, C, C) of a uint8 HWC style image at `layers`, on the VGG's device."""
    device = vgg.mean.device
    x = torch.from_numpy(to_float(style[None], "sigmoid")).to(device)
    features = vgg(x)
    return {layer: gram_matrix(features[layer]) for layer in layers}


def _on_device(state: TrainState, device: torch.device) -> tuple[VGGFeatures, dict[str, torch.Tensor]]:
    """The frozen VGG and style Grams, moved to `device` the first time a batch arrives there."""
    vgg, grams = state.extras["vgg"], state.extras["style_grams"]
    if vgg.mean.device != device:
        vgg.to(device)
    if any(g.device != device for g in grams.values()):
        grams = state.extras["style_grams"] = {k: g.to(device) for k, g in grams.items()}
    return vgg, grams


# --- training ----------------------------------------------------------------------------------------------

def init_training(cfg: StyleNetConfig, lr: float) -> TrainState:
    model = build(cfg)  # first, so its seeded init does not depend on how the VGG was found
    vgg, source = load_vgg(cfg)
    vgg.to("cpu")  # the Grams are made on CPU once; train_step moves both to the batch's device
    style = read_style_image(cfg.style_image_uri, cfg.style_size)
    extras = {"vgg": vgg, "vgg_source": source, "style_grams": style_targets(vgg, style, cfg.style_layers)}
    return TrainState(modules={"model": model}, optimizers={"model": torch.optim.Adam(model.parameters(), lr=lr)},
                      cfg=cfg, extras=extras)


def train_step(state: TrainState, content: torch.Tensor) -> dict[str, float]:
    """One update of the style network. content: (B, 3, H, W) in [0, 1]."""
    model, opt, cfg = state.modules["model"], state.optimizers["model"], state.cfg
    vgg, grams = _on_device(state, content.device)
    losses = perceptual_losses(model(content), content, vgg, grams, cfg)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    return {k: v.item() for k, v in losses.items()}


def _fit_crop_size(image: np.ndarray, side: int) -> np.ndarray:
    """Scale an image up (keeping its aspect) until its shorter side is at least `side`."""
    return image if min(image.shape[:2]) >= side else resize_side(image, side)


def make_dataset(images: list[np.ndarray], labels: list[int] | None, cfg: StyleNetConfig) -> RandomCrops:
    """Random image_size crops of the content photos (photos smaller than a crop are scaled up first)."""
    return RandomCrops([_fit_crop_size(im, cfg.image_size) for im in images], cfg.image_size, "sigmoid",
                       crops_per_image=cfg.crops_per_image)


@torch.no_grad()
def sample_grid(modules: dict[str, nn.Module], content: torch.Tensor, cfg: StyleNetConfig) -> np.ndarray:
    """Rows: content crops / their stylised versions."""
    rows = [content, modules["model"](content)]
    tiles = [img for row in rows for img in to_uint8(row.cpu().numpy(), "sigmoid")]
    return make_grid(tiles, nrow=content.shape[0])


def _eval_image(image: np.ndarray) -> np.ndarray:
    """At most EVAL_MAX_SIDE per side, at least MIN_SIDE, centre-cropped to multiples of 4; RGB."""
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if max(image.shape[:2]) > EVAL_MAX_SIDE:
        image = resize_side(image, EVAL_MAX_SIDE, longer=True)
    image = _fit_crop_size(image, MIN_SIDE)
    h, w = image.shape[:2]
    y, x = (h % 4) // 2, (w % 4) // 2
    return image[y : y + h // 4 * 4, x : x + w // 4 * 4]


@torch.no_grad()
def evaluate(model: nn.Module, images: list[np.ndarray], labels: list[int] | None,
             cfg: StyleNetConfig) -> dict[str, float]:
    """Mean weighted content / style / TV losses of the stylised held-out photos, and whether VGG was pretrained
    (0.0 means random features: the loss values say nothing about quality)."""
    device = next(model.parameters()).device
    vgg, source = load_vgg(cfg)
    vgg.to(device)
    grams = style_targets(vgg, read_style_image(cfg.style_image_uri, cfg.style_size), cfg.style_layers)
    sums: dict[str, float] = {}
    for image in images:  # one at a time: held-out photos differ in size
        x = torch.from_numpy(to_float(_eval_image(image)[None], "sigmoid")).to(device)
        for k, v in perceptual_losses(model(x), x, vgg, grams, cfg).items():
            sums[k] = sums.get(k, 0.0) + v.item()
    # "eval_" keeps these apart from the last epoch's training losses in model.json.
    result = {f"eval_{k}": v / max(1, len(images)) for k, v in sums.items()}
    return {**result, "vgg_pretrained": 0.0 if source == "untrained" else 1.0,
            "num_eval_images": float(len(images))}


# --- Gatys et al.: optimise the image itself -----------------------------------------------------------------

def gatys_transfer(content: np.ndarray, style: np.ndarray, vgg: VGGFeatures, iterations: int = 300,
                   content_weight: float = 1.0, style_weight: float = 1e5, tv_weight: float = 1.0, lr: float = 0.02,
                   progress: Callable[[int, float], None] | None = None) -> np.ndarray:
    """Gatys et al. 2016: start from the content photo and optimise its pixels with Adam so that its VGG19
    relu4_2 features match the content's and its Gram matrices at relu1_1..relu5_1 match the style's (+ TV).

    content, style: uint8 HWC (1 or 3 channels; the style is resized so its longer side matches the content's).
    vgg must expose GATYS_LAYERS (load it with layers=GATYS_LAYERS). progress(iteration, loss) is called after
    every step with the loss before it. Returns uint8 with the content's shape.
    """
    missing = [layer for layer in GATYS_LAYERS if layer not in vgg.layers]
    if missing:
        raise ValueError(f"gatys_transfer needs VGG layers {missing}; load the VGG with layers=GATYS_LAYERS")
    if content.ndim != 3 or content.dtype != np.uint8 or style.ndim != 3 or style.dtype != np.uint8:
        raise ValueError(f"content and style must be uint8 HWC, got {content.dtype} {content.shape} and "
                         f"{style.dtype} {style.shape}")
    if min(content.shape[:2]) < 16:
        raise ValueError(f"content image {content.shape[1]}x{content.shape[0]} is too small (VGG pools 4 times)")
    rgb = lambda im: np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im  # noqa: E731
    style = resize_side(rgb(style), max(content.shape[:2]), longer=True)
    device = vgg.mean.device
    target = torch.from_numpy(to_float(rgb(content)[None], "sigmoid")).to(device)  # (1, 3, H, W)
    with torch.no_grad():
        content_features = vgg(target)[GATYS_CONTENT_LAYER]
    grams = style_targets(vgg, style, GATYS_STYLE_LAYERS)

    image = target.clone().requires_grad_(True)
    opt = torch.optim.Adam([image], lr=lr)
    for iteration in range(iterations):
        features = vgg(image)
        loss = (content_weight * F.mse_loss(features[GATYS_CONTENT_LAYER], content_features)
                + style_weight * style_loss(features, grams) + tv_weight * total_variation(image))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            image.clamp_(0, 1)  # stay a valid image
        if progress is not None:
            progress(iteration + 1, loss.item())
    out = to_uint8(image.detach().cpu().numpy(), "sigmoid")[0]  # (H, W, 3)
    if content.shape[2] == 1:
        out = np.round(out.mean(axis=2, keepdims=True)).astype(np.uint8)
    return out


SPEC = ModelSpec(
    name="style_net",
    config_cls=StyleNetConfig,
    task="style",
    value_range="sigmoid",
    build=build,
    init_training=init_training,
    train_step=train_step,
    sample_grid=sample_grid,
    evaluate=evaluate,
    in_channels=lambda cfg: 3,
    make_dataset=make_dataset,
    size_multiple=4,
    min_side=MIN_SIDE,
)

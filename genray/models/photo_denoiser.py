"""Photo denoiser: a DnCNN-style residual network (Zhang et al. 2017, "Beyond a Gaussian Denoiser") for RGB photos
of any size. It predicts the noise and subtracts it: conv+ReLU, (depth - 2) x (conv+BN+ReLU), conv.
Trained on random patches with fresh Gaussian noise of sigma noise_sigma / 255 on [0, 1] pixels.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from genray.images import center_crop, make_grid, to_float, to_uint8
from genray.metrics import psnr, ssim, ssim_fits
from genray.models.data import RandomCrops
from genray.models.spec import ModelSpec, TrainState

EVAL_MAX_SIDE = 256  # held-out photos are center-cropped to at most this per side (cheap on CPU)
EVAL_SEED = 1234  # fixed evaluation noise: metrics are comparable across runs


class PhotoDenoiserConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["photo_denoiser"] = "photo_denoiser"
    channels: Literal[1, 3] = 3
    depth: int = Field(default=17, ge=3)  # conv layers in total (DnCNN-S: 17)
    width: int = Field(default=64, gt=0)  # features per hidden layer
    noise_sigma: float = Field(default=25.0, gt=0, le=255)  # Gaussian sigma in 0..255 pixel units
    patch: int = Field(default=48, ge=8)  # training patch side (DnCNN: 40-50)
    crops_per_image: int = Field(default=64, gt=0)
    augment: bool = False  # random 90-degree rotations and mirroring of the training crops

    @classmethod
    def tiny(cls) -> "PhotoDenoiserConfig":
        return cls(depth=3, width=8, patch=16, crops_per_image=2)


class DnCNN(nn.Module):
    """(B, C, H, W) noisy in [0, 1] -> (B, C, H, W) denoised in [0, 1]; any H, W (padding keeps the size)."""

    def __init__(self, cfg: PhotoDenoiserConfig):
        super().__init__()
        c, f = cfg.channels, cfg.width
        layers: list[nn.Module] = [nn.Conv2d(c, f, 3, padding=1), nn.ReLU(inplace=True)]  # (B, F, H, W)
        for _ in range(cfg.depth - 2):
            layers += [nn.Conv2d(f, f, 3, padding=1, bias=False), nn.BatchNorm2d(f), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(f, c, 3, padding=1))  # (B, C, H, W): the predicted noise
        self.body = nn.Sequential(*layers)

    def forward(self, noisy: torch.Tensor, return_noise: bool = False) -> torch.Tensor:
        """Denoised image, or (for training) the predicted noise through the same forward, so DDP sees the call."""
        noise = self.body(noisy)
        return noise if return_noise else (noisy - noise).clamp(0, 1)


def build(cfg: PhotoDenoiserConfig) -> DnCNN:
    return DnCNN(cfg)


def add_noise(clean: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """clean [0, 1] + N(0, (sigma/255)^2), clipped to [0, 1] as a stored noisy photo would be."""
    noise = torch.randn(clean.shape, generator=generator, device=clean.device if generator is None else "cpu")
    return (clean + (sigma / 255.0) * noise.to(clean.device)).clamp(0, 1)


def make_dataset(images: list[np.ndarray], labels: list[int] | None, cfg: PhotoDenoiserConfig) -> Dataset:
    """Clean random patches (C, patch, patch) in [0, 1]; noise is added fresh in every train_step."""
    return RandomCrops(images, cfg.patch, "sigmoid", cfg.crops_per_image, augment=cfg.augment)


def init_training(cfg: PhotoDenoiserConfig, lr: float) -> TrainState:
    model = build(cfg)
    return TrainState(modules={"model": model}, optimizers={"model": torch.optim.Adam(model.parameters(), lr=lr)},
                      cfg=cfg)


def train_step(state: TrainState, clean: torch.Tensor) -> dict[str, float]:
    """Residual learning: the network predicts noisy - clean. clean: (B, C, H, W) in [0, 1]."""
    model, opt, cfg = state.modules["model"], state.optimizers["model"], state.cfg
    noisy = add_noise(clean, cfg.noise_sigma)
    loss = F.mse_loss(model(noisy, return_noise=True), noisy - clean)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item()}


@torch.no_grad()
def sample_grid(modules: dict[str, nn.Module], clean: torch.Tensor, cfg: PhotoDenoiserConfig) -> np.ndarray:
    """Rows: noisy / denoised / clean, one column per fixed sample patch."""
    noisy = add_noise(clean, cfg.noise_sigma, torch.Generator().manual_seed(0))
    rows = [noisy, modules["model"](noisy), clean]
    tiles = [image for row in rows for image in to_uint8(row.float().cpu().numpy(), "sigmoid")]
    return make_grid(tiles, nrow=clean.shape[0])


@torch.no_grad()
def evaluate(model: nn.Module, images: list[np.ndarray], labels: list[int] | None,
             cfg: PhotoDenoiserConfig) -> dict[str, float]:
    """Held-out photos (center crops <= 256) with fixed-seed noise, scored on uint8 pixels (data range 255, no
    border crop): the noisy input as a user would store it, and the denoised output as the Predictor returns it."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(EVAL_SEED)
    scores: dict[str, list[float]] = {k: [] for k in ("psnr_noisy_db", "psnr_denoised_db", "ssim_noisy", "ssim_denoised")}
    for image in images:
        clean8 = center_crop(image, EVAL_MAX_SIDE)
        noisy = add_noise(torch.from_numpy(to_float(clean8[None], "sigmoid")), cfg.noise_sigma, generator)
        denoised = model(noisy.to(device)).float().cpu()
        noisy8, denoised8 = (to_uint8(x.numpy(), "sigmoid")[0] for x in (noisy, denoised))
        for name, result in (("noisy", noisy8), ("denoised", denoised8)):
            scores[f"psnr_{name}_db"].append(psnr(clean8, result, 255))
            if ssim_fits(clean8):  # per channel, averaged; images smaller than its window: PSNR only
                scores[f"ssim_{name}"].append(ssim(clean8, result, 255, channel_axis=-1))
    out = {k: float(np.mean(v)) for k, v in scores.items() if v}
    out["psnr_gain_db"] = out["psnr_denoised_db"] - out["psnr_noisy_db"]
    out["num_eval_images"] = float(len(images))
    return out


SPEC = ModelSpec(
    name="photo_denoiser",
    config_cls=PhotoDenoiserConfig,
    task="denoise",
    value_range="sigmoid",
    build=build,
    init_training=init_training,
    train_step=train_step,
    sample_grid=sample_grid,
    evaluate=evaluate,
    in_channels=lambda cfg: cfg.channels,
    make_dataset=make_dataset,
    size_multiple=1,
    noise_sigma=lambda cfg: cfg.noise_sigma,
)

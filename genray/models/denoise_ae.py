"""Convolutional denoising autoencoder from the seed documents, on [0, 1] images: Conv 16/8 stride 2 ->
ConvTranspose 8/16 stride 2 -> sigmoid conv, trained noisy -> clean.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from genray.images import make_grid, to_float, to_uint8
from genray.metrics import mean_psnr
from genray.models.spec import ModelSpec, TrainState


class DenoiseAEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["denoise_ae"] = "denoise_ae"
    channels: int = Field(default=1, ge=1, le=3)  # 1 for digits; RGB inputs are denoised channel by channel
    filters: tuple[int, int] = (16, 8)  # encoder widths; the decoder mirrors them (seed: 16, 8)
    noise_std: float = Field(default=0.4, gt=0, le=1)  # Gaussian noise sigma on [0, 1] pixels
    loss: Literal["bce", "mse"] = "bce"  # the seed trains with binary cross-entropy

    @classmethod
    def tiny(cls) -> "DenoiseAEConfig":
        return cls(filters=(4, 4))


class DenoiseAE(nn.Module):
    """Conv encoder (two stride-2 convs) and a mirrored ConvTranspose decoder; any input size divisible by 4."""

    def __init__(self, cfg: DenoiseAEConfig):
        super().__init__()
        f1, f2 = cfg.filters
        self.encoder = nn.Sequential(
            nn.Conv2d(cfg.channels, f1, 3, stride=2, padding=1), nn.ReLU(),  # (B, f1, H/2, W/2)
            nn.Conv2d(f1, f2, 3, stride=2, padding=1), nn.ReLU(),  # (B, f2, H/4, W/4)
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(f2, f2, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # (B, f2, H/2, W/2)
            nn.ConvTranspose2d(f2, f1, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # (B, f1, H, W)
            nn.Conv2d(f1, cfg.channels, 3, padding=1),  # logits; sigmoid applied in forward
        )

    def forward(self, x: torch.Tensor, return_logits: bool = False) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> same. Training asks for logits (stable BCE) through the same forward, so
        DDP's gradient hooks see the call."""
        logits = self.decoder(self.encoder(x))
        return logits if return_logits else torch.sigmoid(logits)


def build(cfg: DenoiseAEConfig) -> DenoiseAE:
    return DenoiseAE(cfg)


def add_noise(clean: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(clean.shape, generator=generator, device=clean.device if generator is None else "cpu")
    return (clean + std * noise.to(clean.device)).clamp(0, 1)


def init_training(cfg: DenoiseAEConfig, lr: float) -> TrainState:
    model = build(cfg)
    return TrainState(modules={"model": model}, optimizers={"model": torch.optim.Adam(model.parameters(), lr=lr)}, cfg=cfg)


def train_step(state: TrainState, clean: torch.Tensor) -> dict[str, float]:
    """One noisy -> clean update. clean: (B, C, H, W) in [0, 1]."""
    model, opt, cfg = state.modules["model"], state.optimizers["model"], state.cfg
    noisy = add_noise(clean, cfg.noise_std)
    logits = model(noisy, return_logits=True)
    if cfg.loss == "bce":
        loss = F.binary_cross_entropy_with_logits(logits, clean)
    else:
        loss = F.mse_loss(torch.sigmoid(logits), clean)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item()}


def _noisy_pairs(images: list[np.ndarray], cfg: DenoiseAEConfig, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.from_numpy(to_float(np.stack(images), "sigmoid"))
    return clean, add_noise(clean, cfg.noise_std, torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_grid(modules: dict[str, nn.Module], clean: torch.Tensor, cfg: DenoiseAEConfig) -> np.ndarray:
    """Rows: noisy / denoised / clean, one column per sample image."""
    noisy = add_noise(clean, cfg.noise_std, torch.Generator().manual_seed(0))
    rows = [noisy, modules["model"](noisy), clean]
    tiles = [img for row in rows for img in to_uint8(row.cpu().numpy(), "sigmoid")]
    return make_grid(tiles, nrow=clean.shape[0])


@torch.no_grad()
def evaluate(model: nn.Module, images: list[np.ndarray], labels: list[int] | None, cfg: DenoiseAEConfig) -> dict[str, float]:
    """PSNR (dB, data range 1) of noisy and denoised held-out images against the clean ones."""
    clean, noisy = _noisy_pairs(images, cfg)
    denoised = torch.cat([model(chunk) for chunk in noisy.split(256)])
    psnr_noisy = mean_psnr(clean.numpy(), noisy.numpy(), 1.0)
    psnr_denoised = mean_psnr(clean.numpy(), denoised.numpy(), 1.0)
    return {
        "psnr_noisy_db": psnr_noisy,
        "psnr_denoised_db": psnr_denoised,
        "psnr_gain_db": psnr_denoised - psnr_noisy,
        "num_eval_images": float(len(images)),
    }


SPEC = ModelSpec(
    name="denoise_ae",
    config_cls=DenoiseAEConfig,
    task="denoise",
    value_range="sigmoid",
    build=build,
    init_training=init_training,
    train_step=train_step,
    sample_grid=sample_grid,
    evaluate=evaluate,
    in_channels=lambda cfg: cfg.channels,
    size_multiple=4,
    noise_sigma=lambda cfg: cfg.noise_std * 255.0,  # noise_std is on [0, 1] pixels
)

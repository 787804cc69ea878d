"""Variational autoencoder (Kingma & Welling 2014): conv encoder -> (mu, log sigma^2), reparameterisation,
conv decoder to Bernoulli logits. Loss = BCE summed over pixels + beta * KL summed over latent dims, per image.
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

SAMPLE_SEED = 0  # the fixed noise behind the samples row of every grid, so epochs are comparable
EVAL_SEED = 1234  # the fixed reparameterisation noise of the held-out ELBO estimate


class VAEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["vae"] = "vae"
    channels: int = Field(default=1, ge=1, le=3)
    image_size: int = Field(default=28, ge=4)  # square; any size (the decoder output is cropped to it)
    latent_dim: int = Field(default=16, ge=1)
    widths: tuple[int, int] = (32, 64)  # encoder conv widths (stride 2 each); the decoder mirrors them
    beta: float = Field(default=1.0, ge=0)  # KL weight; 1 is the ELBO, > 1 a beta-VAE

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(image_size=16, latent_dim=4, widths=(4, 8))


class VAE(nn.Module):
    """forward(x) is the deterministic reconstruction (decoder at mu), so the Predictor can run it image -> image."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w1, w2 = cfg.widths
        self.channels, self.image_size, self.latent_dim = cfg.channels, cfg.image_size, cfg.latent_dim
        self.side = -(-cfg.image_size // 4)  # feature-map side after two stride-2 convs: ceil(S / 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(cfg.channels, w1, 3, stride=2, padding=1), nn.ReLU(),  # (B, w1, S/2, S/2)
            nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.ReLU(),  # (B, w2, S/4, S/4)
            nn.Flatten(),
        )
        self.to_stats = nn.Linear(w2 * self.side**2, 2 * cfg.latent_dim)  # -> (mu, logvar)
        self.from_latent = nn.Sequential(nn.Linear(cfg.latent_dim, w2 * self.side**2), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(w2, w1, 4, stride=2, padding=1), nn.ReLU(),  # (B, w1, 2 side, 2 side)
            nn.ConvTranspose2d(w1, cfg.channels, 4, stride=2, padding=1),  # (B, C, 4 side, 4 side) logits
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) in [0, 1] -> mu, logvar, each (B, latent_dim)."""
        if tuple(x.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"VAE expects (B, {self.channels}, {self.image_size}, {self.image_size}) inputs, "
                             f"got {tuple(x.shape)}")
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> Bernoulli logits (B, C, S, S)."""
        h = self.from_latent(z).view(z.shape[0], -1, self.side, self.side)  # shape[0], not len(): exports keep N free
        return self.decoder(h)[:, :, : self.image_size, : self.image_size]  # crop 4*ceil(S/4) to S

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> images (B, C, S, S) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor, return_all: bool = False, noise: torch.Tensor | None = None):
        """x: (B, C, S, S) in [0, 1]. Default: the reconstruction decode(mu) in [0, 1].

        return_all: (logits of decode(z), mu, logvar) with z = mu + sigma * eps, eps ~ N(0, I) (or `noise`).
        Training goes through this same forward so DDP's gradient hooks see the call."""
        mu, logvar = self.encode(x)
        if not return_all:
            return self.decode(mu)
        eps = torch.randn_like(mu) if noise is None else noise.to(mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps  # the reparameterisation trick: gradients flow to mu and logvar
        return self.decode_logits(z), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, S, S) in [0, 1] decoded from z ~ N(0, I) drawn on the CPU from `generator`."""
        z = torch.randn(n, self.latent_dim, generator=generator)
        return self.decode(z.to(next(self.parameters()).device))


def build(cfg: VAEConfig) -> VAE:
    return VAE(cfg)


def elbo_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(recon, kl), each averaged over the batch: BCE summed over pixels, KL(q(z|x) || N(0, I)) summed over dims."""
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    return recon, kl


def init_training(cfg: VAEConfig, lr: float) -> TrainState:
    model = build(cfg)
    return TrainState(modules={"model": model}, optimizers={"model": torch.optim.Adam(model.parameters(), lr=lr)},
                      cfg=cfg)


def _images(batch) -> torch.Tensor:
    return batch if torch.is_tensor(batch) else batch[0]  # labelled data yields (image, label); labels unused


def train_step(state: TrainState, batch) -> dict[str, float]:
    """One ELBO step on x: (B, C, S, S) in [0, 1]. loss = recon + beta * kl (the negative ELBO when beta = 1)."""
    model, opt, cfg = state.modules["model"], state.optimizers["model"], state.cfg
    x = _images(batch)
    logits, mu, logvar = model(x, return_all=True)
    recon, kl = elbo_terms(logits, x, mu, logvar)
    loss = recon + cfg.beta * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item(), "recon": recon.item(), "kl": kl.item()}


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model: VAE, n: int, seed: int, cfg: VAEConfig | None = None) -> np.ndarray:
    """n samples as uint8 (N, H, W, C); the same seed gives the same images."""
    return to_uint8(model.sample(n, torch.Generator().manual_seed(seed)).cpu().numpy(), "sigmoid")


@torch.no_grad()
def reconstruct(model: VAE, images: np.ndarray | list[np.ndarray], cfg: VAEConfig | None = None) -> np.ndarray:
    """uint8 (N, S, S, C) -> their reconstructions decode(mu), uint8 (N, S, S, C)."""
    x = torch.from_numpy(to_float(np.stack(list(images)), "sigmoid")).to(_model_device(model))
    return to_uint8(model(x).cpu().numpy(), "sigmoid")


@torch.no_grad()
def interpolate(model: VAE, steps: int, seed: int, cfg: VAEConfig | None = None) -> np.ndarray:
    """Decodings of `steps` evenly spaced points on the line between two latents drawn with `seed`:
    uint8 (steps, S, S, C); the first and last images are the decodings of the two endpoint latents."""
    if steps < 2:
        raise ValueError(f"interpolate needs steps >= 2, got {steps}")
    z0, z1 = torch.randn(2, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    t = torch.linspace(0, 1, steps)[:, None]  # (steps, 1)
    z = (1 - t) * z0 + t * z1  # (steps, latent_dim)
    z[0], z[-1] = z0, z1  # exact endpoints, free of rounding in (1 - t) * z0 + t * z1
    return to_uint8(model.decode(z.to(_model_device(model))).cpu().numpy(), "sigmoid")


@torch.no_grad()
def sample_grid(modules: dict[str, nn.Module], batch, cfg: VAEConfig) -> np.ndarray:
    """Rows: originals / reconstructions (decode(mu)) / samples from fixed seeded noise."""
    model = modules["model"]
    x = _images(batch)
    samples = model.sample(len(x), torch.Generator().manual_seed(SAMPLE_SEED))
    rows = [x, model(x), samples]
    tiles = [img for row in rows for img in to_uint8(row.cpu().numpy(), "sigmoid")]
    return make_grid(tiles, nrow=len(x))


def _frechet_distance(generated: np.ndarray, held_out: np.ndarray) -> float | None:
    """Fréchet distance from genray.fid, or None where that module is not available."""
    try:
        from genray.fid import frechet_distance_images
    except ImportError:
        return None
    return float(frechet_distance_images(generated, held_out))


@torch.no_grad()
def evaluate(model: VAE, images: list[np.ndarray], labels: list[int] | None, cfg: VAEConfig) -> dict[str, float]:
    """Held-out negative ELBO (one fixed-noise sample of z per image) and its terms, PSNR of decode(mu), and for
    28x28x1 images a Fréchet distance between as many samples as held-out images and the held-out images."""
    x = torch.from_numpy(to_float(np.stack(images), "sigmoid")).to(_model_device(model))
    generator = torch.Generator().manual_seed(EVAL_SEED)
    recon_sum = kl_sum = 0.0
    reconstructions = []
    for chunk in x.split(256):
        noise = torch.randn(len(chunk), model.latent_dim, generator=generator)
        logits, mu, logvar = model(chunk, return_all=True, noise=noise)
        recon, kl = elbo_terms(logits, chunk, mu, logvar)
        recon_sum, kl_sum = recon_sum + recon.item() * len(chunk), kl_sum + kl.item() * len(chunk)
        reconstructions.append(model.decode(mu))
    recon, kl = recon_sum / len(x), kl_sum / len(x)
    metrics = {
        "neg_elbo": recon + kl,  # nats per image, whatever beta was trained with
        "recon": recon,
        "kl": kl,
        "psnr_recon_db": mean_psnr(x.cpu().numpy(), torch.cat(reconstructions).cpu().numpy(), 1.0),
        "num_eval_images": float(len(images)),
    }
    if images[0].shape == (28, 28, 1):
        fd = _frechet_distance(generate(model, len(images), SAMPLE_SEED, cfg), np.stack(images))
        if fd is not None:
            metrics["frechet_distance"] = fd
    return metrics


SPEC = ModelSpec(
    name="vae",
    config_cls=VAEConfig,
    task="generate",
    value_range="sigmoid",
    build=build,
    init_training=init_training,
    train_step=train_step,
    sample_grid=sample_grid,
    evaluate=evaluate,
    in_channels=lambda cfg: cfg.channels,
    generate=generate,
    image_size=lambda cfg: cfg.image_size,
    code_size=lambda cfg: cfg.latent_dim,
    reconstruct=reconstruct,
    interpolate=interpolate,
)

"""DCGAN (Radford et al. 2016) in the seeds' two shapes: 28x28x1 (dense -> 7x7 -> ConvTranspose to 14 and 28) and
32x32x3 (latent 100, 8x8x256 start -> 16 -> 32). Options: WGAN-GP (Gulrajani et al. 2017), spectral norm on D
(Miyato et al. 2018), an EMA of the generator's weights.
"""
from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genray.images import make_grid, resize, resize_side, to_uint8
from genray.models.data import RandomCrops, image_tensor_dataset
from genray.models.layers import unwrap
from genray.models.spec import ModelSpec, TrainState

# variant -> (side, channels, side of the generator's first feature map)
VARIANTS = {"mnist28": (28, 1, 7), "cifar32": (32, 3, 8)}
GRID_SEED, GRID_COLUMNS, GRID_SAMPLES = 0, 8, 64  # the fixed noise behind every epoch's grid (and progress.gif)
NUM_EVAL_SAMPLES = 500


class DCGANConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["dcgan"] = "dcgan"
    variant: Literal["mnist28", "cifar32"] = "mnist28"
    latent_dim: int = Field(default=100, gt=0)
    g_width: int = Field(default=64, gt=0)  # G's last hidden width; it starts at 4x this (seeds: 256 -> 128 -> 64)
    d_width: int = Field(default=64, gt=0)  # D's first conv width, doubled per stride-2 conv
    d_dropout: float = Field(default=0.3, ge=0, lt=1)  # after each D conv block (the mnist seed's 0.3)
    loss: Literal["bce", "wgan_gp"] = "bce"  # non-saturating BCE (the seeds) or Wasserstein + gradient penalty
    gp_weight: float = Field(default=10.0, ge=0)  # WGAN-GP's lambda
    critic_steps: int | None = Field(default=None, gt=0)  # D updates per G update; None: 5 for wgan_gp, 1 for bce
    spectral_norm: bool = False  # on every D conv/linear layer
    ema_decay: float | None = Field(default=None, gt=0, lt=1)  # EMA of G's weights used for inference (e.g. 0.999)
    betas: tuple[float, float] = (0.5, 0.999)  # Adam, both networks (DCGAN paper; WGAN-GP uses (0.0, 0.9))
    lr_g_mult: float = Field(default=1.0, gt=0)  # G's lr = train.lr * this
    lr_d_mult: float = Field(default=1.0, gt=0)  # D's lr = train.lr * this (TTUR-style imbalance if != g's)
    crops_per_image: int = Field(default=16, gt=0)  # cifar32 on photos larger than 32x32: random crops per photo
    photo_short_side: int | None = Field(default=None, ge=32)  # resize such photos' shorter side first (None: no)

    @classmethod
    def tiny(cls) -> "DCGANConfig":
        return cls(latent_dim=8, g_width=4, d_width=4)

    @property
    def num_critic_steps(self) -> int:
        if self.critic_steps is not None:
            return self.critic_steps
        return 5 if self.loss == "wgan_gp" else 1


class Generator(nn.Module):
    """z (B, latent_dim) -> images (B, C, S, S) in [-1, 1]; S = 28 (mnist28) or 32 (cifar32)."""

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        _, channels, start = VARIANTS[cfg.variant]
        w = cfg.g_width
        self.start_shape = (4 * w, start, start)
        self.project = nn.Sequential(  # (B, 4w * start²), no bias: BatchNorm follows
            nn.Linear(cfg.latent_dim, 4 * w * start * start, bias=False), nn.BatchNorm1d(4 * w * start * start),
            nn.LeakyReLU(0.2),
        )
        if cfg.variant == "mnist28":  # the TF DCGAN tutorial's 5x5 ConvTransposes
            self.upsample = nn.Sequential(
                nn.ConvTranspose2d(4 * w, 2 * w, 5, stride=1, padding=2, bias=False), nn.BatchNorm2d(2 * w),
                nn.LeakyReLU(0.2),  # (B, 2w, 7, 7)
                nn.ConvTranspose2d(2 * w, w, 5, stride=2, padding=2, output_padding=1, bias=False),
                nn.BatchNorm2d(w), nn.LeakyReLU(0.2),  # (B, w, 14, 14)
                nn.ConvTranspose2d(w, channels, 5, stride=2, padding=2, output_padding=1),  # (B, 1, 28, 28)
            )
        else:
            self.upsample = nn.Sequential(
                nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                nn.LeakyReLU(0.2),  # (B, 2w, 16, 16)
                nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w),
                nn.LeakyReLU(0.2),  # (B, w, 32, 32)
                nn.Conv2d(w, channels, 3, padding=1),  # (B, 3, 32, 32)
            )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, *self.start_shape)  # (B, 4w, start, start)
        return torch.tanh(self.upsample(x))


class Discriminator(nn.Module):
    """images (B, C, S, S) in [-1, 1] -> one logit (B,) (a critic score for WGAN-GP).

    No BatchNorm (the mnist seed has none): a WGAN-GP critic must not have it, since the gradient penalty is per
    sample, and without it real and fake images can share one forward pass.
    """

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        side, channels, _ = VARIANTS[cfg.variant]
        w, p = cfg.d_width, cfg.d_dropout
        if cfg.variant == "mnist28":
            widths, kernel, padding = [channels, w, 2 * w], 5, 2  # 28 -> 14 -> 7
        else:
            widths, kernel, padding = [channels, w, 2 * w, 4 * w], 4, 1  # 32 -> 16 -> 8 -> 4
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel, stride=2, padding=padding), nn.LeakyReLU(0.2), nn.Dropout(p)]
        final_side = side // 2 ** (len(widths) - 1)
        layers += [nn.Flatten(), nn.Linear(widths[-1] * final_side * final_side, 1)]  # (B, 1)
        if cfg.spectral_norm:
            layers = [spectral_norm(m) if isinstance(m, (nn.Conv2d, nn.Linear)) else m for m in layers]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def build(cfg: DCGANConfig) -> Generator:
    return Generator(cfg)


def init_training(cfg: DCGANConfig, lr: float) -> TrainState:
    generator, discriminator = build(cfg), Discriminator(cfg)
    modules: dict[str, nn.Module] = {"model": generator, "discriminator": discriminator}
    if cfg.ema_decay is not None:
        # "model" (saved, sampled, served) is the EMA copy; "generator" is the one the optimizer trains.
        modules = {"model": copy.deepcopy(generator).requires_grad_(False), "generator": generator,
                   "discriminator": discriminator}
    optimizers = {
        "generator": torch.optim.Adam(generator.parameters(), lr=lr * cfg.lr_g_mult, betas=cfg.betas),
        "discriminator": torch.optim.Adam(discriminator.parameters(), lr=lr * cfg.lr_d_mult, betas=cfg.betas),
    }
    return TrainState(modules=modules, optimizers=optimizers, cfg=cfg)


def gradient_penalty(critic_on_mixed: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's E[(||grad_x D(x)||_2 - 1)²] at points between real and fake (graph kept for the D update)."""
    (grad,) = torch.autograd.grad(critic_on_mixed.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (BatchNorm statistics) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train_step(state: TrainState, real: torch.Tensor) -> dict[str, float]:
    """critic_steps D updates, then one G update. real: (B, C, S, S) in [-1, 1].

    Modules come from state.modules (DDP-wrapped on workers). Each D update is ONE D forward over real and fake
    (and, for WGAN-GP, mixed) images and one backward, which is what DDP's gradient hooks expect.
    """
    cfg = state.cfg
    g_key = "generator" if "generator" in state.modules else "model"
    G, D = state.modules[g_key], state.modules["discriminator"]
    opt_g, opt_d = state.optimizers["generator"], state.optimizers["discriminator"]
    b = real.shape[0]
    out: dict[str, float] = {}

    # [1] Discriminator / critic.
    for _ in range(cfg.num_critic_steps):
        with torch.no_grad():  # no G graph (and no DDP backward expected for G)
            fake = G(torch.randn(b, cfg.latent_dim, device=real.device))
        if cfg.loss == "bce":
            logits = D(torch.cat([real, fake]))  # (2B,)
            targets = torch.cat([torch.ones(b, device=real.device), torch.zeros(b, device=real.device)])
            loss_d = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            alpha = torch.rand(b, 1, 1, 1, device=real.device)
            mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            scores = D(torch.cat([real, fake, mixed]))  # (3B,)
            score_real, score_fake, score_mixed = scores.split(b)
            gp = gradient_penalty(score_mixed, mixed)
            loss_d = score_fake.mean() - score_real.mean() + cfg.gp_weight * gp
            out["gp"] = gp.item()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
    out["loss_d"] = loss_d.item()

    # [2] Generator. D's grads from this backward are discarded by the next D update's zero_grad.
    logits = D(G(torch.randn(b, cfg.latent_dim, device=real.device)))
    if cfg.loss == "bce":  # non-saturating: maximise log D(G(z))
        loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    else:
        loss_g = -logits.mean()
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    if cfg.ema_decay is not None:
        update_ema(unwrap(state.modules["model"]), unwrap(G), cfg.ema_decay)
    out["loss_g"] = loss_g.item()
    out["loss"] = out["loss_g"]  # the loss plot's line
    return out


def make_dataset(images: list[np.ndarray], labels: list[int] | None, cfg: DCGANConfig) -> torch.utils.data.Dataset:
    """Unconditional: labels are ignored. Images already of the variant's shape are used as they are; cifar32 on
    larger photos takes random 32x32 crops; anything else (faces 25x25 -> 28x28) is resized, bicubic."""
    side, channels, _ = VARIANTS[cfg.variant]
    if all(im.shape == (side, side, channels) for im in images):
        return image_tensor_dataset(images, "tanh")
    if cfg.variant == "cifar32" and all(min(im.shape[:2]) > side for im in images):
        if cfg.photo_short_side is not None:
            images = [resize_side(im, cfg.photo_short_side) for im in images]
        if any(im.shape[2] != channels for im in images):
            images = [np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im for im in images]
        return RandomCrops(images, side, "tanh", crops_per_image=cfg.crops_per_image)
    return image_tensor_dataset([resize(im, side, side, channels=channels) for im in images], "tanh")


@torch.no_grad()
def generate(model: nn.Module, n: int, seed: int, cfg: DCGANConfig) -> np.ndarray:
    """n images as uint8 (n, S, S, C); the same seed gives the same images (noise from a seeded CPU generator)."""
    if n <= 0:
        side, channels, _ = VARIANTS[cfg.variant]
        return np.zeros((0, side, side, channels), np.uint8)
    z = torch.randn(n, cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # BatchNorm running statistics: each image independent of its batch
    try:
        fakes = torch.cat([model(chunk.to(device)).cpu() for chunk in z.split(256)])
    finally:
        model.train(was_training)
    return to_uint8(fakes.numpy(), "tanh")


@torch.no_grad()
def sample_grid(modules: dict[str, nn.Module], fixed_batch: torch.Tensor, cfg: DCGANConfig) -> np.ndarray:
    """8x8 samples of modules["model"] from the same noise every epoch, so the progress.gif shows one set improving
    (the fixed batch of real images is not needed)."""
    return make_grid(list(generate(modules["model"], GRID_SAMPLES, GRID_SEED, cfg)), nrow=GRID_COLUMNS)


def _pixel_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance on 8x8 downsampled pixels: a cheap, model-free stand-in where no feature net fits."""
    from genray.fid import frechet_distance

    def small(images: np.ndarray) -> np.ndarray:
        return np.stack([resize(im, 8, 8) for im in images]).reshape(len(images), -1) / 255.0

    return frechet_distance(small(a), small(b))


@torch.no_grad()
def evaluate(model: nn.Module, images: list[np.ndarray], labels: list[int] | None, cfg: DCGANConfig) -> dict[str, float]:
    """28x28x1 held-out images: FID on the digits classifier's features for 500 samples vs the real images, and
    `fid_real_floor` (real half vs real half: what a perfect generator would score at this sample size).
    Other data: a Fréchet distance on 8x8 downsampled pixels between samples and up to 500 real items as the
    training data would present them (resized, or fixed random crops of photos)."""
    fakes = generate(model, NUM_EVAL_SAMPLES, seed=1, cfg=cfg)
    result = {"num_eval_images": float(len(images))}
    if all(im.shape == (28, 28, 1) for im in images) and fakes.shape[1:] == (28, 28, 1):
        if len(images) >= 4:
            from genray.fid import classifier_features, frechet_distance

            real = classifier_features(np.stack(images))
            result["fid"] = frechet_distance(classifier_features(fakes), real)
            # Interleaved halves: key-sorted held-out data is class-sorted; the floor must compare like with like.
            result["fid_real_floor"] = frechet_distance(real[0::2], real[1::2])
        return result
    dataset = make_dataset(images, None, cfg)  # RandomCrops start at epoch 0: the same crops every evaluation
    step = max(1, len(dataset) // NUM_EVAL_SAMPLES)
    items = [dataset[i] for i in range(0, len(dataset), step)][:NUM_EVAL_SAMPLES]
    if len(items) >= 4:
        result["pixel_frechet_8x8"] = _pixel_frechet(fakes, to_uint8(torch.stack(items).numpy(), "tanh"))
    return result


SPEC = ModelSpec(
    name="dcgan",
    config_cls=DCGANConfig,
    task="generate",
    value_range="tanh",
    build=build,
    init_training=init_training,
    train_step=train_step,
    sample_grid=sample_grid,
    evaluate=evaluate,
    in_channels=lambda cfg: VARIANTS[cfg.variant][1],
    image_size=lambda cfg: VARIANTS[cfg.variant][0],
    code_size=lambda cfg: cfg.latent_dim,
    make_dataset=make_dataset,
    generate=generate,
    loss_decreases=False,
)

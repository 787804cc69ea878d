"""SRGAN (Ledig et al. 2017, "Photo-Realistic Single Image Super-Resolution Using a GAN"): an SRResNet generator
(x4, sub-pixel upsampling) pretrained on pixel MSE, then trained against a VGG-style discriminator with a content
loss (MSE and/or VGG54 features) + 1e-3 adversarial loss. The LR input is a bicubic x4 downscale of the HR photo.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from genray.images import center_crop, make_grid, resize, to_float, to_uint8
from genray.metrics import psnr, rgb_to_y, ssim, ssim_fits
from genray.models.data import RandomCrops
from genray.models.spec import ModelSpec, TrainState

SCALE = 4  # two sub-pixel x2 stages
EVAL_MAX_SIDE = 256  # held-out HR center crops are at most this big (keeps evaluate cheap on CPU)
EVAL_BORDER = SCALE  # pixels left out at each edge before PSNR/SSIM, as SR papers do (crop = scale)


class SRGANConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["srgan"] = "srgan"
    # Generator (SRResNet): paper values 64 features, 16 residual blocks.
    num_features: int = Field(default=64, gt=0)
    num_blocks: int = Field(default=16, ge=1)
    # Discriminator: widths disc_features x (1, 1, 2, 2, 4, 4, 8, 8) over 8 conv blocks (paper 64 -> 512), dense 1024.
    disc_features: int = Field(default=64, gt=0)
    disc_dense: int = Field(default=1024, gt=0)
    # Data: random HR crops (paper 96x96); the LR input is their bicubic x4 downscale.
    # Predict only the difference to a bicubic x4 upscale (VDSR's global residual): the untrained network starts
    # at bicubic quality, so short CPU runs beat bicubic; the paper's SRResNet predicts the whole image (False).
    bicubic_skip: bool = False
    hr_crop: int = Field(default=96, ge=8)
    crops_per_image: int = Field(default=16, gt=0)
    augment: bool = False  # random 90-degree rotations and mirroring of the training crops
    # Phases: epochs 1..pretrain_epochs train SRResNet on pixel MSE; later epochs are adversarial.
    pretrain_epochs: int = Field(default=10, ge=0)
    content: Literal["mse", "vgg", "mse+vgg"] = "mse"  # GAN-phase content loss; "vgg" is the paper's SRGAN-VGG54
    vgg_layer: str = "relu5_4"  # VGG54: features after the 4th conv (+ReLU) before the 5th max-pool
    vgg_loss_weight: float = Field(default=1 / 12.75**2, gt=0)  # the paper rescales VGG features by 1/12.75
    adversarial_weight: float = Field(default=1e-3, ge=0)
    # VGG19 weights: explicit URI (local or s3://) -> torchvision's cache -> download (if vgg_download).
    vgg_weights: str | None = None
    vgg_download: bool = True
    allow_untrained_vgg: bool = False  # smoke tests only: perceptual loss on random features is meaningless

    @field_validator("hr_crop")
    @classmethod
    def _crop_divisible(cls, value: int) -> int:
        if value % SCALE:
            raise ValueError(f"hr_crop must be a multiple of {SCALE}, got {value}")
        return value

    @classmethod
    def tiny(cls) -> "SRGANConfig":
        # pretrain_epochs=0: every step is a full GAN step (D then G), so the battery sees gradients in both
        # networks; G's total loss is still dominated by the MSE content term and falls.
        return cls(num_features=8, num_blocks=1, disc_features=4, disc_dense=16, hr_crop=16, crops_per_image=2,
                   pretrain_epochs=0)


# --- generator: SRResNet -------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """conv-BN-PReLU-conv-BN with an identity skip; (B, F, H, W) -> same."""

    def __init__(self, num_features: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(num_features, num_features, 3, padding=1), nn.BatchNorm2d(num_features), nn.PReLU(num_features),
            nn.Conv2d(num_features, num_features, 3, padding=1), nn.BatchNorm2d(num_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SubPixelUpsample(nn.Module):
    """x2 sub-pixel convolution (Shi et al. 2016): (B, F, H, W) -> conv (B, 4F, H, W) -> shuffle (B, F, 2H, 2W)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.conv = nn.Conv2d(num_features, 4 * num_features, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.act = nn.PReLU(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shuffle(self.conv(x)))


class SRResNet(nn.Module):
    """(B, 3, h, w) LR in [-1, 1] -> (B, 3, 4h, 4w) SR in [-1, 1]; any h, w."""

    def __init__(self, cfg: SRGANConfig, channels: int = 3):
        super().__init__()
        f = cfg.num_features
        self.head = nn.Sequential(nn.Conv2d(channels, f, 9, padding=4), nn.PReLU(f))  # (B, F, h, w)
        self.body = nn.Sequential(*[ResidualBlock(f) for _ in range(cfg.num_blocks)])
        self.body_tail = nn.Sequential(nn.Conv2d(f, f, 3, padding=1), nn.BatchNorm2d(f))
        self.upsample = nn.Sequential(SubPixelUpsample(f), SubPixelUpsample(f))  # (B, F, 4h, 4w)
        self.tail = nn.Conv2d(f, channels, 9, padding=4)  # (B, 3, 4h, 4w); tanh in forward
        self.bicubic_skip = cfg.bicubic_skip
        if self.bicubic_skip:  # start exactly at bicubic: the residual branch's last layer begins at zero
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        head = self.head(lr)
        features = head + self.body_tail(self.body(head))  # global skip over the residual blocks
        detail = self.tail(self.upsample(features))
        if self.bicubic_skip:
            base = F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False)
            return (base + detail).clamp(-1, 1)
        return torch.tanh(detail)


# --- discriminator -------------------------------------------------------------------------------------------

class DiscriminatorBlock(nn.Module):
    """3x3 conv (stride 1 or 2) + BN + LeakyReLU(0.2); the first block of the paper has no BN."""

    def __init__(self, in_features: int, out_features: int, stride: int, batch_norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, 3, stride=stride, padding=1)
        self.norm = nn.BatchNorm2d(out_features) if batch_norm else nn.Identity()
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Discriminator(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B,) real/fake logits. 8 conv blocks with stride 1, 2, 1, 2, ... (H/16 at the
    end), adaptive average pooling so any crop size works, dense 1024 + LeakyReLU, dense 1 (the paper's sigmoid
    is folded into the BCE-with-logits loss)."""

    def __init__(self, cfg: SRGANConfig, channels: int = 3):
        super().__init__()
        f = cfg.disc_features
        widths = [f, f, 2 * f, 2 * f, 4 * f, 4 * f, 8 * f, 8 * f]
        blocks, previous = [], channels
        for index, width in enumerate(widths):
            blocks.append(DiscriminatorBlock(previous, width, stride=1 + index % 2, batch_norm=index > 0))
            previous = width
        self.features = nn.Sequential(*blocks)  # (B, 8F, H/16, W/16)
        self.pool = nn.AdaptiveAvgPool2d(1)  # (B, 8F, 1, 1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(previous, cfg.disc_dense), nn.LeakyReLU(0.2), nn.Linear(cfg.disc_dense, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x))).squeeze(1)


def build(cfg: SRGANConfig) -> SRResNet:
    return SRResNet(cfg)


# --- data ----------------------------------------------------------------------------------------------------

def bicubic_downscale(image: np.ndarray, factor: int = SCALE) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (H/factor, W/factor, C) with PIL's bicubic filter (the paper's LR inputs)."""
    return resize(image, image.shape[1] // factor, image.shape[0] // factor)


def bicubic_upscale(image: np.ndarray, factor: int = SCALE) -> np.ndarray:
    """uint8 (h, w, C) -> uint8 (h*factor, w*factor, C): the baseline SR is measured against."""
    return resize(image, image.shape[1] * factor, image.shape[0] * factor)


class LowResPairs(Dataset):
    """Items (lr, hr): hr is a random hr_crop² crop in [-1, 1] (B, 3, S, S); lr is its bicubic x4 downscale
    (B, 3, S/4, S/4), made from the uint8 crop as a camera pipeline would."""

    def __init__(self, images: list[np.ndarray], cfg: SRGANConfig):
        self.crops = RandomCrops(images, cfg.hr_crop, "tanh", cfg.crops_per_image, augment=cfg.augment)

    def set_epoch(self, epoch: int) -> None:
        self.crops.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        hr = self.crops[i]  # (3, S, S) float
        hr_uint8 = to_uint8(hr[None].numpy(), "tanh")  # exact: crops are uint8 pixels / 127.5 - 1
        lr = to_float(bicubic_downscale(hr_uint8[0])[None], "tanh")[0]
        return torch.from_numpy(lr), hr


def make_dataset(images: list[np.ndarray], labels: list[int] | None, cfg: SRGANConfig) -> Dataset:
    return LowResPairs(images, cfg)


# --- training ------------------------------------------------------------------------------------------------

def in_pretraining(cfg: SRGANConfig, epoch: int) -> bool:
    """SRResNet (MSE only) phase: epochs 1..pretrain_epochs (epoch 0: outside the loop, e.g. unit tests)."""
    return cfg.pretrain_epochs > 0 and epoch <= cfg.pretrain_epochs


def init_training(cfg: SRGANConfig, lr: float) -> TrainState:
    generator, discriminator = build(cfg), Discriminator(cfg)
    state = TrainState(
        modules={"model": generator, "discriminator": discriminator},
        # The paper: Adam with beta1 = 0.9 for both networks.
        optimizers={"model": torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.9, 0.999)),
                    "discriminator": torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.9, 0.999))},
        cfg=cfg,
    )
    if "vgg" in cfg.content:  # loaded only when used; frozen, so an extra: never checkpointed or DDP-wrapped
        from genray.models.vgg import load_vgg19_features

        vgg, source = load_vgg19_features((cfg.vgg_layer,), cfg.vgg_weights, cfg.allow_untrained_vgg,
                                          allow_download=cfg.vgg_download)
        state.extras.update(vgg=vgg, vgg_source=source)
    return state


def vgg_content_loss(vgg: nn.Module, sr: torch.Tensor, hr: torch.Tensor, layer: str) -> torch.Tensor:
    """MSE between VGG features of SR and HR (both [-1, 1] -> [0, 1], VGG normalises to ImageNet stats)."""
    sr_features = vgg((sr + 1) / 2)[layer]
    with torch.no_grad():
        hr_features = vgg((hr + 1) / 2)[layer]
    return F.mse_loss(sr_features, hr_features)


def train_step(state: TrainState, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """One update. lr: (B, 3, h, w), hr: (B, 3, 4h, 4w), both in [-1, 1].

    Pretraining: G on pixel MSE. GAN phase: [1] D on real HR vs detached SR, [2] G on content + adversarial.
    """
    lr, hr = batch
    cfg = state.cfg
    generator, discriminator = state.modules["model"], state.modules["discriminator"]
    opt_g, opt_d = state.optimizers["model"], state.optimizers["discriminator"]

    sr = generator(lr)  # (B, 3, 4h, 4w)
    mse = F.mse_loss(sr, hr)
    if in_pretraining(cfg, state.epoch):
        opt_g.zero_grad(set_to_none=True)
        mse.backward()
        opt_g.step()
        return {"loss": mse.item(), "mse": mse.item()}

    # [1] Discriminator: real HR -> 1, SR -> 0. Each forward is followed by its own backward (DDP-friendly).
    opt_d.zero_grad(set_to_none=True)
    real_logits = discriminator(hr)
    loss_d_real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    loss_d_real.backward()
    fake_logits = discriminator(sr.detach())
    loss_d_fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    loss_d_fake.backward()
    opt_d.step()

    # [2] Generator: content loss + adversarial loss -log D(G(lr)) (the non-saturating form the paper uses).
    # D's gradients from this backward are discarded by its zero_grad in the next step.
    losses: dict[str, float] = {"mse": mse.item()}
    content = torch.zeros((), device=hr.device)
    if "mse" in cfg.content:
        content = content + mse
    if "vgg" in cfg.content:
        vgg = state.extras["vgg"].to(hr.device)
        loss_vgg = cfg.vgg_loss_weight * vgg_content_loss(vgg, sr, hr, cfg.vgg_layer)
        content = content + loss_vgg
        losses["loss_vgg"] = loss_vgg.item()
    fake_logits = discriminator(sr)
    loss_adv = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    loss_g = content + cfg.adversarial_weight * loss_adv
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()

    losses.update(loss=loss_g.item(), loss_adv=loss_adv.item(), loss_d=(loss_d_real + loss_d_fake).item())
    return losses


# --- samples and evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(modules: dict[str, nn.Module], batch: tuple[torch.Tensor, torch.Tensor], cfg: SRGANConfig) -> np.ndarray:
    """Rows: LR (nearest-neighbour x4 for display) / SR / HR, one column per fixed sample."""
    lr, hr = batch
    lr_big = F.interpolate(lr, scale_factor=SCALE, mode="nearest")
    rows = [lr_big, modules["model"](lr), hr]
    tiles = [image for row in rows for image in to_uint8(row.float().cpu().numpy(), "tanh")]
    return make_grid(tiles, nrow=lr.shape[0])


@torch.no_grad()
def evaluate(model: nn.Module, images: list[np.ndarray], labels: list[int] | None, cfg: SRGANConfig) -> dict[str, float]:
    """x4 SR of held-out photos vs bicubic x4 upscaling, on uint8 RGB (data range 255) with a 4-px border crop;
    PSNR also on the luma channel Y (`psnr_y_*`, float64 BT.601 Y, data range 255), as SR papers report it.

    Each photo: HR = center crop (<= 256, sides multiple of 4), LR = its bicubic x4 downscale.
    """
    device = next(model.parameters()).device
    names = ("psnr_sr_db", "psnr_bicubic_db", "psnr_y_sr_db", "psnr_y_bicubic_db", "ssim_sr", "ssim_bicubic")
    scores: dict[str, list[float]] = {k: [] for k in names}
    b = EVAL_BORDER
    for image in images:
        hr = center_crop(image, EVAL_MAX_SIDE, SCALE)
        lr = bicubic_downscale(hr)
        sr = to_uint8(model(torch.from_numpy(to_float(lr[None], "tanh")).to(device)).float().cpu().numpy(), "tanh")[0]
        bicubic = bicubic_upscale(lr)
        hr, sr, bicubic = (x[b:-b, b:-b] for x in (hr, sr, bicubic))
        scores["psnr_sr_db"].append(psnr(hr, sr, 255))
        scores["psnr_bicubic_db"].append(psnr(hr, bicubic, 255))
        if hr.shape[-1] == 3:
            scores["psnr_y_sr_db"].append(psnr(rgb_to_y(hr), rgb_to_y(sr), 255))
            scores["psnr_y_bicubic_db"].append(psnr(rgb_to_y(hr), rgb_to_y(bicubic), 255))
        if ssim_fits(hr):  # a tiny config's crops are smaller than SSIM's window: PSNR only
            scores["ssim_sr"].append(ssim(hr, sr, 255, channel_axis=-1))
            scores["ssim_bicubic"].append(ssim(hr, bicubic, 255, channel_axis=-1))
    result = {k: float(np.mean(v)) for k, v in scores.items() if v}
    result["psnr_gain_over_bicubic_db"] = result["psnr_sr_db"] - result["psnr_bicubic_db"]
    if "psnr_y_sr_db" in result:
        result["psnr_y_gain_over_bicubic_db"] = result["psnr_y_sr_db"] - result["psnr_y_bicubic_db"]
    result["num_eval_images"] = float(len(images))
    return result


SPEC = ModelSpec(
    name="srgan",
    config_cls=SRGANConfig,
    task="superres",
    value_range="tanh",
    build=build,
    init_training=init_training,
    train_step=train_step,
    sample_grid=sample_grid,
    evaluate=evaluate,
    in_channels=lambda cfg: 3,
    make_dataset=make_dataset,
    scale=SCALE,
    size_multiple=1,
    loss_decreases=True,  # G's total loss is dominated by its content term (pure MSE while pretraining)
)

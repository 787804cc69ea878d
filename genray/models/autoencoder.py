"""Autoencoders from the seed documents, on [0, 1] images:
- denoise_ae: convolutional denoising AE (Conv 16/8 stride 2 -> ConvTranspose 8/16 stride 2 -> sigmoid conv);
- dense_ae: dense AE (784 -> latent -> 784), optionally sparse (L1 or KL activity penalty), or a 2-d latent
  plotted against PCA;
- sae_classifier: a stacked-autoencoder classifier (encoder pretrained as an AE, then a softmax head).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from genray.images import make_grid, to_float, to_uint8
from genray.models.data import image_tensor_dataset
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


DENOISE_AE = ModelSpec(
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
)


# --- dense autoencoder (seed 000), sparse variants (seed 004), 2-d latent against PCA (seed 001) ------------

NEAR_ZERO = 0.05  # a code entry with |h| below this counts as inactive in the sparsity metrics


def _dense_stack(sizes: list[int]) -> list[nn.Module]:
    """Linear layers through `sizes` with ReLU between them (none after the last: callers choose its activation)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


_CODE_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "linear": nn.Identity}


class DenseAEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["dense_ae"] = "dense_ae"
    channels: int = Field(default=1, ge=1, le=3)
    image_size: int = Field(default=28, ge=2)  # the dense layers see image_size^2 * channels pixels (seed: 784)
    hidden: tuple[int, ...] = ()  # extra ReLU layers between the pixels and the code; the decoder mirrors them
    latent_dim: int = Field(default=64, ge=1)  # seed: 64; 2 gives the embedding plot against PCA
    # The code's activation. Seed: ReLU; the KL penalty needs sigmoid (activations read as firing rates in
    # (0, 1)); a 2-d code for plotting is better linear (ReLU folds it into one quadrant).
    code_activation: Literal["relu", "sigmoid", "linear"] = "relu"
    sparsity: Literal["none", "l1", "kl"] = "none"
    sparsity_weight: float = Field(default=1e-4, ge=0)  # times the L1 or KL activity penalty
    sparsity_target: float = Field(default=0.05, gt=0, lt=1)  # rho of the KL penalty: the mean activation wanted

    @model_validator(mode="after")
    def _kl_needs_sigmoid(self) -> "DenseAEConfig":
        if self.sparsity == "kl" and self.code_activation != "sigmoid":
            raise ValueError("sparsity 'kl' needs code_activation 'sigmoid' (mean activations must lie in (0, 1))")
        return self

    @classmethod
    def tiny(cls) -> "DenseAEConfig":
        return cls(hidden=(16,), latent_dim=4)


class DenseAE(nn.Module):
    """Pixels -> code -> pixels with dense layers, on image_size^2 blocks.

    A 28x28 digit is one block. Larger inputs are cut into non-overlapping blocks (padded with black to a
    multiple of image_size, cropped back after), so the Predictor can run it on any image.
    """

    def __init__(self, cfg: DenseAEConfig):
        super().__init__()
        self.channels, self.image_size = cfg.channels, cfg.image_size
        pixels = cfg.channels * cfg.image_size**2
        sizes = [pixels, *cfg.hidden, cfg.latent_dim]
        self.encoder = nn.Sequential(*_dense_stack(sizes), _CODE_ACTIVATIONS[cfg.code_activation]())
        self.decoder = nn.Sequential(*_dense_stack(sizes[::-1]))  # logits; sigmoid applied in forward

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) or (N, C*S*S) in [0, 1] -> codes (N, latent_dim)."""
        return self.encoder(x.flatten(1))

    def forward(self, x: torch.Tensor, return_code: bool = False):
        """(B, C, H, W) in [0, 1] -> reconstruction, same shape. return_code: (logits, codes (B*blocks, latent))
        for training, through this same forward so DDP's gradient hooks see the call."""
        b, c, h, w = x.shape
        s = self.image_size
        ph, pw = -(-h // s) * s, -(-w // s) * s
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h))
        nh, nw = ph // s, pw // s
        blocks = x.reshape(b, c, nh, s, nw, s).permute(0, 2, 4, 1, 3, 5).reshape(b * nh * nw, c * s * s)
        code = self.encoder(blocks)  # (B * nh * nw, latent_dim)
        logits = self.decoder(code)  # (B * nh * nw, C * S * S)
        logits = logits.reshape(b, nh, nw, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ph, pw)[:, :, :h, :w]
        return (logits, code) if return_code else torch.sigmoid(logits)


def build_dense_ae(cfg: DenseAEConfig) -> DenseAE:
    return DenseAE(cfg)


def sparsity_penalty(code: torch.Tensor, cfg: DenseAEConfig) -> torch.Tensor:
    """The activity penalty on codes (N, latent_dim), before sparsity_weight.

    l1: sum of |h| over units, averaged over the batch. kl: sum over units of KL(rho || rho_hat_j), rho_hat_j the
    mean activation of unit j over the batch (Ng's sparse autoencoder); 0 when every rho_hat_j == rho.
    """
    if cfg.sparsity == "l1":
        return code.abs().sum(1).mean()
    if cfg.sparsity == "kl":
        rho = cfg.sparsity_target
        rho_hat = code.mean(0).clamp(1e-6, 1 - 1e-6)
        return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    return code.new_zeros(())


def dense_ae_losses(model: nn.Module, x: torch.Tensor, cfg: DenseAEConfig) -> dict[str, torch.Tensor]:
    """{'loss', 'recon_loss'[, 'sparsity_loss']} for x: (B, C, H, W) in [0, 1]; recon is per-pixel mean BCE."""
    logits, code = model(x, return_code=True)
    recon = F.binary_cross_entropy_with_logits(logits, x)
    if cfg.sparsity == "none":
        return {"loss": recon, "recon_loss": recon}
    penalty = cfg.sparsity_weight * sparsity_penalty(code, cfg)
    return {"loss": recon + penalty, "recon_loss": recon, "sparsity_loss": penalty}


def init_dense_ae(cfg: DenseAEConfig, lr: float) -> TrainState:
    model = build_dense_ae(cfg)
    return TrainState(modules={"model": model}, optimizers={"model": torch.optim.Adam(model.parameters(), lr=lr)},
                      cfg=cfg)


def train_dense_ae(state: TrainState, batch) -> dict[str, float]:
    x = batch if torch.is_tensor(batch) else batch[0]  # labelled data yields (image, label); labels unused
    losses = dense_ae_losses(state.modules["model"], x, state.cfg)
    opt = state.optimizers["model"]
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    return {k: v.item() for k, v in losses.items()}


@torch.no_grad()
def reconstruction_grid(model: nn.Module, batch) -> np.ndarray:
    """Rows: originals / reconstructions (model(x) in [0, 1])."""
    x = batch if torch.is_tensor(batch) else batch[0]
    tiles = [img for row in (x, model(x)) for img in to_uint8(row.cpu().numpy(), "sigmoid")]
    return make_grid(tiles, nrow=len(x))


def sample_grid_dense_ae(modules: dict[str, nn.Module], batch, cfg: DenseAEConfig) -> np.ndarray:
    return reconstruction_grid(modules["model"], batch)


@torch.no_grad()
def evaluate_dense_ae(model: nn.Module, images: list[np.ndarray], labels: list[int] | None,
                      cfg: DenseAEConfig) -> dict[str, float]:
    """Held-out reconstruction MSE and PSNR (data range 1), and code statistics: mean activation, and the
    fraction of code entries with |h| < NEAR_ZERO (what the sparsity penalties push up)."""
    x = torch.from_numpy(to_float(np.stack(images), "sigmoid"))
    outputs, codes = [], []
    for chunk in x.split(256):
        logits, code = model(chunk, return_code=True)
        outputs.append(torch.sigmoid(logits))
        codes.append(code)
    recon, code = torch.cat(outputs), torch.cat(codes)
    return {
        "recon_mse": F.mse_loss(recon, x).item(),
        "psnr_recon_db": mean_psnr(x.numpy(), recon.numpy(), 1.0),
        "code_mean_activation": code.abs().mean().item(),
        "code_near_zero_fraction": (code.abs() < NEAR_ZERO).float().mean().item(),
        "num_eval_images": float(len(images)),
    }


def _embedding_png(codes: np.ndarray, projected: np.ndarray, labels: list[int] | None) -> bytes:
    """Two scatter plots side by side: the autoencoder's 2-d codes and PCA's 2-d projection, coloured by label."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    colour = {"c": labels, "cmap": "tab10"} if labels is not None else {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), dpi=100)
    for ax, points, title in ((axes[0], codes, "autoencoder 2-d code"), (axes[1], projected, "PCA, 2 components")):
        scatter = ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.8, **colour)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if labels is not None:
        fig.legend(*scatter.legend_elements(), title="label", loc="center right")
    fig.suptitle(f"held-out images ({len(codes)})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@torch.no_grad()
def extra_outputs_dense_ae(model: nn.Module, images: list[np.ndarray], labels: list[int] | None,
                           cfg: DenseAEConfig) -> dict[str, bytes]:
    """With a 2-d latent: {'embedding.png': codes of the held-out images next to their PCA projection}."""
    from sklearn.decomposition import PCA

    if cfg.latent_dim != 2 or len(images) < 2:
        return {}
    x = torch.from_numpy(to_float(np.stack(images), "sigmoid"))
    if tuple(x.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
        return {}  # one code per image only when an image is one block
    codes = model.encode(x).numpy()
    projected = PCA(n_components=2, random_state=0).fit_transform(x.flatten(1).numpy())
    return {"embedding.png": _embedding_png(codes, projected, labels)}


DENSE_AE = ModelSpec(
    name="dense_ae",
    config_cls=DenseAEConfig,
    task="reconstruct",
    value_range="sigmoid",
    build=build_dense_ae,
    init_training=init_dense_ae,
    train_step=train_dense_ae,
    sample_grid=sample_grid_dense_ae,
    evaluate=evaluate_dense_ae,
    in_channels=lambda cfg: cfg.channels,
    extra_outputs=extra_outputs_dense_ae,
    size_multiple=28,  # tiles of the Predictor fall on block boundaries for the default image_size
)


# --- stacked-autoencoder classifier (seed 001) ---------------------------------------------------------------

class SAEClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["sae_classifier"] = "sae_classifier"
    channels: int = Field(default=1, ge=1, le=3)
    image_size: int = Field(default=28, ge=2)  # inputs must be exactly this size
    hidden: tuple[int, ...] = (256,)  # encoder ReLU layers before the code; the decoder mirrors them
    latent_dim: int = Field(default=64, ge=1)
    num_classes: int = Field(default=10, ge=2)
    pretrain_epochs: int = Field(default=5, ge=0)  # epochs 1..pretrain_epochs train the autoencoder only
    freeze_encoder: bool = False  # after pretraining: train the head only (True) or fine-tune the encoder too
    dropout: float = Field(default=0.2, ge=0, lt=1)  # on the code, before the classifier head

    @classmethod
    def tiny(cls) -> "SAEClassifierConfig":
        return cls(image_size=16, hidden=(16,), latent_dim=8, pretrain_epochs=1)


class SAEClassifier(nn.Module):
    """Dense encoder (pretrained as an autoencoder with `decoder`) and a linear softmax head on the code.

    forward(x) -> logits (B, num_classes). The decoder stays in the artefact: it is small, and it lets the
    sample grid show what the encoder keeps."""

    def __init__(self, cfg: SAEClassifierConfig):
        super().__init__()
        self.input_shape = (cfg.channels, cfg.image_size, cfg.image_size)
        sizes = [cfg.channels * cfg.image_size**2, *cfg.hidden, cfg.latent_dim]
        self.encoder = nn.Sequential(*_dense_stack(sizes), nn.ReLU())  # (B, latent_dim)
        self.decoder = nn.Sequential(*_dense_stack(sizes[::-1]))  # (B, C*S*S) logits
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.latent_dim, cfg.num_classes))

    def forward(self, x: torch.Tensor, return_reconstruction: bool = False):
        """x: (B, C, S, S) in [0, 1] -> logits (B, num_classes); return_reconstruction: (logits, reconstruction
        logits (B, C, S, S))."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"sae_classifier expects (B, {', '.join(map(str, self.input_shape))}) inputs, "
                             f"got {tuple(x.shape)}")
        code = self.encoder(x.flatten(1))
        logits = self.head(code)
        if not return_reconstruction:
            return logits
        return logits, self.decoder(code).view_as(x)


def build_sae_classifier(cfg: SAEClassifierConfig) -> SAEClassifier:
    return SAEClassifier(cfg)


def make_labelled_dataset(images: list[np.ndarray], labels: list[int] | None, cfg: SAEClassifierConfig):
    """(image, label) items; a classifier cannot train on unlabelled images."""
    if labels is None:
        raise ValueError("sae_classifier needs labelled images: keys laid out as <split>/<label>/<file>.png, "
                         "e.g. from `genray data export digits`")
    bad = sorted({label for label in labels if not 0 <= label < cfg.num_classes})
    if bad:
        raise ValueError(f"labels {bad[:5]} are outside 0..{cfg.num_classes - 1} (model.num_classes)")
    return image_tensor_dataset(images, "sigmoid", labels)


def init_sae_classifier(cfg: SAEClassifierConfig, lr: float) -> TrainState:
    """One optimizer per phase: the autoencoder's (encoder + decoder) and the classifier's (head, plus the
    encoder unless frozen). A frozen encoder is simply left out of the second."""
    model = build_sae_classifier(cfg)
    classify = [*model.head.parameters(), *([] if cfg.freeze_encoder else model.encoder.parameters())]
    optimizers = {
        "pretrain": torch.optim.Adam([*model.encoder.parameters(), *model.decoder.parameters()], lr=lr),
        "classify": torch.optim.Adam(classify, lr=lr),
    }
    return TrainState(modules={"model": model}, optimizers=optimizers, cfg=cfg)


def train_sae_classifier(state: TrainState, batch) -> dict[str, float]:
    """Epochs 1..pretrain_epochs: reconstruction (BCE) updates of the autoencoder; after that, cross-entropy
    updates of the head (and the encoder unless frozen). x: (B, C, S, S) in [0, 1], y: (B,) class indices."""
    model, cfg = state.modules["model"], state.cfg
    x, y = batch
    pretraining = state.epoch <= cfg.pretrain_epochs
    logits, recon_logits = model(x, return_reconstruction=True)
    recon_loss = F.binary_cross_entropy_with_logits(recon_logits, x)
    ce_loss = F.cross_entropy(logits, y)
    # Both terms are in every backward, the idle one weighted 0, so every parameter gets a gradient each step
    # (DDP without find_unused_parameters requires it); only the phase's optimizer steps.
    loss = recon_loss + 0.0 * ce_loss if pretraining else ce_loss + 0.0 * recon_loss
    for opt in state.optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizers["pretrain" if pretraining else "classify"].step()
    if pretraining:
        return {"loss": recon_loss.item(), "recon_loss": recon_loss.item()}
    accuracy = (logits.argmax(1) == y).float().mean()
    return {"loss": ce_loss.item(), "ce_loss": ce_loss.item(), "accuracy": accuracy.item()}


@torch.no_grad()
def sample_grid_sae_classifier(modules: dict[str, nn.Module], batch, cfg: SAEClassifierConfig) -> np.ndarray:
    """Rows: originals / the autoencoder's reconstructions."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    _, recon_logits = modules["model"](x, return_reconstruction=True)
    tiles = [img for row in (x, torch.sigmoid(recon_logits)) for img in to_uint8(row.cpu().numpy(), "sigmoid")]
    return make_grid(tiles, nrow=len(x))


@torch.no_grad()
def evaluate_sae_classifier(model: nn.Module, images: list[np.ndarray], labels: list[int] | None,
                            cfg: SAEClassifierConfig) -> dict[str, float]:
    """Held-out reconstruction BCE, and with labels: accuracy, macro F1 and per-class precision/recall/F1."""
    from sklearn.metrics import precision_recall_fscore_support

    x = torch.from_numpy(to_float(np.stack(images), "sigmoid"))
    logits, recon = [], []
    for chunk in x.split(256):
        lg, rc = model(chunk, return_reconstruction=True)
        logits.append(lg)
        recon.append(F.binary_cross_entropy_with_logits(rc, chunk, reduction="sum").item())
    metrics = {"recon_bce": sum(recon) / x.numel(), "num_eval_images": float(len(images))}
    if labels is None:
        return metrics
    predicted = torch.cat(logits).argmax(1).numpy()
    truth = np.asarray(labels)
    classes = list(range(cfg.num_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, labels=classes, zero_division=0)
    metrics["accuracy"] = float(np.mean(predicted == truth))
    present = np.isin(classes, truth)  # macro F1 over the classes the held-out set has
    metrics["macro_f1"] = float(f1[present].mean())
    for k in classes:
        metrics[f"precision_class_{k}"] = float(precision[k])
        metrics[f"recall_class_{k}"] = float(recall[k])
        metrics[f"f1_class_{k}"] = float(f1[k])
    return metrics


SAE_CLASSIFIER = ModelSpec(
    name="sae_classifier",
    config_cls=SAEClassifierConfig,
    task="classify",
    value_range="sigmoid",
    build=build_sae_classifier,
    init_training=init_sae_classifier,
    train_step=train_sae_classifier,
    sample_grid=sample_grid_sae_classifier,
    evaluate=evaluate_sae_classifier,
    in_channels=lambda cfg: cfg.channels,
    make_dataset=make_labelled_dataset,
)

"""Dense autoencoder from the seed documents, on [0, 1] images: 784 -> latent -> 784, optionally sparse (L1 or
KL activity penalty), or a 2-d latent plotted against PCA and t-SNE (with a k-NN accuracy for each).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from genray.images import make_grid, to_float, to_uint8
from genray.metrics import mean_psnr
from genray.models.layers import dense_stack
from genray.models.spec import ModelSpec, TrainState


NEAR_ZERO = 0.05  # a code entry with |h| below this counts as inactive in the sparsity metrics


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
        self.encoder = nn.Sequential(*dense_stack(sizes), _CODE_ACTIVATIONS[cfg.code_activation]())
        self.decoder = nn.Sequential(*dense_stack(sizes[::-1]))  # logits; sigmoid applied in forward

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


def build(cfg: DenseAEConfig) -> DenseAE:
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


def compute_losses(model: nn.Module, x: torch.Tensor, cfg: DenseAEConfig) -> dict[str, torch.Tensor]:
    """{'loss', 'recon_loss'[, 'sparsity_loss']} for x: (B, C, H, W) in [0, 1]; recon is per-pixel mean BCE."""
    logits, code = model(x, return_code=True)
    recon = F.binary_cross_entropy_with_logits(logits, x)
    if cfg.sparsity == "none":
        return {"loss": recon, "recon_loss": recon}
    penalty = cfg.sparsity_weight * sparsity_penalty(code, cfg)
    return {"loss": recon + penalty, "recon_loss": recon, "sparsity_loss": penalty}


def init_training(cfg: DenseAEConfig, lr: float) -> TrainState:
    model = build(cfg)
    return TrainState(modules={"model": model}, optimizers={"model": torch.optim.Adam(model.parameters(), lr=lr)},
                      cfg=cfg)


def train_step(state: TrainState, batch) -> dict[str, float]:
    x = batch if torch.is_tensor(batch) else batch[0]  # labelled data yields (image, label); labels unused
    losses = compute_losses(state.modules["model"], x, state.cfg)
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


def sample_grid(modules: dict[str, nn.Module], batch, cfg: DenseAEConfig) -> np.ndarray:
    return reconstruction_grid(modules["model"], batch)


@torch.no_grad()
def evaluate(model: nn.Module, images: list[np.ndarray], labels: list[int] | None,
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
    metrics = {
        "recon_mse": F.mse_loss(recon, x).item(),
        "psnr_recon_db": mean_psnr(x.numpy(), recon.numpy(), 1.0),
        "code_mean_activation": code.abs().mean().item(),
        "code_near_zero_fraction": (code.abs() < NEAR_ZERO).float().mean().item(),
        "num_eval_images": float(len(images)),
    }
    embedded = embeddings(model, images, cfg)
    if embedded and labels is not None:
        for name, points in embedded.items():
            accuracy = knn_accuracy(points, labels)
            if accuracy is not None:
                metrics[f"knn_accuracy_{name}"] = accuracy
    return metrics


KNN_NEIGHBOURS, KNN_FOLDS = 5, 5


def embeddings(model: nn.Module, images: list[np.ndarray], cfg: DenseAEConfig) -> dict[str, np.ndarray]:
    """With a 2-d latent: the held-out images in 2-d three ways — the autoencoder's code, PCA and t-SNE of the
    pixels (scikit-learn, fixed seeds) — so the learned embedding has two classical ones to be compared with."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if cfg.latent_dim != 2 or len(images) < 2:
        return {}
    x = torch.from_numpy(to_float(np.stack(images), "sigmoid"))
    if tuple(x.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
        return {}  # one code per image only when an image is one block
    pixels = x.flatten(1).numpy()
    with torch.no_grad():
        codes = model.encode(x).numpy()
    perplexity = min(30.0, (len(images) - 1) / 3)  # sklearn requires perplexity < n_samples
    return {"autoencoder": codes,
            "pca": PCA(n_components=2, random_state=0).fit_transform(pixels),
            "tsne": TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(pixels)}


def knn_accuracy(points: np.ndarray, labels: list[int]) -> float | None:
    """How well an embedding keeps classes apart, as one number: the accuracy of a 5-nearest-neighbour
    classifier on the 2-d points, stratified 5-fold cross-validated (None when a class has too few images)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    counts = np.bincount(np.asarray(labels))
    folds = min(KNN_FOLDS, int(counts[counts > 0].min()))
    if folds < 2 or len(labels) <= KNN_NEIGHBOURS * 2:
        return None
    scores = cross_val_score(KNeighborsClassifier(KNN_NEIGHBOURS), points, labels,
                             cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    return float(scores.mean())


_TITLES = {"autoencoder": "autoencoder 2-d code", "pca": "PCA, 2 components", "tsne": "t-SNE of the pixels"}


def _embedding_png(embedded: dict[str, np.ndarray], labels: list[int] | None) -> bytes:
    """The embeddings side by side, coloured by label, each titled with its k-NN accuracy when labels exist."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    colour = {"c": labels, "cmap": "tab10"} if labels is not None else {}
    fig, axes = plt.subplots(1, len(embedded), figsize=(5.5 * len(embedded), 5), dpi=100)
    for ax, (name, points) in zip(axes, embedded.items()):
        scatter = ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.8, **colour)
        accuracy = knn_accuracy(points, labels) if labels is not None else None
        ax.set_title(_TITLES[name] + (f"\n{KNN_NEIGHBOURS}-NN accuracy {accuracy:.1%}" if accuracy is not None else ""))
        ax.grid(alpha=0.3)
    if labels is not None:
        fig.legend(*scatter.legend_elements(), title="label", loc="center right")
    fig.suptitle(f"held-out images ({len(next(iter(embedded.values())))})")
    fig.tight_layout(rect=(0, 0, 0.94, 0.95))  # room for the suptitle and the legend
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@torch.no_grad()
def extra_outputs(model: nn.Module, images: list[np.ndarray], labels: list[int] | None,
                  cfg: DenseAEConfig) -> dict[str, bytes]:
    """With a 2-d latent: {'embedding.png': the held-out images' codes next to their PCA and t-SNE embeddings}."""
    embedded = embeddings(model, images, cfg)
    return {"embedding.png": _embedding_png(embedded, labels)} if embedded else {}


SPEC = ModelSpec(
    name="dense_ae",
    config_cls=DenseAEConfig,
    task="reconstruct",
    value_range="sigmoid",
    build=build,
    init_training=init_training,
    train_step=train_step,
    sample_grid=sample_grid,
    evaluate=evaluate,
    in_channels=lambda cfg: cfg.channels,
    extra_outputs=extra_outputs,
    code_size=lambda cfg: cfg.latent_dim,
    size_multiple=28,  # tiles of the Predictor fall on block boundaries for the default image_size
)

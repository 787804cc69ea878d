"""Stacked-autoencoder classifier from the seed documents, on [0, 1] images: a dense encoder pretrained as an
autoencoder, then a softmax head on its code.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from genray.images import make_grid, to_float, to_uint8
from genray.models.data import image_tensor_dataset
from genray.models.layers import dense_stack
from genray.models.spec import ModelSpec, TrainState


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
        self.encoder = nn.Sequential(*dense_stack(sizes), nn.ReLU())  # (B, latent_dim)
        self.decoder = nn.Sequential(*dense_stack(sizes[::-1]))  # (B, C*S*S) logits
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


def build(cfg: SAEClassifierConfig) -> SAEClassifier:
    return SAEClassifier(cfg)


def make_dataset(images: list[np.ndarray], labels: list[int] | None, cfg: SAEClassifierConfig):
    """(image, label) items; a classifier cannot train on unlabelled images."""
    if labels is None:
        raise ValueError("sae_classifier needs labelled images: keys laid out as <split>/<label>/<file>.png, "
                         "e.g. from `genray data export digits`")
    bad = sorted({label for label in labels if not 0 <= label < cfg.num_classes})
    if bad:
        raise ValueError(f"labels {bad[:5]} are outside 0..{cfg.num_classes - 1} (model.num_classes)")
    return image_tensor_dataset(images, "sigmoid", labels)


def init_training(cfg: SAEClassifierConfig, lr: float) -> TrainState:
    """One optimizer per phase: the autoencoder's (encoder + decoder) and the classifier's (head, plus the
    encoder unless frozen). A frozen encoder is simply left out of the second."""
    model = build(cfg)
    classify = [*model.head.parameters(), *([] if cfg.freeze_encoder else model.encoder.parameters())]
    optimizers = {
        "pretrain": torch.optim.Adam([*model.encoder.parameters(), *model.decoder.parameters()], lr=lr),
        "classify": torch.optim.Adam(classify, lr=lr),
    }
    return TrainState(modules={"model": model}, optimizers=optimizers, cfg=cfg)


def train_step(state: TrainState, batch) -> dict[str, float]:
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
def sample_grid(modules: dict[str, nn.Module], batch, cfg: SAEClassifierConfig) -> np.ndarray:
    """Rows: originals / the autoencoder's reconstructions."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    _, recon_logits = modules["model"](x, return_reconstruction=True)
    tiles = [img for row in (x, torch.sigmoid(recon_logits)) for img in to_uint8(row.cpu().numpy(), "sigmoid")]
    return make_grid(tiles, nrow=len(x))


@torch.no_grad()
def evaluate(model: nn.Module, images: list[np.ndarray], labels: list[int] | None,
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


SPEC = ModelSpec(
    name="sae_classifier",
    config_cls=SAEClassifierConfig,
    task="classify",
    value_range="sigmoid",
    build=build,
    init_training=init_training,
    train_step=train_step,
    sample_grid=sample_grid,
    evaluate=evaluate,
    in_channels=lambda cfg: cfg.channels,
    make_dataset=make_dataset,
    image_size=lambda cfg: cfg.image_size,
    code_size=lambda cfg: cfg.latent_dim,
)

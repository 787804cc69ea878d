"""Fréchet distance (Heusel et al. 2017, "FID") on Inception v3 features, or on a small digits classifier.

Paper-comparable FID uses Inception v3's 2048-d pool features; its weights need a download, so genray takes them
from an explicit URI (local or s3://, a copy of torchvision's file, as `vgg_weights` for VGG19). Without one, the
digits classifier here trains in seconds on the embedded digits, so generators of 28x28x1 images still get a
comparable number offline. No Ray here.
"""
from __future__ import annotations

import functools
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from genray import storage
from genray.images import to_float

CACHE_FILE = "digits_classifier_v2.pt"  # bump the version when the architecture or the training recipe changes
NUM_FEATURES = 128
_SEED, _EPOCHS, _BATCH_SIZE, _MAX_LR = 0, 20, 64, 6e-3  # one-cycle schedule: ~99% test accuracy


class DigitsClassifier(nn.Module):
    """Two stride-2 convs and a 128-unit hidden layer; (B, 1, 28, 28) in [0, 1] -> 10 logits."""

    def __init__(self):
        super().__init__()
        # Pre-activation hidden units are the FID features: after the ReLU many are exactly 0, which makes the
        # feature covariance singular and the distance less informative.
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # (B, 32, 7, 7)
            nn.Flatten(), nn.Linear(32 * 7 * 7, NUM_FEATURES),  # (B, 128)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(NUM_FEATURES, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _as_tensor(images) -> torch.Tensor:
    """uint8 (N, 28, 28, 1) array or list of (28, 28, 1) -> float (N, 1, 28, 28) in [0, 1]."""
    array = np.stack([np.asarray(im) for im in images]) if isinstance(images, (list, tuple)) else np.asarray(images)
    if array.ndim != 4 or array.shape[1:] != (28, 28, 1) or array.dtype != np.uint8:
        raise ValueError(f"the digits classifier needs uint8 (N, 28, 28, 1) images, got {array.dtype} {array.shape}")
    return torch.from_numpy(to_float(array, "sigmoid"))


def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from genray.datasets import load_embedded

    images, labels, keys = load_embedded("digits")
    chosen = [i for i, key in enumerate(keys) if key.startswith(split + "/")]
    return _as_tensor([images[i] for i in chosen]), torch.tensor([labels[i] for i in chosen])


def train_digits_classifier() -> DigitsClassifier:
    """Train on the embedded digits' train split, seeded, on CPU, without touching the global RNG (~5 s CPU)."""
    x, y = _split("train")  # (1437, 1, 28, 28), (1437,)
    threads = torch.get_num_threads()
    # One thread: the same float sums on every machine, and small convs run fastest that way anyway.
    torch.set_num_threads(1)
    try:
        # enable_grad: the first caller is often a no_grad feature extraction.
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(_SEED)
            model = DigitsClassifier()
            opt = torch.optim.Adam(model.parameters(), lr=_MAX_LR / 3)
            steps_per_epoch = -(-len(x) // _BATCH_SIZE)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, _MAX_LR, total_steps=_EPOCHS * steps_per_epoch)
            for _ in range(_EPOCHS):
                for idx in torch.randperm(len(x)).split(_BATCH_SIZE):
                    # Shifts of up to 1 pixel: generated digits are not all perfectly centred.
                    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,)))
                    loss = F.cross_entropy(model(torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _cache_path() -> str:
    cache_dir = os.path.expanduser(os.environ.get("GENRAY_CACHE_DIR", "~/.cache/genray"))
    return os.path.join(cache_dir, CACHE_FILE)


@functools.lru_cache(maxsize=1)
def digits_classifier() -> nn.Module:
    """The trained classifier (eval mode, CPU), from this process, the disk cache, or trained now and cached."""
    path = _cache_path()
    model = DigitsClassifier()
    if os.path.isfile(path):
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval().requires_grad_(False)
        except (RuntimeError, OSError, EOFError, KeyError):
            pass  # a truncated or stale file: train again and overwrite it
    model = train_digits_classifier()
    try:  # write then rename, so a concurrent reader never sees half a file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(model.state_dict(), f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still gets a working classifier, just not a cached one
    return model.requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(images, labels) -> float:
    model = digits_classifier()
    logits = torch.cat([model(chunk) for chunk in _as_tensor(images).split(512)])
    return float((logits.argmax(1) == torch.as_tensor(labels)).float().mean())


@torch.no_grad()
def classifier_features(images) -> np.ndarray:
    """uint8 (N, 28, 28, 1) images -> float64 (N, 128) penultimate-layer features (before its ReLU)."""
    model = digits_classifier()
    feats = [model.features(chunk) for chunk in _as_tensor(images).split(512)]
    return torch.cat(feats).double().numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½) between Gaussians fitted to two (N, D) feature sets.

    Tr (S_a S_b)^½ is the sum of the square roots of the eigenvalues of S_a S_b. With fewer samples than
    dimensions (Inception's 2048 features, a few hundred images) those are, exactly, the squared singular values of
    the small Na x Nb matrix X_a X_b^T / sqrt((Na-1)(Nb-1)) of centred features: an SVD of that costs milliseconds
    where scipy's sqrtm of a 2048 x 2048 product takes ~20 s, and it never meets a singular matrix. Otherwise, as
    in the reference FID code: sqrtm, with eps added to both diagonals if the root is not finite; tiny imaginary
    parts from numerical error are dropped."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of one D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    diff = mu_a - mu_b
    if min(len(a), len(b)) < a.shape[1]:
        xa, xb = a - mu_a, b - mu_b
        scale = (len(a) - 1) * (len(b) - 1)
        trace_a, trace_b = (xa * xa).sum() / (len(a) - 1), (xb * xb).sum() / (len(b) - 1)
        trace_covmean = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(scale)
        distance = diff @ diff + trace_a + trace_b - 2.0 * trace_covmean
        return float(max(distance, 0.0))
    sigma_a, sigma_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # "matrix is singular": handled below, as the reference code does
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma_a)) * eps
            covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = np.real(covmean)
    distance = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
    return float(max(distance, 0.0))  # identical sets give ~-1e-12 from rounding, never a real negative


def frechet_distance_images(a, b) -> float:
    """Fréchet distance between two sets of uint8 (N, 28, 28, 1) images on the digits classifier's features."""
    return frechet_distance(classifier_features(a), classifier_features(b))


# ---------------------------------------------------------------------------------------------- Inception

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's file for Inception_V3_Weights.IMAGENET1K_V1
INCEPTION_SIDE, INCEPTION_FEATURES = 299, 2048


class InceptionWeightsError(RuntimeError):
    """No usable Inception v3 weights (none given, unreadable, or not an Inception v3 state_dict)."""


def inception_state(weights_uri: str | None, allow_download: bool = False) -> tuple[dict, str]:
    """(Inception v3 state_dict, where it came from): the URI -> torchvision's cache -> download (if allowed)."""
    import io

    if weights_uri:
        try:
            data = storage.read_bytes(weights_uri)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), weights_uri
        except storage.StorageError as err:
            raise InceptionWeightsError(f"Inception weights {weights_uri}: {err}") from None
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise InceptionWeightsError(f"{weights_uri}: not an Inception v3 state_dict ({type(err).__name__})") from None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if os.path.isfile(cached):
        return torch.load(cached, map_location="cpu", weights_only=True), cached
    if allow_download:
        try:
            from torchvision.models import Inception_V3_Weights

            return Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=False), "torchvision download"
        except Exception as err:  # noqa: BLE001 - offline machines fail in many ways
            raise InceptionWeightsError(f"Inception v3 download failed ({type(err).__name__})") from None
    raise InceptionWeightsError(
        f"no Inception weights: give a local or s3:// copy of torchvision's {INCEPTION_FILE} "
        "(--inception-weights URI), or put it in torchvision's cache")


@functools.lru_cache(maxsize=2)
def inception_model(weights_uri: str | None, allow_download: bool = False) -> nn.Module:
    """torchvision's Inception v3 with the classifier removed: forward gives the 2048-d pool features."""
    from torchvision.models import inception_v3

    state, source = inception_state(weights_uri, allow_download)
    # transform_input=True: as torchvision's pretrained model, which takes ImageNet-normalised input and converts
    # it to the [-1, 1] scaling the original Google weights were trained with.
    model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InceptionWeightsError(f"{source}: not an Inception v3 state_dict "
                                    f"({str(err).splitlines()[0]})") from None
    model.fc = nn.Identity()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def inception_features(images, weights_uri: str | None, allow_download: bool = False,
                       batch_size: int = 32) -> np.ndarray:
    """uint8 (N, H, W, C) images (C = 1 or 3, any size) -> float64 (N, 2048) Inception v3 pool features, after a
    bilinear resize to 299x299 and ImageNet normalisation (grey images as three equal channels)."""
    from genray.models.vgg import IMAGENET_MEAN, IMAGENET_STD

    array = np.stack([np.asarray(im) for im in images]) if isinstance(images, (list, tuple)) else np.asarray(images)
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or array.dtype != np.uint8:
        raise ValueError(f"Inception features need uint8 (N, H, W, 1 or 3) images, got {array.dtype} {array.shape}")
    model = inception_model(weights_uri, allow_download)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    feats = []
    for start in range(0, len(array), batch_size):  # one batch of 299x299 inputs in memory at a time
        x = torch.from_numpy(array[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x.expand(-1, 3, -1, -1), size=(INCEPTION_SIDE, INCEPTION_SIDE), mode="bilinear",
                          align_corners=False)
        feats.append(model((x - mean) / std))
    return torch.cat(feats).double().numpy()

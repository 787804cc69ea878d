"""The model registry: every family genray can train, bulk-run and serve, written out by hand.

CLI choices, config validation and the test battery all derive from MODELS. This package never imports ray.
"""
from __future__ import annotations

from genray.models import autoencoder
from genray.models import denoiser, srgan
from genray.models import style
from genray.models import vae
from genray.models import dcgan
from genray.models.spec import ModelSpec, TrainState

MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    MODELS[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model family {name!r}; valid families: {', '.join(sorted(MODELS))}") from None


register_model(autoencoder.DENOISE_AE)
register_model(srgan.SRGAN)
register_model(denoiser.PHOTO_DENOISER)
register_model(style.STYLE_NET)
register_model(vae.VAE_SPEC)
register_model(autoencoder.DENSE_AE)
register_model(autoencoder.SAE_CLASSIFIER)
register_model(dcgan.DCGAN)

__all__ = ["MODELS", "ModelSpec", "TrainState", "get_spec", "register_model"]

"""The model registry: every family genray can train, bulk-run and serve, written out by hand.

CLI choices, config validation, evaluation, serving and the test battery all derive from MODELS: adding a family
is one file (its config with `tiny()`, networks, `train_step`, `SPEC`) and one line below. Never imports ray.
"""
from __future__ import annotations

from genray.models import dcgan, denoise_ae, dense_ae, photo_denoiser, sae_classifier, srgan, style_net, vae
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


register_model(denoise_ae.SPEC)
register_model(dense_ae.SPEC)
register_model(sae_classifier.SPEC)
register_model(vae.SPEC)
register_model(dcgan.SPEC)
register_model(srgan.SPEC)
register_model(photo_denoiser.SPEC)
register_model(style_net.SPEC)

__all__ = ["MODELS", "ModelSpec", "TrainState", "get_spec", "register_model"]

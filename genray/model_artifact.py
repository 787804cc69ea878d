"""Model artefacts: `<uri>/weights.pt` (a state_dict) + `<uri>/model.json` (family, config, metrics, digest).

The digest covers the weights and the model config, so the bulk jobs can tell "same model" from "new model".
Weights are only ever loaded with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Any

import torch
from torch import nn

from genray import __version__, storage
from genray.models import ModelSpec, get_spec

WEIGHTS_FILE = "weights.pt"
META_FILE = "model.json"


class ArtifactError(ValueError):
    """The URI does not hold a usable genray model artefact; the message says why."""


def compute_digest(weights: bytes, family: str, model_config: dict[str, Any]) -> str:
    h = hashlib.sha256(weights)
    h.update(json.dumps({"family": family, "config": model_config}, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def provenance(name: str, meta: dict[str, Any]) -> dict[str, str]:
    """What an output of this artefact carries so it can be traced to the model that made it: its name (the Serve
    endpoint, style or model URI), family and digest, and the genray version that ran it. Written into images by
    genray.images.encode_image (PNG text chunks / XMP) and sent by Serve as X-Genray-* headers."""
    return {"genray:model": name, "genray:model-family": meta["family"], "genray:model-digest": meta["digest"],
            "genray:version": __version__}


def save_artifact(
    uri: str, spec: ModelSpec, cfg: Any, model: nn.Module, metrics: dict[str, float], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write weights.pt and model.json under `uri`; returns the model.json content."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, buf)
    weights = buf.getvalue()
    model_config = cfg.model_dump(mode="json")
    meta = {
        "family": spec.name,
        "task": spec.task,
        "value_range": spec.value_range,
        "config": model_config,
        "metrics": metrics,
        "digest": compute_digest(weights, spec.name, model_config),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "genray_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    # Weights first, model.json last: a reader that finds model.json finds matching weights.
    storage.write_bytes(storage.join_uri(uri, WEIGHTS_FILE), weights)
    storage.write_bytes(storage.join_uri(uri, META_FILE), json.dumps(meta, indent=2).encode())
    return meta


def _resolve(uri: str) -> str:
    """A zoo:<name> URI names a model shipped in the package (genray/zoo); any other URI is storage's."""
    from genray import zoo

    try:
        return zoo.resolve(uri)
    except zoo.ZooError as err:
        raise ArtifactError(str(err)) from None


def read_meta(uri: str) -> dict[str, Any]:
    uri = _resolve(uri)
    try:
        raw = storage.read_bytes(storage.join_uri(uri, META_FILE))
    except storage.StorageError as err:
        raise ArtifactError(f"{uri}: not a genray model artefact (cannot read {META_FILE}: {err})") from None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ArtifactError(f"{uri}: {META_FILE} is not valid JSON") from None
    if not isinstance(meta, dict) or not {"family", "config", "digest"} <= meta.keys():
        raise ArtifactError(f"{uri}: {META_FILE} lacks family/config/digest; not a genray model artefact")
    return meta


def load_artifact(uri: str, device: str | torch.device = "cpu") -> tuple[ModelSpec, Any, nn.Module, dict[str, Any]]:
    """(spec, model config, model in eval mode on `device`, model.json) for the artefact at `uri`."""
    uri = _resolve(uri)
    meta = read_meta(uri)
    try:
        spec = get_spec(meta["family"])
        cfg = spec.config_cls.model_validate(meta["config"])
    except ValueError as err:
        raise ArtifactError(f"{uri}: {err}") from None
    try:
        weights = storage.read_bytes(storage.join_uri(uri, WEIGHTS_FILE))
    except storage.StorageError as err:
        raise ArtifactError(f"{uri}: cannot read {WEIGHTS_FILE}: {err}") from None
    if compute_digest(weights, spec.name, meta["config"]) != meta["digest"]:
        raise ArtifactError(f"{uri}: {WEIGHTS_FILE} does not match the digest in {META_FILE} (corrupt or mixed artefact)")
    try:
        state = torch.load(io.BytesIO(weights), map_location=device, weights_only=True)
        model = spec.build(cfg)
        model.load_state_dict(state)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError with long texts; keep the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"{uri}: weights do not load into a {spec.name} model: {first}") from None
    return spec, cfg, model.to(device).eval(), meta

"""The model zoo shipped with genray: artefacts trained by the project's own CPU configs (scripts/build_zoo.py),
committed under genray/zoo/<name>/ with an index (index.json) of their configs, digests, sizes and held-out metrics.

`zoo:<name>` is a model URI like any other (`--model zoo:srresnet-x4`, Serve configs, pipelines, `genray eval`):
it names the artefact folder inside the installed package, so it works without training or network, on a
cluster too (the package travels with the job's working_dir or the image's install).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEME = "zoo:"
ROOT = Path(__file__).resolve().parent
INDEX_FILE = ROOT / "index.json"


class ZooError(ValueError):
    """A zoo: URI that names no shipped model."""


@lru_cache(maxsize=1)
def index() -> dict[str, dict[str, Any]]:
    """name -> entry (family, task, config, config_digest, digest, bytes, metrics, headline), as build_zoo wrote."""
    if not INDEX_FILE.exists():
        return {}
    return json.loads(INDEX_FILE.read_text())["models"]


def is_zoo(uri: str) -> bool:
    return uri.startswith(SCHEME)


def resolve(uri: str) -> str:
    """'zoo:srresnet-x4' -> the artefact folder in the package; any other URI unchanged."""
    if not is_zoo(uri):
        return uri
    name = uri[len(SCHEME):].strip("/")
    if name not in index():
        known = ", ".join(sorted(index())) or "none (genray/zoo/index.json is missing)"
        raise ZooError(f"{uri}: no such model in genray's zoo (shipped: {known}; `genray zoo list` shows them)")
    return str(ROOT / name)


def table() -> str:
    """`genray zoo list`: one line per model with its task, size and headline held-out metric."""
    rows = [("name", "task", "family", "size", "held-out metric")]
    for name, entry in sorted(index().items()):
        rows.append((f"zoo:{name}", entry["task"], entry["family"], f"{entry['bytes'] / 1e6:.2f} MB", entry["headline"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def held_out_metrics(model_uri: str, config: str | Path, data_root: str) -> dict[str, float]:
    """Evaluate the model at `model_uri` on the held-out split of its training `config`, read from `data_root`
    (where `genray data export` wrote the embedded datasets: <data_root>/digits/test/...). What
    scripts/build_zoo.py records for the shipped weights and tests/test_zoo.py re-measures, in a source checkout."""
    from genray.config import load_config
    from genray.datasets import read_images
    from genray.model_artifact import load_artifact

    spec, model_cfg, model, _ = load_artifact(model_uri)
    cfg = load_config(config)
    held_out = cfg.data.held_out_uri.replace("s3://genray-data/", f"{data_root.rstrip('/')}/")
    images, labels, _ = read_images(held_out, spec.in_channels(model_cfg), cfg.data)
    return spec.evaluate(model, images, labels, model_cfg)

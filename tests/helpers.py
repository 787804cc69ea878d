"""Helpers the tests share (fixtures live in conftest.py): the real CLI as a subprocess, tiny artefacts and
configs, the manifest of a bulk job, crafted image bytes, the local multi-node cluster script."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
from PIL import Image

from genray import storage
from genray.images import encode_png
from genray.runtime import free_port  # noqa: F401  (re-exported: tests import it from here)

GENRAY = str(Path(sys.executable).with_name("genray"))


REPO = str(Path(__file__).resolve().parent.parent)


def genray(*args: str, env: dict | None = None, drop: tuple[str, ...] = (), timeout: float = 300
           ) -> subprocess.CompletedProcess:
    """The installed `genray` command run as a subprocess from the repository root, output captured; `env` adds
    to this process's environment, `drop` removes variables from it."""
    full = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop}
    return subprocess.run([GENRAY, *args], capture_output=True, text=True, timeout=timeout, env=full, cwd=REPO)


def read_manifest_table(output_uri: str):
    """A bulk job's whole manifest as one Arrow table, read as users read it (pyarrow.dataset)."""
    fs, path = storage.pyarrow_filesystem(f"{output_uri}/_manifest")
    return pds.dataset(path, filesystem=fs, format="parquet").to_table()


def tiny_train_config(digits_uri: str, output_uri: str, name: str = "tiny", **train):
    """configs/tiny/denoise_ae.yaml pointed at the test digits and `output_uri`."""
    from genray.config import load_config

    overrides = [f"data.uri={digits_uri}/train/", f"data.held_out_uri={digits_uri}/test/",
                 f"output_uri={output_uri}", f"name={name}", "data.limit=null"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config("configs/tiny/denoise_ae.yaml", overrides)


def save_untrained_artifact(uri: str, family: str, seed: int = 0, **options) -> str:
    """A model artefact of the family's tiny config with seeded random weights (bulk-job plumbing does not
    depend on what the weights learned). Returns the URI."""
    import torch

    from genray.model_artifact import save_artifact
    from genray.models import get_spec

    spec = get_spec(family)
    cfg = spec.config_cls.tiny().model_copy(update=options)
    torch.manual_seed(seed)
    save_artifact(uri, spec, cfg, spec.build(cfg).eval(), {})
    return uri


def image_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    """`image` saved in `fmt` (Pillow's format name) with Pillow's save options."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with a correct CRC, for crafting PNGs whose header says what the test needs."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def load_ray_local():
    """cluster/local/ray_local.py as a module (it is a script, not part of the genray package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "cluster" / "local" / "ray_local.py"
    spec = importlib.util.spec_from_file_location("ray_local", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_history(output_uri: str) -> list[dict]:
    """A training run's metrics.jsonl as dicts, one per epoch ([] before the first epoch is written)."""
    if not storage.exists(f"{output_uri}/metrics.jsonl"):
        return []
    return [json.loads(line) for line in storage.read_bytes(f"{output_uri}/metrics.jsonl").decode().splitlines()]


def random_png(seed: int, size: int = 12) -> bytes:
    """A size x size RGB PNG of seeded noise."""
    return encode_png(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def tar_bytes(entries: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    """A tar with exactly these member names (unsafe ones included); an entry (name, b"") whose name starts with
    'LINK:' / 'HARD:' / 'DEV:' / 'FIFO:' becomes that kind of entry (a link's target is /etc/passwd)."""
    kinds = {"LINK": tarfile.SYMTYPE, "HARD": tarfile.LNKTYPE, "DEV": tarfile.CHRTYPE, "FIFO": tarfile.FIFOTYPE}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in entries:
            kind, sep, rest = name.partition(":")
            if sep and kind in kinds:
                info = tarfile.TarInfo(rest)
                info.type, info.linkname = kinds[kind], "/etc/passwd"
                tar.addfile(info)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def lose_the_rank1_node(cluster, epoch_record: dict, output_uri: str) -> tuple[list[str], int, str]:
    """Node loss in a training run on the local multi-node cluster (a ray_local.LocalCluster): `epoch_record`
    (a metrics.jsonl row) placed one worker on each worker node; kill the rank-1 worker's node (every process of
    it, at once), wait until Ray sees it dead, and add a fresh node. Returns (the node names ranks 0 and 1 were
    on, the last epoch written before the kill, the new node's name)."""
    names = cluster.names()
    placed = [names[n] for n in epoch_record["worker_nodes"]]
    assert sorted(placed) == cluster.workers()
    cluster.kill_node(placed[1])
    killed_after = read_history(output_uri)[-1]["epoch"]
    cluster.wait_dead(epoch_record["worker_nodes"][1])
    return placed, killed_after, cluster.add_node()

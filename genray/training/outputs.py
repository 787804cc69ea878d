"""What a run leaves in storage besides checkpoints: metrics.jsonl, loss.png, samples/ and progress.gif."""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from genray import storage
from genray.images import decode_image, encode_png

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
SAMPLES_DIR = "samples"


def write_metrics(output_uri: str, history: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    storage.write_bytes(storage.join_uri(output_uri, METRICS_FILE), lines.encode())


def write_sample_grid(output_uri: str, epoch: int, grid: np.ndarray) -> str:
    uri = storage.join_uri(output_uri, SAMPLES_DIR, f"epoch_{epoch:03d}.png")
    storage.write_bytes(uri, encode_png(grid))
    return uri


def write_loss_plot(output_uri: str, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    keys = sorted({k for row in history for k in row if k.startswith("loss") or k.endswith("_loss")})
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in keys:
        points = [(row["epoch"], row[key]) for row in history if key in row]
        ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(storage.join_uri(output_uri, LOSS_PLOT), buf.getvalue())


def write_progress_gif(output_uri: str, frame_ms: int = 500) -> str | None:
    """Animate samples/epoch_*.png into samples/progress.gif (as the seed notebooks do)."""
    import imageio.v3 as iio

    samples_uri = storage.join_uri(output_uri, SAMPLES_DIR)
    objects = [o for o in storage.list_objects(samples_uri, suffixes=(".png",)) if o.key.startswith("epoch_")]
    if not objects:
        return None
    frames = [decode_image(storage.read_bytes(o.uri), channels=3) for o in objects]
    buf = io.BytesIO()
    iio.imwrite(buf, np.stack(frames), extension=".gif", duration=frame_ms, loop=0)
    uri = storage.join_uri(samples_uri, "progress.gif")
    storage.write_bytes(uri, buf.getvalue())
    return uri

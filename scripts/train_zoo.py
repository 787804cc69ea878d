"""Train configs/train/*.yaml (or the ones named) against a local S3 server, as a user would on this machine,
and print a table of training time and final metrics per config (for the README's results table).

    .venv/bin/python scripts/train_zoo.py [configs/train/x.yaml ...] [--set train.epochs=1]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import genray  # noqa: F401  (first: importing genray sets Ray's local env before ray is imported)

from genray import storage  # noqa: E402
from genray.config import load_config  # noqa: E402
from genray.datasets import DATASETS, export_dataset, load_embedded  # noqa: E402
from genray.images import encode_png  # noqa: E402
from genray.s3server import LocalS3Server  # noqa: E402

STYLE_URI = "s3://genray-data/styles/starry.png"


def write_style_image() -> None:
    """A style image for the style configs: scikit-image's 'coffee' photo stands in for a painting offline."""
    images, _, keys = load_embedded("photos")
    image = dict(zip(keys, images)).get("train/coffee.png", images[0])
    storage.write_bytes(STYLE_URI, encode_png(image))


@contextlib.contextmanager
def local_storage_with_data():
    """A local S3 server (its settings in os.environ) holding every embedded dataset under s3://genray-data/<name>
    and an empty s3://genray-runs, as the configs expect."""
    with LocalS3Server() as s3:
        os.environ.update(s3.env())
        for bucket in ("s3://genray-data", "s3://genray-runs"):
            storage.ensure_bucket(bucket)
        for name in DATASETS:
            export_dataset(name, f"s3://genray-data/{name}")
        write_style_image()
        yield s3


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("configs", nargs="*", default=sorted(str(c) for c in Path("configs/train").glob("*.yaml")))
    p.add_argument("--set", action="append", default=[], help="override applied to every config")
    p.add_argument("--out", default="zoo-results.jsonl")
    args = p.parse_args(argv)

    from genray.runtime import init_ray
    from genray.training.trainer import run_training

    rows = []
    with local_storage_with_data():
        init_ray()
        for path in args.configs:
            cfg = load_config(path, args.set)
            started = time.perf_counter()
            try:
                result = run_training(cfg)
                row = {"config": path, "seconds": round(time.perf_counter() - started, 1), **result.metrics}
            except Exception as err:  # noqa: BLE001 - keep going, report the failure in the table
                row = {"config": path, "seconds": round(time.perf_counter() - started, 1), "error": str(err)[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{'config':<45} {'seconds':>8}  metrics")
    for row in rows:
        shown = {k: round(v, 4) for k, v in row.items() if isinstance(v, float) and k not in ("seconds",)
                 and not k.startswith(("epoch", "images_per", "f1_class"))}
        print(f"{row['config']:<45} {row['seconds']:>8}  {row.get('error') or shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

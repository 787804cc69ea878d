"""Train the zoo's configs against a local S3 server holding the embedded data, and ship each artefact under
genray/zoo/<name>/ (weights.pt + model.json) with an entry in genray/zoo/index.json: config and its digest, the
artefact's digest and size, and its held-out metrics (tests/test_zoo.py re-measures them).

Weights ship as float16 (half the bytes; they load into the float32 model unchanged), so the recorded metrics
are measured again on the shipped weights, not copied from training.

    .venv/bin/python scripts/build_zoo.py [name ...]            # train and ship all of ZOO or the named ones
    .venv/bin/python scripts/build_zoo.py --reship [name ...]   # no training: re-ship what genray/zoo holds
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from genray import storage
from genray.config import load_config, read_yaml
from genray.datasets import export_dataset
from genray.model_artifact import META_FILE, WEIGHTS_FILE, compute_digest
from genray.pipeline.stages import digest_of
from genray.zoo import INDEX_FILE, ROOT, held_out_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_zoo import local_storage_with_data  # noqa: E402  (scripts/ is not a package)

# name -> (training config, the held-out metric a user compares first, how to show it)
ZOO = {
    "srresnet-x4": ("configs/train/srresnet_photos_cpu.yaml", "psnr_y_gain_over_bicubic_db", "Y PSNR {psnr_y_sr_db:.2f} dB ({psnr_y_gain_over_bicubic_db:+.2f} dB over bicubic), photos x4"),
    "photo-denoiser-s25": ("configs/train/photo_denoiser_photos_cpu.yaml", "psnr_gain_db", "PSNR {psnr_noisy_db:.2f} -> {psnr_denoised_db:.2f} dB at sigma 25, photos"),
    "digits-denoise-ae": ("configs/train/denoise_ae_digits.yaml", "psnr_gain_db", "PSNR {psnr_noisy_db:.2f} -> {psnr_denoised_db:.2f} dB, digits"),
    "digits-classifier": ("configs/train/sae_classifier_digits.yaml", "accuracy", "accuracy {accuracy:.1%}, digits"),
    "digits-vae": ("configs/train/vae_digits.yaml", "neg_elbo", "negative ELBO {neg_elbo:.1f} nats, digits"),
    "digits-dcgan": ("configs/train/dcgan_digits.yaml", "fid", "Frechet distance {fid:.1f} on digits classifier features (real-vs-real {fid_real_floor:.1f})"),
}


def copy_artifact(name: str, model_uri: str) -> None:
    folder = ROOT / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in (WEIGHTS_FILE, META_FILE):  # weights first, model.json last, as save_artifact writes them
        (folder / file).write_bytes(storage.read_bytes(storage.join_uri(model_uri, file)))


def halve(folder: Path) -> None:
    """Rewrite weights.pt with float16 floating-point tensors (integers such as BatchNorm's counter stay) and
    model.json's digest to match. Idempotent."""
    meta = json.loads((folder / META_FILE).read_text())
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    buffer = io.BytesIO()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, buffer)
    weights = buffer.getvalue()
    meta["digest"] = compute_digest(weights, meta["family"], meta["config"])
    meta["weights_dtype"] = "float16"
    (folder / WEIGHTS_FILE).write_bytes(weights)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def ship(name: str, config: str, metric: str, headline: str, data_root: str) -> dict:
    """Halve the artefact in genray/zoo/<name>, measure it on the held-out data, and return its index entry."""
    folder = ROOT / name
    halve(folder)
    meta = json.loads((folder / META_FILE).read_text())
    trained = {k: v for k, v in meta["metrics"].items() if isinstance(v, (int, float))}
    metrics = {**trained, **held_out_metrics(str(folder), config, data_root)}
    return {"family": meta["family"], "task": meta["task"], "config": config,
            "config_digest": digest_of(read_yaml(config)), "digest": meta["digest"],
            "bytes": sum((folder / f).stat().st_size for f in (WEIGHTS_FILE, META_FILE)),
            "num_parameters": meta["num_parameters"], "metric": metric, "metrics": metrics,
            "headline": headline.format(**metrics)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", default=list(ZOO))
    p.add_argument("--reship", action="store_true", help="train nothing: re-ship the artefacts genray/zoo holds")
    args = p.parse_args(argv)
    unknown = set(args.names) - set(ZOO)
    if unknown:
        p.error(f"not in ZOO: {sorted(unknown)}")

    models = json.loads(INDEX_FILE.read_text())["models"] if INDEX_FILE.exists() else {}

    def record(name: str, data_root: str, seconds: float | None) -> None:
        config, metric, headline = ZOO[name]
        seconds = seconds if seconds is not None else models.get(name, {}).get("training_seconds")
        models[name] = {**ship(name, config, metric, headline, data_root), "training_seconds": seconds}
        print(json.dumps({name: models[name]}), flush=True)
        INDEX_FILE.write_text(json.dumps({"models": dict(sorted(models.items()))}, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as data_root:
        for dataset in ("digits", "photos"):
            export_dataset(dataset, f"{data_root}/{dataset}", split="test")
        if args.reship:
            for name in args.names:
                record(name, data_root, None)
            return 0
        from genray.runtime import init_ray
        from genray.training.trainer import run_training

        with local_storage_with_data():
            init_ray()
            for name in args.names:
                started = time.perf_counter()
                result = run_training(load_config(ZOO[name][0]))
                copy_artifact(name, result.model_uri)
                record(name, data_root, round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

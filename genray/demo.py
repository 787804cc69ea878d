"""`genray demo`: the whole flow on embedded data, on this machine, with nothing set up by hand.

local S3 server -> digits into S3 -> Ray Train (2 workers) -> model artefact -> Ray Data bulk denoise over S3
(with one corrupt file, then a rerun that skips; then over tar shards) -> Ray Serve -> a real HTTP request. A copy of what it made
lands in a local folder, because the S3 server keeps its buckets in memory and stops with the demo.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from genray import logs, storage
from genray.images import decode_image, encode_png, make_grid
from genray.runtime import free_port

DATA = "s3://genray-data"
RUNS = "s3://genray-runs"
NOISE_STD = 0.4  # the model's default training noise, on [0, 1] pixels
NUM_NOISY = 24


def _step(n: int, text: str) -> float:
    logs.progress(f"\n[{n}] {text}")
    return time.perf_counter()


def make_noisy_inputs(clean_uri: str, noisy_uri: str, count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Noisy copies of held-out digits (the bulk job's input) plus one corrupt file; returns (key, clean) pairs."""
    from genray.datasets import read_image_prefix

    images, keys = read_image_prefix(clean_uri, channels=1)  # 360 held-out digits: small
    step = max(1, len(images) // count)  # every step-th: all ten classes, not the first key's class only
    images, keys = images[::step][:count], keys[::step][:count]
    rng = np.random.default_rng(seed)
    pairs = []
    for image, key in zip(images, keys):
        noisy = np.clip(image + rng.normal(0, NOISE_STD * 255, image.shape), 0, 255).astype(np.uint8)
        storage.write_bytes(storage.join_uri(noisy_uri, key), encode_png(noisy))
        pairs.append((key, image))
    storage.write_bytes(storage.join_uri(noisy_uri, "corrupt.png"), b"\x89PNG\r\n\x1a\n this file is broken")
    return pairs


def before_after(noisy: list[np.ndarray], denoised: list[np.ndarray], clean: list[np.ndarray], n: int = 12,
                 zoom: int = 4) -> bytes:
    """Rows noisy / denoised / clean of the first n digits, enlarged (nearest) so 28-px digits can be seen."""
    tiles = [np.kron(image, np.ones((zoom, zoom, 1), np.uint8)) for row in (noisy, denoised, clean) for image in row[:n]]
    return encode_png(make_grid(tiles, nrow=min(n, len(noisy)), padding=4))


def run_demo(workdir: str = "genray-demo-output", epochs: int = 20) -> dict:
    from ray import serve
    import requests

    from genray.model_artifact import read_meta
    from genray.process.job import run_process_job
    from genray.config import ProcessConfig, TrainConfig
    from genray.datasets import export_dataset
    from genray.metrics import mean_psnr
    from genray.runtime import init_ray
    from genray.s3server import LocalS3Server
    from genray.serving.app import build_app
    from genray.training.trainer import run_training

    started = time.perf_counter()
    local = Path(workdir).resolve()
    local.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with LocalS3Server() as s3:
        t = _step(1, f"S3-compatible server on {s3.endpoint_url} (generated credentials, stopped at the end)")
        os.environ.update(s3.env())
        for bucket in (DATA, RUNS):
            storage.ensure_bucket(bucket)
        init_ray()
        import ray

        logs.progress(f"    local Ray, node IP {ray.util.get_node_ip_address()} (loopback only)")
        timings["start"] = time.perf_counter() - t

        t = _step(2, f"embedded digits -> {DATA}/digits/ (28x28 PNGs, train/ and test/)")
        written = export_dataset("digits", f"{DATA}/digits")
        logs.progress(f"    {len(written)} images")
        timings["export"] = time.perf_counter() - t

        t = _step(3, f"Ray Train: denoising autoencoder, 2 workers, {epochs} epochs, checkpoints in S3")
        cfg = TrainConfig.model_validate({
            "name": "demo_denoise_ae",
            "output_uri": f"{RUNS}/demo_denoise_ae",
            "model": {"family": "denoise_ae", "noise_std": NOISE_STD},
            "data": {"uri": f"{DATA}/digits/train/", "held_out_uri": f"{DATA}/digits/test/"},
            "train": {"epochs": epochs, "batch_size": 32, "lr": 2e-3, "checkpoint_every": max(1, epochs // 4)},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        })
        result = run_training(cfg)
        m = result.metrics
        logs.progress(f"    held-out PSNR: noisy {m['psnr_noisy_db']:.2f} dB -> "
                      f"denoised {m['psnr_denoised_db']:.2f} dB ({m['psnr_gain_db']:+.2f} dB)")
        timings["train"] = time.perf_counter() - t

        t = _step(4, f"Ray Data bulk job: {NUM_NOISY} noisy digits + 1 corrupt file -> {DATA}/denoised/")
        pairs = make_noisy_inputs(f"{DATA}/digits/test/", f"{DATA}/noisy", NUM_NOISY)
        job = ProcessConfig(task="denoise", input_uri=f"{DATA}/noisy", output_uri=f"{DATA}/denoised",
                            model_uri=result.model_uri, batch_size=8)
        summary = run_process_job(job, log=logs.progress)
        # One line, not `genray process`'s table: the demo shows the manifest's error row as the point.
        errors = "; ".join(f"{key}: {why}" for key, why in summary.errors)
        logs.progress(f"    {summary.counts['ok']} ok, {summary.counts['error']} error ({errors}) in "
                      f"{summary.seconds:.1f}s ({summary.images_per_s:.1f} images/s)")
        denoised = [decode_image(storage.read_bytes(f"{DATA}/denoised/{key}"), channels=1) for key, _ in pairs]
        clean = [image for _, image in pairs]
        noisy = [decode_image(storage.read_bytes(f"{DATA}/noisy/{key}"), channels=1) for key, _ in pairs]
        bulk_psnr = (mean_psnr(np.stack(clean), np.stack(noisy), 255), mean_psnr(np.stack(clean), np.stack(denoised), 255))
        logs.progress(f"    bulk outputs PSNR: noisy {bulk_psnr[0]:.2f} dB -> denoised {bulk_psnr[1]:.2f} dB")
        (local / "before_after.png").write_bytes(before_after(noisy, denoised, clean))
        rerun = run_process_job(job, log=lambda *_: None)
        logs.progress(f"    rerun of the same command: {rerun.counts['skipped']} skipped, "
                      f"{rerun.counts['ok']} processed again")
        # The same model over archives as they are stored: held-out digits as WebDataset shards, tar shards out.
        shards = export_dataset("digits", f"{DATA}/shards", split="test", output_format="tar", shard_size=100)
        pattern = f"{DATA}/shards/shard-{{000000..{len(shards) - 1:06d}}}.tar"
        tar_job = job.model_copy(update={"input_uri": pattern, "output_uri": f"{DATA}/denoised-shards",
                                         "output_format": "tar", "shard_size": 128})
        tar_summary = run_process_job(tar_job, log=lambda *_: None)
        out_shards = [o for o in storage.list_objects(tar_job.output_uri) if o.key.endswith(".tar")]
        logs.progress(f"    archives: {pattern} ({len(shards)} shards, images + .json labels) -> "
                      f"{tar_summary.counts['ok']} images in {len(out_shards)} output shards "
                      f"({tar_summary.images_per_s:.1f} images/s)")
        timings["bulk"] = time.perf_counter() - t

        t = _step(5, "Ray Serve: POST /denoise on 127.0.0.1")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"models": {"denoise": {"uri": result.model_uri}}}), name="genray", route_prefix="/")
        url = f"http://127.0.0.1:{port}/denoise"
        body = storage.read_bytes(f"{DATA}/noisy/{pairs[0][0]}")
        response = requests.post(url, data=body, headers={"content-type": "image/png"}, timeout=60)
        response.raise_for_status()
        served = decode_image(response.content, channels=1)
        bad = requests.post(url, data=b"not an image", timeout=60)
        logs.progress(f"    POST {url} ({len(body)} bytes PNG) -> {response.status_code} "
                      f"{response.headers['content-type']} {served.shape[1]}x{served.shape[0]}; "
                      f"a non-image body -> {bad.status_code} {bad.json()['detail']!r}")
        timings["serve"] = time.perf_counter() - t

        # [6] Keep a local copy: the in-memory S3 server goes away with the demo.
        storage.download_dir(cfg.output_uri, str(local / "run"))
        storage.download_dir(f"{DATA}/denoised", str(local / "denoised"))
        storage.download_dir(f"{DATA}/noisy", str(local / "noisy"))
        storage.download_dir(tar_job.output_uri, str(local / "denoised-shards"))
        (local / "served.png").write_bytes(response.content)
        serve.shutdown()
        import ray

        ray.shutdown()

    total = time.perf_counter() - started
    meta = read_meta(str(local / "run" / "model"))
    print(f"\n[6] done in {total:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}). "
          f"A copy of what the demo made is in {local}/:")
    for path, what in [
        ("run/model/", f"model artefact (weights.pt + model.json, digest {meta['digest'][:19]}...)"),
        ("run/checkpoints/", "Ray Train checkpoints"),
        ("run/samples/", "per-epoch noisy/denoised/clean grids and progress.gif"),
        ("run/metrics.jsonl, run/loss.png", "training metrics and loss curve"),
        ("noisy/, denoised/", "bulk job input and output PNGs"),
        ("denoised/_manifest/", "bulk job manifest (parquet, one row per input)"),
        ("denoised-shards/", "the same job over WebDataset shards: output shards and manifest"),
        ("served.png", "the image Ray Serve returned over HTTP"),
        ("before_after.png", "rows: noisy input, bulk job output, clean digit"),
    ]:
        print(f"    {path:<34} {what}")
    if logs.verbosity() < logs.VERBOSE:
        print(f"    {'Ray logs':<34} {logs.log_path()}")
    return {"seconds": total, "timings": timings, "metrics": result.metrics, "bulk_psnr": bulk_psnr,
            "counts": dict(summary.counts), "rerun_counts": dict(rerun.counts), "http_status": response.status_code,
            "bad_status": bad.status_code, "workdir": str(local)}

"""The same images as loose files and as WebDataset tar shards, through the same bulk job on a local S3 server: what
reading (and writing) archives costs or saves against one object per image, measured side by side in one run.

Workload: N (default 256) 64x64 crops of the embedded photos as PNGs, x4 super-resolution by a CPU-sized SRResNet
(32 features, 8 blocks, random init; as in bulk_superres.py) to 256x256, 2 model actors x 1 CPU, batches of 8.
The S3 server adds --latency-ms (default 40, as in bulk_superres.py) to every request: a real object store answers
small requests in tens of milliseconds, and per-request latency is what separates one object per image from shards.
- loose: the images as <prefix>/img_NNNNN.png, output one PNG per image (--output-format files).
- shards: the same PNGs in tar shards of --shard-size images, read through a brace pattern, output as tar shards
  (--output-format tar): the archives-as-stored path end to end. Also with PNG outputs (shards_files_out).
Each job is timed as the whole run_process_job call (listing, actor start, read, model, write, manifest); Ray is
started once before all jobs, and a first, untimed job warms up Ray Data. Jobs run in the order loose, shards,
shards->files, then again in reverse order; each figure is the mean of its two runs (machine drift cancels).
Prints one JSON line: {"shards_vs_loose": ..., "loose_images_per_s": ..., "shards_images_per_s": ..., ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import genray  # noqa: F401  (first: importing genray sets Ray's local env before ray is imported)

from genray import archives, storage  # noqa: E402
from genray.config import ProcessConfig  # noqa: E402
from genray.images import encode_png  # noqa: E402

if __package__:  # imported as benchmarks.bulk_archives
    from benchmarks import _common as common
else:  # run as a script: benchmarks/ is sys.path[0]
    import _common as common

MODEL_URI = f"{common.BUCKET}/models/srresnet"
LOOSE_URI = f"{common.BUCKET}/loose"
SHARDS_URI = f"{common.BUCKET}/shards"
WARM_URI = f"{common.BUCKET}/warm"


def upload(pngs: list[bytes], shard_size: int) -> str:
    """The PNGs as loose objects and as shards (same keys, same bytes); returns the shards' brace pattern."""
    for i, png in enumerate(pngs):
        storage.write_bytes(storage.join_uri(LOOSE_URI, f"img_{i:05d}.png"), png)
    writer = archives.ShardWriter(SHARDS_URI, max_samples=shard_size)
    for i, png in enumerate(pngs):
        writer.add([(f"img_{i:05d}.png", png)])
    writer.close()
    return f"{SHARDS_URI}/shard-{{000000..{len(writer.written) - 1:06d}}}.tar"


def run_job(name: str, input_uri: str, output_format: str, args, run: int) -> float:
    """images/s of the whole run_process_job call."""
    from genray.process import job

    cfg = ProcessConfig(task="superres", input_uri=input_uri, output_uri=f"{common.BUCKET}/out-{name}-{run}",
                        model_uri=MODEL_URI, batch_size=args.batch_size, forward_batch_size=1, concurrency=2,
                        cpus_per_actor=1.0, output_format=output_format, shard_size=args.shard_size)
    seconds, summary = common.timed(job.run_process_job, cfg, log=common.log)
    if summary.counts["ok"] != args.num_images or summary.counts["error"]:
        raise RuntimeError(f"job {name} did not process every image:\n{summary.table()}")
    common.log(f"{name} (run {run}): {args.num_images / seconds:.3f} images/s ({seconds:.1f} s)")
    return args.num_images / seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--size", type=int, default=64, help="side of the inputs (outputs are 4x)")
    p.add_argument("--shard-size", type=int, default=64, help="images per input and output shard")
    p.add_argument("--batch-size", type=int, default=8, help="images per bulk-job batch")
    p.add_argument("--latency-ms", type=float, default=40.0, help="added to every S3 request during the jobs")
    p.add_argument("--smoke-test", action="store_true", help="8 images of 16x16 in shards of 4, for CI")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.num_images, args.size, args.shard_size, args.batch_size = 8, 16, 4, 2

    load_at_start = os.getloadavg()[0]
    with common.local_s3(latency_ms=0) as s3:
        # [1] the same PNG bytes as loose objects and as shards, and the model artefact
        pngs = [encode_png(crop) for crop in common.lr_crops(args.num_images, args.size)]
        pattern = upload(pngs, args.shard_size)
        common.upload_pngs(WARM_URI, common.lr_crops(2, args.size))
        common.save_srresnet(MODEL_URI)
        s3.set_latency(args.latency_ms)  # from here on, storage behaves like a remote object store
        jobs = {"loose": (LOOSE_URI, "files"), "shards": (pattern, "tar"), "shards_files_out": (pattern, "files")}
        rates: dict[str, list[float]] = {name: [] for name in jobs}
        with common.local_ray(num_cpus=2):
            # [2] an untimed first job: Ray Data's one-off start-up, as in bulk_superres.py
            first = run_job("warm", WARM_URI, "files", argparse.Namespace(**{**vars(args), "num_images": 2}), 0)
            # [3] every job twice, in opposite orders
            for run, order in enumerate((list(jobs), list(reversed(jobs)))):
                for name in order:
                    rates[name].append(run_job(name, *jobs[name], args, run))
    mean = {name: sum(values) / len(values) for name, values in rates.items()}
    figures = {
        "shards_vs_loose": round(mean["shards"] / mean["loose"], 3),
        "loose_images_per_s": round(mean["loose"], 3),
        "shards_images_per_s": round(mean["shards"], 3),
        "shards_files_out_vs_loose": round(mean["shards_files_out"] / mean["loose"], 3),
        "shards_files_out_images_per_s": round(mean["shards_files_out"], 3),
        "runs_images_per_s": {name: [round(v, 3) for v in values] for name, values in rates.items()},
        "untimed_first_job_images_per_s": round(first, 3),
        "num_images": args.num_images, "size": args.size, "shard_size": args.shard_size,
        "batch_size": args.batch_size, "s3_latency_ms": args.latency_ms,
        "model": {"family": "srgan", **common.SRRESNET, "scale": 4, "weights": "random init"},
        "load_avg_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # at start and end
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])

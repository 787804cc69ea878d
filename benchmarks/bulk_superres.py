"""Bulk x4 super-resolution over a local S3 server: the Ray Data job against the model's forward-only ceiling and
against a naive one-image-at-a-time loop, measured side by side in one run.

Storage latency: a loopback S3 server answers in ~1 ms, a real object store in tens of milliseconds per small
request (AWS's S3 performance guide), and that wait is what separates a pipelined job from a sequential loop. So the
server adds --latency-ms (default 40) to every request while the naive loop and the bulk jobs run; the naive loop is
also timed at 0 ms, and the job's own overhead is visible against the ceiling (no storage at all).

Workload: N (default 256) 128x128 crops of the embedded photos as PNGs in S3, a CPU-sized SRResNet (32 features,
8 blocks, x4 -> 512x512 outputs) saved as a model artefact. Random-init weights: throughput does not depend on them.
- ceiling: Predictor forward only, in this process, on the already decoded images, torch threads = 2 = all
  cores, at the better of forward batches 1 and --batch-size (tried on 32 images; on this CPU 1 wins: a small
  batch's activations stay in cache); one warm-up batch untimed. Measured before and again after the bulk jobs:
  the ratios use the mean, and the two values show how much the machine drifted meanwhile. Also at 1 thread (what
  each of 2 one-CPU actors gets), and the ceiling of the 2x1 layout: two one-thread processes, each on half of the
  images, started together.
- naive: for each key, in this process with 2 threads: boto3 GET -> Pillow decode -> Predictor on the one image
  -> PNG encode -> boto3 PUT; per-stage times are reported too (where the time of a non-overlapped loop goes).
  At --latency-ms (the headline) and at 0 ms.
- bulk: genray.process.job.run_process_job over the S3 server at --latency-ms, for each actor layout in
  --layouts. Ray is started once before all jobs and not timed. Per layout:
  * wall: the whole run_process_job call for the N-image job, i.e. what a user waits for after `ray.init`:
    listing, model actor start + artefact load, read/decode/forward/encode/write, manifest. The headline ratios.
    The jobs read --batch-size images per batch and run the ceiling's forward batch size.
  * steady: marginal throughput (N - N/2) / (T(N) - T(N/2)) from a second job over the first N/2 keys: the fixed
    costs (actor start, model load, manifest) cancel, which is what a job of thousands of images sees.
Prints one JSON line: {"bulk_vs_ceiling": ..., "bulk_vs_naive": ..., "bulk_images_per_s": ..., ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import genray  # noqa: F401  (first: importing genray sets Ray's local env before ray is imported)

import torch  # noqa: E402

from genray import storage  # noqa: E402
from genray.config import ProcessConfig  # noqa: E402
from genray.images import decode_image, encode_png  # noqa: E402
from genray.inference import Predictor  # noqa: E402

if __package__:  # imported as benchmarks.bulk_superres
    from benchmarks import _common as common
else:  # run as a script: benchmarks/ is sys.path[0]
    import _common as common

MODEL_URI = f"{common.BUCKET}/models/srresnet"
INPUT_URI = f"{common.BUCKET}/in"
HALF_URI = f"{common.BUCKET}/in-half"  # the first half of the inputs, for the steady-state difference
WARM_URI = f"{common.BUCKET}/in-warm"  # 2 images for an untimed first job: Ray Data's one-off start-up
# Actor layouts of the bulk job on 2 cores: name -> (concurrency, cpus_per_actor). job.actor_cpus keeps 0.5
# CPU back for Ray Data (2x1: 0.75 CPU, 1 thread each; 1x2: 1.5 CPUs, 2 threads).
LAYOUTS = {"2x1": (2, 1.0), "1x2": (1, 2.0)}


def read_decoded(keys: list[str]) -> list:
    return [decode_image(storage.read_bytes(storage.join_uri(INPUT_URI, key))) for key in keys]


def measure_ceiling(predictor: Predictor, images: list, batch_size: int, threads: int) -> float:
    """Forward-only images/s of the Predictor on decoded images, in this process."""
    torch.set_num_threads(threads)
    predictor(images[:batch_size])  # warm-up: oneDNN picks its kernels on the first call of a shape
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        predictor(images[start:start + batch_size])
    return len(images) / (time.perf_counter() - started)


def measure_ceiling_processes(keys: list[str], batch_size: int, processes: int = 2) -> float:
    """Forward-only images/s of `processes` one-thread processes sharing the images, timed from the first start to
    the last finish: the ceiling of the 2x1 layout (no threads waiting on each other, as there are in one process)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--forward-child", str(batch_size)]
    children = [subprocess.Popen(cmd + keys[i::processes], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for i in range(processes)]
    try:
        for child in children:  # each has loaded the model and its images and made a warm-up call
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"forward child exited with {child.wait()}")
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        spans = [json.loads(child.stdout.readline()) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
    return len(keys) / (max(end for _, end in spans) - min(start for start, _ in spans))


def forward_child(batch_size: int, keys: list[str]) -> None:
    """Child of measure_ceiling_processes: prints 'ready', waits for a line on stdin, prints [start, end]."""
    torch.set_num_threads(1)
    predictor = Predictor.from_uri(MODEL_URI, device="cpu", batch_size=batch_size)
    images = read_decoded(keys)
    predictor(images[:batch_size])  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()  # wall clock: compared across processes
    for start in range(0, len(images), batch_size):
        predictor(images[start:start + batch_size])
    print(json.dumps([started, time.time()]), flush=True)


def measure_naive(predictor: Predictor, keys: list[str]) -> tuple[float, dict[str, float]]:
    """(images/s, mean ms per image and stage) of a sequential GET -> decode -> forward -> encode -> PUT loop."""
    torch.set_num_threads(2)
    client = storage.s3_client()  # boto3, as a hand-written script would use it
    bucket = INPUT_URI.removeprefix("s3://").split("/")[0]
    stages = dict.fromkeys(("get", "decode", "forward", "encode", "put"), 0.0)
    predictor([decode_image(client.get_object(Bucket=bucket, Key=f"in/{keys[0]}")["Body"].read())])  # warm-up
    started = time.perf_counter()
    for key in keys:
        t0 = time.perf_counter()
        data = client.get_object(Bucket=bucket, Key=f"in/{key}")["Body"].read()
        t1 = time.perf_counter()
        image = decode_image(data)
        t2 = time.perf_counter()
        out = predictor([image])[0]
        t3 = time.perf_counter()
        png = encode_png(out)
        t4 = time.perf_counter()
        client.put_object(Bucket=bucket, Key=f"out-naive/{key}", Body=png)
        t5 = time.perf_counter()
        for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[stage] += seconds
    images_per_s = len(keys) / (time.perf_counter() - started)
    return images_per_s, {stage: round(1000 * s / len(keys), 1) for stage, s in stages.items()}


def run_job(input_uri: str, output_uri: str, concurrency: int, cpus_per_actor: float, batch_size: int,
            forward_batch_size: int | None = None) -> tuple[float, dict]:
    """(seconds of the whole run_process_job call, the actor placement the pipeline derived from the config)."""
    from genray.process import job

    cfg = ProcessConfig(task="superres", input_uri=input_uri, output_uri=output_uri, model_uri=MODEL_URI,
                        batch_size=batch_size, forward_batch_size=forward_batch_size, concurrency=concurrency,
                        cpus_per_actor=cpus_per_actor)
    seconds, summary = common.timed(job.run_process_job, cfg, log=common.log)
    if summary.counts["ok"] == 0 or summary.counts["error"]:
        raise RuntimeError(f"bulk job {output_uri} did not process every image:\n{summary.table()}")
    cpus = job.actor_cpus(cfg)
    return seconds, {"actor_cpus": round(cpus, 2), "threads_per_actor": job.actor_threads(cpus)}


def measure_bulk(name: str, keys: list[str], batch_size: int, forward_batch_size: int) -> dict:
    """Wall and steady-state (marginal) images/s of the bulk job with one actor layout."""
    concurrency, cpus_per_actor = LAYOUTS[name]
    half = len(keys) // 2
    job = (concurrency, cpus_per_actor, batch_size, forward_batch_size)
    half_seconds, _ = run_job(HALF_URI, f"{common.BUCKET}/out-{name}-half", *job)
    seconds, placement = run_job(INPUT_URI, f"{common.BUCKET}/out-{name}", *job)
    # Noise larger than the work of the extra images (tiny smoke runs on a busy machine) makes it unmeasurable.
    steady = (len(keys) - half) / (seconds - half_seconds) if seconds > half_seconds else None
    return {
        "concurrency": concurrency, "cpus_per_actor": cpus_per_actor, **placement,
        "wall_images_per_s": round(len(keys) / seconds, 3), "wall_seconds": round(seconds, 2),
        "half_job_seconds": round(half_seconds, 2), "steady_images_per_s": steady and round(steady, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=256,
                   help="256 = 32 batches of 8 (the half job: 16), so both jobs split evenly over 2 actors; a "
                        "job's fixed cost (actor start, model load, manifest) is ~4 s of its wall time")
    p.add_argument("--size", type=int, default=128, help="side of the LR inputs (outputs are 4x)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per bulk-job batch (read, model call, write); the ceiling also tries it as the "
                        "forward batch, against 1")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--latency-ms", type=float, default=40.0,
                   help="added to every S3 request during the naive and bulk runs (0: loopback as it is)")
    p.add_argument("--smoke-test", action="store_true", help="4 images of 32x32, one layout, for CI")
    p.add_argument("--forward-child", nargs="+", help=argparse.SUPPRESS)  # BATCH KEY...: see forward_child
    args = p.parse_args(argv)
    if args.forward_child:  # the S3 variables come from the parent
        forward_child(int(args.forward_child[0]), args.forward_child[1:])
        return {}
    if args.smoke_test:
        args.num_images, args.size, args.batch_size, args.layouts = 4, 32, 2, args.layouts[:1]

    load_at_start = os.getloadavg()[0]  # the 1-minute load average: was the machine busy?
    with common.local_s3(latency_ms=0) as s3:
        # [1] inputs and the model artefact in S3
        keys = common.upload_pngs(INPUT_URI, common.lr_crops(args.num_images, args.size))
        common.upload_pngs(HALF_URI, common.lr_crops(args.num_images // 2, args.size))  # same seed: same crops
        common.upload_pngs(WARM_URI, common.lr_crops(2, args.size))
        common.save_srresnet(MODEL_URI)
        # [2] ceiling and naive loop in this process, before Ray starts any process that could compete for CPU
        predictor = Predictor.from_uri(MODEL_URI, device="cpu", batch_size=args.batch_size)
        images = read_decoded(keys)
        # The ceiling is the model's best forward speed: on a CPU a batch of 1 can beat a batch of 8 (its
        # activations stay in cache), so both are tried and the bulk jobs run their forward passes at the winner.
        by_forward_batch = {fb: measure_ceiling(predictor, images[:32], fb, threads=2)
                            for fb in sorted({1, args.batch_size})}
        forward_batch = max(by_forward_batch, key=by_forward_batch.get)
        ceiling_before = measure_ceiling(predictor, images, forward_batch, threads=2)
        ceiling_1_thread = measure_ceiling(predictor, images[:16], forward_batch, threads=1)
        ceiling_2x1 = measure_ceiling_processes(keys, forward_batch)
        naive_loopback, naive_loopback_ms = measure_naive(predictor, keys)
        s3.set_latency(args.latency_ms)  # from here on, storage behaves like a remote object store
        naive, naive_ms = measure_naive(predictor, keys)
        common.log(f"ceiling {ceiling_before:.3f} img/s at forward batch {forward_batch} {by_forward_batch} (1 thread "
                   f"{ceiling_1_thread:.3f}, 2 processes x 1 thread {ceiling_2x1:.3f}), "
                   f"naive {naive:.3f} img/s {naive_ms} at {args.latency_ms} ms, "
                   f"{naive_loopback:.3f} img/s {naive_loopback_ms} at 0 ms")
        # [3] the bulk job, for each actor layout
        with common.local_ray(num_cpus=2):
            # The session's first job also starts Ray Data's own actors and warms the worker pool: once per
            # cluster, not per job, so it is kept out of every layout's figures (as ray.init is).
            first_job_seconds, _ = run_job(WARM_URI, f"{common.BUCKET}/out-warm", 1, 1.0, 1)
            layouts = {name: measure_bulk(name, keys, args.batch_size, forward_batch) for name in args.layouts}
        for name, row in layouts.items():
            common.log(f"bulk {name}: {row}")
        ceiling_after = measure_ceiling(predictor, images, forward_batch, threads=2)
        ceiling = (ceiling_before + ceiling_after) / 2
    best = max(layouts, key=lambda name: layouts[name]["wall_images_per_s"])
    bulk, steady = layouts[best]["wall_images_per_s"], layouts[best]["steady_images_per_s"]
    figures = {
        "bulk_vs_ceiling": round(bulk / ceiling, 3),
        "bulk_vs_naive": round(bulk / naive, 3),
        "bulk_images_per_s": bulk,
        "ceiling_images_per_s": round(ceiling, 3),
        "ceiling_before_after_images_per_s": [round(ceiling_before, 3), round(ceiling_after, 3)],
        "naive_images_per_s": round(naive, 3),
        "s3_latency_ms": args.latency_ms,
        "naive_loopback_images_per_s": round(naive_loopback, 3),  # the same loop with 0 ms added
        "naive_loopback_vs_ceiling": round(naive_loopback / ceiling, 3),
        "bulk_best_layout": best,
        "bulk_steady_images_per_s": steady,
        "bulk_steady_vs_ceiling": steady and round(steady / ceiling, 3),
        "bulk_steady_vs_naive": steady and round(steady / naive, 3),
        "ceiling_1_thread_images_per_s": round(ceiling_1_thread, 3),
        "ceiling_by_forward_batch_images_per_s": {str(k): round(v, 3) for k, v in by_forward_batch.items()},
        "forward_batch_size": forward_batch,
        "ceiling_2x1_images_per_s": round(ceiling_2x1, 3),
        "bulk_2x1_vs_ceiling_2x1": round(layouts["2x1"]["wall_images_per_s"] / ceiling_2x1, 3)
        if "2x1" in layouts else None,
        "naive_ms_per_image": naive_ms,
        "naive_loopback_ms_per_image": naive_loopback_ms,
        "bulk_layouts": layouts,
        "untimed_first_job_seconds": round(first_job_seconds, 2),
        "num_images": args.num_images, "lr_size": args.size, "batch_size": args.batch_size,
        "model": {"family": "srgan", **common.SRRESNET, "scale": 4, "weights": "random init"},
        "load_avg_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # at start and end
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])

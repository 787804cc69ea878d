"""Peak memory of the bulk super-resolution job: flat in the number of images (streaming), and bounded by the tile
size rather than the image size for one large photo (1024x1024 -> 4096x4096 through tiling).

Model: the CPU-sized SRResNet of bulk_superres.py (32 features, 8 blocks, x4), random init (memory depends on the
architecture and the image sizes, not on the weights). Everything runs against a local S3 server.
- Streaming: the real bulk job (2 actors x 1 CPU) over N and then 10 N crops (64x64 by default). While it runs, a
  background thread samples /proc every 0.1 s: the summed RSS (and PSS, which counts shared pages such as
  libtorch and Ray's object store once) of this driver and every process under it (the Ray services, workers and
  model actors, not the S3 server), and the peak RSS (VmHWM, exact) of the model-actor processes.
- One 1024x1024 photo crop through the real bulk job (one actor, tile --tile, --big-batch-size tiles per forward),
  then through the Predictor alone in a fresh subprocess: its peak RSS during the one call (VmHWM, reset just
  before the call, after a warm-up call), tiled at 1024 and 512 and untiled at smaller sizes.
  Untiled, the activations grow with the image area; tiled, with batch x tile^2 (plus the output buffers).
Prints one JSON line: {"peak_rss_mb_N": ..., "peak_rss_mb_10N": ..., "rss_ratio_10N_vs_N": ...,
"sr_1024_to_4096_peak_rss_mb": ..., ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import genray  # noqa: F401  (first: importing genray sets Ray's local env before ray is imported)

from genray.config import ProcessConfig  # noqa: E402

if __package__:  # imported as benchmarks.bulk_memory
    from benchmarks import _common as common
else:  # run as a script: benchmarks/ is sys.path[0]
    import _common as common

MODEL_URI = f"{common.BUCKET}/models/srresnet"
UNTILED = 1 << 30  # a tile larger than any image: the Predictor makes one piece per image


def run_job_measured(name: str, input_uri: str, s3_pid: int, **job) -> dict:
    """Run one bulk job while sampling the memory of this process tree; returns its figures prefixed by name."""
    from genray.process.job import run_process_job

    cfg = ProcessConfig(task="superres", input_uri=input_uri, output_uri=f"{common.BUCKET}/out-{name}",
                        model_uri=MODEL_URI, **job)
    with common.TreeMemory(exclude={s3_pid}) as memory:
        summary = run_process_job(cfg, log=common.log)
    if summary.counts["ok"] == 0 or summary.counts["error"]:
        raise RuntimeError(f"bulk job {name} did not process every image:\n{summary.table()}")
    if memory.num_marked == 0:  # the actor's process title changed: the actor figure would silently read 0
        raise RuntimeError(f"no process named like {memory.marker!r} was seen during job {name}")
    figures = {**memory.figures(f"{name}_"), f"{name}_seconds": round(summary.seconds, 1)}
    common.log(f"{name}: {summary.counts['ok']} images, {figures}")
    return figures


def idle_tree(s3_pid: int) -> dict:
    """The tree's memory with Ray started and no job running: the floor the job figures sit on."""
    memory = common.TreeMemory(exclude={s3_pid})
    memory.sample()  # one snapshot, no thread needed
    return {"idle_rss_mb": round(memory.peak_rss_kb / 1024, 1), "idle_pss_mb": round(memory.peak_pss_kb / 1024, 1)}


# --------------------------------------------------------------------------- the Predictor in a subprocess

def predictor_child(side: int, tile: int, batch_size: int) -> None:
    """Child process: SR of one side x side crop with the Predictor; prints its memory and the output shape."""
    import gc
    import time

    import torch

    from genray.inference import Predictor

    torch.set_num_threads(2)
    image = next(common.lr_crops(1, side))
    predictor = Predictor.from_uri(MODEL_URI, device="cpu", tile=tile, batch_size=batch_size)
    predictor([image[:16, :16]])  # the first call sets up oneDNN/OpenMP (~100 MB, once per process): not the SR's
    gc.collect()
    # Reset the kernel's peak-RSS mark, so the peak is the SR call's, not a transient of loading the photos or the
    # weights before it. VmHWM, not ru_maxrss: after fork + exec, ru_maxrss starts at the parent's size.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = common.status_kb(os.getpid(), "VmRSS")  # imports, model and input loaded; no forward yet
    started = time.perf_counter()
    out = predictor([image])[0]
    print(json.dumps({
        "peak_rss_mb": round(common.status_kb(os.getpid(), "VmHWM") / 1024, 1),
        "before_call_rss_mb": round(before / 1024, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "output_shape": list(out.shape),
    }))


def measure_predictor(side: int, tile: int, batch_size: int) -> dict:
    """Run predictor_child in a fresh interpreter (so ru_maxrss is this case's alone) and return its figures."""
    cmd = [sys.executable, os.path.abspath(__file__), "--predictor-child", str(side), str(tile), str(batch_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"predictor subprocess {side}/{tile}/{batch_size} failed:\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["call_mb"] = round(row["peak_rss_mb"] - row["before_call_rss_mb"], 1)
    common.log(f"predictor side={side} tile={'none' if tile == UNTILED else tile} batch={batch_size}: {row}")
    return row


# ------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=48, help="N: the streaming jobs run N and 10 N images")
    p.add_argument("--size", type=int, default=64, help="side of the streaming inputs")
    p.add_argument("--big", type=int, default=1024, help="side of the one large input (output is 4x)")
    p.add_argument("--tile", type=int, default=256, help="tile of the large-image runs")
    p.add_argument("--big-batch-size", type=int, default=2, help="tiles per forward in the large-image runs")
    p.add_argument("--untiled-sizes", type=int, nargs="*", default=[256, 512],
                   help="sides run without tiling (1024 needs ~8 GB for this model)")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--predictor-child", type=int, nargs=3, metavar=("SIDE", "TILE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.predictor_child:  # the subprocess of measure_predictor (the S3 variables come from the parent)
        predictor_child(*args.predictor_child)
        return {}
    if args.smoke_test:
        args.num_images, args.size, args.big, args.tile, args.untiled_sizes = 4, 32, 128, 64, [64]

    n, load_at_start = args.num_images, os.getloadavg()[0]
    with common.local_s3() as s3:
        # [1] inputs and model
        common.upload_pngs(f"{common.BUCKET}/in-N", common.lr_crops(n, args.size))
        common.upload_pngs(f"{common.BUCKET}/in-10N", common.lr_crops(10 * n, args.size))
        common.upload_pngs(f"{common.BUCKET}/in-big", common.lr_crops(1, args.big))
        common.save_srresnet(MODEL_URI)
        # [2] the real bulk job: streaming over N and 10 N images, then one large image through tiling
        with common.local_ray(num_cpus=2):
            figures = idle_tree(s3.pid)
            streaming = {"concurrency": 2, "cpus_per_actor": 1.0, "batch_size": 8}
            figures |= run_job_measured("N", f"{common.BUCKET}/in-N", s3.pid, **streaming)
            figures |= run_job_measured("10N", f"{common.BUCKET}/in-10N", s3.pid, **streaming)
            figures |= run_job_measured("big", f"{common.BUCKET}/in-big", s3.pid, concurrency=1, cpus_per_actor=2.0,
                                        tile=args.tile, batch_size=args.big_batch_size)
        # [3] the Predictor alone, tiled at two image sizes (flat) and untiled (grows with the area)
        tiled_big = measure_predictor(args.big, args.tile, args.big_batch_size)
        tiled_half = measure_predictor(args.big // 2, args.tile, args.big_batch_size)
        untiled = {side: measure_predictor(side, UNTILED, 1) for side in args.untiled_sizes}

    result = {
        "peak_rss_mb_N": figures["N_peak_rss_mb"],
        "peak_rss_mb_10N": figures["10N_peak_rss_mb"],
        "rss_ratio_10N_vs_N": round(figures["10N_peak_rss_mb"] / figures["N_peak_rss_mb"], 3),
        "pss_ratio_10N_vs_N": round(figures["10N_peak_pss_mb"] / figures["N_peak_pss_mb"], 3),
        "actor_rss_ratio_10N_vs_N": round(
            figures["10N_model_actor_peak_rss_mb"] / figures["N_model_actor_peak_rss_mb"], 3),
        # The model actor is the process that holds the image, its tiles and their outputs.
        "sr_1024_to_4096_peak_rss_mb": figures["big_model_actor_peak_rss_mb"],
        "sr_1024_predictor_peak_rss_mb": tiled_big["peak_rss_mb"],
        # Memory one SR call adds on top of the loaded process: flat in the image size when tiled (but for the
        # output and stitching buffers, which grow with the output) ...
        "tiled_call_mb": {str(args.big): tiled_big["call_mb"], str(args.big // 2): tiled_half["call_mb"]},
        # ... proportional to the image area when not.
        "untiled_call_mb": {str(side): row["call_mb"] for side, row in untiled.items()},
        "untiled_peak_rss_mb": {str(side): row["peak_rss_mb"] for side, row in untiled.items()},
        "big_side": args.big, "tile": args.tile, "big_batch_size": args.big_batch_size,
        "num_images_N": n, "streaming_size": args.size,
        "jobs": figures,
        "predictor": {"tiled_big": tiled_big, "tiled_half": tiled_half,
                      **{f"untiled_{side}": row for side, row in untiled.items()}},
        "load_avg_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # at start and end: was it busy?
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

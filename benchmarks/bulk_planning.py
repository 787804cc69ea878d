"""Planning a bulk-job rerun at scale: driver memory and time of `genray process --dry-run` over N inputs whose
manifest already says every one is done (everything skipped), next to the bare listing of the same prefix.

The listing is a real local prefix of N empty `.png` files (1,000 per folder; planning never opens an input, so
empty files list exactly like images), made once and kept under --cache-dir. The manifest is one finished,
compacted parquet file (`_manifest/manifest-<run_id>.parquet`, the layout a finished run leaves) written straight
with pyarrow from one listing of that prefix, so every row's ETag matches and every input is skipped.

Each measurement runs in a fresh Python process (peak RSS is a process-wide high-water mark): it imports genray,
reads its VmRSS, runs the step, and reports VmHWM minus that baseline (the driver's own growth; no Ray is started
by a dry run). Figures (one JSON line on stdout):
  plan_rss_mb_1m       driver peak RSS growth planning the large N (1,000,000 by default; target <= 300)
  plan_time_ratio_10x  planning time at 10*N over planning time at N (N >= 100,000 by default; target <= 11)
  plan_vs_listing      planning time over the bare listing time at the large N (target <= 1.5)

    python benchmarks/bulk_planning.py                # N = 100,000 and 1,000,000 (makes 1.1 M files once)
    python benchmarks/bulk_planning.py --smoke-test   # N = 2,000 and 20,000: well under a minute
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FILES_PER_DIR = 1000
ROOT = Path(__file__).resolve().parent.parent


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _status(field: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


# ----------------------------------------------------------------------------------------------- fixtures

def make_inputs(root: Path, n: int) -> Path:
    """N empty .png files under root/in (made once; a marker file says it is complete)."""
    inputs, marker = root / "in", root / f"complete-{n}"
    if marker.exists():
        return inputs
    log(f"[bench] making {n:,} input files under {inputs}")
    for d in range(-(-n // FILES_PER_DIR)):
        folder = inputs / f"d{d:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(d * FILES_PER_DIR, min(n, (d + 1) * FILES_PER_DIR)):
            os.close(os.open(folder / f"img{i:08d}.png", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()
    return inputs


def make_model(root: Path) -> str:
    uri = root / "model"
    if not (uri / "model.json").exists():
        import torch

        from genray.model_artifact import save_artifact
        from genray.models import get_spec

        spec = get_spec("srgan")
        cfg = spec.config_cls.tiny()
        torch.manual_seed(0)
        save_artifact(str(uri), spec, cfg, spec.build(cfg).eval(), {})
    return str(uri)


def make_manifest(inputs: Path, output: Path, model_uri: str) -> None:
    """A finished manifest: one ok row per input with its current ETag and the model's digest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genray import storage
    from genray.model_artifact import read_meta
    from genray.process import manifest

    folder = output / manifest.MANIFEST_DIR
    if folder.is_dir() and any(folder.iterdir()):
        return
    folder.mkdir(parents=True, exist_ok=True)
    digest = read_meta(model_uri)["digest"]
    objects = storage.list_objects(str(inputs))
    n = len(objects)
    keys = [o.key for o in objects]
    table = pa.table({
        "input_key": keys, "output_key": keys, "status": ["ok"] * n, "error": [None] * n,
        "input_etag": [o.etag for o in objects], "model_digest": [digest] * n,
        "width": [64] * n, "height": [64] * n, "seconds": [0.1] * n, "node_id": ["0" * 56] * n,
    }, schema=manifest.SCHEMA)
    del objects, keys
    pq.write_table(table, folder / f"manifest-{manifest.new_run_id()}.parquet")


# ------------------------------------------------------------------------------------------- child steps

def child(step: str, inputs: str, output: str, model_uri: str) -> dict:
    """One measurement in this (fresh) process: 'plan' (the dry-run rerun) or 'list' (the bare listing)."""
    from genray import storage
    from genray.config import ProcessConfig
    from genray.process import job  # noqa: F401 - imported before the baseline, as the CLI has it

    base = _status("VmRSS")
    started = time.perf_counter()
    if step == "plan":
        cfg = ProcessConfig(task="superres", input_uri=inputs, output_uri=output, model_uri=model_uri, dry_run=True)
        summary = job.run_process_job(cfg, log=lambda *_: None)
        count = summary.counts["skipped"]
    else:
        # The storage layer's listing, consumed without planning: page by page where it streams pages.
        pages = getattr(storage, "iter_object_pages", None)
        if pages is not None:
            count = sum(len(page) for page in pages(inputs))
        else:
            count = len(storage.list_objects(inputs))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rss_growth_mb": _status("VmHWM") - base, "count": count}


def measure(step: str, inputs: Path, output: Path, model_uri: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__, "--child", step, str(inputs), str(output), model_uri],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"[bench] {step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(n_small: int, n_large: int, cache_dir: Path) -> dict:
    model_uri = make_model(cache_dir)
    results = {}
    for n in (n_small, n_large):
        root = cache_dir / f"n{n}"
        inputs = make_inputs(root, n)
        output = root / "out"
        make_manifest(inputs, output, model_uri)
        measure("list", inputs, output, model_uri)  # warm the dentry cache for both timed steps
        listing = measure("list", inputs, output, model_uri)
        planning = measure("plan", inputs, output, model_uri)
        if planning["count"] != n or listing["count"] != n:
            raise SystemExit(f"[bench] expected {n} inputs skipped and listed, got {planning} / {listing}")
        log(f"[bench] N={n:,}: listing {listing['seconds']:.2f}s +{listing['rss_growth_mb']:.0f} MB, "
            f"planning {planning['seconds']:.2f}s +{planning['rss_growth_mb']:.0f} MB")
        results[n] = {"list": listing, "plan": planning}
    small, large = results[n_small], results[n_large]
    return {
        "plan_rss_mb_1m": round(large["plan"]["rss_growth_mb"], 1),
        "plan_time_ratio_10x": round(large["plan"]["seconds"] / small["plan"]["seconds"], 2),
        "plan_vs_listing": round(large["plan"]["seconds"] / large["list"]["seconds"], 2),
        "n_small": n_small, "n_large": n_large,
        "plan_seconds_small": round(small["plan"]["seconds"], 2),
        "plan_seconds_large": round(large["plan"]["seconds"], 2),
        "list_seconds_large": round(large["list"]["seconds"], 2),
        "plan_rss_mb_small": round(small["plan"]["rss_growth_mb"], 1),
        "list_rss_mb_large": round(large["list"]["rss_growth_mb"], 1),
        "load_average": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="the smaller N; the larger is 10x")
    p.add_argument("--smoke-test", action="store_true", help="N = 2,000 and 20,000")
    p.add_argument("--cache-dir", default="/tmp/genray-bench-planning", help="inputs are made here once")
    p.add_argument("--child", nargs=4, metavar=("STEP", "INPUT", "OUTPUT", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    n = 2_000 if args.smoke_test else args.n
    print(json.dumps(run(n, 10 * n, Path(args.cache_dir))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

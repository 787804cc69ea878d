"""The `genray` command: data export, train, process, serve, demo. Every verb has --help."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from genray.config import ConfigError

# Errors a user can fix; printed as one line instead of a traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from genray.artifacts import ArtifactError
    from genray.batch.pipeline import JobError
    from genray.images import ImageError
    from genray.storage import StorageError
    from genray.training.trainer import TrainingError

    return (ConfigError, StorageError, ArtifactError, JobError, TrainingError, ImageError)


def cmd_data_export(args: argparse.Namespace) -> int:
    from genray.datasets import export_dataset

    written = export_dataset(args.name, args.to, split=args.split)
    print(f"[genray] wrote {len(written)} {args.name} images under {args.to}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from genray.config import load_config
    from genray.runtime import init_ray
    from genray.training.trainer import run_training

    overrides = list(args.set or []) + ([f"output_uri={args.output}"] if args.output else [])
    cfg = load_config(args.config, overrides)
    init_ray(args.address)
    started = time.perf_counter()
    result = run_training(cfg)
    print(f"[genray] trained {cfg.model.family} '{cfg.name}' in {time.perf_counter() - started:.1f}s "
          f"on {cfg.scaling.num_workers} workers")
    print(f"  model artefact: {result.model_uri}")
    print(f"  checkpoints:    {cfg.output_uri.rstrip('/')}/checkpoints/{cfg.name}/")
    print(f"  samples:        {cfg.output_uri.rstrip('/')}/samples/ (epoch_NNN.png, progress.gif)")
    print(f"  metrics:        {cfg.output_uri.rstrip('/')}/metrics.jsonl, loss.png")
    shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
    print(f"  final metrics:  {shown}")
    return 0


def process_config_from_args(args: argparse.Namespace) -> Any:
    from genray.config import ProcessConfig, read_yaml, validate

    data: dict[str, Any] = read_yaml(args.config) if args.config else {}
    flags = {"task": args.task, "input_uri": args.input, "output_uri": args.output, "model_uri": args.model,
             "style_image_uri": args.style_image, "tile": args.tile, "batch_size": args.batch_size,
             "concurrency": args.concurrency, "max_pixels": args.max_pixels, "dry_run": args.dry_run or None,
             "gatys_iterations": args.iterations, "vgg_weights": args.vgg_weights}
    data.update({k: v for k, v in flags.items() if v is not None})  # flags win over the file
    return validate(ProcessConfig, data, args.config or "command line")


def cmd_process(args: argparse.Namespace) -> int:
    from genray.batch.pipeline import run_process_job
    from genray.runtime import init_ray

    cfg = process_config_from_args(args)
    if not cfg.dry_run:
        init_ray(args.address)
    summary = run_process_job(cfg)
    print(summary.table())
    if summary.manifest_uri:
        print(f"[genray] manifest: {summary.manifest_uri}")
    # Non-zero only when there was work and none of it succeeded (bad inputs alone are manifest rows).
    return 1 if summary.counts["error"] and not (summary.counts["ok"] or summary.counts["skipped"]) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from genray.config import ServeFileConfig, load_config
    from genray.runtime import init_ray
    from genray.serving.deploy import run_serve_config

    cfg = load_config(args.config, args.set, cls=ServeFileConfig)
    if args.host or args.port is not None:
        http = cfg.http_options.model_copy(update={k: v for k, v in {"host": args.host, "port": args.port}.items() if v})
        cfg = cfg.model_copy(update={"http_options": http})
    init_ray(args.address)
    url = run_serve_config(cfg)
    print(f"[genray] serving at {url} (OpenAPI at {url}/docs); Ctrl-C or SIGTERM to stop", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.shutdown()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from genray.demo import run_demo

    run_demo(workdir=args.workdir, epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from genray.datasets import DATASETS

    p = argparse.ArgumentParser(prog="genray", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    data = sub.add_parser("data", help="embedded datasets").add_subparsers(dest="data_verb", required=True)
    exp = data.add_parser("export", help="write an embedded dataset as PNG files")
    exp.add_argument("name", choices=DATASETS)
    exp.add_argument("--to", required=True, help="local path or s3://bucket/prefix")
    exp.add_argument("--split", choices=("train", "test"), help="only this split (default: both)")
    exp.set_defaults(func=cmd_data_export)

    tr = sub.add_parser("train", help="train a model on Ray Train")
    tr.add_argument("config", help="configs/train/*.yaml")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=2e-4 (repeatable)")
    tr.add_argument("--output", help="output URI (overrides output_uri)")
    tr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser("process", help="run a bulk job over an image prefix on Ray Data")
    pr.add_argument("task", choices=("denoise", "superres", "style"))
    pr.add_argument("--input", help="input prefix URI")
    pr.add_argument("--output", help="output prefix URI")
    pr.add_argument("--model", help="model artefact URI (genray train's <output>/model)")
    pr.add_argument("--style-image", help="style jobs without a style model: Gatys optimisation towards this image")
    pr.add_argument("--config", help="configs/process/*.yaml; flags override it")
    pr.add_argument("--tile", type=int, help="images larger than this go through the model in overlapping tiles")
    pr.add_argument("--batch-size", type=int, help="images per model call")
    pr.add_argument("--concurrency", type=int, help="model actors")
    pr.add_argument("--max-pixels", type=int, help="refuse images declaring more pixels than this")
    pr.add_argument("--iterations", type=int, help="Gatys iterations per image (default 300)")
    pr.add_argument("--vgg-weights", help="Gatys: local or s3:// copy of torchvision's vgg19-dcbb9e9d.pth")
    pr.add_argument("--dry-run", action="store_true", help="list what would be processed")
    pr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    pr.set_defaults(func=cmd_process)

    sv = sub.add_parser("serve", help="serve models over HTTP with Ray Serve")
    sv.add_argument("config", help="configs/serve/*.yaml (the Serve config format)")
    sv.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the config")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    sv.set_defaults(func=cmd_serve)

    de = sub.add_parser("demo", help="train -> bulk job over a local S3 server -> serve -> HTTP request")
    de.add_argument("--workdir", default="genray-demo-output", help="local copy of what the demo made")
    de.add_argument("--epochs", type=int, default=20)
    de.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from genray.runtime import prepare_local_env

    prepare_local_env()  # before anything imports ray: a local Ray then listens on 127.0.0.1 only
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"genray: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

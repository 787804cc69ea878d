"""The `genray` command: data export, train, eval, pipeline, process, serve, export, submit, jobs, demo. Every verb has
--help."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from genray.config import ConfigError
from genray.tasks import BULK_TASKS, EVAL_TASKS

# Errors a user can fix; printed as one line instead of a traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from genray.model_artifact import ArtifactError
    from genray.evaluation import EvalError
    from genray.export import ExportError
    from genray.process.job import JobError
    from genray.images import ImageError
    from genray.storage import StorageError
    from genray.submit import SubmitError
    from genray.training.trainer import TrainingError

    return (ConfigError, StorageError, ArtifactError, JobError, TrainingError, ImageError, SubmitError, EvalError,
            ExportError)


def cmd_data_export(args: argparse.Namespace) -> int:
    from genray.datasets import export_dataset

    written = export_dataset(args.name, args.to, split=args.split, output_format=args.format,
                             shard_size=args.shard_size)
    what = "images" if args.format == "files" else f"shards of up to {args.shard_size} images"
    print(f"[genray] wrote {len(written)} {args.name} {what} under {args.to}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from genray.config import load_config
    from genray.runtime import init_ray
    from genray.training.trainer import check_inputs, run_training

    cfg = load_config(args.config, train_overrides(args))
    check_inputs(cfg)  # a wrong data.uri or output bucket: one line, before Ray starts
    with json_summary(args) as summary:
        init_ray(args.address)
        started = time.perf_counter()
        result = run_training(cfg)
        summary.update(name=cfg.name, family=cfg.model.family, output_uri=cfg.output_uri, model_uri=result.model_uri,
                       checkpoint_uri=result.checkpoint_uri, seconds=round(time.perf_counter() - started, 3),
                       num_workers=cfg.scaling.num_workers, metrics=result.metrics,
                       tensorboard_uri=(f"{cfg.output_uri.rstrip('/')}/tensorboard" if cfg.tracking.tensorboard
                                        else None))
    if args.json:
        return 0
    print(f"[genray] trained {cfg.model.family} '{cfg.name}' in {time.perf_counter() - started:.1f}s "
          f"on {cfg.scaling.num_workers} workers")
    print(f"  model artefact: {result.model_uri}")
    print(f"  checkpoints:    {cfg.output_uri.rstrip('/')}/checkpoints/{cfg.name}/")
    print(f"  samples:        {cfg.output_uri.rstrip('/')}/samples/ (epoch_NNN.png, progress.gif)")
    print(f"  metrics:        {cfg.output_uri.rstrip('/')}/metrics.jsonl, loss.png")
    if cfg.tracking.tensorboard:
        print(f"  tensorboard:    tensorboard --logdir {cfg.output_uri.rstrip('/')}/tensorboard")
    if cfg.tracking.mlflow_uri:  # the URI itself stays out of the output: a server URL may carry a user name
        print(f"  mlflow:         run '{cfg.name}' in experiment '{cfg.tracking.mlflow_experiment}'")
    shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
    print(f"  final metrics:  {shown}")
    return 0


@contextlib.contextmanager
def json_summary(args: argparse.Namespace):
    """With --json: everything the verb prints on the way goes to stderr, and stdout gets exactly one JSON object
    (the dict the block fills), so scripts need not scrape text. Without --json: nothing changes."""
    record: dict[str, Any] = {}
    if not getattr(args, "json", False):
        yield record
        return
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield record
    print(json.dumps(record, default=str), file=stdout, flush=True)


def train_overrides(args: argparse.Namespace) -> list[str]:
    """`genray train`'s --set overrides, with --output as one more."""
    return list(args.set or []) + ([f"output_uri={args.output}"] if args.output else [])


def process_config_from_args(args: argparse.Namespace) -> Any:
    from genray.config import ProcessConfig, read_yaml, validate

    data: dict[str, Any] = read_yaml(args.config) if args.config else {}
    flags = {"task": args.task, "input_uri": args.input, "output_uri": args.output, "model_uri": args.model,
             "style_image_uri": args.style_image, "tile": args.tile, "tile_overlap": args.tile_overlap,
             "batch_size": args.batch_size, "ext": args.ext, "quality": args.quality, "outscale": args.outscale,
             "alpha": args.alpha,
             "forward_batch_size": args.forward_batch_size,
             "concurrency": args.concurrency, "max_pixels": args.max_pixels, "dry_run": args.dry_run or None,
             "gatys_iterations": args.iterations, "vgg_weights": args.vgg_weights,
             "output_format": args.output_format, "shard_size": args.shard_size, "shard_bytes": args.shard_bytes,
             "max_output_pixels": args.max_output_pixels, "max_input_bytes": args.max_input_bytes,
             "max_archive_members": args.max_archive_members, "max_archive_bytes": args.max_archive_bytes,
             "max_sample_bytes": args.max_sample_bytes, "max_attempts": args.max_attempts,
             "retry_errors": args.retry_errors or None, "lease_seconds": args.lease_seconds,
             "cpus_per_actor": args.cpus_per_actor, "gpus_per_actor": args.gpus_per_actor,
             "precision": args.precision, "overlap_io": args.overlap_io,
             "verify_outputs": args.verify_outputs or None}
    data.update({k: v for k, v in flags.items() if v is not None})  # flags win over the file
    return validate(ProcessConfig, data, args.config or "command line")


def cmd_process(args: argparse.Namespace) -> int:
    from genray import logs
    from genray.process.job import run_process_job
    from genray.runtime import init_ray

    cfg = process_config_from_args(args)
    if args.preview:
        from genray.process.preview import run_preview

        with json_summary(args) as record:
            record.update(preview_uri=run_preview(cfg, args.preview, args.preview_to, log=logs.progress))
        if not args.json:
            print(f"[genray] preview: {args.preview_to} (before | after; the job itself has not run)")
        return 0
    with json_summary(args) as record:
        if not cfg.dry_run:
            init_ray(args.address)
        summary = run_process_job(cfg, log=logs.progress)
        record.update(task=cfg.task, input_uri=cfg.input_uri, output_uri=cfg.output_uri, run_id=summary.run_id,
                      dry_run=cfg.dry_run, counts=dict(summary.counts), seconds=round(summary.seconds, 3),
                      images_per_s=round(summary.images_per_s, 3), manifest_uri=summary.manifest_uri or None,
                      errors=[{"input_key": key, "error": why} for key, why in summary.errors])
    logs.end_bar()
    if not args.json:
        print(summary.table())
        if summary.manifest_uri:
            print(f"[genray] manifest: {summary.manifest_uri}")
    # Non-zero only when there was work and none of it succeeded (bad inputs alone are manifest rows).
    return 1 if summary.counts["error"] and not (summary.counts["ok"] or summary.counts["skipped"]) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from genray.config import ServeFileConfig, load_config
    from genray.runtime import init_ray
    from genray.serving.auth import TOKEN_ENV, TOKEN_FILE_ENV, is_loopback
    from genray.serving.deploy import open_access_warning, run_serve_config

    # --host/--port are overrides like any other, so they are validated with the rest of the file.
    overrides = list(args.set or []) + [f"http_options.{key}={value}" for key, value in
                                        (("host", args.host), ("port", args.port)) if value is not None]
    cfg = load_config(args.config, overrides, cls=ServeFileConfig)
    if args.insecure:  # every application's `insecure`, so its gateway agrees to listen open too
        overrides += [f"applications.{i}.args.insecure=true" for i in range(len(cfg.applications))]
        cfg = load_config(args.config, overrides, cls=ServeFileConfig)
    # A blank $GENRAY_SERVE_TOKEN / $GENRAY_SERVE_TOKEN_FILE is a mistake, not "no token": stop before Ray starts.
    blank = [name for name in (TOKEN_ENV, TOKEN_FILE_ENV) if name in os.environ and not os.environ[name].strip()]
    if blank:
        print(f"genray: error: ${blank[0]} is set but blank; unset it or give the token", file=sys.stderr)
        return 2
    refusal = open_access_warning(cfg)
    if refusal:
        print(f"genray: error: {refusal}", file=sys.stderr)
        return 2
    if args.insecure and not is_loopback(cfg.http_options.host):
        print(f"[genray] warning: --insecure: serving on {cfg.http_options.host} without requiring a token",
              file=sys.stderr, flush=True)
    init_ray(args.address)
    url = run_serve_config(cfg)
    serve_until_stopped(url)
    return 0


def serve_until_stopped(url: str) -> None:
    """Keep this driver (and so a local Ray with its Serve app) alive until Ctrl-C or SIGTERM."""
    print(f"[genray] serving at {url} (OpenAPI at {url}/docs, what is loaded at {url}/models); "
          "Ctrl-C or SIGTERM to stop", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.shutdown()


def cmd_pipeline(args: argparse.Namespace) -> int:
    import os

    from genray.pipeline.stages import GateFailed, load_pipeline_config, run_pipeline
    from genray.runtime import init_ray

    cfg, train_cfg = load_pipeline_config(args.config, args.set)
    init_ray(args.address)
    try:
        run = run_pipeline(cfg, train_cfg)
    except GateFailed as err:
        print(f"genray: {err}", file=sys.stderr)
        return 1
    serving = run.stages.get("serve")
    # On a cluster the Serve app outlives this driver; a local Ray ends with it, so stay up unless told not to.
    if serving and not args.exit_after_deploy and not (args.address or os.environ.get("RAY_ADDRESS")):
        serve_until_stopped(serving["url"])
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from genray.submit import parse_env, resolve_address, split_address, submit

    address, job_args = split_address(args.args)
    address = resolve_address(args.address or address)  # no cluster to submit to: say so before anything else
    entrypoint, runtime_env, warnings = build_job(args.job, job_args, args.working_dir, parse_env(args.env))
    for warning in warnings:
        print(f"[genray] warning: {warning}", file=sys.stderr)
    return submit(args.job, entrypoint, runtime_env, address=address, wait=not args.no_wait,
                  submission_id=args.submission_id)


def job_arguments(verb: str, args: list[str], working_dir: str) -> tuple[list[str], list[str]]:
    """Check `genray <verb> ARGS` here, as the local verb would (flags, config file and overrides), so a typo fails
    before anything is submitted; returns (the arguments for jobs/<verb>.py, warnings). The config must be inside
    the working directory (it travels with it) and is passed relative to it."""
    from genray.config import load_config
    from genray.submit import relative_config

    ns = build_parser().parse_args([verb, *args])
    if verb == "train":
        cfg = load_config(ns.config, train_overrides(ns))
        uris = {"output_uri": cfg.output_uri, "data.uri": cfg.data.uri}
    elif verb == "pipeline":
        from genray.pipeline.stages import load_pipeline_config

        cfg, train_cfg = load_pipeline_config(ns.config, ns.set)
        for path in [cfg.train] + ([cfg.serve.config] if cfg.serve and cfg.serve.config else []):
            relative_config(path, working_dir)  # read by the job, from the working directory it ships
        uris = {"run_uri": cfg.run_uri, "training output_uri": train_cfg.output_uri, "eval.data_uri":
                cfg.eval.data_uri, **{f"bulk job {j.name} {k}": j.job.get(k) for j in cfg.bulk_jobs
                                      for k in ("input_uri", "output_uri")}}
    else:
        cfg = process_config_from_args(ns)
        uris = {"--input": cfg.input_uri, "--output": cfg.output_uri, "--model": cfg.model_uri}
    warnings = [f"{name} {uri} is a local path: on a cluster each node has its own disk (use s3://)"
                for name, uri in uris.items() if uri and not uri.startswith(("s3://", "zoo:"))]

    out: list[str] = []
    for i, arg in enumerate(args):
        if ns.config is not None and arg == ns.config and (i == 0 or args[i - 1] != "--set"):
            arg = relative_config(ns.config, working_dir)
        elif ns.config is not None and arg == f"--config={ns.config}":
            arg = f"--config={relative_config(ns.config, working_dir)}"
        out.append(arg)
    return out, warnings


def build_job(verb: str, args: list[str], working_dir: str = ".", env_vars: dict[str, str] | None = None
              ) -> tuple[str, dict[str, Any], list[str]]:
    """(entrypoint, runtime_env, warnings) for `genray <verb> ARGS` run as a Ray job (genray.submit submits it)."""
    import shlex
    from pathlib import Path

    from genray.submit import build_runtime_env, entrypoint_script

    working_dir = str(Path(working_dir).resolve())
    script = entrypoint_script(verb, working_dir)
    job_args, warnings = job_arguments(verb, args, working_dir)
    return shlex.join(["python", script, *job_args]), build_runtime_env(working_dir, env_vars), warnings


def cmd_jobs(args: argparse.Namespace) -> int:
    from genray import submit

    if args.jobs_verb == "list":
        return submit.list_jobs(args.address, as_json=args.json)
    if args.jobs_verb == "status":
        return submit.job_status(args.job_id, args.address, as_json=args.json)
    if args.jobs_verb == "logs":
        return submit.job_logs(args.job_id, args.address, follow=args.follow)
    return submit.stop_job(args.job_id, args.address)


def cmd_eval(args: argparse.Namespace) -> int:
    from genray import storage
    from genray.evaluation import evaluate_model, write_evaluation

    evaluation = evaluate_model(args.model, args.data, task=args.task, sigma=args.sigma, num_samples=args.samples,
                                reference_model=args.reference_model, train_data=args.train_data, limit=args.limit,
                                inception_weights=args.inception_weights)
    # A zoo model lives inside the installed package: its evaluation goes to the working directory instead.
    home = f"eval-{args.model[len('zoo:'):]}" if args.model.startswith("zoo:") else storage.join_uri(args.model, "eval")
    output = args.output or storage.join_uri(home, evaluation.task)
    json_uri, md_uri = write_evaluation(evaluation, output)
    if args.json:
        print(json.dumps(evaluation.to_dict()))
        return 0
    print(f"[genray] {evaluation.task} evaluation of {evaluation.family} {args.model} on {args.data}\n")
    print(evaluation.table())
    print(f"\n[genray] wrote {json_uri} and {md_uri}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from genray.export import export_model

    report = export_model(args.model, args.format, args.to)
    print(f"[genray] exported {report.family} {args.model} ({report.digest[:19]}...) as {args.format} to {args.to} "
          f"({report.size_bytes / 1e6:.2f} MB)")
    print("\n".join(report.lines()))
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from genray import zoo

    if args.json:
        print(json.dumps(zoo.index(), indent=2))
    else:
        print(zoo.table())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from genray.demo import run_demo

    run_demo(workdir=args.workdir, epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    import shtab

    from genray.datasets import DATASETS

    from genray import __version__

    p = argparse.ArgumentParser(prog="genray", description=__doc__)
    p.add_argument("--version", action="version", version=f"genray {__version__}")
    # Global, so before the verb: `genray -q process ...`.
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="show Ray's logs and progress bars here instead of in the log file")
    loud.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    sub = p.add_subparsers(dest="verb", required=True)

    data = sub.add_parser("data", help="embedded datasets").add_subparsers(dest="data_verb", required=True)
    exp = data.add_parser("export", help="write an embedded dataset as PNG files")
    exp.add_argument("name", choices=DATASETS)
    exp.add_argument("--to", required=True, help="local path or s3://bucket/prefix")
    exp.add_argument("--split", choices=("train", "test"), help="only this split (default: both)")
    exp.add_argument("--format", choices=("files", "tar"), default="files",
                     help="files: one PNG per image; tar: WebDataset shards shard-NNNNNN.tar (+ .json labels)")
    exp.add_argument("--shard-size", type=int, default=1000, help="--format tar: images per shard")
    exp.set_defaults(func=cmd_data_export)

    tr = sub.add_parser("train", help="train a model on Ray Train")
    tr_config = tr.add_argument("config", help="configs/train/*.yaml")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=2e-4 (repeatable)")
    tr.add_argument("--output", help="output URI (overrides output_uri)")
    tr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    tr.add_argument("--json", action="store_true",
                    help="print the result (artefact URI, metrics, ...) as one JSON object on stdout; the rest to stderr")
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser("process", help="run a bulk job over an image prefix on Ray Data")
    pr.add_argument("task", choices=BULK_TASKS)
    pr.add_argument("-i", "--input", help="a prefix of images and/or archives (.tar, .tar.gz, .tgz, .zip), one "
                    "archive, or a brace pattern of shards: s3://b/shards/shard-{000000..000099}.tar")
    pr.add_argument("-o", "--output", help="output prefix URI")
    pr.add_argument("--output-format", choices=("files", "tar"),
                    help="files (default): an image per input; tar: WebDataset shards <output>/shard-NNNNNN.tar")
    pr.add_argument("--ext", choices=("png", "jpg", "webp"),
                    help="output image format (default png); output keys end with it: a/b.tif -> a/b.webp")
    pr.add_argument("--quality", type=int, help="jpg/webp quality 1-100 (default 90)")
    pr.add_argument("--outscale", type=float,
                    help="final size over the input's, e.g. 2 with a x4 model (its x4, then a Lanczos resize)")
    pr.add_argument("--alpha", choices=("keep", "composite"),
                    help="keep (default): alpha goes around the model into png/webp outputs; composite: over white "
                         "first (jpg outputs always are)")
    pr.add_argument("--shard-size", type=int, help="--output-format tar: images per shard (default 1000)")
    pr.add_argument("--shard-bytes", type=int, help="--output-format tar: also close a shard before this size")
    pr.add_argument("--model", help="model artefact URI (genray train's <output>/model), or zoo:NAME for a model "
                    "shipped with genray (`genray zoo list`)")
    pr.add_argument("--style-image", help="style jobs without a style model: Gatys optimisation towards this image")
    pr.add_argument("--config", help="configs/process/*.yaml; flags override it")
    pr.add_argument("--tile", type=int, help="images larger than this go through the model in overlapping tiles")
    pr.add_argument("--tile-overlap", type=int, help="pixels two tiles share, blended (default 16)")
    pr.add_argument("--batch-size", type=int, help="images per model call")
    pr.add_argument("--forward-batch-size", type=int,
                    help="images (or tiles) per forward pass (default: --batch-size; on CPU 1 is often fastest)")
    pr.add_argument("--concurrency", metavar="N|MIN-MAX",
                    help="model actors: N, or MIN-MAX for a pool that grows as nodes join (starts once MIN are placed)")
    pr.add_argument("--cpus-per-actor", type=float, help="CPUs per model actor (default 1)")
    pr.add_argument("--gpus-per-actor", type=float,
                    help="GPUs per model actor; a fraction shares a GPU (0.5: two actors per GPU). Default 0: CPU")
    pr.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                    help="forward autocast dtype (default: bf16 on GPUs, fp32 on CPU)")
    pr.add_argument("--overlap-io", action=argparse.BooleanOptionalAction, default=None,
                    help="decode/encode of one batch while another's forward runs (default: on for GPU actors)")
    pr.add_argument("--verify-outputs", action="store_true",
                    help="rerun: also redo inputs whose manifest row says ok but whose output object is gone")
    pr.add_argument("--max-pixels", type=int, help="refuse images declaring more pixels than this")
    pr.add_argument("--max-output-pixels", type=int, help="refuse inputs whose output would exceed this (64000000)")
    pr.add_argument("--max-input-bytes", type=int,
                    help="refuse files and archive members larger than this (default 8 x --max-pixels + 1 MiB)")
    pr.add_argument("--max-archive-members", type=int, help="entries read per archive (default 1000000)")
    pr.add_argument("--max-archive-bytes", type=int, help="decompressed bytes read per archive (default 256 GiB)")
    pr.add_argument("--max-sample-bytes", type=int, help="bytes of one WebDataset sample's parts (default 1 GiB)")
    pr.add_argument("--max-attempts", type=int,
                    help="an input (or archive) whose model or read worker dies this many times becomes an error "
                         "row (default 3)")
    pr.add_argument("--retry-errors", action="store_true",
                    help="also redo inputs recorded as 'worker died while processing/reading it'")
    pr.add_argument("--lease-seconds", type=float,
                    help="the output prefix's lease expires this long after a dead run's last renewal (600)")
    pr.add_argument("--iterations", type=int, help="Gatys iterations per image (default 300)")
    pr.add_argument("--vgg-weights", help="Gatys: local or s3:// copy of torchvision's vgg19-dcbb9e9d.pth")
    pr.add_argument("--dry-run", action="store_true", help="list what would be processed")
    pr.add_argument("--preview", type=int, metavar="N",
                    help="run only the first N inputs, here (no Ray), into one before/after contact sheet "
                         "(--preview-to); writes nothing under --output")
    pr.add_argument("--preview-to", default="preview.png", metavar="URI",
                    help="where --preview writes its PNG: a local path or s3:// URI (default preview.png)")
    pr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    pr.add_argument("--json", action="store_true",
                    help="print the summary as one JSON object on stdout (progress goes to stderr)")
    pr.set_defaults(func=cmd_process)

    ev = sub.add_parser("eval", help="measure a model artefact on held-out images next to classical baselines",
                        description="Prints and writes (eval.json, eval.md) an artefact's metrics on held-out images "
                        "with baselines on the same images: superres vs bicubic/Lanczos (PSNR RGB and Y, SSIM), "
                        "denoise vs the noisy input, non-local means and TV, generate as a Fréchet distance with "
                        "the real-vs-real floor, classify vs logistic regression, reconstruct (negative ELBO) vs PCA.")
    ev.add_argument("--model", required=True, help="model artefact URI (genray train's <output>/model)")
    ev.add_argument("--data", required=True, help="held-out image prefix URI, e.g. s3://genray-data/photos/test/")
    ev.add_argument("--task", choices=EVAL_TASKS,
                    help="default: the model's own task")
    ev.add_argument("--sigma", type=float, help="denoise: Gaussian noise sigma in 0..255 (default: the model's)")
    ev.add_argument("--samples", type=int, help="generate: samples per Fréchet distance (default 500)")
    ev.add_argument("--reference-model", help="generate: another artefact (e.g. a VAE) measured the same way")
    ev.add_argument("--inception-weights", metavar="URI",
                    help="generate: FID on Inception v3 features from this local or s3:// copy of torchvision's "
                         "inception_v3_google-0cc3c7bd.pth (needed for images other than 28x28x1 digits)")
    ev.add_argument("--train-data", help="classify/reconstruct: training images for the baselines to fit on")
    ev.add_argument("--limit", type=int, help="only the first N held-out images (by key)")
    ev.add_argument("--output", help="where eval.json and eval.md go (default: <model>/eval/<task>/; for zoo:NAME, "
                    "./eval-NAME/<task>/)")
    ev.add_argument("--json", action="store_true", help="print everything as one JSON object instead of the table")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("pipeline", help="train -> eval -> quality gate -> bulk jobs -> serve, from one YAML",
                        description="Runs configs/pipeline/*.yaml: trains (or reuses a finished run with the same "
                        "config digest), evaluates against baselines, stops with a report if the quality gate fails, "
                        "else runs the bulk jobs with the artefact and deploys it to Serve. Rerunning continues from "
                        "the first unfinished stage. The report: <run_uri>/report/report.md. Exit status 1 when the "
                        "gate fails.")
    pl_config = pl.add_argument("config", help="configs/pipeline/*.yaml")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the pipeline config")
    pl.add_argument("--exit-after-deploy", action="store_true",
                    help="return once deployed (a local Ray, and its Serve app, then stop with this command)")
    pl.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    pl.set_defaults(func=cmd_pipeline)

    sv = sub.add_parser("serve", help="serve models over HTTP with Ray Serve")
    sv_config = sv.add_argument("config", help="configs/serve/*.yaml (the Serve config format)")
    sv.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the config")
    sv.add_argument("--host", help="listen address (default 127.0.0.1; anything else wants a bearer token)")
    sv.add_argument("--port", type=int, help="HTTP port (default from the config, 8000)")
    sv.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    sv.add_argument("--insecure", action="store_true",
                    help="allow listening beyond loopback without a bearer token (otherwise serve refuses to start)")
    sv.set_defaults(func=cmd_serve)

    ex = sub.add_parser("export", help="write a model artefact as one ONNX or TorchScript file",
                        description="Writes the artefact's network as ONNX (opened by onnxruntime) or TorchScript "
                        "(torch.jit.load), float32 NCHW images in [0, 1] in and out (class logits for classifiers). "
                        "Image-to-image families (denoisers, super-resolution, style nets, dense autoencoders) take "
                        "any batch, height and width (multiples of the family's size multiple, at least its "
                        "smallest side; pad as genray's Predictor does); the VAE and the classifier have one input "
                        "size and are exported for it; DCGAN (no image goes in) cannot be exported. The file is run "
                        "and compared with genray's Predictor at two sizes before it is written.")
    ex.add_argument("--model", required=True, help="model artefact URI (genray train's <output>/model)")
    ex.add_argument("--format", required=True, choices=("onnx", "torchscript"),
                    help="onnx needs the 'export' extra (pip install 'genray[export]')")
    ex.add_argument("--to", required=True, help="the file to write: a local path or s3://bucket/key")
    ex.set_defaults(func=cmd_export)

    sb = sub.add_parser("submit", help="run `genray train|process|pipeline` as a job on a Ray cluster",
                        description="Submit `genray train|process|pipeline ARGS` to a Ray cluster through the "
                        "Jobs API, ship the working directory with it, stream its logs and exit with its status. "
                        "Credentials are not shipped: the cluster's nodes hold them. Sends the token from "
                        "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH when set.")
    sb.add_argument("--address", help="the head's dashboard, e.g. http://head:8265 (default: RAY_ADDRESS)")
    sb.add_argument("--working-dir", default=".", help="directory shipped with the job; holds jobs/ and the config")
    sb.add_argument("--env", action="append", metavar="NAME=VALUE", help="non-secret environment variable for the job")
    sb.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following it")
    sb.add_argument("--submission-id", help="job id to use (default: one Ray picks)")
    sb.add_argument("job", choices=("train", "process", "pipeline"))
    sb.add_argument("args", nargs=argparse.REMAINDER, help="arguments of `genray train|process|pipeline`")
    sb.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop Ray jobs").add_subparsers(
        dest="jobs_verb", required=True)
    for name, text in (("list", "every job on the cluster"), ("status", "a job's status"),
                       ("logs", "a job's logs"), ("stop", "stop a running job")):
        jp = jobs.add_parser(name, help=text)
        if name != "list":
            jp.add_argument("job_id")
        if name == "logs":
            jp.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if name in ("list", "status"):
            jp.add_argument("--json", action="store_true", help="print one JSON value instead of the table")
        jp.add_argument("--address", help="the head's dashboard, e.g. http://head:8265 (default: RAY_ADDRESS)")
        jp.set_defaults(func=cmd_jobs)

    zoo = sub.add_parser("zoo", help="the models shipped with genray (use as --model zoo:NAME)").add_subparsers(
        dest="zoo_verb", required=True)
    zl = zoo.add_parser("list", help="name, task, size and held-out metric of each shipped model")
    zl.add_argument("--json", action="store_true", help="the whole index (configs, digests, every metric) as JSON")
    zl.set_defaults(func=cmd_zoo_list)

    de = sub.add_parser("demo", help="train -> bulk job over a local S3 server -> serve -> HTTP request")
    de.add_argument("--workdir", default="genray-demo-output", help="local copy of what the demo made")
    de.add_argument("--epochs", type=int, default=20)
    de.set_defaults(func=cmd_demo)

    co = sub.add_parser("completion", help="print a shell completion script: eval \"$(genray completion bash)\"",
                        description="Tab completion of verbs, flags and choices (generated by shtab from this "
                        "parser, so it never falls behind). bash: add `eval \"$(genray completion bash)\"` to "
                        "~/.bashrc; zsh: `genray completion zsh > ~/.zfunc/_genray` with ~/.zfunc on $fpath.")
    co.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    co.set_defaults(func=cmd_completion)
    for action in (tr_config, pl_config, sv_config):
        action.complete = shtab.FILE  # complete paths here, not words
    return p


def main(argv: list[str] | None = None) -> int:
    from genray import logs

    args = build_parser().parse_args(argv)
    logs.set_verbosity(logs.QUIET if args.quiet else logs.VERBOSE if args.verbose else logs.NORMAL)
    if argv is None:  # run as the program (not called by a test or a library): its terminal is genray's
        logs.own_terminal()
    try:
        return args.func(args)
    except _user_errors() as err:
        logs.end_bar()
        print(f"genray: error: {err}", file=sys.stderr)
        return 2


def smoke_output(verb: str, argv: list[str]) -> tuple[str, list[str]]:
    """For a jobs/<verb>.py --smoke-test: (--output, or a new temp dir; the other arguments)."""
    import tempfile

    p = argparse.ArgumentParser(prog=f"jobs/{verb}.py --smoke-test")
    p.add_argument("--output")
    args, rest = p.parse_known_args(argv)
    return args.output or tempfile.mkdtemp(prefix=f"genray-smoke-{verb}-"), rest


def job_main(verb: str, argv: list[str] | None, smoke_test_args) -> int:
    """The `jobs/<verb>.py` entry points: `genray <verb> ARGS`, or with --smoke-test the arguments that
    `smoke_test_args(rest)` makes (after writing its data) for a seeded tiny run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke-test" in argv:
        argv.remove("--smoke-test")
        argv = smoke_test_args(argv)
    return main([verb, *argv])


if __name__ == "__main__":
    sys.exit(main())

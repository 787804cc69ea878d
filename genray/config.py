"""Typed configs for every value that comes from YAML or the command line.

Pydantic v2 models with extra="forbid": a typo or a wrong type fails loudly, naming the key and the file.
Defaults live only in these classes (and in each model family's config class, beside its model).
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genray.tasks import BULK_TASKS, EVAL_TASKS


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    """Training data: read and decoded by Ray Data tasks, streamed to the Train workers (no worker holds it all).

    uri and held_out_uri take what `genray process --input` takes: a prefix of loose images, one archive
    (.tar/.tar.gz/.zip), a prefix holding archives, or a brace pattern of WebDataset shards
    (s3://b/celeba/shard-{000000..000099}.tar). Labels come from a '<label>/' folder in the key, or for archive
    members from a .cls / .json ({"label": n}) sidecar of the same sample."""

    uri: str
    held_out_uri: str | None = None  # images for the final quality metrics in model.json (read by the driver)
    limit: int | None = Field(default=None, gt=0)  # use at most this many training images
    # A file that cannot be decoded, or declares more than max_pixels: skip it (counted, logged with its key, and
    # recorded in metrics.jsonl as data_errors), or fail the run naming it.
    on_error: Literal["fail", "skip"] = "skip"
    max_pixels: int = Field(default=64_000_000, gt=0)  # decoded-size cap per image, checked from the header
    # Keep the decoded dataset in Ray's object store after the first read instead of reading it every epoch:
    # auto does so when the listed inputs total at most materialize_max_bytes.
    materialize: Literal["auto", "always", "never"] = "auto"
    materialize_max_bytes: int = Field(default=64 << 20, ge=0)
    # Shuffling: the order of files/shards is new every epoch; then decoded images pass a local shuffle buffer of
    # shuffle_rows images (memory: up to twice that many decoded images per worker, with the rows read ahead), and
    # prepared items (crops) one of shuffle_items items.
    shuffle_rows: int = Field(default=64, ge=1)
    shuffle_items: int = Field(default=1024, ge=1)
    files_per_read_task: int = Field(default=16, gt=0)  # loose images per Ray Data read task (archives: one each)
    # CPUs each Ray Data read task reserves. 0 (default): reads never wait for a CPU, so they run even where the
    # Train workers hold every CPU (a read mostly waits on storage); on a cluster with CPU-only nodes for reading,
    # set it (e.g. 1) so reads are spread by CPU there.
    cpus_per_read_task: float = Field(default=0.0, ge=0)
    # Read tasks in flight at once (None: the cluster's CPU count when the run starts). Each one is a worker
    # process: with 0-CPU reads nothing else bounds them, and 90 processes starting at once on a 2-core node took
    # two minutes before the first batch (genray demo, 1,440 digits in 90 read tasks).
    max_read_tasks: int | None = Field(default=None, gt=0)


class TrainParams(Strict):
    epochs: int = Field(default=10, gt=0)
    batch_size: int = Field(default=64, gt=0)  # per worker
    lr: float = Field(default=1e-3, gt=0)
    # Learning-rate schedule over epochs, applied to every optimizer (as a factor on its initial lr):
    # constant, or cosine decay from lr at epoch 1 towards lr * lr_min_factor at the end of the last epoch.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min_factor: float = Field(default=0.0, ge=0, le=1)
    seed: int = 0
    checkpoint_every: int = Field(default=1, gt=0)  # epochs between checkpoints (and ray.train.report calls)
    num_to_keep: int = Field(default=2, gt=0)  # checkpoints kept in storage
    max_failures: int = Field(default=0, ge=-1)  # worker-group restarts from the last checkpoint (-1 = forever)
    num_samples: int = Field(default=8, gt=0)  # images in each per-epoch sample grid
    # Autocast precision of the train steps: bf16 (CPUs and recent GPUs) or fp16 (GPUs; with a GradScaler so small
    # gradients do not underflow). Weights and optimizer state stay fp32. Recorded in model.json.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class ScalingParams(Strict):
    num_workers: int = Field(default=2, ge=0)  # 0 runs the loop in the driver (unit tests only)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    # Extra entries for the TorchTrainer placement, e.g. {"node_a": 1} to pin workers in tests.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # How Ray Train places the workers' bundles: PACK (fewest nodes, fastest all-reduce) or SPREAD (one per node
    # where possible, so losing a node loses fewer workers); the STRICT_ forms fail instead of falling back.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class TrackingConfig(Strict):
    """Experiment tracking, written by rank 0 (genray/training/tracking.py; needs the `tracking` extra)."""
    # TensorBoard event files under <output>/tensorboard/ (scalars and the sample grid per epoch, hparams).
    tensorboard: bool = True
    # An MLflow tracking URI: a local store (file:/abs/mlruns) or a server (http://host:5000). None: no MLflow.
    # A file: store must be reachable from the rank-0 worker's node (shared storage on a real cluster).
    mlflow_uri: str | None = None
    mlflow_experiment: str = Field(default="genray", min_length=1)


class TrainConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # run name: same name + output resumes
    output_uri: str  # where checkpoints, samples, metrics and model/ go
    model: Any  # validated against the family's own config class (see _validate_model)
    data: DataConfig
    train: TrainParams = TrainParams()
    scaling: ScalingParams = ScalingParams()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _validate_model(cls, value: Any) -> Any:
        from genray.models import get_spec  # models do not import config; the arrow points this way only

        if isinstance(value, BaseModel):
            return value
        if not isinstance(value, dict) or "family" not in value:
            raise ValueError("model must be a mapping with a 'family' key")
        spec = get_spec(value["family"])
        return spec.config_cls.model_validate(value)

    def model_dump_plain(self) -> dict[str, Any]:
        """A JSON-able dict that validates back into an equal TrainConfig (for train_loop_config)."""
        return self.model_dump(mode="json")


def set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set tree['a']['b'] = value for 'a.b' (a numeric part indexes a list: 'applications.0.name').

    Intermediate mappings are created; validation then rejects keys that do not exist."""
    *parents, leaf = dotted_key.split(".")
    node: Any = tree
    for part in parents:
        if isinstance(node, list):
            node = _list_item(node, part, dotted_key)
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {dotted_key}: '{part}' is not a section")
        node = child
    if isinstance(node, list):
        node[_list_index(node, leaf, dotted_key)] = value
    else:
        node[leaf] = value


def _list_index(items: list, part: str, dotted_key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"--set {dotted_key}: '{part}' is not an index of a list of {len(items)}")
    return int(part)


def _list_item(items: list, part: str, dotted_key: str) -> Any:
    return items[_list_index(items, part, dotted_key)]


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        # YAML parsing gives numbers, booleans and lists the same types as in the file.
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else raw))
    return pairs


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"{source}: {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def validate(cls: type[BaseModel], data: dict[str, Any], source: str = "<config>") -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, cls: type[BaseModel] = TrainConfig) -> Any:
    """Read a YAML file, apply dotted `key=value` overrides, validate into `cls`."""
    data = read_yaml(path)
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value)
    return validate(cls, data, str(path))


TaskName = Literal[BULK_TASKS]  # the tasks `genray process` runs (genray/tasks.py)


class ProcessConfig(Strict):
    """One bulk job (`genray process`): every image under input_uri through the model, results under output_uri.

    Style jobs take either a fast style network artefact (model_uri) or a style image (style_image_uri), which
    runs Gatys optimisation per image: slow, and `gatys_iterations` sets how slow.
    """

    task: TaskName
    input_uri: str
    output_uri: str
    model_uri: str | None = None
    style_image_uri: str | None = None
    tile: int = Field(default=512, ge=32)  # images larger than this are processed in overlapping tiles
    tile_overlap: int = Field(default=16, ge=0)
    batch_size: int = Field(default=8, gt=0)  # images per model call in each actor (and per read/write task)
    # Images (or tiles) per forward pass inside a model call; None: batch_size. On CPU 1 is often fastest (a small
    # batch's activations stay in cache); on a GPU larger batches are.
    forward_batch_size: int | None = Field(default=None, gt=0)
    # Model actors: N, or (MIN, MAX) from "MIN-MAX" for a pool Ray Data grows as nodes join; the job starts once MIN
    # are placed.
    concurrency: int | tuple[int, int] = 1
    cpus_per_actor: float = Field(default=1.0, gt=0)
    # GPUs per model actor; fractions share a GPU (0.5: two actors on each). 0: CPU only. Above 1, whole GPUs.
    gpus_per_actor: float = Field(default=0.0, ge=0)
    # The forward's autocast dtype. None: bf16 on a GPU, fp32 on CPU (where reduced precision is usually slower).
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    # Two calls per model actor so one batch's read/decode and encode/write overlap the other's forward (one forward
    # at a time). None: on for GPU actors (the GPU otherwise waits for the CPU work), off on CPU (it competes for the
    # same cores there; see README "GPU bulk jobs").
    overlap_io: bool | None = None
    # A rerun also checks that the output of every input its manifest says is done still exists (a HEAD per
    # input, or per tar shard) and redoes those whose output is gone, e.g. removed by a lifecycle rule.
    verify_outputs: bool = False
    max_pixels: int = Field(default=64_000_000, gt=0)  # decoded-size cap, checked from the header
    # Hardening limits (README "Reliability"): past each one an input is an error row naming the flag.
    max_output_pixels: int = Field(default=64_000_000, gt=0)  # output size cap (x4 of a 64 MP input is 1 Gpx)
    # Bytes of one loose file or archive member, checked from the listing / header before reading; None:
    # 8 bytes per allowed pixel + 1 MiB (an uncompressed 16-bit RGBA image of max_pixels).
    max_input_bytes: int | None = Field(default=None, gt=0)
    max_archive_members: int = Field(default=1_000_000, gt=0)  # entries per archive (tar headers, zip directory)
    max_archive_bytes: int = Field(default=256 << 30, gt=0)  # decompressed bytes read from one archive
    max_sample_bytes: int = Field(default=1 << 30, gt=0)  # one WebDataset sample's parts held together
    max_attempts: int = Field(default=3, gt=0)  # an input whose worker dies this often becomes an error row
    retry_errors: bool = False  # reruns redo "worker died" rows too (other error rows are always redone)
    lease_seconds: float = Field(default=600.0, gt=0)  # a dead run's lease on the output prefix expires after this
    dry_run: bool = False
    # files: one image per input under the output prefix; tar: WebDataset shards <output>/shard-NNNNNN.tar
    output_format: Literal["files", "tar"] = "files"
    # Output images: png, jpg or webp (output keys end with it: a/b.tif -> a/b.webp); quality for jpg and webp.
    ext: Literal["png", "jpg", "webp"] = "png"
    quality: int = Field(default=90, ge=1, le=100)
    # The output's size over the input's, e.g. 2 with a x4 model: its x4, then a Lanczos resize (Real-ESRGAN's
    # --outscale). None: the model's own scale.
    outscale: float | None = Field(default=None, gt=0, le=16)
    # keep: an input's alpha channel goes around the model (colour through it, alpha resized with Lanczos) and into
    # the output (png, webp); composite: alpha over white before the model, as jpg outputs always are.
    alpha: Literal["keep", "composite"] = "keep"
    shard_size: int = Field(default=1000, gt=0)  # tar output: images per shard (their sidecars ride along)
    shard_bytes: int | None = Field(default=None, gt=0)  # tar output: a shard also closes before passing this size
    # Gatys optimisation (style jobs with style_image_uri): iterations per image and the VGG19 weight lookup.
    gatys_iterations: int = Field(default=300, gt=0)
    gatys_max_side: int = Field(default=512, ge=16)  # larger images are optimised at this size, then upscaled
    vgg_weights: str | None = None  # local or s3:// copy of torchvision's vgg19-dcbb9e9d.pth
    vgg_download: bool = True
    allow_untrained_vgg: bool = False  # smoke tests only: random VGG features make meaningless styles

    @field_validator("concurrency", mode="before")
    @classmethod
    def _actor_range(cls, value: Any) -> Any:
        """3, "3", "2-4" or [2, 4] -> 3 or (2, 4)."""
        if isinstance(value, str):
            lo, sep, hi = value.strip().partition("-")
            try:
                value = (int(lo), int(hi)) if sep else int(lo)
            except ValueError:
                raise ValueError(f"concurrency {value!r}: give N or MIN-MAX, e.g. 4 or 2-8") from None
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"concurrency {value}: at least 1 model actor")
        if isinstance(value, (list, tuple)) and len(value) == 2 and not 0 < value[0] <= value[1]:
            raise ValueError(f"concurrency {value[0]}-{value[1]}: need 1 <= MIN <= MAX")
        return value

    @field_validator("gpus_per_actor")
    @classmethod
    def _gpu_share(cls, value: float) -> float:
        if value > 1 and value != int(value):  # Ray shares a GPU by fractions, but hands out more than one whole
            raise ValueError(f"gpus_per_actor {value:g}: a fraction up to 1, or a whole number of GPUs")
        return value

    @property
    def output_suffix(self) -> str:
        return "." + self.ext

    @property
    def keeps_alpha(self) -> bool:
        return self.alpha == "keep" and self.ext != "jpg"  # JPEG has no alpha channel

    @property
    def min_actors(self) -> int:
        return self.concurrency if isinstance(self.concurrency, int) else self.concurrency[0]

    @property
    def max_actors(self) -> int:
        return self.concurrency if isinstance(self.concurrency, int) else self.concurrency[1]

    @model_validator(mode="after")
    def _model_or_style_image(self) -> "ProcessConfig":
        if self.task != "style" and self.style_image_uri:
            raise ValueError(f"style_image_uri is only for style jobs, not {self.task}")
        if self.task == "style" and self.model_uri and self.style_image_uri:
            raise ValueError("give either model_uri (a fast style network) or style_image_uri (Gatys "
                             "optimisation), not both")
        if not self.model_uri and not (self.task == "style" and self.style_image_uri):
            need = "model_uri or style_image_uri" if self.task == "style" else "model_uri"
            raise ValueError(f"a {self.task} job needs {need}")
        return self


# --- serving: configs/serve/*.yaml, read by `genray serve` and by Ray's own `serve run` / `serve deploy` -------

class AutoscalingOptions(Strict):
    """Ray Serve's autoscaling_config for one deployment: the replica count follows the requests in flight."""

    min_replicas: int = Field(default=1, ge=0)  # 0 scales to zero when idle; the next request waits for a cold start
    max_replicas: int = Field(default=2, gt=0)
    # Requests in flight per replica (running + waiting in the batcher) that Serve steers towards. None: one full
    # batch, so a replica is added once batches are full and requests start waiting for the next one.
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    upscale_delay_s: float = Field(default=10.0, ge=0)  # load must stay above target this long to add a replica
    downscale_delay_s: float = Field(default=120.0, ge=0)  # and below it this long to remove one (avoids flapping)
    look_back_period_s: float = Field(default=30.0, gt=0)  # the window the in-flight average is taken over
    # How often callers report their in-flight requests to Serve's controller (None: Ray's 10 s). Ray 2.60 marks
    # the field deprecated in favour of future environment variables, but it is still what sets the period.
    metrics_interval_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        interval = self.metrics_interval_s or 10.0
        if self.look_back_period_s <= interval:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must be longer than the metrics "
                             f"interval ({interval} s): the average needs more than one report")
        return self


class DeploymentOptions(Strict):
    """How one model deployment runs: dynamic batching, replicas, resources, and its bounded request queue."""

    max_batch_size: int = Field(default=8, gt=0)  # dynamic batching: concurrent requests share one forward pass
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)  # how long a partial batch waits for more requests
    num_replicas: int | None = Field(default=None, gt=0)  # a fixed count; None: 1, or `autoscaling` if given
    autoscaling: AutoscalingOptions | None = None  # replicas follow the load (instead of num_replicas)
    num_cpus: float = Field(default=0.5, gt=0)  # Ray's CPU reservation per replica
    num_gpus: float = Field(default=0, ge=0)  # per replica; a replica that gets a GPU runs its model there
    # torch intra-op threads per replica. None: Ray's OMP_NUM_THREADS for the actor (num_cpus rounded down, >= 1).
    num_threads: int | None = Field(default=None, gt=0)
    # Requests a replica holds at once. None: two batches (one running, the next one filling meanwhile).
    max_ongoing_requests: int | None = Field(default=None, gt=0)
    # Requests waiting for a free replica slot, per caller; beyond that the caller gets 503 (or 429) at once
    # instead of an ever longer wait. Always bounded: an unbounded queue turns overload into timeouts.
    max_queued_requests: int = Field(default=32, gt=0)
    tile: int = Field(default=512, ge=32)  # larger images go through the model in overlapping tiles
    tile_overlap: int = Field(default=16, ge=0)

    @model_validator(mode="after")
    def _replicas_and_batches(self) -> "DeploymentOptions":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give num_replicas (fixed) or autoscaling, not both")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) below max_batch_size "
                             f"({self.max_batch_size}) would never let a batch fill up")
        return self

    @property
    def ongoing_limit(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size


class ModelServeConfig(DeploymentOptions):
    """One model artefact as one deployment. Its routes follow the artefact's task: image models answer
    POST /<name>, generators GET /generate/<name> (VAEs also /vae/<name>/...), classifiers POST /classify/<name>."""

    uri: str  # model artefact (local or s3://) as written by `genray train`, or zoo:NAME (`genray zoo list`)


class StylePoolConfig(DeploymentOptions):
    """POST /style/<style>: fast style networks multiplexed over one pool of replicas (Serve model multiplexing);
    each replica loads the styles it is asked for on demand and keeps the most recently used ones."""

    uris: dict[str, str] = Field(min_length=1)  # style name -> style_net artefact (local or s3://)
    max_styles_per_replica: int = Field(default=4, gt=0)  # loaded styles kept per replica (least recently used go)

    @field_validator("uris")
    @classmethod
    def _style_names(cls, uris: dict[str, str]) -> dict[str, str]:
        for name in uris:
            _check_route_name(name, reserved=False)
        return uris


class GatewayOptions(Strict):
    """The FastAPI ingress: checks the token, validates and decodes uploads, then calls the model deployments."""

    num_replicas: int = Field(default=1, gt=0)
    num_cpus: float = Field(default=0.25, gt=0)  # decoding uploads is its only real work
    # Far above what the models accept, so the models' own bounded queues decide which requests get 503.
    max_ongoing_requests: int = Field(default=512, gt=0)
    max_queued_requests: int = Field(default=256, gt=0)  # waiting at the HTTP proxy; beyond that Serve answers 503


# Endpoint and style names are URL path segments; these are the gateway's own first segments.
_RESERVED_ROUTE_NAMES = ("models", "docs", "redoc", "openapi.json", "style", "generate", "vae", "classify", "-")


def _check_route_name(name: str, reserved: bool = True) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise ValueError(f"{name!r}: names are URL path segments: lower-case letters, digits, '_', '.', '-'")
    if reserved and name in _RESERVED_ROUTE_NAMES:
        raise ValueError(f"{name!r} is one of the gateway's own routes ({', '.join(_RESERVED_ROUTE_NAMES)})")


class ServeAppConfig(Strict):
    """`args` of the genray application in a Serve config file (configs/serve/*.yaml)."""

    models: dict[str, ModelServeConfig] = Field(default_factory=dict)  # endpoint name -> artefact
    styles: StylePoolConfig | None = None  # POST /style/<style>, multiplexed
    gateway: GatewayOptions = GatewayOptions()
    max_body_bytes: int = Field(default=20_000_000, gt=0)  # larger uploads get 413
    max_pixels: int = Field(default=16_000_000, gt=0)  # larger decoded images get 413 (checked from the header)
    max_output_pixels: int = Field(default=64_000_000, gt=0)  # 413 when e.g. x4 super-resolution would exceed it
    max_images: int = Field(default=64, gt=0)  # cap on n for /generate and steps for /vae/.../interpolate
    # The gateway waits this long for a model's answer, then answers 504 and cancels the request.
    request_timeout_s: float = Field(default=60.0, gt=0)
    # The whole upload must arrive within this long, else 408: a client trickling a large body cannot hold a
    # connection and its buffer open for ever.
    body_read_timeout_s: float = Field(default=30.0, gt=0)
    overload_status_code: Literal[503, 429] = 503  # the answer when a bounded queue is full
    retry_after_s: float | None = Field(default=1.0, ge=0)  # Retry-After header on those answers (None: none)
    # Bearer token: never in this file. The ingress reads it from $GENRAY_SERVE_TOKEN, else from the file named by
    # $GENRAY_SERVE_TOKEN_FILE, else from token_file (e.g. a mounted Kubernetes secret). No token: no check.
    token_file: str | None = None
    require_token: bool = False  # refuse to start when no token is found (set it for anything off loopback)
    # Listening beyond loopback with no token refuses to start; true serves such a host open to anyone who can
    # reach it (`genray serve --insecure` sets it).
    insecure: bool = False

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelServeConfig]) -> dict[str, ModelServeConfig]:
        for name in models:
            _check_route_name(name)
        return models

    @model_validator(mode="after")
    def _something_to_serve(self) -> "ServeAppConfig":
        if not self.models and self.styles is None:
            raise ValueError("nothing to serve: give `models`, `styles` or both")
        return self


class HttpOptions(Strict):
    host: str = "127.0.0.1"  # loopback unless a cluster config says otherwise (then set a token too)
    port: int = Field(default=8000, ge=0, le=65535)
    # Serve's own end-to-end limit at the HTTP proxy (answered 408); None leaves it to the gateway's 504.
    request_timeout_s: float | None = Field(default=None, gt=0)


class ServeApplication(Strict):
    name: str = "genray"
    route_prefix: str = "/"
    import_path: Literal["genray.serving.app:build_app"] = "genray.serving.app:build_app"
    args: ServeAppConfig


class ServeFileConfig(Strict):
    """The Serve config file format (a subset Ray's `serve run` / `serve deploy` read too)."""

    proxy_location: Literal["HeadOnly", "EveryNode", "Disabled"] = "HeadOnly"
    http_options: HttpOptions = HttpOptions()
    applications: list[ServeApplication] = Field(min_length=1)


# -- genray pipeline: train -> eval -> gate -> bulk jobs -> serve, one YAML ------------------------------------

# A gate condition's operators; two-character ones first, so '>=' is not read as '>'.
GATE_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}


def parse_gate_condition(text: str) -> tuple[str, Callable[[float, float], bool], float]:
    """'psnr_gain_over_bicubic_db >= 0.5' -> ('psnr_gain_over_bicubic_db', operator.ge, 0.5)."""
    import re

    ops = "|".join(map(re.escape, GATE_OPERATORS))
    match = re.fullmatch(rf"\s*([A-Za-z_][A-Za-z0-9_]*)\s*({ops})\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*", text)
    if not match:
        raise ValueError(f"{text!r}: a gate condition is '<metric> <op> <number>' with op one of "
                         f"{' '.join(GATE_OPERATORS)}, e.g. 'accuracy >= 0.95'")
    return match[1], GATE_OPERATORS[match[2]], float(match[3])


class PipelineEval(Strict):
    """What `genray eval` runs on the trained artefact before the gate (see genray/evaluation.py)."""

    data_uri: str  # held-out images, e.g. s3://genray-data/photos/test/
    task: Literal[EVAL_TASKS] | None = None  # default: the model's
    sigma: float | None = Field(default=None, gt=0)  # denoise: noise sigma in 0..255 (default: the model's)
    num_samples: int | None = Field(default=None, gt=1)  # generate: samples per Fréchet distance
    reference_model_uri: str | None = None  # generate: e.g. a VAE artefact, for fid_ratio_vs_vae
    train_data_uri: str | None = None  # classify/reconstruct: training images for the baselines


class PipelineBulkJob(Strict):
    """One `genray process` job run with the trained artefact; `job` holds ProcessConfig's keys but model_uri."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    job: dict[str, Any]

    @field_validator("job")
    @classmethod
    def _valid_process_config(cls, job: dict[str, Any]) -> dict[str, Any]:
        if "model_uri" in job:
            raise ValueError("model_uri is the pipeline's trained artefact; leave it out")
        ProcessConfig.model_validate({**job, "model_uri": "<trained artefact>"})  # typos fail at load time
        return job


class PipelineServe(Strict):
    """Deploy a Serve config with the trained artefact behind one of its `models` endpoints."""

    # configs/serve/*.yaml (relative paths: to the working directory); None: one app serving just this model with
    # the default options on 127.0.0.1:8000 (tune it with overrides, e.g. applications.0.args.models.<endpoint>.*)
    config: str | None = None
    endpoint: str  # the entry of the first application's `models` whose uri becomes the trained artefact
    overrides: list[str] = Field(default_factory=list)  # e.g. ["http_options.port=8123"]


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    run_uri: str  # the pipeline's state (resume), eval results and report.md go here
    train: str  # configs/train/*.yaml (relative paths: to the working directory)
    train_overrides: list[str] = Field(default_factory=list)  # as `genray train --set`
    eval: PipelineEval
    gate: list[str] = Field(min_length=1)  # every condition must hold, e.g. "psnr_y_gain_over_bicubic_db >= 1.0"
    bulk_jobs: list[PipelineBulkJob] = Field(default_factory=list)
    serve: PipelineServe | None = None

    @field_validator("gate")
    @classmethod
    def _gate_conditions(cls, gate: list[str]) -> list[str]:
        for condition in gate:
            parse_gate_condition(condition)
        return gate

    @model_validator(mode="after")
    def _unique_job_names(self) -> "PipelineConfig":
        names = [job.name for job in self.bulk_jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"bulk job names must be unique, got {names}")
        return self

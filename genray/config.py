"""Typed configs for every value that comes from YAML or the command line.

Pydantic v2 models with extra="forbid": a typo or a wrong type fails loudly, naming the key and the file.
Defaults live only in these classes (and in each model family's config class, beside its model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    uri: str  # image prefix, local path or s3://bucket/prefix
    held_out_uri: str | None = None  # images for the final quality metrics in model.json
    limit: int | None = Field(default=None, gt=0)  # use at most this many training images


class TrainParams(Strict):
    epochs: int = Field(default=10, gt=0)
    batch_size: int = Field(default=64, gt=0)  # per worker
    lr: float = Field(default=1e-3, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(default=1, gt=0)  # epochs between checkpoints (and ray.train.report calls)
    num_to_keep: int = Field(default=2, gt=0)  # checkpoints kept in storage
    max_failures: int = Field(default=0, ge=-1)  # worker-group restarts from the last checkpoint (-1 = forever)
    num_samples: int = Field(default=8, gt=0)  # images in each per-epoch sample grid


class ScalingParams(Strict):
    num_workers: int = Field(default=2, ge=0)  # 0 runs the loop in the driver (unit tests only)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    # Extra entries for the TorchTrainer placement, e.g. {"node_a": 1} to pin workers in tests.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)


class TrainConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # run name: same name + output resumes
    output_uri: str  # where checkpoints, samples, metrics and model/ go
    model: Any  # validated against the family's own config class (see _validate_model)
    data: DataConfig
    train: TrainParams = TrainParams()
    scaling: ScalingParams = ScalingParams()

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


TaskName = Literal["denoise", "superres", "style"]


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
    batch_size: int = Field(default=8, gt=0)  # images per model call in each actor
    concurrency: int = Field(default=1, gt=0)  # model actors
    cpus_per_actor: float = Field(default=1.0, gt=0)
    max_pixels: int = Field(default=64_000_000, gt=0)  # decoded-size cap, checked from the header
    dry_run: bool = False
    # Gatys optimisation (style jobs with style_image_uri): iterations per image and the VGG19 weight lookup.
    gatys_iterations: int = Field(default=300, gt=0)
    gatys_max_side: int = Field(default=512, ge=16)  # larger images are optimised at this size, then upscaled
    vgg_weights: str | None = None  # local or s3:// copy of torchvision's vgg19-dcbb9e9d.pth
    vgg_download: bool = True
    allow_untrained_vgg: bool = False  # smoke tests only: random VGG features make meaningless styles

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


class ModelServeConfig(Strict):
    """One model deployment of the Serve app."""

    uri: str  # model artefact (local or s3://)
    max_batch_size: int = Field(default=8, gt=0)  # dynamic batching: concurrent requests share a forward pass
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    num_replicas: int = Field(default=1, gt=0)
    num_cpus: float = Field(default=0.5, gt=0)
    tile: int = Field(default=512, ge=32)
    tile_overlap: int = Field(default=16, ge=0)


class ServeAppConfig(Strict):
    """`args` of the genray application in a Serve config file (configs/serve/*.yaml)."""

    models: dict[str, ModelServeConfig]  # endpoint name -> model; image models answer POST /<name>
    max_body_bytes: int = Field(default=20_000_000, gt=0)  # larger uploads get 413
    max_pixels: int = Field(default=16_000_000, gt=0)  # larger decoded images get 413 (checked from the header)


class HttpOptions(Strict):
    host: str = "127.0.0.1"  # loopback unless a cluster config says otherwise
    port: int = Field(default=8000, ge=0, le=65535)


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

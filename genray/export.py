"""`genray export`: a model artefact as one ONNX or TorchScript file that runs without genray.

The file's graph is the Predictor's model call with the family's value range folded in, so every exported model
speaks the same language: float32 NCHW images in [0, 1] in, float32 NCHW images in [0, 1] out (`scale` times
larger for super-resolution), or class logits for classifiers. Image-to-image families take any batch, height
and width (height and width multiples of the family's size multiple, and at least its smallest side: padding and
tiling stay with the caller, as the Predictor does them); families whose network has one input size (the VAE,
the classifier) are exported for that size. Models that do not take an image (DCGAN) cannot be exported.

Before a file is written, it is run (onnxruntime / torch.jit.load) on two batches of other shapes than the example
it was made from (other heights and widths, one of them the smallest side, where the family allows) and compared
with the Predictor's forward on the same uint8 tiles: a shape that tracing or torch.export baked into the graph,
or any difference beyond CHECK_TOLERANCE, refuses the file instead of writing it.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from genray import __version__, storage
from genray.inference import Predictor
from genray.model_artifact import load_artifact
from genray.models import MODELS, ModelSpec
from genray.tasks import TASKS

FORMATS = ("onnx", "torchscript")
CHECK_TOLERANCE = 1e-4  # max abs difference from the Predictor on [0, 1] outputs (or on logits)
METADATA_KEY = "genray"  # ONNX metadata_props key / TorchScript extra file "genray.json": what the graph expects
EXAMPLE_SIDE = 16  # sides of the traced example are at least this, so no layer sees a degenerate input


class ExportError(ValueError):
    """The artefact cannot be exported as asked; the message says why, on one line."""


@dataclass(frozen=True)
class GraphShape:
    """What an exported graph takes and gives."""

    channels: int
    output: Literal["image", "logits"]
    scale: int
    fixed_side: int | None  # the one input side of a fixed-shape family; None: any height and width...
    multiple: int  # ...that are multiples of this
    min_side: int  # ...and at least this

    def describe(self) -> tuple[str, str]:
        """(input, output) in words, for the CLI and the file's metadata."""
        c = self.channels
        if self.fixed_side is not None:
            s = self.fixed_side
            given = f"float32 (N, {c}, {s}, {s}) in [0, 1] (fixed size: this family's network has one input size)"
            made = f"float32 (N, {c}, {s}, {s}) in [0, 1]"
        else:
            sides = f"H, W multiples of {self.multiple}" if self.multiple > 1 else "H, W any"
            given = f"float32 (N, {c}, H, W) in [0, 1]; {sides}, at least {self.min_side}"
            k = f"{self.scale}" if self.scale > 1 else ""
            made = f"float32 (N, {c}, {k}H, {k}W) in [0, 1]"
        return given, made if self.output == "image" else "float32 (N, classes) logits"


def exportable_families() -> list[str]:
    return sorted(name for name, spec in MODELS.items() if _output_kind(spec) is not None)


def _output_kind(spec: ModelSpec) -> Literal["image", "logits"] | None:
    route = TASKS[spec.task].route
    if route == "image" or (route == "generator" and spec.reconstruct is not None):  # a VAE's forward reconstructs
        return "image"
    if route == "classifier" and spec.image_size is not None:
        return "logits"
    return None  # a generator from latent noise: no image goes in


def graph_shape(spec: ModelSpec, cfg: Any) -> GraphShape:
    output = _output_kind(spec)
    if output is None:
        raise ExportError(f"{spec.name} models cannot be exported: they make images from latent noise, not from an "
                          f"input image (exportable families: {', '.join(exportable_families())})")
    m = spec.size_multiple
    return GraphShape(channels=spec.in_channels(cfg), output=output, scale=spec.scale if output == "image" else 1,
                      fixed_side=spec.image_size(cfg) if spec.image_size is not None else None,
                      multiple=m, min_side=math.ceil(max(spec.min_side, 1) / m) * m)


class _InUnitRange(nn.Module):
    """The family's network between [0, 1] images: the Predictor's to_float / to_uint8 value-range rule as graph
    operations (tanh families see 2x - 1 and give (y + 1) / 2)."""

    def __init__(self, model: nn.Module, value_range: str, output: str):
        super().__init__()
        self.model, self.tanh, self.image_out = model, value_range == "tanh", output == "image"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        y = self.model(image * 2.0 - 1.0 if self.tanh else image)
        return (y + 1.0) * 0.5 if self.tanh and self.image_out else y


def _sizes(shape: GraphShape) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(the example's height and width, the two (height, width) the file is checked at). Dynamic graphs are
    checked at other sizes than the example, one of them the smallest side, so a shape baked into the graph
    (tracing follows Python's branches) shows up before the file is written."""
    if shape.fixed_side is not None:
        s = shape.fixed_side
        return (s, s), [(s, s), (s, s)]
    m, low = shape.multiple, shape.min_side
    base = m * max(2, math.ceil(max(low, EXAMPLE_SIDE) / m))
    return (base, base + m), [(low, base + 2 * m), (base + 3 * m, low)]


def _metadata(shape: GraphShape, spec: ModelSpec, meta: dict[str, Any], fmt: str) -> str:
    given, made = shape.describe()
    return json.dumps({"family": spec.name, "task": spec.task, "digest": meta["digest"], "format": fmt,
                       "input": given, "output": made, "channels": shape.channels, "scale": shape.scale,
                       "fixed_side": shape.fixed_side, "size_multiple": shape.multiple, "min_side": shape.min_side,
                       "genray_version": __version__}, sort_keys=True)


def _to_onnx(wrapper: nn.Module, example: torch.Tensor, shape: GraphShape, metadata: str) -> bytes:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:  # torch.onnx's exporter needs the first two, the check before writing the third
        raise ExportError(f"--format onnx needs the 'export' extra (pip install 'genray[export]'): "
                          f"{', '.join(missing)} not installed")
    from torch.export import Dim

    dims: dict[int, Any] = {0: Dim("batch")}
    if shape.fixed_side is None:  # height = multiple * k: the graph holds for every such size, not just the example's
        for axis, name in ((2, "height"), (3, "width")):
            k = Dim(f"{name}_blocks" if shape.multiple > 1 else name, min=shape.min_side // shape.multiple)
            dims[axis] = k * shape.multiple if shape.multiple > 1 else k
    output_name = "output" if shape.output == "image" else "logits"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # torch.export first, on its own: it refuses a graph that would only hold for the example's sizes,
            # where torch.onnx.export alone falls back to fixing them silently.
            exported = torch.export.export(wrapper, (example,), dynamic_shapes={"image": dims})
            program = torch.onnx.export(exported, dynamo=True, input_names=["image"], output_names=[output_name],
                                        verbose=False)
    except Exception as err:  # torch.export's errors are pages long: the first line says what broke
        raise ExportError(f"ONNX export failed: {_first_line(err)}") from None
    _name_axes(program, shape.multiple)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    proto.doc_string = f"genray export: {metadata}"
    return proto.SerializeToString()


def _name_axes(program: Any, multiple: int) -> None:
    """Readable dynamic axes in the ONNX file ("batch", "height", or "4*height_div4"), not torch's s0, s1..."""
    names = {0: "batch", 2: "height" if multiple == 1 else f"height_div{multiple}",
             3: "width" if multiple == 1 else f"width_div{multiple}"}
    mapping = {}
    for axis, name in names.items():
        dim = program.model.graph.inputs[0].shape[axis]
        symbols = re.findall(r"[A-Za-z_]\w*", str(getattr(dim, "value", dim)))  # "4*s73" -> s73; fixed: none
        if len(symbols) == 1:
            mapping[symbols[0]] = name
    program.rename_axes(mapping)


def _to_torchscript(wrapper: nn.Module, example: torch.Tensor, metadata: str) -> bytes:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes; the check below decides
            traced = torch.jit.trace(wrapper, (example,))
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer, _extra_files={f"{METADATA_KEY}.json": metadata})
    except Exception as err:
        raise ExportError(f"TorchScript export failed: {_first_line(err)}") from None
    return buffer.getvalue()


def _runner(fmt: str, data: bytes):
    """A function float32 NCHW array -> float32 array that runs the exported file as its users would."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # a failing node is reported once, as an ExportError, not also in red
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"image": x})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run


def predictor_reference(predictor: Predictor, tiles: np.ndarray, output: str) -> np.ndarray:
    """The Predictor's forward on uint8 NHWC tiles, in the exported graph's terms ([0, 1] images, or logits)."""
    y = predictor._forward(tiles)  # the exact model call Predictor.__call__ makes, before its uint8 rounding
    return (y + 1.0) * 0.5 if predictor.spec.value_range == "tanh" and output == "image" else y


def check_export(fmt: str, data: bytes, predictor: Predictor, shape: GraphShape, seed: int = 0
                 ) -> list[tuple[tuple[int, ...], float]]:
    """Run the exported file at two sizes (batches of 1 and 3) and compare it with the Predictor on the same
    uint8 tiles: [(input shape, max abs difference)]. Raises ExportError past CHECK_TOLERANCE."""
    run, rng, results = _runner(fmt, data), np.random.default_rng(seed), []
    for batch, (h, w) in zip((1, 3), _sizes(shape)[1]):
        tiles = rng.integers(0, 256, (batch, h, w, shape.channels), dtype=np.uint8)
        expected = predictor_reference(predictor, tiles, shape.output)
        try:
            got = run(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255))
        except Exception as err:
            raise ExportError(f"the exported {fmt} file fails on a {batch}x{shape.channels}x{h}x{w} input, not "
                              f"written: {_first_line(err)}") from None
        if got.shape != expected.shape:
            raise ExportError(f"the exported {fmt} file gives {got.shape} for a {batch}x{shape.channels}x{h}x{w} "
                              f"input, the Predictor {expected.shape}: not written")
        diff = float(np.abs(got - expected).max())
        if not diff <= CHECK_TOLERANCE:
            raise ExportError(f"the exported {fmt} file differs from genray's Predictor by {diff:.3g} on a "
                              f"{batch}x{shape.channels}x{h}x{w} input (tolerance {CHECK_TOLERANCE}): not written")
        results.append(((batch, shape.channels, h, w), diff))
    return results


@dataclass
class ExportReport:
    family: str
    digest: str
    shape: GraphShape
    size_bytes: int
    checks: list[tuple[tuple[int, ...], float]]

    def lines(self) -> list[str]:
        given, made = self.shape.describe()
        checked = " and ".join("x".join(map(str, s)) for s, _ in self.checks)
        return [f"  input:   {given}", f"  output:  {made}",
                f"  checked: against genray's Predictor at {checked}: max abs diff "
                f"{max(d for _, d in self.checks):.2g}"]


def export_model(model_uri: str, fmt: str, to: str) -> ExportReport:
    """Write the artefact at `model_uri` as an ONNX or TorchScript file at `to` (a local path or s3:// URI)."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: one of {', '.join(FORMATS)}")
    spec, cfg, model, meta = load_artifact(model_uri, "cpu")
    shape = graph_shape(spec, cfg)
    wrapper = _InUnitRange(model, spec.value_range, shape.output).eval()
    # Batch 2 and unequal sides: torch.export specialises dimensions of size 1 and may tie equal ones together.
    h, w = _sizes(shape)[0]
    example = torch.rand(2, shape.channels, h, w, generator=torch.Generator().manual_seed(0))
    metadata = _metadata(shape, spec, meta, fmt)
    data = (_to_onnx(wrapper, example, shape, metadata) if fmt == "onnx"
            else _to_torchscript(wrapper, example, metadata))
    # Built after the export: the Predictor converts the model to channels-last in place.
    checks = check_export(fmt, data, Predictor(spec, cfg, model, meta, torch.device("cpu")), shape)
    storage.write_bytes(to, data)
    return ExportReport(spec.name, meta["digest"], shape, len(data), checks)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

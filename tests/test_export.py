"""`genray export`: every exportable family's tiny artefact, exported through the CLI as ONNX and TorchScript, run
as a user runs the files (onnxruntime on CPU, torch.jit.load) and compared with genray's Predictor on the same
tiles at two sizes."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from genray import cli, storage
from genray.inference import Predictor
from genray.model_artifact import read_meta
from genray.models import MODELS
from genray.tasks import TASKS

from helpers import genray, save_untrained_artifact

TOLERANCE = 1e-4  # max abs difference on float outputs ([0, 1] images, or logits)
# DCGAN generates from latent noise: no image goes in, so it has nothing to export.
EXPORTABLE = sorted(name for name, spec in MODELS.items()
                    if TASKS[spec.task].route in ("image", "classifier") or spec.reconstruct is not None)


def run_exported(fmt: str, path: str):
    """The exported file opened as its users would: float32 NCHW in [0, 1] -> numpy."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]
    module = torch.jit.load(path, map_location="cpu")
    return lambda x: module(torch.from_numpy(x)).detach().numpy()


def file_metadata(fmt: str, path: str) -> dict:
    if fmt == "onnx":
        return json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["genray"])
    extra = {"genray.json": ""}
    torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return json.loads(extra["genray.json"])


def sizes_for(spec, cfg) -> list[tuple[int, int]]:
    """Two (height, width) the family's graph takes: multiples of its size multiple, at least its smallest side."""
    if spec.image_size is not None:
        return [(spec.image_size(cfg),) * 2] * 2  # one input size: the two checks differ in batch size only
    m = spec.size_multiple
    k = math.ceil(max(spec.min_side, 8) / m)
    return [(m * k, m * (k + 1)), (m * (k + 3), m * (k + 2))]


def compare_with_predictor(fmt: str, path: str, uri: str) -> float:
    """Max abs difference between the exported file and the Predictor's forward on the same uint8 tiles, at two
    sizes and batches of 1 and 2; image outputs are also checked through the Predictor's uint8 images."""
    predictor = Predictor.from_uri(uri, device="cpu")
    run, spec, rng, worst = run_exported(fmt, path), predictor.spec, np.random.default_rng(7), 0.0
    for batch, (h, w) in zip((1, 2), sizes_for(spec, predictor.cfg)):
        tiles = rng.integers(0, 256, (batch, h, w, predictor.channels), dtype=np.uint8)
        got = run(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255))
        reference = predictor._forward(tiles)  # the model call of Predictor.__call__, in the family's value range
        if TASKS[spec.task].route == "classifier":
            assert got.shape == reference.shape == (batch, predictor.cfg.num_classes)
        else:
            if spec.value_range == "tanh":
                reference = (reference + 1) / 2
            assert got.shape == reference.shape == (batch, predictor.channels, h * spec.scale, w * spec.scale)
            # The Predictor's own uint8 output (padding, rounding and all) for the same images.
            as_uint8 = np.rint(np.clip(got * 255, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
            for image, exported in zip(tiles, as_uint8):
                assert np.abs(predictor([image])[0].astype(int) - exported).max() <= 1
        worst = max(worst, float(np.abs(got - reference).max()))
    assert worst <= TOLERANCE, f"{fmt}: max abs diff {worst}"
    return worst


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("family", EXPORTABLE)
def test_exported_file_matches_the_predictor(family, fmt, tmp_path, capsys):
    uri = save_untrained_artifact(str(tmp_path / "model"), family, seed=3)
    path = str(tmp_path / f"{family}.{fmt}")
    assert cli.main(["export", "--model", uri, "--format", fmt, "--to", path]) == 0
    out = capsys.readouterr().out
    assert f"exported {family}" in out and "checked: against genray's Predictor" in out
    worst = compare_with_predictor(fmt, path, uri)
    print(f"{family} {fmt}: max abs diff {worst:.2g}")  # pytest -s shows the figures the README sums up

    meta, spec = file_metadata(fmt, path), MODELS[family]
    assert meta["family"] == family and meta["digest"] == read_meta(uri)["digest"]
    assert meta["fixed_side"] == (spec.image_size(spec.config_cls.tiny()) if spec.image_size else None)
    if fmt == "onnx" and meta["fixed_side"] is None:  # dynamic axes carry names, not torch's s0, s1...
        dims = [d.dim_param or d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
        assert dims[0] == "batch" and "height" in dims[2] and "width" in dims[3]


@pytest.mark.integration  # the real `genray` command as a subprocess
def test_cli_exports_an_s3_artefact_to_s3(s3_bucket, tmp_path):
    uri = save_untrained_artifact(f"{s3_bucket}/sr", "srgan", seed=5)
    r = genray("export", "--model", uri, "--format", "onnx", "--to", f"{s3_bucket}/exported/sr-x4.onnx")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(N, 3, 4H, 4W)" in r.stdout and "max abs diff" in r.stdout
    path = tmp_path / "sr-x4.onnx"
    path.write_bytes(storage.read_bytes(f"{s3_bucket}/exported/sr-x4.onnx"))
    compare_with_predictor("onnx", str(path), uri)


def test_help_says_which_families_are_fixed_size_and_which_cannot_be_exported(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert "any batch, height and width" in text and "VAE and the classifier have one input size" in text
    assert "DCGAN (no image goes in) cannot be exported" in text


def test_wrong_artefacts_are_one_clear_line(tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    cases = {str(tmp_path / "not-a-model"): "not a genray model artefact",
             save_untrained_artifact(str(tmp_path / "gan"), "dcgan"): "dcgan models cannot be exported: they make "
                                                                      "images from latent noise"}
    for uri, says in cases.items():
        for fmt in ("onnx", "torchscript"):
            to = tmp_path / f"out.{fmt}"
            assert cli.main(["export", "--model", uri, "--format", fmt, "--to", str(to)]) == 2
            err = capsys.readouterr().err
            assert err.startswith("genray: error: ") and says in err and err.count("\n") == 1, err
            assert not to.exists()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_graph_that_holds_only_for_some_sizes_is_refused(fmt, tmp_path, capsys, monkeypatch):
    # Without its smallest side (8), the style net's graph would be promised for 4x4 inputs, where the network
    # pads in Python code that neither torch.export nor tracing keeps: export must refuse, not write a wrong file.
    monkeypatch.setitem(MODELS, "style_net", dataclasses.replace(MODELS["style_net"], min_side=1))
    uri = save_untrained_artifact(str(tmp_path / "style"), "style_net")
    to = tmp_path / f"style.{fmt}"
    assert cli.main(["export", "--model", uri, "--format", fmt, "--to", str(to)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genray: error: ") and err.count("\n") == 1, err
    assert "export failed" in err or f"the exported {fmt} file fails on a 1x3x4x" in err, err
    assert not to.exists()

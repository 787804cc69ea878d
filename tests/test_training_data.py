"""The training data path: loose prefixes, archives and brace patterns of WebDataset shards in the real S3 server,
read by Ray Data tasks and streamed to 2 Ray Train workers; labels from folders and sidecars; bad files skipped
(counted, named in metrics.jsonl) or fatal; bf16 autocast on CPU."""
from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import pytest
import torch

from genray import storage
from genray.config import DataConfig, load_config
from genray.datasets import load_embedded
from genray.images import encode_png
from genray.model_artifact import read_meta
from genray.models import get_spec
from genray.models.data import prepare_items
from genray.datasets import TrainingDataError, list_units, read_images, unit_rows
from genray.training.data import sample_seed
from genray.training.trainer import TrainingError, run_training

from helpers import read_history, tar_bytes

NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n but not really"


def write_digit_shards(prefix: str, num_shards: int, per_shard: int, bad: bool = False) -> str:
    """Digits as WebDataset shards <prefix>/shard-NNNNNN.tar, labels in <key>.json (even) or <key>.cls (odd)
    sidecars; with `bad`, the first image of shard 0 is undecodable. Returns the brace pattern naming them."""
    digits, labels, _ = load_embedded("digits")
    i = 0
    for shard in range(num_shards):
        files = []
        for _ in range(per_shard):
            key = f"d{i:04d}"
            label = (json.dumps({"label": int(labels[i])}).encode(), ".json") if i % 2 == 0 else \
                (str(int(labels[i])).encode(), ".cls")
            image = NOT_AN_IMAGE if bad and i == 0 else encode_png(digits[i])
            files += [(f"{key}.png", image), (key + label[1], label[0])]
            i += 1
        storage.write_bytes(f"{prefix}/shard-{shard:06d}.tar", tar_bytes(files))
    return f"{prefix}/shard-{{000000..{num_shards - 1:06d}}}.tar"


def tiny(path: str, data_uri: str, out: str, *overrides: str):
    return load_config(path, [f"data.uri={data_uri}", "data.held_out_uri=null", f"output_uri={out}",
                              "data.limit=null", *overrides])


# ------------------------------------------------------------------------------------------ without Ray

def test_shard_rows_take_labels_from_sidecars_and_refuse_tar_slip(s3_bucket):
    pattern = write_digit_shards(f"{s3_bucket}/shards", num_shards=2, per_shard=3, bad=True)
    evil = tar_bytes([("../escape.png", encode_png(np.zeros((8, 8, 1), np.uint8))),
                      ("ok/7/fine.png", encode_png(np.full((8, 8, 1), 9, np.uint8)))])
    storage.write_bytes(f"{s3_bucket}/evil/one.tar", evil)

    units, total = list_units(pattern, DataConfig(uri=pattern))
    assert [u["key"] for u in units] == ["shard-000000.tar", "shard-000001.tar"] and total > 0
    rows = [r for u in units for r in unit_rows(u, 1, DataConfig(uri=pattern))]
    good = [r for r in rows if r["error"] is None]
    _, labels, _ = load_embedded("digits")
    assert [r["label"] for r in good] == [int(x) for x in labels[1:6]]  # .json and .cls sidecars both read
    assert [r["key"] for r in rows if r["error"]] == ["shard-000000.tar#d0000.png"]

    # One archive as the uri; '..' is refused (an error row), the '<label>/' folder of a member gives its label.
    evil_rows = [r for u in list_units(f"{s3_bucket}/evil/one.tar", DataConfig(uri="x"))[0]
                 for r in unit_rows(u, 1, DataConfig(uri="x"))]
    assert [(r["key"], r["label"]) for r in evil_rows if r["error"] is None] == [("one.tar#ok/7/fine.png", 7)]
    assert any("refused" in (r["error"] or "") for r in evil_rows)

    # on_error=fail: the first bad file stops the read, named.
    strict = DataConfig(uri=pattern, on_error="fail")
    with pytest.raises(TrainingDataError, match=r"d0000\.png.*on_error=fail"):
        [r for u in units for r in unit_rows(u, 1, strict)]
    # The held-out reader takes the same inputs, in key order, skipping the bad file.
    images, held_labels, keys = read_images(pattern, 1, DataConfig(uri=pattern))
    assert len(images) == 5 and held_labels == [int(x) for x in labels[1:6]] and keys[0] == "shard-000000.tar#d0001.png"


def test_over_max_pixels_is_a_skipped_row_naming_the_limit(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/big/a.png", encode_png(np.zeros((64, 64, 3), np.uint8)))
    cfg = DataConfig(uri=f"{s3_bucket}/big/", max_pixels=1000)
    [row] = [r for u in list_units(cfg.uri, cfg)[0] for r in unit_rows(u, 3, cfg)]
    assert row["key"] == "a.png" and "data.max_pixels=1,000" in row["error"]


def test_crops_are_seeded_by_seed_epoch_and_key():
    spec = get_spec("photo_denoiser")
    cfg = spec.config_cls.tiny()
    photo = load_embedded("photos")[0][0]
    crops = lambda seed, epoch, key: torch.stack(prepare_items(spec, photo, None, cfg, sample_seed(seed, epoch, key)))  # noqa: E731
    assert torch.equal(crops(0, 1, "a.png"), crops(0, 1, "a.png"))  # a rerun gets the same crops
    assert not torch.equal(crops(0, 1, "a.png"), crops(0, 2, "a.png"))  # new ones every epoch
    assert not torch.equal(crops(0, 1, "a.png"), crops(1, 1, "a.png"))  # and per seed


# --------------------------------------------------------------------------------------- Ray Train runs

def test_trains_from_a_brace_pattern_of_shards_with_sidecar_labels(ray_local, s3_bucket):
    pattern = write_digit_shards(f"{s3_bucket}/shards", num_shards=4, per_shard=16, bad=True)
    out = f"{s3_bucket}/run"
    # A classifier: it refuses unlabelled data, so training at all shows the sidecar labels arrived.
    cfg = tiny("configs/tiny/sae_classifier.yaml", pattern, out, "data.materialize=never", "train.epochs=2")
    run_training(cfg)
    history = read_history(out)
    assert [r["epoch"] for r in history] == [1, 2] and all(r["world_size"] == 2 for r in history)
    # The undecodable member is skipped every epoch: counted and named, the run goes on.
    assert [r["data_errors"] for r in history] == [1, 1]
    assert history[0]["data_error_keys"][0].startswith("shard-000000.tar#d0000.png: ")
    # 64 files over 2 workers at batch 16: 2 steps each per epoch (the bad one costs one short batch).
    assert history[-1]["step"] == 2 * history[0]["step"] and history[0]["step"] >= 2
    assert all(r["worker_peak_rss_mb"] > 0 for r in history)
    with pytest.raises(TrainingError, match=r"d0000\.png"):
        run_training(tiny("configs/tiny/sae_classifier.yaml", pattern, f"{s3_bucket}/strict", "name=strict",
                          "data.on_error=fail", "data.materialize=always", "train.epochs=1"))
    # Streamed: the read fails in the worker's row fetcher thread, and the loop raises it.
    with pytest.raises(TrainingError, match=r"d0000\.png"):
        run_training(tiny("configs/tiny/sae_classifier.yaml", pattern, f"{s3_bucket}/strict2", "name=strict2",
                          "data.on_error=fail", "data.materialize=never", "train.epochs=1"))


def test_materialised_rows_come_in_equal_blocks_that_split_evenly_over_workers(ray_local):
    import ray.data

    from genray.training.data import equal_blocks

    rows = [{"key": f"k{i:02d}", "error": "bad png" if i == 1 else None} for i in range(37)]
    ds = equal_blocks(ray.data.from_items(rows, override_num_blocks=5).materialize(), world=2, rows_per_block=8)
    sizes = [entry.metadata.num_rows for bundle in ds.iter_internal_ref_bundles() for entry in bundle.blocks]
    # 37 rows -> 6 blocks of 7 (a multiple of 2 workers): 5 copies top it up, none of the bad row.
    assert sizes == [7] * 6
    keys = [r["key"] for r in ds.take_all()]
    assert sorted(set(keys)) == [r["key"] for r in rows] and keys.count("k01") == 1
    # The workers read their shares at the same time (an epoch starts once every split has asked for it).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        shares = list(pool.map(lambda split: sum(len(b["key"]) for b in split.iter_batches(batch_size=None)),
                               ds.streaming_split(2, equal=True)))
    assert shares == [21, 21]  # every row kept: nothing cut off to even the workers out


def test_bf16_autocast_on_cpu_is_recorded_in_the_artefact(ray_local, digits_uri, s3_bucket):
    out = f"{s3_bucket}/bf16"
    cfg = tiny("configs/tiny/photo_denoiser.yaml", f"{digits_uri}/train/", out, "train.precision=bf16",
               "train.epochs=2", "model.channels=1")
    result = run_training(cfg)
    history = read_history(out)
    assert all(np.isfinite(r["loss"]) for r in history)
    meta = read_meta(result.model_uri)
    assert meta["precision"] == "bf16" and meta["train"]["precision"] == "bf16"
    # The weights stay fp32: bf16 is the autocast compute type only.
    assert result.metrics["epoch"] == 2


@pytest.mark.parametrize("family", ["photo_denoiser", "dcgan"])
def test_fp16_steps_go_through_the_grad_scaler(family):
    """The loop's fp16 path on CPU, without Ray: every optimizer of the family (a GAN has two) steps through one
    GradScaler, the weights move, and torch's own backward is restored afterwards."""
    from genray.models.data import build_dataset, fixed_batch
    from genray.training.loop import ScaledOptimizer, autocast

    spec = get_spec(family)
    cfg = spec.config_cls.tiny()
    side = 32 if family == "photo_denoiser" else 28
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (side, side, spec.in_channels(cfg)), dtype=np.uint8) for _ in range(4)]
    batch = fixed_batch(build_dataset(spec, images, None, cfg), 4)
    state = spec.init_training(cfg, 1e-3)
    scaler = torch.amp.GradScaler("cpu")
    state.optimizers = {name: ScaledOptimizer(opt, scaler) for name, opt in state.optimizers.items()}
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    backward = torch.Tensor.backward
    for _ in range(2):
        with autocast("fp16", torch.device("cpu"), scaler):
            losses = spec.train_step(state, batch)
        scaler.update()
    assert torch.Tensor.backward is backward
    assert all(np.isfinite(v) for v in losses.values()) and scaler.get_scale() > 1
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())

"""genray.config: every YAML under configs/ validates, and typos, wrong types and bad overrides fail naming the key."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from genray.config import ConfigError, PipelineConfig, ProcessConfig, ServeFileConfig, TrainConfig, load_config
from genray.models import MODELS, get_spec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = CONFIGS / "tiny" / "denoise_ae.yaml"
# configs/<kind>/*.yaml -> the class that reads it; a new kind must be added here (test_every_config_dir_is_known).
CLASS_FOR_DIR = {"train": TrainConfig, "tiny": TrainConfig, "serve": ServeFileConfig, "process": ProcessConfig,
                 "pipeline": PipelineConfig}
ALL_YAML = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _tiny_data() -> dict:
    return yaml.safe_load(TINY.read_text())


# --- every file under configs/ -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_family_has_a_tiny_config_that_is_its_tiny(family):
    """configs/tiny/<family>.yaml is what the Ray Train family test and smoke runs train: its model block must be
    the family's tiny() (one tiny model per family, not two that drift apart), but for the input size, which
    follows the data it trains on (28x28 digits; tiny() is 16 for the synthetic battery)."""
    path = CONFIGS / "tiny" / f"{family}.yaml"
    assert path.exists(), f"family {family} has no tiny config {path}"
    follows_data = {"image_size"}
    model = load_config(path).model.model_dump(exclude=follows_data)
    assert model == MODELS[family].config_cls.tiny().model_dump(exclude=follows_data), \
        f"{path}: model block differs from {family}'s tiny()"


def test_configs_dir_has_files():
    assert ALL_YAML, f"no YAML found under {CONFIGS}"


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_dir_is_known(path):
    kind = path.relative_to(CONFIGS).parts[0]
    assert kind in CLASS_FOR_DIR, f"{path}: no config class known for configs/{kind}/"


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_validates(path):
    cls = CLASS_FOR_DIR[path.relative_to(CONFIGS).parts[0]]
    cfg = load_config(path, cls=cls)
    assert isinstance(cfg, cls)
    if cls is TrainConfig:
        # The model section is validated by its family's own config class, and the dump that goes into
        # train_loop_config validates back into an equal config on the worker.
        assert isinstance(cfg.model, get_spec(cfg.model.family).config_cls)
        assert TrainConfig.model_validate(cfg.model_dump_plain()) == cfg
    if cls is ServeFileConfig:
        assert all(app.args.models for app in cfg.applications)


# --- errors in the file --------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, typo", [("train", "lrr"), ("model", "filterz"), ("scaling", "num_worker")])
def test_unknown_key_names_file_and_dotted_key(tmp_path, section, typo):
    data = _tiny_data()
    data[section][typo] = 1
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert f"{section}.{typo}" in str(err.value)
    assert "unknown key" in str(err.value)


def test_unknown_top_level_key(tmp_path):
    path = _write(tmp_path, {**_tiny_data(), "epochs": 3})
    with pytest.raises(ConfigError, match=r"epochs: unknown key"):
        load_config(path)


@pytest.mark.parametrize("dotted, value", [("train.epochs", "many"), ("train.lr", [1]), ("scaling.use_gpu", "maybe"),
                                           ("model.filters", "wide"), ("train.batch_size", 0)])
def test_wrong_type_or_value_names_key(tmp_path, dotted, value):
    data = _tiny_data()
    section, key = dotted.split(".")
    data[section][key] = value
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert f": {dotted}:" in str(err.value)


def test_serve_config_wrong_type_names_nested_key(tmp_path):
    data = yaml.safe_load((CONFIGS / "serve" / "denoise.yaml").read_text())
    data["applications"][0]["args"]["models"]["denoise"]["max_batch_size"] = "lots"
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=r"applications\.0\.args\.models\.denoise\.max_batch_size"):
        load_config(path, cls=ServeFileConfig)


def test_missing_required_key_named(tmp_path):
    data = _tiny_data()
    del data["output_uri"]
    with pytest.raises(ConfigError, match=r"output_uri: Field required"):
        load_config(_write(tmp_path, data))


def test_unknown_model_family_lists_valid_families(tmp_path):
    data = _tiny_data()
    data["model"]["family"] = "denoise_aee"
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text and "denoise_aee" in text and "valid families" in text
    for name in MODELS:
        assert name in text


def test_model_without_family_fails(tmp_path):
    data = _tiny_data()
    del data["model"]["family"]
    with pytest.raises(ConfigError, match=r"model: .*'family'"):
        load_config(_write(tmp_path, data))


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such config file") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_invalid_yaml_names_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_top_level_list_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


# --- dotted overrides ----------------------------------------------------------------------------------------

def test_overrides_apply_with_yaml_typing():
    base = load_config(TINY)
    cfg = load_config(TINY, ["train.lr=2e-4", "model.filters=[8,4]", "scaling.num_workers=1",
                             "scaling.use_gpu=false", "data.held_out_uri=null", "name=other_run"])
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.filters == (8, 4)
    assert cfg.scaling.num_workers == 1 and isinstance(cfg.scaling.num_workers, int)
    assert cfg.scaling.use_gpu is False
    assert cfg.data.held_out_uri is None
    assert cfg.name == "other_run"
    # Everything not overridden comes from the file.
    assert cfg.train.epochs == base.train.epochs and cfg.data.uri == base.data.uri
    assert cfg.model.noise_std == base.model.noise_std


def test_override_value_may_contain_equals():
    cfg = load_config(TINY, ["data.uri=s3://bucket/a=b/"])
    assert cfg.data.uri == "s3://bucket/a=b/"


def test_override_creates_section_missing_from_file(tmp_path):
    data = _tiny_data()
    del data["scaling"]
    cfg = load_config(_write(tmp_path, data), ["scaling.num_workers=0"])
    assert cfg.scaling.num_workers == 0
    assert cfg.scaling.cpus_per_worker == 1.0  # the class default, not the tiny file's 0.5


def test_override_does_not_touch_file():
    before = TINY.read_text()
    load_config(TINY, ["train.epochs=7"])
    assert TINY.read_text() == before
    assert load_config(TINY).train.epochs != 7


@pytest.mark.parametrize("override, key", [("train.lrr=1", "train.lrr"), ("model.filterz=[1,2]", "model.filterz"),
                                           ("nosuch.key=1", "nosuch")])
def test_override_of_unknown_key_fails(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert key in str(err.value)
    assert str(TINY) in str(err.value)


def test_override_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(TINY, ["train.epochs=abc"])


def test_override_unknown_family_lists_families():
    with pytest.raises(ConfigError, match="valid families: " + ", ".join(sorted(MODELS))):
        load_config(TINY, ["model.family=nope"])


@pytest.mark.parametrize("override, match", [("train.lr", "expected key=value"), ("=3", "expected key=value"),
                                             ("name.sub=1", "'name' is not a section")])
def test_malformed_override(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


# --- frozen --------------------------------------------------------------------------------------------------

def test_configs_are_frozen():
    cfg = load_config(TINY)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.name = "x"
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.lr = 1.0
    with pytest.raises(ValidationError, match="frozen"):
        cfg.model.filters = (1, 1)
    serve = load_config(CONFIGS / "serve" / "denoise.yaml", cls=ServeFileConfig)
    with pytest.raises(ValidationError, match="frozen"):
        serve.applications[0].args.models["denoise"].num_replicas = 3


def test_process_config_validates_and_refuses_typos(tmp_path):
    good = {"task": "denoise", "input_uri": "s3://in/", "output_uri": "s3://out/", "model_uri": "s3://m/"}
    cfg = load_config(_write(tmp_path, good), cls=ProcessConfig)
    assert cfg.tile == 512 and cfg.dry_run is False
    with pytest.raises(ConfigError, match="tile_overlapp: unknown key"):
        load_config(_write(tmp_path, {**good, "tile_overlapp": 8}, "typo.yaml"), cls=ProcessConfig)
    with pytest.raises(ConfigError, match="task: Input should be"):
        load_config(_write(tmp_path, {**good, "task": "deblur"}, "task.yaml"), cls=ProcessConfig)


def test_placement_strategy_reaches_ray_train(tmp_path):
    """scaling.placement_strategy is handed to Ray Train's ScalingConfig; a typo is refused by the config."""
    from genray.training.trainer import scaling_config

    cfg = load_config(TINY, ["scaling.placement_strategy=SPREAD", f"output_uri={tmp_path / 'run'}"])
    assert scaling_config(cfg).placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match=r"scaling\.placement_strategy"):
        load_config(TINY, ["scaling.placement_strategy=SPREADD"])

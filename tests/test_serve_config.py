"""Serve configs: every file in configs/serve/ is valid for genray *and* for Ray's own `serve run` / `serve deploy`,
the deployment options built from it are accepted by Ray, and mistakes fail naming the key. No Ray started."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from genray.config import ConfigError, ServeAppConfig, ServeFileConfig, load_config

SERVE_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "serve").glob("*.yaml"))


def app_args(**extra) -> dict:
    return {"models": {"denoise": {"uri": "s3://b/m"}}, **extra}


def test_there_is_a_demo_serving_every_family():
    from genray.config import TrainConfig
    from genray.models import MODELS

    assert {p.name for p in SERVE_CONFIGS} >= {"all.yaml", "denoise.yaml"}
    args = load_config(SERVE_CONFIGS[0].parent / "all.yaml", cls=ServeFileConfig).applications[0].args
    # Every artefact is the model/ of a run of configs/train/<run>.yaml (s3://genray-runs/<run>/model) ...
    families = set()
    for uri in [m.uri for m in args.models.values()] + list(args.styles.uris.values())[:1]:
        run = uri.removeprefix("s3://genray-runs/").removesuffix("/model")
        train = load_config(SERVE_CONFIGS[0].parent.parent / "train" / f"{run}.yaml", cls=TrainConfig)
        assert train.output_uri.rstrip("/") + "/model" == uri
        families.add(train.model.family)
    assert families == set(MODELS)  # ... and together they cover every family
    assert len(args.styles.uris) >= 2  # more than one style behind the multiplexed pool


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_valid_for_genray_and_for_ray(path):
    from ray.serve.schema import ServeDeploySchema

    from genray.serving.app import deployment_options
    from genray.serving.deployments import ImageDeployment

    from ray.serve.config import HTTPOptions

    cfg = load_config(path, cls=ServeFileConfig)
    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))  # what `serve run <file>` parses
    HTTPOptions(**cfg.http_options.model_dump())  # what `genray serve` hands to serve.start
    assert cfg.http_options.host == "127.0.0.1"  # loopback by default
    for app in cfg.applications:
        assert app.import_path == "genray.serving.app:build_app"
        pools = [*app.args.models.values(), *([app.args.styles] if app.args.styles else [])]
        for opts in pools:
            ImageDeployment.options(**deployment_options(opts, "x", 503, 1.0))  # Ray validates every option here
            assert opts.ongoing_limit >= opts.max_batch_size


def test_autoscaling_becomes_rays_autoscaling_config():
    from ray.serve.config import AutoscalingConfig

    from genray.serving.app import deployment_options

    cfg = ServeAppConfig.model_validate(app_args(models={"m": {"uri": "u", "max_batch_size": 4, "autoscaling": {
        "max_replicas": 3}}}))
    options = deployment_options(cfg.models["m"], "model-m", 429, None)
    scaling = AutoscalingConfig(**options["autoscaling_config"])
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 4)
    assert "num_replicas" not in options and options["max_ongoing_requests"] == 8
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": None}
    fixed = deployment_options(ServeAppConfig.model_validate(app_args()).models["denoise"], "d", 503, 1)
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed and fixed["max_queued_requests"] > 0


@pytest.mark.parametrize("change, message", [
    ({"models": {"d": {"uri": "u", "num_replicas": 2, "autoscaling": {}}}}, "not both"),
    ({"models": {"d": {"uri": "u", "max_batch_size": 8, "max_ongoing_requests": 4}}}, "never let a batch fill"),
    ({"models": {"d": {"uri": "u", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}}}, "above max_replicas"),
    ({"models": {"d": {"uri": "u", "autoscaling": {"look_back_period_s": 5}}}}, "longer than the metrics"),
    ({"models": {"d": {"uri": "u", "max_queued_requests": -1}}}, "greater than 0"),
    ({"models": {"models": {"uri": "u"}}}, "gateway's own routes"),
    ({"models": {"Denoise Photos": {"uri": "u"}}}, "URL path segments"),
    ({"models": {}}, "nothing to serve"),
    ({"styles": {"uris": {}}}, "at least 1 item"),
    ({"styles": {"uris": {"a/b": "u"}}}, "URL path segments"),
    ({"overload_status_code": 500}, "503"),
    ({"token": "s3cret"}, "Extra inputs are not permitted"),  # a token never goes into a config
    ({"models": {"d": {"uri": "u", "max_batch": 4}}}, "Extra inputs are not permitted"),
])
def test_mistakes_fail_with_a_reason(change, message):
    with pytest.raises(ValueError, match=message):
        ServeAppConfig.model_validate({**app_args(), **change})


def test_errors_name_the_file_and_key(tmp_path):
    data = yaml.safe_load((SERVE_CONFIGS[0].parent / "all.yaml").read_text())
    data["applications"][0]["args"]["models"]["superres"]["autoscaling"]["max_replica"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"bad\.yaml: applications\.0\.args\.models\.superres\.autoscaling\."
                                          r"max_replica: unknown key"):
        load_config(path, cls=ServeFileConfig)
    with pytest.raises(ConfigError, match="http_options.port"):
        load_config(SERVE_CONFIGS[0].parent / "all.yaml", ["http_options.port=70000"], cls=ServeFileConfig)


def test_open_access_warning(monkeypatch):
    from genray.serving.auth import TOKEN_ENV, TOKEN_FILE_ENV
    from genray.serving.deploy import open_access_warning

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    path = SERVE_CONFIGS[0].parent / "denoise.yaml"
    assert open_access_warning(load_config(path, cls=ServeFileConfig)) is None  # loopback
    public = load_config(path, ["http_options.host=0.0.0.0"], cls=ServeFileConfig)
    assert "without a bearer token" in open_access_warning(public)
    with_file = load_config(path, ["http_options.host=0.0.0.0", "applications.0.args.token_file=/run/token"],
                            cls=ServeFileConfig)
    assert open_access_warning(with_file) is None
    monkeypatch.setenv(TOKEN_ENV, "x")
    assert open_access_warning(public) is None

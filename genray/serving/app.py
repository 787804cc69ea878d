"""The genray Serve application, built from a typed config (`build_app`, the import path in configs/serve/*.yaml).

One deployment per model artefact (its class follows the artefact's task), one multiplexed pool for the style
networks, and the FastAPI gateway in front (genray/serving/gateway.py). Each deployment gets its batching,
replica/autoscaling, CPU and bounded-queue settings from the config.
"""

from typing import Any

from ray import serve

from genray.config import DeploymentOptions, ServeAppConfig
from genray.serving.gateway import Gateway
from genray.serving.deployments import (ClassifierDeployment, GeneratorDeployment, ImageDeployment,
                                        StylePoolDeployment)

# The route kind a task gets (genray.models.TASKS) -> the deployment class that serves it. A style network
# given under `models` is served on its own; many styles go under `styles`, multiplexed over one pool.
DEPLOYMENTS = {"image": ImageDeployment, "generator": GeneratorDeployment, "classifier": ClassifierDeployment}


def deployment_options(opts: DeploymentOptions, name: str, overload_status_code: int,
                       retry_after_s: float | None) -> dict[str, Any]:
    """Ray Serve deployment options from genray's config (batching itself is set inside the replica)."""
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        "max_ongoing_requests": opts.ongoing_limit,
        "max_queued_requests": opts.max_queued_requests,
        "backpressure_config": {"status_code": overload_status_code, "retry_after_s": retry_after_s},
    }
    if opts.autoscaling is not None:
        scaling = opts.autoscaling.model_dump(exclude_none=True)
        scaling.setdefault("target_ongoing_requests", opts.max_batch_size)
        options["autoscaling_config"] = scaling
    else:
        options["num_replicas"] = opts.num_replicas or 1
    return options


def build_app(args: dict[str, Any]) -> serve.Application:
    """Typed app builder: `serve run` / `serve deploy` and `genray serve` all call this with the config's `args`.

    Every artefact's model.json is read here (a small file), so a wrong URI or an unservable family fails the
    deployment at once with a clear message instead of a replica crash loop."""
    from genray.model_artifact import read_meta
    from genray.models import get_spec
    from genray.tasks import TASKS

    cfg = ServeAppConfig.model_validate(args)
    overload = {"overload_status_code": cfg.overload_status_code, "retry_after_s": cfg.retry_after_s}
    routes: dict[str, dict[str, Any]] = {}
    models = {}
    for name, m in cfg.models.items():
        spec = get_spec(read_meta(m.uri)["family"])
        kind = TASKS[spec.task].route
        routes[name] = {"kind": kind, "family": spec.name, "task": spec.task, "scale": spec.scale,
                        "reconstructs": spec.reconstruct is not None}
        models[name] = DEPLOYMENTS[kind].options(**deployment_options(m, f"model-{name}", **overload)).bind(
            m.model_dump(mode="json"), name)
    styles = None
    if cfg.styles is not None:
        styles = StylePoolDeployment.options(**deployment_options(cfg.styles, "styles", **overload)).bind(
            cfg.styles.model_dump(mode="json"))
    g = cfg.gateway
    return Gateway.options(
        num_replicas=g.num_replicas, ray_actor_options={"num_cpus": g.num_cpus},
        max_ongoing_requests=g.max_ongoing_requests, max_queued_requests=g.max_queued_requests,
        backpressure_config={"status_code": cfg.overload_status_code, "retry_after_s": cfg.retry_after_s},
    ).bind(cfg.model_dump(mode="json"), routes, models, styles)

"""Every YAML under cluster/ validates: KubeRay manifests against a structural validator written from the KubeRay v1
CRDs (RayCluster, RayJob, RayService; no Kubernetes needed), the cluster-launcher config against the JSON schema Ray
ships (ray/autoscaler/ray-schema.json) and Ray's own config checks, plus genray's rules: token authentication on
every Ray container, no literal credentials, entrypoints and Serve configs that genray itself accepts."""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAMLS = sorted(p for p in (REPO / "cluster").rglob("*") if p.suffix in (".yaml", ".yml"))
IMAGE_CHECKOUT = "/home/ray/genray/"  # where the images hold the genray checkout (jobs/, configs/)
SECRETISH = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


# -- a small structural schema language (unknown keys are errors: KubeRay's CRDs prune them silently) ----------

class Obj:
    def __init__(self, fields: dict, required=(), extra: bool = False):
        self.fields, self.required, self.extra = fields, set(required), extra


class ListOf:
    def __init__(self, item, min_items: int = 0):
        self.item, self.min_items = item, min_items


class MapOf:
    def __init__(self, value):
        self.value = value


class Enum:
    def __init__(self, *values):
        self.values = values


ANY = object()
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


def check(value, schema, path: str, errors: list[str]) -> None:
    if schema is ANY:
        return
    if schema == "quantity":
        if not (isinstance(value, int) and not isinstance(value, bool)) and not (
                isinstance(value, str) and QUANTITY.match(value)):
            errors.append(f"{path}: {value!r} is not a Kubernetes quantity")
        return
    if isinstance(schema, type):
        ok = isinstance(value, schema) and not (schema is int and isinstance(value, bool))
        if schema is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            errors.append(f"{path}: expected {schema.__name__}, got {type(value).__name__} {value!r}")
        return
    if isinstance(schema, Enum):
        if value not in schema.values:
            errors.append(f"{path}: {value!r} is not one of {schema.values}")
        return
    if isinstance(schema, ListOf):
        if not isinstance(value, list) or len(value) < schema.min_items:
            errors.append(f"{path}: expected a list of at least {schema.min_items}")
            return
        for i, item in enumerate(value):
            check(item, schema.item, f"{path}[{i}]", errors)
        return
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping")
            return
        for key, item in value.items():
            check(item, schema.value, f"{path}.{key}", errors)
        return
    assert isinstance(schema, Obj)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
        return
    for key in sorted(schema.required - set(value)):
        errors.append(f"{path}.{key}: required")
    for key, item in value.items():
        if key in schema.fields:
            check(item, schema.fields[key], f"{path}.{key}", errors)
        elif not schema.extra:
            errors.append(f"{path}.{key}: unknown field")


# Kubernetes pieces the manifests use (a subset of core/v1, strict where a typo is likely).
SECRET_KEY_REF = Obj({"name": str, "key": str, "optional": bool}, required=("name", "key"))
ENV_VAR = Obj({"name": str, "value": str,
               "valueFrom": Obj({"secretKeyRef": SECRET_KEY_REF, "configMapKeyRef": SECRET_KEY_REF,
                                 "fieldRef": Obj({"fieldPath": str}, required=("fieldPath",))})},
              required=("name",))
RESOURCES = Obj({"requests": MapOf("quantity"), "limits": MapOf("quantity")})
CONTAINER = Obj({
    "name": str, "image": str, "imagePullPolicy": Enum("Always", "IfNotPresent", "Never"),
    "command": ListOf(str), "args": ListOf(str), "env": ListOf(ENV_VAR), "envFrom": ListOf(ANY),
    "ports": ListOf(Obj({"containerPort": int, "name": str, "protocol": Enum("TCP", "UDP")},
                        required=("containerPort",))),
    "resources": RESOURCES, "volumeMounts": ListOf(ANY), "securityContext": ANY, "lifecycle": ANY,
}, required=("name",))
POD_TEMPLATE = Obj({
    "metadata": Obj({"labels": MapOf(str), "annotations": MapOf(str)}),
    "spec": Obj({"containers": ListOf(CONTAINER, 1), "initContainers": ListOf(CONTAINER),
                 "tolerations": ListOf(Obj({"key": str, "operator": Enum("Exists", "Equal"), "value": str,
                                            "effect": Enum("NoSchedule", "PreferNoSchedule", "NoExecute")})),
                 "nodeSelector": MapOf(str), "affinity": ANY, "volumes": ListOf(ANY), "serviceAccountName": str,
                 "restartPolicy": Enum("Always", "OnFailure", "Never"), "securityContext": ANY,
                 "imagePullSecrets": ListOf(ANY), "priorityClassName": str},
                required=("containers",)),
}, required=("spec",))

# KubeRay ray.io/v1.
RAY_START_PARAMS = MapOf(str)  # map[string]string: `num-cpus: 0` unquoted is rejected by the API server
AUTOSCALER_OPTIONS = Obj({"upscalingMode": Enum("Default", "Aggressive", "Conservative"), "idleTimeoutSeconds": int,
                          "image": str, "imagePullPolicy": str, "resources": RESOURCES, "env": ListOf(ENV_VAR),
                          "envFrom": ListOf(ANY), "securityContext": ANY, "volumeMounts": ListOf(ANY),
                          "version": Enum("v1", "v2")})
HEAD_GROUP = Obj({"rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE,
                  "serviceType": Enum("ClusterIP", "NodePort", "LoadBalancer"), "headService": ANY,
                  "enableIngress": bool}, required=("template",))
WORKER_GROUP = Obj({"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                    "idleTimeoutSeconds": int, "rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE,
                    "scaleStrategy": Obj({"workersToDelete": ListOf(str)}), "numOfHosts": int, "suspend": bool},
                   required=("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"))
RAY_CLUSTER_SPEC = Obj({"rayVersion": str, "enableInTreeAutoscaling": bool, "autoscalerOptions": AUTOSCALER_OPTIONS,
                        "headGroupSpec": HEAD_GROUP, "workerGroupSpecs": ListOf(WORKER_GROUP),
                        "headServiceAnnotations": MapOf(str), "suspend": bool, "managedBy": str,
                        "gcsFaultToleranceOptions": ANY, "authOptions": Obj({"mode": Enum("disabled", "token")})},
                       required=("headGroupSpec",))
RAY_JOB_SPEC = Obj({"entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "metadata": MapOf(str),
                    "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int, "activeDeadlineSeconds": int,
                    "backoffLimit": int, "rayClusterSpec": RAY_CLUSTER_SPEC, "clusterSelector": MapOf(str),
                    "submitterPodTemplate": POD_TEMPLATE, "submitterConfig": ANY,
                    "submissionMode": Enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
                    "entrypointNumCpus": float, "entrypointNumGpus": float, "entrypointResources": str,
                    "suspend": bool, "managedBy": str, "deletionStrategy": ANY},
                   required=("entrypoint",))
RAY_SERVICE_SPEC = Obj({"serveConfigV2": str, "rayClusterConfig": RAY_CLUSTER_SPEC, "serveService": ANY,
                        "upgradeStrategy": ANY, "deploymentUnhealthySecondThreshold": int,
                        "serviceUnhealthySecondThreshold": int, "excludeHeadPodFromServeSvc": bool},
                       required=("serveConfigV2", "rayClusterConfig"))
SPECS = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC, "RayService": RAY_SERVICE_SPEC}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def validate_kuberay(doc: dict) -> list[str]:
    errors: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: {doc.get('apiVersion')!r}, expected 'ray.io/v1'")
    kind = doc.get("kind")
    if kind not in SPECS:
        return errors + [f"kind: {kind!r} is not one of {sorted(SPECS)}"]
    check(doc, Obj({"apiVersion": str, "kind": str,
                    "metadata": Obj({"name": str, "namespace": str, "labels": MapOf(str),
                                     "annotations": MapOf(str)}, required=("name",)),
                    "spec": SPECS[kind]}, required=("apiVersion", "kind", "metadata", "spec")), kind, errors)
    if errors:
        return errors
    name = doc["metadata"]["name"]
    if not DNS_1123.match(name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label")
    spec = doc["spec"]
    if kind == "RayCluster":
        errors += cluster_rules(spec, "spec")
    elif kind == "RayJob":
        errors += ray_job_rules(spec)
    else:
        errors += cluster_rules(spec["rayClusterConfig"], "spec.rayClusterConfig")
        errors += serve_config_rules(spec["serveConfigV2"])
    return errors


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def credential_rules(env: dict[str, dict], where: str) -> list[str]:
    """Token auth on; anything secret comes from a Secret, never as a literal value."""
    errors = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        errors.append(f"{where}: RAY_AUTH_MODE=token missing (token authentication must be on)")
    if "secretKeyRef" not in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}):
        errors.append(f"{where}: RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef)")
    for name, var in env.items():
        if ("value" in var) == ("valueFrom" in var):
            errors.append(f"{where}: env {name}: give exactly one of value / valueFrom")
        if SECRETISH.search(name) and "value" in var:
            errors.append(f"{where}: env {name}: a credential as a literal value; use a Secret")
    return errors


def cluster_rules(spec: dict, path: str) -> list[str]:
    errors = []
    if spec.get("rayVersion") != ray.__version__:
        errors.append(f"{path}.rayVersion: {spec.get('rayVersion')!r}, but genray pins ray {ray.__version__}")
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{path}.enableInTreeAutoscaling: must be true")
    else:
        errors += credential_rules({e["name"]: e for e in spec.get("autoscalerOptions", {}).get("env", [])},
                                   f"{path}.autoscalerOptions")
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        errors.append(f"{path}.headGroupSpec: num-cpus '0' keeps training and bulk work off the head")
    groups = spec.get("workerGroupSpecs", [])
    if not groups:
        errors.append(f"{path}.workerGroupSpecs: no worker groups")
    names = [g["groupName"] for g in groups]
    if len(set(names)) != len(names):
        errors.append(f"{path}.workerGroupSpecs: duplicate groupName in {names}")
    pods = [(f"{path}.headGroupSpec", head["template"])]
    for g in groups:
        where = f"{path}.workerGroupSpecs[{g['groupName']}]"
        if not 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]:
            errors.append(f"{where}: needs 0 <= minReplicas <= replicas <= maxReplicas")
        if g["maxReplicas"] <= g["minReplicas"]:
            errors.append(f"{where}: maxReplicas == minReplicas leaves the autoscaler nothing to do")
        pods.append((where, g["template"]))
    for where, template in pods:
        for c in template["spec"]["containers"]:
            if "image" not in c:
                errors.append(f"{where}: container {c['name']} has no image")
            errors += credential_rules(env_of(c), f"{where}.{c['name']}")
    return errors


def gpu_groups(spec: dict) -> list[str]:
    return [g["groupName"] for g in spec.get("workerGroupSpecs", [])
            if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                   for c in g["template"]["spec"]["containers"])]


def ray_job_rules(spec: dict) -> list[str]:
    from genray.cli import job_arguments

    errors = []
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        errors.append("spec: give exactly one of rayClusterSpec / clusterSelector")
    if "rayClusterSpec" in spec:
        errors += cluster_rules(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if spec.get("shutdownAfterJobFinishes") is not True:
            errors.append("spec.shutdownAfterJobFinishes: must be true (the job's cluster goes when it is done)")
    for c in spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
        errors += credential_rules(env_of(c), f"spec.submitterPodTemplate.{c['name']}")
    if "runtimeEnvYAML" in spec:
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        if not isinstance(runtime_env, dict):
            errors.append("spec.runtimeEnvYAML: not a mapping")
        elif any(SECRETISH.search(name) for name in runtime_env.get("env_vars", {})):
            errors.append("spec.runtimeEnvYAML: credentials in runtime_env (Ray shows it in its dashboard)")
    # The entrypoint is a genray job entry point whose arguments genray itself accepts (config file included).
    argv = shlex.split(spec["entrypoint"])
    mapped = [str(REPO / a[len(IMAGE_CHECKOUT):]) if a.startswith(IMAGE_CHECKOUT) else a for a in argv]
    script = Path(mapped[1]) if len(mapped) > 1 else None
    if mapped[0] != "python" or script is None or script.parent != REPO / "jobs" or not script.is_file():
        return errors + [f"spec.entrypoint: expected `python {IMAGE_CHECKOUT}jobs/<entry point>.py ...`"]
    try:
        job_arguments(script.stem, mapped[2:], str(REPO))
    except (Exception, SystemExit) as err:  # noqa: BLE001 - argparse exits, config errors raise
        errors.append(f"spec.entrypoint: genray {script.stem} refuses the arguments: {err}")
    return errors


def serve_config_rules(text: str) -> list[str]:
    from pydantic import ValidationError

    from genray.config import ServeFileConfig

    try:
        cfg = ServeFileConfig.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as err:
        return [f"spec.serveConfigV2: not a genray Serve config: {err}"]
    if cfg.http_options.host != "127.0.0.1" and not all(a.args.require_token for a in cfg.applications):
        return ["spec.serveConfigV2: listens beyond loopback without require_token: true"]
    return []


def validate_launcher(doc: dict) -> list[str]:
    """Ray's JSON schema, then what `ray up` checks after filling in the provider's defaults."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    try:
        jsonschema.validate(doc, schema)
        validate_config(prepare_config(copy.deepcopy(doc)))
    except (jsonschema.ValidationError, ValueError) as err:
        return [f"cluster launcher schema: {getattr(err, 'message', err)}"]
    errors = []
    types = doc["available_node_types"]
    if types[doc["head_node_type"]].get("resources", {}).get("CPU") != 0:
        errors.append("head node type: resources {CPU: 0} keeps training and bulk work off the head")
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    if not any(i.startswith(("g", "p")) for i in instance.values()):
        errors.append(f"no GPU worker type among {instance}")
    if any(t.get("max_workers", 0) <= t.get("min_workers", 0) for n, t in types.items() if n != doc["head_node_type"]):
        errors.append("a worker type cannot autoscale (max_workers <= min_workers)")
    if not any("pip install" in c and "genray" in c for c in doc.get("setup_commands", [])):
        errors.append("setup_commands do not install genray")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if not any("RAY_AUTH_MODE=token" in c for c in doc[key]):
            errors.append(f"{key}: RAY_AUTH_MODE=token missing (token authentication must be on)")
    return errors


def validate_file(path: Path) -> list[str]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    kind = path.relative_to(REPO / "cluster").parts[0]
    if kind == "kuberay":
        return [f"{path.name}: {e}" for d in docs for e in validate_kuberay(d)]
    if kind == "launcher":
        return [f"{path.name}: {e}" for d in docs for e in validate_launcher(d)]
    return [f"{path}: no validator for YAML files under cluster/{kind}/"]


# -- tests -----------------------------------------------------------------------------------------------------

def test_cluster_holds_every_promised_config():
    kinds = {yaml.safe_load(p.read_text()).get("kind") for p in (REPO / "cluster" / "kuberay").glob("*.yaml")}
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    jobs = [yaml.safe_load(p.read_text())["spec"]["entrypoint"] for p in (REPO / "cluster/kuberay").glob("ray-job.*")]
    assert any("jobs/train.py" in e for e in jobs) and any("jobs/process.py" in e for e in jobs)
    assert (REPO / "cluster/launcher/aws.yaml").is_file() and (REPO / "cluster/local/ray_local.py").is_file()
    cluster = yaml.safe_load((REPO / "cluster/kuberay/ray-cluster.genray.yaml").read_text())["spec"]
    assert gpu_groups(cluster) == ["gpu"] and len(cluster["workerGroupSpecs"]) == 2  # a CPU and a GPU group


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(REPO / "cluster")))
def test_every_yaml_under_cluster_validates(path):
    assert validate_file(path) == []


def _cluster_doc() -> dict:
    return yaml.safe_load((REPO / "cluster/kuberay/ray-cluster.genray.yaml").read_text())


def _job_doc() -> dict:
    return yaml.safe_load((REPO / "cluster/kuberay/ray-job.train.yaml").read_text())


def _first_env(doc: dict) -> list[dict]:
    return doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]


MISTAKES = {
    "old apiVersion": (_cluster_doc, lambda d: d.update(apiVersion="ray.io/v1alpha1"), "expected 'ray.io/v1'"),
    "typo": (_cluster_doc, lambda d: d["spec"].update(enableInTreeAutoscalling=True), "unknown field"),
    "unquoted num-cpus": (_cluster_doc, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0}), "expected str"),
    "no maxReplicas": (_cluster_doc, lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
                       "maxReplicas: required"),
    "replicas above max": (_cluster_doc, lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas=99),
                           "minReplicas <= replicas <= maxReplicas"),
    "literal secret": (_cluster_doc, lambda d: _first_env(d).append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}), "a credential as a literal value"),
    "auth off": (_cluster_doc, lambda d: _first_env(d)[0].update(value="disabled"), "RAY_AUTH_MODE=token missing"),
    "bad quantity": (_cluster_doc, lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                     ["resources"]["limits"].update(memory="32 GB"), "not a Kubernetes quantity"),
    "config typo in entrypoint": (_job_doc, lambda d: d["spec"].update(
        entrypoint=d["spec"]["entrypoint"] + " --set train.epocs=3"), "train.epocs: unknown key"),
    "secret in runtime env": (_job_doc, lambda d: d["spec"].update(
        runtimeEnvYAML="env_vars:\n  AWS_SECRET_ACCESS_KEY: x\n"), "credentials in runtime_env"),
    "no shutdown": (_job_doc, lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "must be true"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_kuberay_validator_catches_mistakes(mistake):
    load, break_it, message = MISTAKES[mistake]
    doc = load()
    break_it(doc)
    errors = validate_kuberay(doc)
    assert any(message in e for e in errors), errors


def test_the_validators_catch_serve_and_launcher_mistakes():
    doc = yaml.safe_load((REPO / "cluster/kuberay/ray-service.genray.yaml").read_text())
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    serve["applications"][0]["args"]["models"]["denoise"]["max_batch_sise"] = 4
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve)
    assert any("not a genray Serve config" in e for e in validate_kuberay(doc))

    launcher = yaml.safe_load((REPO / "cluster/launcher/aws.yaml").read_text())
    broken = dict(launcher, max_worker=3)
    assert any("Additional properties" in e for e in validate_launcher(broken))
    no_auth = dict(launcher, worker_start_ray_commands=["ray start --address=$RAY_HEAD_IP:6379"])
    assert any("RAY_AUTH_MODE=token missing" in e for e in validate_launcher(no_auth))

"""`genray pipeline`: train -> eval -> quality gate -> bulk jobs -> serve, declared in one YAML, resumable.

Each stage records what it did in `<run_uri>/state.json` before the next starts. A rerun (after a crash, a
fixed typo, a missing bucket created) skips stages already done with the same inputs and continues from the
first unfinished one: training is reused when its config digest matches (and a half-finished training resumes
from its own last checkpoint), the evaluation when the artefact digest matches, a bulk job skips the inputs its
manifest already has. `<run_uri>/report/report.md` (plus the PNGs it shows) is rewritten after every stage, so a
failed gate or a crash still leaves a readable report. (The bulk job itself is genray/process/.)
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from genray import storage
from genray.config import (ConfigError, PipelineConfig, ProcessConfig, ServeFileConfig, TrainConfig, load_config,
                           parse_gate_condition, parse_overrides, read_yaml, set_dotted, validate)

STATE_FILE = "state.json"


class GateFailed(RuntimeError):
    """The trained model did not meet the quality gate; nothing was bulk-processed or deployed."""


def digest_of(value: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def check_gate(conditions: list[str], metrics: dict[str, float]) -> list[dict[str, Any]]:
    """One row per condition: the measured value and whether it passed. A metric the evaluation did not measure
    fails its condition, with the metrics that exist in the row's note."""
    rows = []
    for condition in conditions:
        name, passes, threshold = parse_gate_condition(condition)
        value = metrics.get(name)
        row = {"condition": condition, "value": value, "passed": value is not None and passes(value, threshold)}
        if value is None:
            row["note"] = f"not measured; the evaluation measured: {', '.join(sorted(metrics))}"
        rows.append(row)
    return rows


@dataclass
class PipelineRun:
    """The state of one pipeline run, as stored in <run_uri>/state.json."""

    cfg: PipelineConfig
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> its record

    @property
    def state_uri(self) -> str:
        return storage.join_uri(self.cfg.run_uri, STATE_FILE)

    @classmethod
    def load(cls, cfg: PipelineConfig) -> "PipelineRun":
        run = cls(cfg)
        try:
            run.stages = json.loads(storage.read_bytes(run.state_uri)).get("stages", {})
        except storage.StorageError as err:
            if err.reason != "missing_object":  # no state yet: a new run
                raise
        return run

    def save(self) -> None:
        data = {"name": self.cfg.name, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "stages": self.stages}
        storage.write_bytes(self.state_uri, json.dumps(data, indent=2).encode())

    def done(self, stage: str, inputs_digest: str) -> dict[str, Any] | None:
        """The stage's record if it finished with these inputs (then it is reused), else None."""
        record = self.stages.get(stage)
        if record and record.get("status") == "done" and record.get("inputs") == inputs_digest:
            return record
        return None

    def record(self, stage: str, inputs_digest: str, status: str, **details: Any) -> dict[str, Any]:
        self.stages[stage] = {"status": status, "inputs": inputs_digest,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}
        self.save()
        return self.stages[stage]


def load_pipeline_config(path: str, overrides: list[str] | None = None) -> tuple[PipelineConfig, TrainConfig]:
    """The pipeline config and the training config it names (both validated, so typos fail before any work)."""
    cfg = load_config(path, overrides, cls=PipelineConfig)
    return cfg, load_config(cfg.train, cfg.train_overrides)


def serve_config_for(cfg: PipelineConfig, model_uri: str) -> ServeFileConfig:
    """The pipeline's Serve config file with the trained artefact behind its endpoint."""
    source = cfg.serve.config or "the pipeline's serve section"
    data = read_yaml(cfg.serve.config) if cfg.serve.config else {
        "applications": [{"name": "genray", "args": {"models": {cfg.serve.endpoint: {"uri": model_uri}}}}]}
    for key, value in parse_overrides(cfg.serve.overrides):
        set_dotted(data, key, value)
    models = (data.get("applications") or [{}])[0].get("args", {}).get("models", {})
    if cfg.serve.endpoint not in models:
        raise ConfigError(f"{source}: the first application has no models entry "
                          f"{cfg.serve.endpoint!r} (has: {', '.join(models) or 'none'})")
    models[cfg.serve.endpoint]["uri"] = model_uri
    return validate(ServeFileConfig, data, source)


def run_pipeline(cfg: PipelineConfig, train_cfg: TrainConfig, log: Callable[[str], None] = print) -> PipelineRun:
    """Run every unfinished stage (see the module docstring); raises GateFailed when the gate fails."""
    from genray.pipeline.report import write_report

    run = PipelineRun.load(cfg)
    try:
        model_uri = _train(run, train_cfg, log)
        evaluation = _evaluate(run, model_uri, log)
        _gate(run, evaluation, log)
        for job in cfg.bulk_jobs:
            _bulk_job(run, job, model_uri, log)
        if cfg.serve is not None:
            _serve(run, model_uri, log)
    finally:
        report_uri = write_report(run, train_cfg)
        log(f"[pipeline] report: {report_uri}")
    return run


def _train(run: PipelineRun, train_cfg: TrainConfig, log) -> str:
    from genray.model_artifact import read_meta
    from genray.training.trainer import run_training

    inputs = digest_of(train_cfg.model_dump_plain())
    record = run.done("train", inputs)
    if record:
        try:  # reuse only what is really there: the artefact could have been deleted since
            if read_meta(record["model_uri"])["digest"] == record["model_digest"]:
                log(f"[pipeline] train: reusing {record['model_uri']} (same training config digest)")
                return record["model_uri"]
        except Exception as err:  # noqa: BLE001 - any failure to read it means: train again
            log(f"[pipeline] train: the recorded artefact is unusable ({err}); training again")
    log(f"[pipeline] train: {train_cfg.model.family} '{train_cfg.name}' on {train_cfg.scaling.num_workers} workers "
        f"(resumes from its last checkpoint in {train_cfg.output_uri} if one exists)")
    run.record("train", inputs, "running", output_uri=train_cfg.output_uri)
    started = time.perf_counter()
    result = run_training(train_cfg)
    run.record("train", inputs, "done", output_uri=train_cfg.output_uri, model_uri=result.model_uri,
               model_digest=read_meta(result.model_uri)["digest"], seconds=round(time.perf_counter() - started, 1),
               metrics={k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    return result.model_uri


def _evaluate(run: PipelineRun, model_uri: str, log) -> dict[str, Any]:
    from genray.model_artifact import read_meta
    from genray.evaluation import evaluate_model, write_evaluation

    ev = run.cfg.eval
    inputs = digest_of({"model": read_meta(model_uri)["digest"], "eval": ev.model_dump(mode="json")})
    record = run.done("eval", inputs)
    if record:
        log("[pipeline] eval: reusing the evaluation of this artefact")
        return record
    log(f"[pipeline] eval: {model_uri} on {ev.data_uri}")
    evaluation = evaluate_model(model_uri, ev.data_uri, task=ev.task, sigma=ev.sigma, num_samples=ev.num_samples,
                                reference_model=ev.reference_model_uri, train_data=ev.train_data_uri)
    json_uri, _ = write_evaluation(evaluation, storage.join_uri(run.cfg.run_uri, "eval"))
    log(evaluation.table())
    return run.record("eval", inputs, "done", eval_uri=json_uri, **evaluation.to_dict())


def _gate(run: PipelineRun, evaluation: dict[str, Any], log) -> None:
    rows = check_gate(run.cfg.gate, evaluation["metrics"])
    passed = all(row["passed"] for row in rows)
    run.record("gate", digest_of({"gate": run.cfg.gate, "eval": evaluation["inputs"]}), "done" if passed else "failed",
               conditions=rows)
    for row in rows:
        value = "not measured" if row["value"] is None else f"{row['value']:.4f}"
        log(f"[pipeline] gate: {row['condition']}: {value} -> {'pass' if row['passed'] else 'FAIL'}")
    if not passed:
        failed = [f"{r['condition']} (measured {'nothing' if r['value'] is None else round(r['value'], 4)})"
                  for r in rows if not r["passed"]]
        raise GateFailed(f"quality gate failed: {'; '.join(failed)}; no bulk job ran and nothing was deployed "
                         f"(report: {storage.join_uri(run.cfg.run_uri, 'report', 'report.md')})")


def _bulk_job(run: PipelineRun, job, model_uri: str, log) -> None:
    from genray.model_artifact import read_meta
    from genray.process.job import run_process_job

    process_cfg = validate(ProcessConfig, {**job.job, "model_uri": model_uri}, f"bulk job {job.name}")
    stage = f"bulk:{job.name}"
    inputs = digest_of({"job": process_cfg.model_dump(mode="json"), "model": read_meta(model_uri)["digest"]})
    if run.done(stage, inputs):
        log(f"[pipeline] {stage}: done before with this artefact; skipping")
        return
    log(f"[pipeline] {stage}: {process_cfg.task} {process_cfg.input_uri} -> {process_cfg.output_uri}")
    run.record(stage, inputs, "running", output_uri=process_cfg.output_uri)
    summary = run_process_job(process_cfg, log=log)  # resumes by itself: inputs in the manifest are skipped
    log(summary.table())
    run.record(stage, inputs, "done", task=process_cfg.task, input_uri=process_cfg.input_uri,
               output_uri=process_cfg.output_uri, manifest_uri=summary.manifest_uri, counts=dict(summary.counts),
               seconds=round(summary.seconds, 1), images_per_s=round(summary.images_per_s, 3),
               errors=summary.errors[:5])


def _serve(run: PipelineRun, model_uri: str, log) -> None:
    import requests

    from genray.model_artifact import read_meta
    from genray.serving.deploy import run_serve_config

    serve_cfg = serve_config_for(run.cfg, model_uri)
    log(f"[pipeline] serve: deploying {model_uri} at /{run.cfg.serve.endpoint}")
    base = run_serve_config(serve_cfg)
    health = requests.get(f"{base}/-/healthz", timeout=30)  # the ingress answers only once every model loaded
    task = read_meta(model_uri).get("task")
    # The gateway's routes by task (genray/serving/app.py): image models at /<name>, the others under a prefix.
    route = {"generate": "generate/", "classify": "classify/"}.get(task, "") + run.cfg.serve.endpoint
    run.record("serve", digest_of({"serve": run.cfg.serve.model_dump(), "model": model_uri}), "done",
               url=base, endpoint=f"{base}/{route}", task=task, healthz=health.status_code)
    log(f"[pipeline] serve: {base}/{route} (healthz {health.status_code})")

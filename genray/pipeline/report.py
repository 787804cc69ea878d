"""The pipeline's run report: `<run_uri>/report/report.md` plus the PNGs it shows, readable on its own."""
from __future__ import annotations

import re
from typing import Any

import yaml

from genray import storage
from genray.config import TrainConfig


def _copy(src: str, dst: str) -> bool:
    try:
        storage.write_bytes(dst, storage.read_bytes(src))
        return True
    except storage.StorageError:
        return False


def _latest_sample(output_uri: str) -> str | None:
    try:
        samples = [o for o in storage.list_objects(storage.join_uri(output_uri, "samples"))
                   if re.fullmatch(r"epoch_\d+\.png", o.key)]
    except storage.StorageError:
        return None
    return max(samples, key=lambda o: o.key).uri if samples else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return "" if value is None else str(value)


def _eval_section(record: dict[str, Any]) -> list[str]:
    from genray.evaluation import Evaluation

    evaluation = Evaluation(**{k: record[k] for k in ("task", "model_uri", "data_uri", "family", "digest", "rows",
                                                      "metrics", "notes", "per_class")})
    return [f"{evaluation.task} evaluation of `{evaluation.model_uri}` on `{evaluation.data_uri}` "
            f"(artefact digest `{evaluation.digest[:19]}`):", "", evaluation.table()]


def render(run, train_cfg: TrainConfig, images: dict[str, str]) -> str:
    cfg, stages = run.cfg, run.stages
    lines = [f"# Pipeline `{cfg.name}`", "", f"Run storage: `{cfg.run_uri}`", "", "## Stages", "",
             "| stage | status | finished |", "|---|---|---|"]
    lines += [f"| {name} | {r.get('status')} | {r.get('finished', '')} |" for name, r in stages.items()]
    gate = stages.get("gate")
    if gate:
        verdict = "**passed**" if gate["status"] == "done" else "**FAILED**: no bulk job ran and nothing was deployed"
        lines += ["", "## Quality gate", "", f"Gate {verdict}.", "", "| condition | measured | result |",
                  "|---|---|---|"]
        lines += [f"| `{r['condition']}` | {_fmt(r['value']) or 'not measured'} | {'pass' if r['passed'] else 'FAIL'} |"
                  for r in gate["conditions"]]
    if stages.get("eval", {}).get("status") == "done":
        lines += ["", "## Metrics vs baselines", "", *_eval_section(stages["eval"])]
    train = stages.get("train", {})
    lines += ["", "## Training", ""]
    if train.get("status") == "done":
        shown = {k: v for k, v in train.get("metrics", {}).items() if not k.startswith(("precision_", "recall_",
                                                                                        "f1_class"))}
        lines += [f"`{train_cfg.model.family}` run `{train_cfg.name}`: {train.get('seconds', '?')} s on "
                  f"{train_cfg.scaling.num_workers} workers; artefact `{train['model_uri']}`", "",
                  "| metric (model.json) | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in shown.items()]]
    else:
        lines.append(f"status: {train.get('status', 'not started')}")
    for title, name in (("Loss curves", "loss.png"), ("Samples (last epoch)", "samples.png")):
        if name in images:
            lines += ["", f"![{title}]({name})"]
    bulk = {name[5:]: r for name, r in stages.items() if name.startswith("bulk:")}
    if bulk:
        lines += ["", "## Bulk jobs", "", "| job | task | input | output | ok | skipped | error | images/s | manifest |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in bulk.items():
            counts = r.get("counts", {})
            lines.append(f"| {name} | {r.get('task', '')} | `{r.get('input_uri', '')}` | `{r.get('output_uri', '')}` | "
                         f"{counts.get('ok', '')} | {counts.get('skipped', '')} | {counts.get('error', '')} | "
                         f"{_fmt(r.get('images_per_s'))} | `{r.get('manifest_uri', '')}` |")
    serve = stages.get("serve")
    if serve:
        example = {"generate": f"curl '{serve['endpoint']}?n=16&seed=1' -o samples.png",
                   "classify": f"curl --data-binary @digit.png {serve['endpoint']}"}.get(
            serve.get("task"), f"curl --data-binary @image.png {serve['endpoint']} -o out.png")
        lines += ["", "## Serving", "", f"Endpoint: `{serve['endpoint']}` (health check {serve['healthz']}), e.g.",
                  "", "```", example, "```"]
    lines += ["", "## Configuration", "", "Pipeline:", "", "```yaml",
              yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).strip(), "```", "",
              f"Training (`{cfg.train}` with its overrides):", "", "```yaml",
              yaml.safe_dump(train_cfg.model_dump(mode="json"), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def write_report(run, train_cfg: TrainConfig) -> str:
    """Copy the training's loss plot and last sample grid next to report.md and write it; returns its URI."""
    report_dir = storage.join_uri(run.cfg.run_uri, "report")
    images = {}
    if run.stages.get("train", {}).get("status") == "done":
        sources = {"loss.png": storage.join_uri(train_cfg.output_uri, "loss.png"),
                   "samples.png": _latest_sample(train_cfg.output_uri)}
        images = {name: src for name, src in sources.items()
                  if src and _copy(src, storage.join_uri(report_dir, name))}
    uri = storage.join_uri(report_dir, "report.md")
    storage.write_bytes(uri, render(run, train_cfg, images).encode())
    return uri

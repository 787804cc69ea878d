"""The pipeline's run report: `<run_uri>/report/report.md` and `index.html` (the same content as a page to open
in a browser) plus the PNGs they show, readable on their own."""
from __future__ import annotations

import html
import re
from typing import Any

import numpy as np

import yaml
from PIL import Image

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
    for name in bulk:
        if f"before_after_{name}.png" in images:
            lines += ["", f"![Bulk job {name}: input (left) and output (right)](before_after_{name}.png)"]
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


CROP = 96  # side of the input crop shown per image in the before/after strip (the output is shown at its scale)


def before_after(input_uri: str, output_uri: str, n: int = 3) -> bytes | None:
    """A strip of up to n (input crop | output crop) pairs from a bulk job's ok rows, the input enlarged (nearest)
    to the output's scale so the two sides line up; None when no pair can be read (e.g. archive members, whose
    input is not an object of its own, or tar shard outputs)."""
    from genray.images import decode_image, encode_png, resize
    from genray.process.manifest import sample_rows

    pairs = []
    for row in sample_rows(output_uri, n):
        try:
            before = decode_image(storage.read_bytes(storage.join_uri(input_uri, row["input_key"])))
            after = decode_image(storage.read_bytes(storage.join_uri(output_uri, row["output_key"])))
        except (storage.StorageError, ValueError):
            continue
        scale = max(1, round(after.shape[0] / before.shape[0]))
        side = min(CROP, *before.shape[:2])
        top, left = (before.shape[0] - side) // 2, (before.shape[1] - side) // 2
        crop_in = before[top:top + side, left:left + side]
        crop_out = after[top * scale:(top + side) * scale, left * scale:(left + side) * scale]
        big = resize(crop_in, side * scale, side * scale, Image.Resampling.NEAREST)
        pairs.append(np.concatenate([big, np.full((big.shape[0], 4, 3), 255, np.uint8), crop_out], axis=1))
    if not pairs:
        return None
    width = max(p.shape[1] for p in pairs)
    rows = [np.pad(p, ((0, 8), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in pairs]
    return encode_png(np.concatenate(rows, axis=0))


def write_report(run, train_cfg: TrainConfig) -> str:
    """Copy the training's loss plot and last sample grid next to report.md, add before/after crops of each bulk
    job, and write report.md and index.html; returns report.md's URI."""
    report_dir = storage.join_uri(run.cfg.run_uri, "report")
    images = {}
    if run.stages.get("train", {}).get("status") == "done":
        sources = {"loss.png": storage.join_uri(train_cfg.output_uri, "loss.png"),
                   "samples.png": _latest_sample(train_cfg.output_uri)}
        images = {name: src for name, src in sources.items()
                  if src and _copy(src, storage.join_uri(report_dir, name))}
    for stage, record in run.stages.items():
        if stage.startswith("bulk:") and record.get("status") == "done":
            strip = before_after(record["input_uri"], record["output_uri"])
            if strip is not None:
                name = f"before_after_{stage[5:]}.png"
                storage.write_bytes(storage.join_uri(report_dir, name), strip)
                images[name] = name
    markdown = render(run, train_cfg, images)
    storage.write_bytes(storage.join_uri(report_dir, "index.html"),
                        to_html(markdown, f"genray pipeline {run.cfg.name}").encode())
    uri = storage.join_uri(report_dir, "report.md")
    storage.write_bytes(uri, markdown.encode())
    return uri


# ------------------------------------------------------------------------------------------------ HTML page
# report.md is the one source; the page renders the small Markdown subset render() writes (headings, tables,
# fenced code, images, paragraphs with `code` and **bold**), so the two never disagree. No scripts, no external
# assets: the page opens from S3, a local copy or a file:// URL alike.

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1d2330; }
h1 { border-bottom: 2px solid #dde3ee; padding-bottom: .3em; } h2 { margin-top: 1.8em; color: #24456e; }
table { border-collapse: collapse; margin: .8em 0; } th, td { border: 1px solid #d5dbe6; padding: .3em .7em; }
th { background: #eef2f8; text-align: left; } tr:nth-child(even) td { background: #f8f9fc; }
td:not(:first-child) { font-variant-numeric: tabular-nums; }
code { background: #f0f2f6; padding: .05em .3em; border-radius: 3px; font-size: 90%; }
pre { background: #f5f7fa; padding: 1em; overflow-x: auto; border-radius: 4px; } pre code { background: none; }
img { max-width: 100%; min-width: min(100%, 224px); image-rendering: pixelated; border: 1px solid #d5dbe6; margin: .5em 0; }
figure { margin: 1em 0; } figcaption { color: #5a6475; font-size: 90%; }
.pass { color: #176b2c; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
"""


def _inline(text: str) -> str:
    out = []
    for i, part in enumerate(re.split(r"`([^`]*)`", text)):  # odd parts are code spans
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part))
            out.append(re.sub(r"\b(pass|passed)\b", r'<span class="pass">\1</span>',
                              re.sub(r"\b(FAIL|FAILED)\b", r'<span class="fail">\1</span>', part)))
    return "".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def to_html(markdown: str, title: str) -> str:
    body: list[str] = []
    lines = markdown.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            body.append("<pre><code>" + html.escape("\n".join(lines[i + 1:end])) + "</code></pre>")
            i = end + 1
            continue
        if line.startswith("|"):
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
            rows = [_cells(r) for r in lines[i:end] if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", r.strip())]
            head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            rest = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rest}</tbody></table>")
            i = end
            continue
        image = re.fullmatch(r"!\[(.*)\]\(([^)]+)\)", line.strip())
        heading = re.match(r"(#{1,6}) (.*)", line)
        if image:
            alt, src = html.escape(image.group(1)), html.escape(image.group(2))
            body.append(f'<figure><img src="{src}" alt="{alt}"><figcaption>{alt}</figcaption></figure>')
        elif heading:
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")

"""genray pipeline on the tiny config against the real S3 server and a local Ray: gate pass -> bulk job and a served
endpoint; gate fail -> a report and nothing else; resume after a failed stage; the real CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from genray import storage
from genray.config import ConfigError, load_config
from genray.datasets import load_embedded
from genray.images import decode_image, encode_png
from genray.pipeline.report import to_html
from genray.pipeline.stages import GateFailed, PipelineConfig, check_gate, load_pipeline_config, run_pipeline

from browser import load_page
from helpers import free_port, GENRAY

pytestmark = pytest.mark.integration  # drives the genray CLI or jobs as subprocesses

CONFIG = "configs/pipeline/tiny_denoise.yaml"


def overrides(digits_uri: str, run: str, port: int, **extra: str) -> list[str]:
    """configs/pipeline/tiny_denoise.yaml pointed at the test digits, `run` and Serve on `port`."""
    from genray.config import read_yaml

    train_overrides = [s for s in read_yaml(CONFIG)["train_overrides"] if not s.startswith("output_uri=")]
    sets = {
        "run_uri": f"{run}/run",
        "train_overrides": json.dumps([*train_overrides, f"output_uri={run}/train", f"data.uri={digits_uri}/train/",
                                       f"data.held_out_uri={digits_uri}/test/"]),
        "eval.data_uri": f"{digits_uri}/test/",
        "bulk_jobs.0.job.input_uri": f"{digits_uri}/test/",
        "bulk_jobs.0.job.output_uri": f"{run}/denoised",
        "serve.overrides": json.dumps([f"http_options.port={port}", "applications.0.args.models.denoise.num_cpus=0.25"]),
        **extra,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def post_digit(url: str) -> requests.Response:
    images, _, _ = load_embedded("digits")
    return requests.post(url, data=encode_png(images[0]), timeout=60)


@pytest.fixture(scope="module")
def passed_run(ray_session, serve_http, digits_uri, tmp_path_factory):
    """The tiny pipeline run once to the end on the session's Ray and Serve; yields (run prefix, PipelineRun, log)."""
    from ray import serve

    storage.ensure_bucket("s3://genray-test-pipeline")
    run_prefix = "s3://genray-test-pipeline/pass"
    cfg, train_cfg = load_pipeline_config(CONFIG, overrides(digits_uri, run_prefix, int(serve_http.rsplit(":", 1)[1])))
    log: list[str] = []
    run = run_pipeline(cfg, train_cfg, log=log.append)
    yield run_prefix, run, log
    serve.delete("genray")


def test_gate_pass_runs_the_bulk_job_and_serves_the_model(passed_run, serve_http, digits_uri):
    run_prefix, run, log = passed_run
    assert [name for name in run.stages] == ["train", "eval", "gate", "bulk:digits", "serve"]
    assert all(record["status"] == "done" for record in run.stages.values())
    # The bulk job denoised every held-out digit with the trained artefact.
    bulk = run.stages["bulk:digits"]
    assert bulk["counts"] == {"ok": 32, "skipped": 0, "error": 0}
    outputs = storage.list_objects(f"{run_prefix}/denoised", suffixes=(".png",))
    assert len(outputs) == 32
    # Serve answers at the configured endpoint with the trained artefact.
    response = post_digit(run.stages["serve"]["endpoint"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert decode_image(response.content, channels=None).shape[:2] == (28, 28)
    models = requests.get(f"{serve_http}/models", timeout=30).json()
    assert json.dumps(models).count(run.stages["train"]["model_digest"]) >= 1
    # The state and the report are in the run's storage.
    state = json.loads(storage.read_bytes(f"{run_prefix}/run/state.json"))
    assert set(state["stages"]) == set(run.stages)
    report = storage.read_bytes(f"{run_prefix}/run/report/report.md").decode()
    for text in ("## Quality gate", "Gate **passed**", "| noisy input |", "| nl_means |", "## Bulk jobs",
                 "| digits | denoise |", "## Serving", "![Loss curves](loss.png)", "![Samples (last epoch)](samples.png)",
                 "## Configuration"):
        assert text in report, text
    for image in ("loss.png", "samples.png", "before_after_digits.png"):
        assert decode_image(storage.read_bytes(f"{run_prefix}/run/report/{image}"), channels=None).size > 0
    assert "![Bulk job digits: input (left) and output (right)](before_after_digits.png)" in report


def _download(prefix: str, to: Path) -> None:
    for obj in storage.list_objects(prefix):
        (to / obj.key).write_bytes(storage.read_bytes(obj.uri))


def test_the_report_page_renders_in_chromium(passed_run, tmp_path):
    """report/index.html, copied out of S3 as a user would, opens in headless Chromium with no console errors or
    failed loads (every picture it shows is there) and draws a page that is not blank."""
    run_prefix, _, _ = passed_run
    _download(f"{run_prefix}/run/report", tmp_path)
    page = load_page((tmp_path / "index.html").as_uri())
    assert page.errors == [] and page.title.startswith("genray pipeline")
    if os.environ.get("GENRAY_SCREENSHOT_DIR"):  # how docs/pipeline-report.png is made
        (Path(os.environ["GENRAY_SCREENSHOT_DIR"]) / "pipeline-report.png").write_bytes(page.screenshot)
    shot = decode_image(page.screenshot, channels=None)
    assert shot.shape[0] > 1000 and shot.std() > 20  # a long page with tables and pictures, not a blank one
    html = (tmp_path / "index.html").read_text()
    for text in ("<h2>Quality gate</h2>", '<img src="loss.png"', '<img src="before_after_digits.png"', "<table>"):
        assert text in html, text


def test_the_page_check_sees_a_missing_picture(tmp_path):
    """The Chromium check above is not vacuous: a report whose picture is missing is reported as an error."""
    (tmp_path / "index.html").write_text(to_html("# r\n\n![gone](gone.png)\n", "r"))
    page = load_page((tmp_path / "index.html").as_uri())
    assert any("gone.png" in error for error in page.errors), page.errors


def test_gate_fail_stops_with_a_report_and_deploys_nothing(passed_run, serve_http, digits_uri):
    from ray import serve

    run_prefix = "s3://genray-test-pipeline/fail"
    sets = overrides(digits_uri, run_prefix, int(serve_http.rsplit(":", 1)[1]),
                     gate=json.dumps(["psnr_gain_over_noisy_db >= 100", "accuracy >= 0.9"]))
    # The same training config as the passing run, so its finished training is what gets evaluated here too.
    sets = [s.replace(f"output_uri={run_prefix}/train", f"output_uri={passed_run[0]}/train") for s in sets]
    cfg, train_cfg = load_pipeline_config(CONFIG, sets)
    serve.delete("genray")  # what the passing run deployed; this run must not deploy again
    try:
        with pytest.raises(GateFailed, match="psnr_gain_over_noisy_db >= 100 .*accuracy >= 0.9 .measured nothing"):
            run_pipeline(cfg, train_cfg, log=lambda line: None)
        state = json.loads(storage.read_bytes(f"{run_prefix}/run/state.json"))["stages"]
        assert state["gate"]["status"] == "failed" and not any(k.startswith("bulk:") or k == "serve" for k in state)
        assert "not measured; the evaluation measured:" in state["gate"]["conditions"][1]["note"]
        assert storage.list_objects(f"{run_prefix}/denoised") == []
        assert "genray" not in serve.status().applications
        report = storage.read_bytes(f"{run_prefix}/run/report/report.md").decode()
        assert "Gate **FAILED**" in report and "| `psnr_gain_over_noisy_db >= 100` |" in report
    finally:  # put the passing run's app back for the tests after this one
        from genray.pipeline.stages import serve_config_for
        from genray.serving.deploy import run_serve_config

        run_serve_config(serve_config_for(passed_run[1].cfg, passed_run[1].stages["train"]["model_uri"]))


def test_resume_after_a_failed_stage_continues_from_it(passed_run, serve_http, digits_uri, s3_bucket):
    """The bulk job's input bucket is missing: train, eval and gate finish, the bulk stage fails. With the data in
    place, the rerun reuses train and eval and runs only what is left."""
    run_prefix = "s3://genray-test-pipeline/resume"
    missing = "s3://genray-test-pipeline-later/digits"
    sets = overrides(digits_uri, run_prefix, int(serve_http.rsplit(":", 1)[1]),
                     **{"bulk_jobs.0.job.input_uri": f"{missing}/test/", "serve": "null"})
    sets = [s.replace(f"output_uri={run_prefix}/train", f"output_uri={passed_run[0]}/train") for s in sets]
    cfg, train_cfg = load_pipeline_config(CONFIG, sets)
    with pytest.raises(Exception, match="genray-test-pipeline-later"):
        run_pipeline(cfg, train_cfg, log=lambda line: None)
    state = json.loads(storage.read_bytes(f"{run_prefix}/run/state.json"))["stages"]
    assert {k: v["status"] for k, v in state.items()} == {"train": "done", "eval": "done", "gate": "done",
                                                           "bulk:digits": "running"}
    storage.ensure_bucket(missing)
    for obj in storage.list_objects(f"{digits_uri}/test/")[:5]:
        storage.write_bytes(f"{missing}/test/{obj.key}", storage.read_bytes(obj.uri))
    log: list[str] = []
    run = run_pipeline(cfg, train_cfg, log=log.append)
    assert any("train: reusing" in line for line in log) and any("eval: reusing" in line for line in log)
    assert run.stages["bulk:digits"]["status"] == "done" and run.stages["bulk:digits"]["counts"]["ok"] == 5
    assert run.stages["train"]["finished"] == state["train"]["finished"]  # not retrained


def test_gate_conditions_and_config_errors(tmp_path):
    rows = check_gate(["a >= 1", "b < 0.5", "c == 2"], {"a": 1.0, "b": 0.7})
    assert [r["passed"] for r in rows] == [True, False, False] and rows[2]["value"] is None
    with pytest.raises(ConfigError, match="gate: .*'<metric> <op> <number>'"):
        load_config(CONFIG, ["gate=['psnr is good']"], cls=PipelineConfig)
    with pytest.raises(ConfigError, match="bulk_jobs.0.job: .*model_uri is the pipeline's"):
        load_config(CONFIG, ["bulk_jobs.0.job.model_uri=s3://x/model"], cls=PipelineConfig)
    with pytest.raises(ConfigError, match="bulk_jobs.0.job.batch_sise: unknown key"):
        load_config(CONFIG, ["bulk_jobs.0.job.batch_sise=4"], cls=PipelineConfig)
    with pytest.raises(ConfigError, match="eval.sigmaa: unknown key"):
        load_config(CONFIG, ["eval.sigmaa=25"], cls=PipelineConfig)


def test_every_pipeline_config_in_the_repo_loads():
    for path in sorted(Path("configs/pipeline").glob("*.yaml")):
        cfg, train_cfg = load_pipeline_config(str(path))
        assert cfg.gate and train_cfg.name, path
        if cfg.serve:
            from genray.pipeline.stages import serve_config_for

            serve_config_for(cfg, "s3://bucket/model")  # the endpoint exists in the serve config


def test_the_cli_reruns_a_finished_pipeline_and_serves(passed_run, digits_uri, tmp_path):
    """`genray pipeline` on the passing run's state: every stage but serve is reused; it then serves on its own
    local Ray until SIGTERM."""
    port = free_port()
    args = [GENRAY, "pipeline", CONFIG, *[f"--set={s}" for s in overrides(digits_uri, passed_run[0], port)]]
    log_path = tmp_path / "pipeline.log"
    proc = subprocess.Popen(args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        deadline = time.time() + 240
        while "serving at" not in log_path.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        text = log_path.read_text()
        assert "serving at" in text, text[-3000:]
        assert "train: reusing" in text and "eval: reusing" in text and "bulk:digits: done before" in text
        response = post_digit(f"http://127.0.0.1:{port}/denoise")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log_path.read_text()[-3000:]

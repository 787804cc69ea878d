"""The real `genray` command, run as a subprocess, end to end on tiny configs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from genray import __version__ as genray_version, storage
from genray.model_artifact import read_meta
from genray.images import decode_image, encode_png, read_metadata

from helpers import GENRAY, REPO, free_port, genray, read_manifest_table

pytestmark = pytest.mark.integration  # drives the genray CLI or jobs as subprocesses

VERBS = [[], ["data"], ["data", "export"], ["train"], ["eval"], ["process"], ["serve"], ["demo"], ["export"],
         ["completion"]]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v) or "genray")
def test_every_verb_has_help(verb):
    r = genray(*verb, "--help")
    assert r.returncode == 0 and "usage: genray" in r.stdout


def test_bash_completion_completes_verbs_tasks_and_flags():
    """`genray completion bash` is a script bash loads; its completion function, called as bash calls it on <Tab>,
    offers the parser's verbs, a verb's choices and its flags."""
    r = genray("completion", "bash")
    assert r.returncode == 0, r.stderr

    def complete(*words: str) -> set[str]:
        line = " ".join(words)
        script = (f"{r.stdout}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE='{line}'; "
                  f"COMP_POINT={len(line)}; _shtab_genray; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return set(done.stdout.split())

    assert complete("genray", "pro") == {"process"}
    assert complete("genray", "process", "") >= {"denoise", "superres", "style"}
    assert complete("genray", "process", "denoise", "--max-a") == {"--max-archive-members", "--max-archive-bytes",
                                                                   "--max-attempts"}
    assert complete("genray", "export", "--format", "") == {"onnx", "torchscript"}


def test_data_export_writes_pngs_to_s3(s3_bucket):
    r = genray("data", "export", "digits", "--to", f"{s3_bucket}/digits", "--split", "test")
    assert r.returncode == 0, r.stderr
    objects = storage.list_objects(f"{s3_bucket}/digits")
    assert len(objects) == 360 and all(o.key.startswith("test/") for o in objects)
    assert decode_image(storage.read_bytes(objects[0].uri), channels=None).shape == (28, 28, 1)


def test_config_typo_is_one_clear_line():
    r = genray("train", "configs/tiny/denoise_ae.yaml", "--set", "train.lrr=0.1")
    assert r.returncode == 2
    assert r.stderr.strip() == "genray: error: configs/tiny/denoise_ae.yaml: train.lrr: unknown key (typo?)"
    r = genray("train", "configs/tiny/denoise_ae.yaml", "--set", "model.family=gann")
    assert r.returncode == 2 and "denoise_ae" in r.stderr and "Traceback" not in r.stderr


def test_version_and_python_dash_m():
    from genray import __version__

    r = genray("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"genray {__version__}"
    r = subprocess.run([sys.executable, "-m", "genray", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"genray {__version__}"
    r = subprocess.run([sys.executable, "-m", "genray", "-q", "-v", "demo"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr  # -q and -v exclude each other


def test_missing_data_uri_is_one_line_before_ray_starts(tmp_path):
    missing = tmp_path / "no-such-digits"
    r = genray("train", "configs/tiny/denoise_ae.yaml", "--set", f"data.uri={missing}/", "--output",
               str(tmp_path / "run"), drop=("RAY_ADDRESS",))
    assert r.returncode == 2 and r.stderr == f"genray: error: data.uri {missing}/ does not exist\n"
    assert r.stdout == ""  # no Ray started: it would have said where its logs go
    empty = tmp_path / "empty"
    empty.mkdir()
    r = genray("train", "configs/tiny/denoise_ae.yaml", "--set", f"data.uri={empty}", "--output",
               str(tmp_path / "run"), drop=("RAY_ADDRESS",))
    assert r.returncode == 2 and r.stderr.startswith("genray: error: data.uri: no images") and r.stdout == ""


def test_missing_bucket_is_one_clear_line(s3_server, tmp_path):
    r = genray("data", "export", "digits", "--to", "s3://no-such-bucket-cli/x", "--split", "test")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "s3://no-such-bucket-cli" in r.stderr and "does not exist" in r.stderr


def test_train_then_process_through_the_cli(ray_local, digits_uri, s3_bucket, tmp_path):
    # The CLI joins the test session's Ray through --address, as a user joins a cluster.
    address = ray_local.get_runtime_context().gcs_address
    out = f"{s3_bucket}/run"
    r = genray("train", "configs/tiny/denoise_ae.yaml", "--set", f"data.uri={digits_uri}/train/",
               "--set", f"data.held_out_uri={digits_uri}/test/", "--set", "train.epochs=1",
               "--set", f"tracking.mlflow_uri=file:{tmp_path}/mlruns", "--output", out, "--address", address, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    # --json: stdout is one JSON object; what the verb prints on the way (epoch lines, paths) goes to stderr.
    result = json.loads(r.stdout)
    assert result["model_uri"] == f"{out}/model" and result["tensorboard_uri"] == f"{out}/tensorboard"
    assert result["family"] == "denoise_ae" and result["metrics"]["epoch"] == 1 and result["seconds"] > 0
    assert "[genray] epoch 1/1" in r.stderr
    assert read_meta(f"{out}/model")["metrics"]["epoch"] == 1
    assert storage.list_objects(f"{out}/tensorboard")
    assert any(tmp_path.glob("mlruns/*/*/artifacts/model/weights.pt"))  # the MLflow run's model artefact

    inputs = f"{s3_bucket}/in"
    for i in range(3):
        storage.write_bytes(f"{inputs}/{i}.png", encode_png(np.full((28, 28, 1), 40 * i, np.uint8)))
    storage.write_bytes(f"{inputs}/broken.png", b"\x89PNG broken")
    args = ("process", "denoise", "--input", inputs, "--output", f"{s3_bucket}/out", "--model", f"{out}/model",
            "--batch-size", "2", "--address", address)
    r = genray(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok             3" in r.stdout and "error          1" in r.stdout
    assert {o.key for o in storage.list_objects(f"{s3_bucket}/out") if not o.key.startswith("_")} == \
        {"0.png", "1.png", "2.png"}
    # Each output says which model made it (PNG text chunks), as Serve's answers do.
    assert read_metadata(storage.read_bytes(f"{s3_bucket}/out/0.png")) == {
        "genray:model": f"{out}/model", "genray:model-family": "denoise_ae",
        "genray:model-digest": read_meta(f"{out}/model")["digest"], "genray:version": genray_version}
    r = genray(*args, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rerun = json.loads(r.stdout)
    assert rerun["counts"]["skipped"] == 3 and rerun["counts"]["ok"] == 0, rerun
    assert rerun["manifest_uri"] == f"{s3_bucket}/out/_manifest/" and rerun["task"] == "denoise"

    r = genray("process", "denoise", "-i", inputs, "-o", f"{s3_bucket}/o2", "--model",  # -i/-o: Real-ESRGAN's
               f"{s3_bucket}/not-a-model", "--address", address)
    assert r.returncode == 2 and "not a genray model artefact" in r.stderr


def test_serve_command_answers_http_and_stops_on_sigterm(tiny_model, tmp_path):
    # Its own local Ray (no --address): `genray serve` as an operator starts it on a fresh machine.
    _, trained = tiny_model
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [GENRAY, "serve", "configs/serve/denoise.yaml", "--port", str(port),
         "--set", f"applications.0.args.models.denoise.uri={trained.model_uri}"],
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = requests.post(f"http://127.0.0.1:{port}/denoise", data=encode_png(np.zeros((28, 28, 1), np.uint8)),
                                  timeout=10)
                if r.status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # the first request waits for cold replicas
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        while "serving at" not in (tmp_path / "serve.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.5)  # SIGTERM is handled once the command says it is serving
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_process_flags_that_conflict_are_one_clear_line(s3_bucket):
    r = genray("process", "style", "--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out",
               "--model", f"{s3_bucket}/m", "--style-image", f"{s3_bucket}/s.png")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not both" in r.stderr
    r = genray("process", "superres", "--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out")
    assert r.returncode == 2 and "needs model_uri" in r.stderr


def test_killed_driver_is_recovered_by_rerunning_the_command(sr_model_uri, s3_bucket, tmp_path):
    """SIGKILL the whole `genray process` (driver and the local Ray it started) mid-job; the same command again
    finishes the job: every input once in the manifest, every output present, a third run skips everything."""
    keys = [f"img{i:02d}.png" for i in range(24)]
    rng = np.random.default_rng(0)
    for key in keys:
        storage.write_bytes(f"{s3_bucket}/in/{key}", encode_png(rng.integers(0, 255, (16, 16, 3), np.uint8)))
    args = ["process", "superres", "--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out",
            "--model", sr_model_uri, "--batch-size", "1"]
    proc = subprocess.Popen([GENRAY, *args], stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    outputs = lambda: [o.key for o in storage.list_objects(f"{s3_bucket}/out") if o.key.endswith(".png")]  # noqa: E731
    deadline = time.monotonic() + 240
    while len(outputs()) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(outputs()) < len(keys), (tmp_path / "first.log").read_text()[-2000:]

    r = genray(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[genray] [" in r.stdout  # the progress line
    assert sorted(outputs()) == keys

    assert sorted(row["input_key"] for row in read_manifest_table(f"{s3_bucket}/out").to_pylist()) == keys
    again = genray(*args)
    assert again.returncode == 0 and "skipped       24" in again.stdout, again.stdout


def test_jobs_process_entry_point_runs_the_same_job(sr_model_uri, s3_bucket):
    """jobs/process.py (what `ray job submit` runs) is `genray process` with the same flags: a dry run here."""
    storage.write_bytes(f"{s3_bucket}/in/a.png", encode_png(np.zeros((8, 8, 3), np.uint8)))
    r = subprocess.run([sys.executable, "jobs/process.py", "superres", "--input", f"{s3_bucket}/in",
                        "--output", f"{s3_bucket}/out", "--model", sr_model_uri, "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "would process a.png -> a.png" in r.stdout


def test_progress_is_one_redrawn_bar_on_a_terminal(ray_local, sr_model_uri, s3_bucket):
    """stdout a terminal (a pty here): the bulk job's progress is one bar redrawn in place (carriage return, clear
    line), closed by a newline before the summary table; in a pipe the same job prints plain lines (other tests)."""
    import pty

    for i in range(6):
        storage.write_bytes(f"{s3_bucket}/in/{i}.png", encode_png(np.full((8, 8, 3), 30 * i, np.uint8)))
    master, slave = pty.openpty()
    proc = subprocess.Popen([GENRAY, "process", "superres", "-i", f"{s3_bucket}/in", "-o", f"{s3_bucket}/out",
                             "--model", sr_model_uri, "--batch-size", "2", "--address",
                             ray_local.get_runtime_context().gcs_address],
                            stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(120) == 0
    out = b"".join(chunks).decode()
    assert "\r\x1b[K[genray] [" in out, out
    assert "\r\x1b[K[genray] [##############################] 6/6 ok=6 error=0" in out
    # The final bar keeps its line; the table starts on the next one (the pty turns "\n" into "\r\n").
    assert out.split("6/6 ok=6 error=0", 1)[1].split("\n", 1)[1].lstrip().startswith("status"), out

"""`genray submit` / `genray jobs`: what a job carries (and never carries), and a real submission to a local
multi-node Ray with token authentication."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from genray import storage
from genray.model_artifact import read_meta
from genray.config import ConfigError
from genray.cli import build_job
from genray.submit import SubmitError, auth_headers, split_address

from helpers import REPO, genray

TINY = "configs/tiny/denoise_ae.yaml"


def test_a_job_ships_the_working_dir_and_relative_config_but_no_secrets():
    entrypoint, runtime_env, warnings = build_job(
        "train", [f"{REPO}/{TINY}", "--set", "train.epochs=1", "--output", "s3://runs/x"], REPO,
        env_vars={"OMP_NUM_THREADS": "4"})
    assert entrypoint == f"python jobs/train.py {TINY} --set train.epochs=1 --output s3://runs/x"
    assert runtime_env["working_dir"] == REPO and ".venv" in runtime_env["excludes"]
    assert runtime_env["env_vars"] == {"OMP_NUM_THREADS": "4"}
    assert warnings == []  # output and data are s3:// (the tiny config reads s3://genray-data/...)

    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN", "MY_DB_PASSWORD"):
        with pytest.raises(SubmitError, match=f"--env {name}: credentials never go through runtime_env"):
            build_job("train", [TINY], REPO, env_vars={name: "x"})


def test_process_jobs_keep_their_flags_and_local_paths_are_warned_about():
    entrypoint, _, warnings = build_job("process", ["superres", "--config", "configs/process/superres.yaml",
                                                    "--output", "/tmp/out", "--concurrency", "4"], REPO)
    assert entrypoint == ("python jobs/process.py superres --config configs/process/superres.yaml "
                          "--output /tmp/out --concurrency 4")
    assert len(warnings) == 1 and warnings[0].startswith("--output /tmp/out is a local path")


def test_pipeline_jobs_check_the_pipeline_and_its_training_config_before_submitting():
    entrypoint, _, warnings = build_job("pipeline", [f"{REPO}/configs/pipeline/tiny_denoise.yaml",
                                                     "--set", "eval.data_uri=/data/test/"], REPO)
    assert entrypoint == "python jobs/pipeline.py configs/pipeline/tiny_denoise.yaml --set eval.data_uri=/data/test/"
    assert warnings == ["eval.data_uri /data/test/ is a local path: on a cluster each node has its own disk (use s3://)"]
    with pytest.raises(ConfigError, match="gate: .*'<metric> <op> <number>'"):
        build_job("pipeline", ["configs/pipeline/tiny_denoise.yaml", "--set", "gate=['good enough']"], REPO)
    with pytest.raises(ConfigError, match="train.epochz: unknown key"):
        build_job("pipeline", ["configs/pipeline/tiny_denoise.yaml", "--set", "train_overrides=['train.epochz=3']"],
                  REPO)


def test_mistakes_fail_before_anything_is_submitted(tmp_path):
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        build_job("train", [TINY, "--set", "train.lrr=1"], REPO)
    outside = tmp_path / "c.yaml"
    outside.write_text(Path(REPO, TINY).read_text())
    with pytest.raises(SubmitError, match="must be inside the working directory"):
        build_job("train", [str(outside)], REPO)
    with pytest.raises(SubmitError, match="has no jobs/train.py"):
        build_job("train", [str(outside)], str(tmp_path))


def test_address_and_token_come_from_flags_or_environment(monkeypatch, tmp_path):
    assert split_address([TINY, "--address", "http://h:8265", "--set", "a=1"]) == ("http://h:8265",
                                                                                  [TINY, "--set", "a=1"])
    assert split_address(["--address=http://h:1", TINY]) == ("http://h:1", [TINY])
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_headers() == {}
    token_file = tmp_path / "token"
    token_file.write_text("abc123\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert auth_headers() == {"Authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")  # Ray's precedence: the variable, then the file
    assert auth_headers() == {"Authorization": "Bearer from-env"}


def test_no_cluster_or_no_dashboard_is_one_clear_line(monkeypatch, capsys):
    from genray.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["submit", "train", TINY]) == 2
    assert capsys.readouterr().err == \
        "genray: error: no cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS\n"
    assert main(["jobs", "list", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("genray: error: cannot use the Ray Jobs API at http://127.0.0.1:9")


def test_submit_train_to_a_multinode_cluster(ray_cluster, digits_uri, s3_bucket, monkeypatch, capsys):
    """`genray submit train` from a client with no S3 credentials: the job runs on the cluster (one Train worker on
    each worker node), its logs stream back, the artefact lands in S3 (credentials from the nodes' environment),
    and the job's runtime_env holds no credentials. Then `genray jobs`, and a client without the token."""
    out = f"{s3_bucket}/run"
    env = ray_cluster.client_env()
    no_aws = tuple(k for k in os.environ if k.startswith("AWS_"))
    r = genray("submit", "train", TINY, "--set", f"data.uri={digits_uri}/train/",
               "--set", f"data.held_out_uri={digits_uri}/test/", "--set", "data.limit=null",
               "--set", "train.epochs=2", "--set", "name=submitted",
               "--set", "scaling.resources_per_worker={worker_slot: 1}",  # one worker per node
               "--output", out, env=env, drop=no_aws, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.split("[genray] submitted ", 1)[1].split()[0]
    # Streamed: the driver's own lines and the rank-0 worker's epoch lines.
    assert "[genray] epoch 2/2" in r.stdout and "[genray] trained denoise_ae 'submitted'" in r.stdout
    assert r.stdout.rstrip().endswith(f"[genray] job {job_id} SUCCEEDED")
    assert read_meta(f"{out}/model")["metrics"]["epoch"] == 2
    assert any(o.key.startswith("checkpoints/submitted/checkpoint_") for o in storage.list_objects(out))

    # Placement: the two Train workers ran on the two worker nodes, one each (never on the 0-CPU head).
    history = [json.loads(line) for line in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    names = ray_cluster.names()
    placed = [names[node] for node in history[-1]["worker_nodes"]]
    print(f"\n[placement] training workers by rank: {placed}")
    assert sorted(placed) == ray_cluster.workers()

    info = ray_cluster.jobs_client().get_job_info(job_id)
    assert set(info.runtime_env) <= {"working_dir", "excludes"}
    assert "AWS_" not in json.dumps(info.runtime_env) and "RAY_AUTH_TOKEN" not in json.dumps(info.runtime_env)

    # `genray jobs`, in this process (it only speaks HTTP to the dashboard).
    from genray.cli import main

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_cluster.token_path)
    capsys.readouterr()
    assert main(["jobs", "list"]) == 0
    assert re.search(rf"^{job_id} +SUCCEEDED ", capsys.readouterr().out, re.MULTILINE)
    assert main(["jobs", "status", job_id]) == 0 and capsys.readouterr().out.startswith(f"{job_id}: SUCCEEDED")
    assert main(["jobs", "status", job_id, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["submission_id"] == job_id and status["status"] == "SUCCEEDED"
    assert status["end_time"] >= status["start_time"] > 0
    assert main(["jobs", "list", "--json"]) == 0
    assert job_id in {job["submission_id"] for job in json.loads(capsys.readouterr().out)}
    assert main(["jobs", "logs", job_id]) == 0 and "[genray] epoch 2/2" in capsys.readouterr().out
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert main(["jobs", "list"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "the cluster requires a token; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")


def test_a_failing_job_exits_with_its_status(ray_cluster):
    """The job's own exit code comes back: here `genray train` inside the job refuses a missing output bucket."""
    r = genray("submit", "train", TINY, "--output", "s3://genray-no-such-bucket/run", env=ray_cluster.client_env())
    assert r.returncode == 2, r.stdout[-2000:]
    assert "genray: error: output s3://genray-no-such-bucket" in r.stdout  # the job's stderr, streamed
    assert r.stdout.strip().splitlines()[-1].startswith("[genray] job raysubmit_")
    assert "FAILED" in r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("verb", [["submit"], ["jobs"], ["jobs", "list"], ["jobs", "status"], ["jobs", "logs"],
                                  ["jobs", "stop"]], ids=" ".join)
def test_submit_and_jobs_have_help(verb, capsys):
    from genray.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*verb, "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: genray {' '.join(verb)}")

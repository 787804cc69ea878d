"""Secrets stay on the machine that holds them (issue 17): `genray submit --env` refuses secret-looking variables
by name and by value, and S3 credentials never travel pickled to the cluster (the nodes resolve their own)."""
from __future__ import annotations

import pytest

from helpers import genray
from genray.cli import build_job
from genray.submit import SubmitError

SECRET = "hunter2-Sup3rSecret"  # a value that must never be echoed back


@pytest.mark.parametrize("item", [
    f"OPENAI_API_KEY={SECRET}", f"MY_APIKEY={SECRET}", f"GITHUB_TOKEN={SECRET}", f"MyTokenFile={SECRET}",
    f"DB_PASSWORD={SECRET}", f"AZURE_STORAGE_CONNECTION_STRING={SECRET}", f"SQL_CONN_STR={SECRET}",
    f"DATABASE_URL=postgres://app:{SECRET}@db.internal:5432/x", f"HTTP_PROXY=http://bob:{SECRET}@proxy:3128",
    f"REPO=https://{SECRET}@github.com/org/repo.git", "SOME_ID=AKIAIOSFODNN7EXAMPLE",
])
def test_submit_refuses_secret_looking_env_before_contacting_the_cluster(item):
    # Port 1 on loopback: nothing listens, so getting the refusal proves the check runs before any connection.
    r = genray("submit", "--address", "http://127.0.0.1:1", "--env", item, "--no-wait",
               "process", "denoise", "--input", "s3://a/in", "--output", "s3://a/out", "--model", "s3://a/m",
               timeout=120)
    name = item.partition("=")[0]
    assert r.returncode != 0 and f"--env {name}: credentials never go through runtime_env" in r.stderr, r.stderr
    assert SECRET not in r.stdout + r.stderr and "AKIAIOSFODNN7EXAMPLE" not in r.stdout + r.stderr


@pytest.mark.parametrize("item", ["OMP_NUM_THREADS=4", "DATA_URL=https://example.com/a@b",
                                  "S3_PREFIX=s3://bucket/prefix", "LOG_LEVEL=debug"])
def test_submit_keeps_ordinary_env(item):
    name, _, value = item.partition("=")
    _, runtime_env, _ = build_job("process", ["denoise", "--input", "s3://a/in", "--output", "s3://a/out",
                                              "--model", "s3://a/m"], ".", env_vars={name: value})
    assert runtime_env["env_vars"] == {name: value}


def test_refusal_names_the_variable_not_the_value():
    with pytest.raises(SubmitError) as err:
        build_job("train", ["configs/tiny/denoise_ae.yaml"], ".", env_vars={"X": f"redis://:{SECRET}@cache:6379"})
    assert "--env X" in str(err.value) and SECRET not in str(err.value)


# -- S3 credentials stay on the nodes --------------------------------------------------------------------------

def _secrets_in(blob: bytes) -> list[str]:
    import os

    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    return [n for n in names if os.environ.get(n) and os.environ[n].encode() in blob]


def test_s3_filesystem_pickles_without_credentials(s3_server, s3_bucket):
    import pickle

    import pyarrow.parquet as pq
    import ray.cloudpickle

    from genray import storage

    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/t")
    assert _secrets_in(pickle.dumps(fs)) == [] and _secrets_in(ray.cloudpickle.dumps(fs)) == []
    # ...and it still works, there and once unpickled (credentials resolved where it runs).
    import pyarrow as pa

    pq.write_table(pa.table({"a": [1, 2]}), f"{path}/x.parquet", filesystem=fs)
    again = pickle.loads(pickle.dumps(fs))
    assert pq.read_table(f"{path}/x.parquet", filesystem=again)["a"].to_pylist() == [1, 2]


def test_train_run_config_ships_no_credentials_and_the_run_still_checkpoints_to_s3(ray_local, digits_uri, s3_bucket):
    import ray.cloudpickle

    from genray import storage
    from genray.training.trainer import build_trainer
    from helpers import tiny_train_config

    cfg = tiny_train_config(digits_uri, f"{s3_bucket}/run", name="nocreds", epochs=1)
    trainer = build_trainer(cfg)
    # What Ray ships to the Train controller and workers: the trainer with its RunConfig (storage_filesystem).
    assert _secrets_in(ray.cloudpickle.dumps(trainer)) == []
    assert _secrets_in(ray.cloudpickle.dumps(trainer.run_config)) == []
    result = trainer.fit()  # the workers resolve their own credentials and write the checkpoint to S3
    assert result.checkpoint is not None
    keys = {o.key for o in storage.list_objects(f"{s3_bucket}/run/checkpoints/nocreds")}
    assert any(k.endswith("/state.pt") for k in keys), keys

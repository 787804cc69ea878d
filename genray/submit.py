"""`genray submit` and `genray jobs`: genray's train, process and pipeline verbs as Ray jobs, through the Ray Jobs SDK.
(genray/cli.py turns the verb's arguments into a checked job; this module ships it and follows it.)

A submitted job ships the working directory (code and configs) in its runtime_env and runs `python jobs/<verb>.py`
with the same arguments as the local verb. Credentials never go into runtime_env, which Ray shows in its dashboard:
the cluster's nodes hold them (their environment, or a Kubernetes secret). With Ray's token authentication, the
token from RAY_AUTH_TOKEN or the file named by RAY_AUTH_TOKEN_PATH is sent as a bearer token.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

# Never shipped: virtualenvs, VCS data and caches. Ray also honours .gitignore files (local outputs are there).
WORKING_DIR_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache"]
# Names of variables that must never travel in runtime_env.
SECRET_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}
# Matched anywhere in the name, so `*_API_KEY`, `*TOKEN*`, `*PASSWORD*` and `*CONNECTION_STRING*` are all caught.
SECRET_PATTERN = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|API_?KEY|"
                            r"AUTH_KEY|CONNECTION_?STRING|CONN_?STR|SAS_KEY|SIGNING_KEY", re.IGNORECASE)
# Values that carry a secret whatever the variable is called: a URL with credentials in it (postgres://user:pw@host,
# https://<token>@host; any user-info part counts) or an AWS access key id.
SECRET_VALUE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s@]+@|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
ENTRYPOINTS = {"train": "jobs/train.py", "process": "jobs/process.py", "pipeline": "jobs/pipeline.py"}


class SubmitError(RuntimeError):
    """The job cannot be submitted or queried (no cluster address, unreachable dashboard, bad token, ...)."""


# -- connecting ----------------------------------------------------------------------------------------------------

def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (the head's dashboard, e.g. http://head:8265)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS")
    return address.rstrip("/")


def auth_headers() -> dict[str, str]:
    """The bearer token from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (Ray's own precedence), if either is set.

    Sent explicitly, so it works whatever RAY_AUTH_MODE this client process has. Without either, Ray's client adds
    its default token file (~/.ray/auth_token) itself when RAY_AUTH_MODE=token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token: {err.strerror}") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None):
    """A JobSubmissionClient for the cluster, or a SubmitError saying in one line why not."""
    from ray.job_submission import JobSubmissionClient

    # The SDK narrates packaging (and warns that .git/.venv are skipped, which is what we want): keep the CLI quiet.
    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)

    url = resolve_address(address)
    try:
        # The SDK lets RAY_ADDRESS override its address argument: an explicit --address must win.
        with _without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            return JobSubmissionClient(url, headers=auth_headers())
    except Exception as err:  # noqa: BLE001 - requests/aiohttp/auth errors, all told as one line
        raise SubmitError(f"cannot use the Ray Jobs API at {url}: {_short(err)}") from None


def _short(err: BaseException) -> str:
    text = str(err)
    if "Authentication required" in text or "Missing authentication token" in text:
        return "the cluster requires a token; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
    if "Authentication failed" in text or "Invalid authentication token" in text:
        return "the cluster rejected the token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)"
    if "Connection refused" in text or "Failed to establish a new connection" in text:
        return "connection refused (is the head running, with its dashboard?)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SubmitError:
        raise
    except Exception as err:  # noqa: BLE001
        raise SubmitError(f"{what}: {_short(err)}") from None


# -- building a job ------------------------------------------------------------------------------------------------

def check_no_secrets(runtime_env: dict[str, Any]) -> None:
    """Refuse secret-looking variables: by name, or by a value that holds credentials (never echoed back)."""
    for name, value in (runtime_env.get("env_vars") or {}).items():
        if name.upper() in SECRET_NAMES or SECRET_PATTERN.search(name):
            why = ""
        elif SECRET_VALUE_PATTERN.search(str(value)):
            why = " (its value holds credentials: a URL with a user/password or an access key id)"
        else:
            continue
        raise SubmitError(f"--env {name}: credentials never go through runtime_env{why} (Ray shows it in its "
                          "dashboard); give them to the cluster's nodes (environment or a secret)")


def build_runtime_env(working_dir: str, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """Ship `working_dir` (code and configs, see WORKING_DIR_EXCLUDES) and non-secret environment variables."""
    runtime_env: dict[str, Any] = {"working_dir": working_dir, "excludes": list(WORKING_DIR_EXCLUDES)}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    check_no_secrets(runtime_env)
    return runtime_env


def parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SubmitError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def split_address(args: list[str]) -> tuple[str | None, list[str]]:
    """`genray submit train CFG --address URL` reads like `genray train CFG --address URL`: take --address out of the
    job's arguments (inside a job, Ray sets RAY_ADDRESS) and use it as the cluster to submit to."""
    address, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--address" and i + 1 < len(args):
            address, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--address="):
            address = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return address, rest


def entrypoint_script(verb: str, working_dir: str) -> str:
    """jobs/<verb>.py, which must be in the working directory the job ships."""
    script = ENTRYPOINTS[verb]
    if not (Path(working_dir) / script).is_file():
        raise SubmitError(f"{working_dir} has no {script}: run from the genray checkout or pass --working-dir")
    return script


def relative_config(config: str, working_dir: str) -> str:
    """A config file's path inside the working directory (it travels with it), as the job will see it."""
    path, base = Path(config).resolve(), Path(working_dir).resolve()
    if not path.is_relative_to(base):
        raise SubmitError(f"{config}: the config must be inside the working directory {base}, which is what the "
                          "job ships (move it there, or pass --working-dir)")
    return path.relative_to(base).as_posix()


# -- running it ----------------------------------------------------------------------------------------------------

def submit(verb: str, entrypoint: str, runtime_env: dict[str, Any], address: str | None = None,
           wait: bool = True, submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
           out=None) -> int:
    """Submit a job built by genray.cli.build_job; with `wait`, stream its logs and return its exit status (0 when
    it SUCCEEDED). `out` (default: sys.stdout at call time) gets the logs and genray's own lines."""
    out = out or sys.stdout
    address = resolve_address(address)
    client = connect(address)
    job_id = _call("submitting the job", client.submit_job, entrypoint=entrypoint, runtime_env=runtime_env,
                   submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                   metadata={"genray_verb": verb})
    print(f"[genray] submitted {job_id} to {client.get_address()}: {entrypoint}", file=out, flush=True)
    if not wait:
        print(f"[genray] follow it with: genray jobs logs {job_id} --follow", file=out, flush=True)
        return 0
    try:
        follow_logs(client, job_id, out)
        info = wait_until_done(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[genray] stopped following; {job_id} keeps running (genray jobs stop {job_id} stops it)",
              file=out, flush=True)
        return 130
    return report_final(info, job_id, out)


def follow_logs(client, job_id: str, out=None) -> None:
    """Print the job's logs as they come, until the job ends (the log stream closes)."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as err:  # noqa: BLE001 - a dropped stream must not lose the job's result
        print(f"[genray] log stream interrupted ({_short(err)}); waiting for the job to finish", file=sys.stderr)


def wait_until_done(client, job_id: str, timeout: float | None = None, poll: float = 1.0):
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = _call(f"job {job_id}", client.get_job_info, job_id)
        if info.status.is_terminal():
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {info.status} after {timeout:.0f}s")
        time.sleep(poll)


def headline(message: str | None) -> str:
    """The first line of Ray's job message (a failed job's message goes on with the end of its logs)."""
    return (message or "").strip().split("\n", 1)[0].split(", last available logs", 1)[0].rstrip(",: ")


def status_name(info) -> str:
    return str(info.status)  # a JobStatus (str enum)


def report_final(info, job_id: str, out=None) -> int:
    out = out or sys.stdout
    status = status_name(info)
    message = headline(info.message)
    print(f"[genray] job {job_id} {status}" + (f": {message}" if status != "SUCCEEDED" and message else ""),
          file=out, flush=True)
    if status == "SUCCEEDED":
        return 0
    return info.driver_exit_code or 1  # the job's own exit code (2 for a user error inside it), else 1


# -- genray jobs ---------------------------------------------------------------------------------------------------

def job_record(job) -> dict:
    """A job as plain JSON-able values (`genray jobs list|status --json`); times in seconds since the epoch."""
    return {"submission_id": job.submission_id or job.job_id, "status": status_name(job),
            "message": headline(job.message), "entrypoint": job.entrypoint,
            "start_time": job.start_time / 1000 if job.start_time else None,
            "end_time": job.end_time / 1000 if job.end_time else None}


def list_jobs(address: str | None = None, out=None, as_json: bool = False) -> int:
    out = out or sys.stdout
    client = connect(address)
    jobs = sorted(_call("listing jobs", client.list_jobs), key=lambda j: j.start_time or 0)
    if as_json:
        print(json.dumps([job_record(job) for job in jobs]), file=out)
        return 0
    print(f"{'submission_id':<30} {'status':<10} {'started':<19} {'seconds':>8}  entrypoint", file=out)
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        seconds = f"{((job.end_time or time.time() * 1000) - job.start_time) / 1000:.0f}" if job.start_time else "-"
        entry = job.entrypoint if len(job.entrypoint) <= 70 else job.entrypoint[:67] + "..."
        print(f"{job.submission_id or job.job_id:<30} {status_name(job):<10} {started:<19} {seconds:>8}  {entry}",
              file=out)
    return 0


def job_status(job_id: str, address: str | None = None, out=None, as_json: bool = False) -> int:
    out = out or sys.stdout
    info = _call(f"job {job_id}", connect(address).get_job_info, job_id)
    if as_json:
        print(json.dumps(job_record(info)), file=out)
        return 0
    print(f"{job_id}: {status_name(info)}" + (f" ({headline(info.message)})" if info.message else ""), file=out)
    return 0


def job_logs(job_id: str, address: str | None = None, follow: bool = False, out=None) -> int:
    out = out or sys.stdout
    client = connect(address)
    if follow:
        follow_logs(client, job_id, out)
        return report_final(wait_until_done(client, job_id), job_id, out)
    out.write(_call(f"job {job_id}", client.get_job_logs, job_id))
    return 0


def stop_job(job_id: str, address: str | None = None, out=None, timeout: float = 60) -> int:
    out = out or sys.stdout
    client = connect(address)
    stopped = _call(f"job {job_id}", client.stop_job, job_id)
    if not stopped:
        info = _call(f"job {job_id}", client.get_job_info, job_id)
        print(f"[genray] job {job_id} already {status_name(info)}", file=out)
        return 0
    info = wait_until_done(client, job_id, timeout=timeout)
    print(f"[genray] job {job_id} {status_name(info)}", file=out)
    return 0

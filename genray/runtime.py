"""Connecting to Ray: a cluster via RAY_ADDRESS / --address, or a local instance bound to 127.0.0.1."""
from __future__ import annotations

import os
import re
import socket

# Set before any Ray process starts (ENVIRONMENT.md): keep every Ray listener on 127.0.0.1, no usage stats,
# and a short Ray Train health-check poll (the default makes each ray.train.report block ~2 s).
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Serve's HTTP proxy drops client headers that would switch off its timeout/disconnect handling
    # (genray/serving/proxy_guard.py; the proxy imports it when it starts).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "genray.serving.proxy_guard:middlewares",
}


def prepare_local_env() -> None:
    """Default the LOCAL_RAY_ENV variables. Call before `import ray`: Ray reads some of them at import time."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True):
    """ray.init against `address` / RAY_ADDRESS if given, else a local instance; returns the context. Unless -v,
    Ray's own output goes to genray's log file (genray/logs.py), whose path is printed here once."""
    import ray

    from genray import logs

    if ray.is_initialized():
        return ray.get_runtime_context()
    logs.quiet_ray_loggers()  # before ray.init: it logs (e.g. the auth token notice) while starting
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, log_to_driver=True)
    else:
        prepare_local_env()  # for the Ray processes started below (the driver may have imported ray already)
        # INFO reaches the log file; on the terminal, -v shows what Ray showed before (WARNING and up).
        verbose = logs.verbosity() >= logs.VERBOSE
        context = ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                           logging_level="WARNING" if quiet and verbose else "INFO")
    logs.relay_worker_logs()
    logs.divert_native_stderr()
    logs.quiet_ray_data()
    logs.announce()
    return context


def ray_error_line(err: BaseException, max_chars: int = 300) -> str:
    """The worker's own exception line (e.g. 'ValueError: no images under s3://...') out of the pages of traceback
    Ray wraps it in: the innermost cause, its last 'SomethingError: message' line that is not one of Ray's own
    wrappers, else its last line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    ours = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*:", line)
            and not line.startswith(("ray.", "TrainingFailedError", "WorkerGroupError", "ControllerError"))]
    line = ours[-1] if ours else (lines[-1] if lines else type(err).__name__)
    return line[:max_chars]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for servers the tests, the demo and the local cluster start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

"""A local S3-compatible endpoint for the demo and the tests: moto's server mode on 127.0.0.1.

moto keeps buckets in memory (a restart loses them) and accepts any credentials; pause() simulates an outage and
set_latency() a remote store's per-request latency (loopback answers in ~1 ms; a real object store in tens of ms).
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from genray.runtime import free_port


# Runs `python -m moto.server ARGS`, but first asks Linux to SIGTERM the server when the process that started
# it dies (PR_SET_PDEATHSIG = 1), so a killed test run or demo leaves no orphaned server holding memory.
# Caveat: the signal follows the *thread* that called start(); start servers from a long-lived thread.
_BOOTSTRAP = """
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass  # not Linux: rely on stop()
if os.getppid() != int(sys.argv[1]):
    sys.exit("parent exited before the server started")
latency_file = sys.argv[2]
if latency_file:  # every request first sleeps the milliseconds written in this file (read per request)
    import time
    import werkzeug.serving

    def delayed(app):
        def handle(environ, start_response):
            try:
                with open(latency_file) as f:
                    time.sleep(float(f.read() or 0) / 1000)
            except (OSError, ValueError):
                pass
            return app(environ, start_response)
        return handle

    run_simple = werkzeug.serving.run_simple  # moto.server imports it by name: patch before it is run
    werkzeug.serving.run_simple = lambda host, port, app, **kw: run_simple(host, port, delayed(app), **kw)
sys.argv = ["moto.server"] + sys.argv[3:]
runpy.run_module("moto.server", run_name="__main__", alter_sys=True)
"""


class LocalS3Server:
    """moto_server on 127.0.0.1 on a free port, with generated credentials."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, latency_ms: float | None = None):
        """latency_ms: if given (even 0), every request waits that long before it is handled, and set_latency()
        changes it while the server runs (benchmarks: a loopback server hides what a remote store costs)."""
        self.host = host
        self._latency_ms = latency_ms
        self._latency_file = ""  # made by start(): the bootstrap reads it on every request
        self._fixed_port = port
        self.port = port or 0
        self._proc: subprocess.Popen | None = None
        self._log_dir: tempfile.TemporaryDirectory | None = None
        self.log_path = ""
        # Random per server so nothing ever relies on moto's well-known test keys.
        self._access_key = "GENRAY" + secrets.token_hex(7).upper()
        self._secret_key = secrets.token_urlsafe(30)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self._access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> "LocalS3Server":
        if self._proc is not None:
            return self
        self._log_dir = tempfile.TemporaryDirectory(prefix="genray-s3-")
        self.log_path = os.path.join(self._log_dir.name, "moto_server.log")
        if self._latency_ms is not None:
            self._latency_file = os.path.join(self._log_dir.name, "latency_ms")
            self.set_latency(self._latency_ms)
        # Picking a free port then binding it later can race with another process; retry on a fresh port.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port(self.host)
            try:
                self._spawn_and_wait(timeout=30.0)
                return self
            except RuntimeError:
                self._kill()
                if attempt == attempts - 1 or "Address already in use" not in self._log_tail():
                    raise
        return self

    def _spawn_and_wait(self, timeout: float) -> None:
        env = dict(os.environ)
        env.pop("AWS_ENDPOINT_URL", None)  # the server must not try to talk to another endpoint itself
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), self._latency_file, "-H", self.host,
                 "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # own process group: Ctrl-C in a terminal does not hit it twice
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with code {self._proc.returncode} before answering on "
                    f"{self.endpoint_url}; log tail:\n{self._log_tail()}"
                )
            if self._answers():
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"moto_server did not answer on {self.endpoint_url} within {timeout:.0f} s; log tail:\n"
            f"{self._log_tail()}"
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except OSError:
            return False

    def _log_tail(self, num_lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-num_lines:])
        except OSError:
            return "(no log)"

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            # A paused (SIGSTOPped) server ignores SIGTERM until it is continued.
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self._kill()
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None

    def set_latency(self, ms: float) -> None:
        """Delay every request from now on by `ms` (the server must have been made with latency_ms)."""
        if not self._latency_file:
            raise RuntimeError("set_latency needs LocalS3Server(latency_ms=...)")
        self._latency_ms = ms
        with open(self._latency_file, "w") as f:
            f.write(str(ms))

    def pause(self) -> None:
        """SIGSTOP the server: connections hang as in a network outage."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGCONT)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

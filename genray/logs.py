"""What the terminal shows: genray's own lines; Ray's and Ray Data's logs go to a file whose path is printed once.

Three levels, chosen by the global flags of `genray` (cli.main):
  quiet   (-q)  errors and the summary only;
  normal        + genray's progress lines (per-epoch training line, bulk progress line, demo steps);
  verbose (-v)  + everything Ray prints, as Ray prints it (nothing is redirected).

Ray reaches the terminal by four roads, each handled here around ray.init:
  1. Python loggers of the driver ('ray', 'ray.data', 'ray.serve'; 'ray.train' propagates to 'ray'): their
     console handlers keep only errors and a file handler gets everything;
  2. workers' stdout/stderr forwarded to the driver (log_to_driver): Ray's dispatcher handler is swapped for one
     that writes every line to the file and passes on only genray's own `[genray] ...` lines;
  3. Ray Data's progress bars: switched off (its logs, including the execution plans, stay in the file);
  4. the driver's own C++ core worker, which writes its ERROR lines straight to file descriptor 2 (Ray Data's actor
     pools trigger one per job: "has constructor arguments in the object store"): when the CLI owns the terminal,
     fd 2 is pointed at the file and Python's sys.stderr at a copy of the terminal, so genray's errors and
     tracebacks still show.
Python warnings (Ray's deprecation notices) go to the file as well.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL
_log_path: Path | None = None
_owns_terminal = False  # set by the CLI: the process is genray's, so its file descriptor 2 may be re-pointed
_native_diverted = False
_RAY_LOGGERS = ("ray", "ray.data", "ray.serve", "py.warnings")
OWN_PREFIX = "[genray]"
DETAIL_PREFIX = "[genray.detail]"  # genray lines for the log file only (e.g. most epochs of a long run)


def set_verbosity(level: int) -> None:
    global _level
    _level = level


class _Stderr:
    """sys.stderr while the CLI runs: writes go to `stream`, which road 4 swaps for a copy of the terminal, so
    whatever took a reference to sys.stderr before (contextlib.redirect_stdout(sys.stderr) under --json, logging
    handlers) keeps reaching the terminal."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ...: the current stream's
        return getattr(self.stream, name)


def own_terminal() -> None:
    """Called by the CLI (not by library users or tests, whose stderr is their own): road 4 may be taken."""
    global _owns_terminal
    _owns_terminal = True
    if not isinstance(sys.stderr, _Stderr):
        sys.stderr = _Stderr(sys.stderr)


def verbosity() -> int:
    return _level


def progress(line: str) -> None:
    """genray's progress lines (not errors, not the summary): shown unless -q."""
    if _level >= NORMAL:
        end_bar()
        print(line, flush=True)


_bar_open = False  # a redrawn bar is on the terminal's last line, without its newline yet


def redraws() -> bool:
    """Whether bar() redraws in place: stdout is a terminal (in a log file or a pipe, bars are plain lines)."""
    return _level >= NORMAL and sys.stdout.isatty()


def bar(line: str, final: bool = False) -> None:
    """A progress bar's line: on a terminal, drawn over the previous one (carriage return, clear to the end of the
    line); elsewhere printed as progress() prints. `final`: the last state, which stays."""
    global _bar_open
    if not redraws():
        progress(line)
        return
    sys.stdout.write("\r\033[K" + line + ("\n" if final else ""))
    sys.stdout.flush()
    _bar_open = not final


def end_bar() -> None:
    """Close an open bar's line, so whatever is printed next starts on a line of its own."""
    global _bar_open
    if _bar_open:
        sys.stdout.write("\n")
        sys.stdout.flush()
        _bar_open = False


def log_path() -> Path:
    """This run's log file ($GENRAY_LOG_DIR, else <tmp>/genray-logs/), named by time and pid; made on first use.
    Not <tmp>/genray/: a folder named `genray` in the working directory shadows the package (as a namespace
    package) for every Ray worker started from there, e.g. `cd /tmp && genray demo`."""
    global _log_path
    if _log_path is None:
        folder = Path(os.environ.get("GENRAY_LOG_DIR") or Path(tempfile.gettempdir()) / "genray-logs")
        folder.mkdir(parents=True, exist_ok=True)
        _log_path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    return _log_path


def _file_handler() -> logging.Handler:
    handler = logging.FileHandler(log_path(), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def quiet_ray_loggers() -> None:
    """Road 1 (and warnings): the driver's Ray loggers to the file, errors still on the console. Idempotent;
    call after importing the Ray libraries in use (each adds its console handler when first imported)."""
    if _level >= VERBOSE:
        return
    logging.captureWarnings(True)
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = False
        if not any(getattr(h, "_genray", False) for h in logger.handlers):
            handler = _file_handler()
            handler._genray = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        for handler in logger.handlers:
            if not getattr(handler, "_genray", False) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)  # a console handler
        if name == "py.warnings":
            logger.setLevel(logging.WARNING)


def relay_worker_logs() -> None:
    """Road 2: after ray.init(log_to_driver=True), replace Ray's printer of worker output by ours. Uses Ray's
    stdstream dispatcher (not a public API): without it, worker output is not shown at all rather than all."""
    if _level >= VERBOSE:
        return
    try:
        import ray._private.worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")
    except (ImportError, AttributeError, KeyError):
        return
    dispatcher.add_handler("ray_print_logs", _relay)
    # The errors the cluster pushes to drivers (e.g. "Task ServeController.graceful_shutdown failed ... will be
    # retried" at every Serve shutdown) are printed through this function by Ray's error listener thread.
    ray_worker.print_to_stdstream = _relay


def _relay(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')})"
    with open(log_path(), "a", encoding="utf-8") as f:
        f.writelines(f"{prefix} {line}\n" for line in data.get("lines", []))
    for line in data.get("lines", []):
        if _level >= NORMAL and line.startswith(OWN_PREFIX):
            end_bar()
            print(line, file=sys.stderr if data.get("is_err") else sys.stdout, flush=True)
        elif data.get("pid") == "raylet" and "memory" in line.lower():  # a warning that matters: OOM kills
            print(f"[genray] warning from Ray: {line.strip()}", file=sys.stderr, flush=True)


def quiet_ray_data() -> None:
    """Road 3: Ray Data's progress bars off in this driver (the executions are still logged to the file)."""
    if _level >= VERBOSE:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    quiet_ray_loggers()  # importing ray.data added its console handler


def divert_native_stderr() -> None:
    """Road 4, after ray.init (the processes it starts redirect their own output to Ray's files already)."""
    global _native_diverted
    if not _owns_terminal or _level >= VERBOSE or _native_diverted:
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    log_fd = os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    terminal_stream = os.fdopen(terminal, "w", buffering=1, errors="backslashreplace",
                                encoding=getattr(sys.stderr, "encoding", None) or "utf-8")
    if isinstance(sys.stderr, _Stderr):
        sys.stderr.stream = terminal_stream
    else:  # something replaced sys.stderr since: it was writing to fd 2
        sys.stderr = terminal_stream
    for name in _RAY_LOGGERS:  # console handlers made before the CLI started hold sys.__stderr__, i.e. fd 2
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.__stderr__:
                handler.setStream(sys.stderr)
    _native_diverted = True


def announce() -> None:
    """The one line that says where Ray's output went (not under -v, where it is on the terminal)."""
    if _level == NORMAL:
        print(f"{OWN_PREFIX} Ray's logs: {log_path()} (-v shows them here)", flush=True)


class EpochLines:
    """Training's per-epoch line (printed by rank 0, relayed by the driver): every epoch's line reaches the log file,
    the terminal only the first and last of the run and one at most every `seconds`, each with an ETA, so a
    20-epoch demo and a 1000-epoch run both stay readable."""

    def __init__(self, epochs: int, start_epoch: int, seconds: float = 10.0):
        self.epochs, self.start_epoch, self.seconds = epochs, start_epoch, seconds
        self.started = self.last_shown = time.monotonic()

    def line(self, epoch: int, text: str) -> str:
        now = time.monotonic()
        eta = (now - self.started) / (epoch - self.start_epoch) * (self.epochs - epoch)
        shown = epoch in (self.start_epoch + 1, self.epochs) or now - self.last_shown >= self.seconds
        if shown:
            self.last_shown = now
        # Only lines starting with OWN_PREFIX reach the terminal (_relay); the others go to the log file alone.
        return f"{OWN_PREFIX if shown else DETAIL_PREFIX} epoch {epoch}/{self.epochs} {text}, eta {eta:.0f}s"

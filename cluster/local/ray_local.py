r"""A real multi-node Ray on one host: a head and N worker nodes, each its own process tree with its own resources.

Every Ray listener is on 127.0.0.1; the head's dashboard (the Jobs API) is on http://127.0.0.1:<port>. Token
authentication is on unless `--auth disabled`: the token is generated into <dir>/auth_token (mode 0600) and every
node reads it through RAY_AUTH_TOKEN_PATH. The nodes inherit this command's environment, so S3 credentials given to
it reach jobs from the cluster's environment, never through a job's runtime_env.

    python cluster/local/ray_local.py start --dir /tmp/gr --workers 2 --worker-cpus 1 \
        --worker-resources '{"worker_slot": 1}'
    eval "$(python cluster/local/ray_local.py env --dir /tmp/gr)"    # RAY_ADDRESS, RAY_AUTH_TOKEN_PATH
    genray submit train configs/tiny/denoise_ae.yaml --output s3://bucket/run
    python cluster/local/ray_local.py add-node --dir /tmp/gr         # another worker node
    python cluster/local/ray_local.py kill-node --dir /tmp/gr worker-1  # SIGKILL a node: a lost machine
    python cluster/local/ray_local.py stop --dir /tmp/gr              # stops exactly these nodes

Why worker nodes are not `ray start --address=...`: Ray's listeners stay on loopback only with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that setting the `ray start` CLI refuses to join a head (it also
rewrites 127.0.0.1 to the host's network address otherwise). So the head is a real `ray start --head --block` and
each worker node runs `ray start --block`'s own code path (ray._private.node.Node(head=False), as
ray.cluster_utils.Cluster does) in a process of its own, with a temp dir of its own. A node's processes are its
process group and its leader's descendants (the raylet gives each Ray worker a group of its own): stop and kill-node
signal exactly those, never `ray stop` (which kills every Ray on the machine). Linux only (it reads /proc).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from genray.runtime import LOCAL_RAY_ENV, free_port

HOST = "127.0.0.1"
STATE_FILE = "cluster.json"
# Loopback-only listeners and no usage stats (genray's local-Ray settings); patience for node agents below.
NODE_ENV = dict(LOCAL_RAY_ENV)
AGENT_REGISTER_TIMEOUT_MS = 180_000  # at least: a node's agents have needed over 60 s on a loaded 2-core host


# -- state ---------------------------------------------------------------------------------------------------------

def read_state(cluster_dir: str | Path) -> dict:
    path = Path(cluster_dir) / STATE_FILE
    if not path.is_file():
        raise SystemExit(f"ray_local: no cluster state in {cluster_dir} (start one first)")
    return json.loads(path.read_text())


def write_state(cluster_dir: str | Path, state: dict) -> None:
    path = Path(cluster_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def auth_headers(state: dict) -> dict[str, str]:
    if not state.get("auth_token_path"):
        return {}
    return {"Authorization": "Bearer " + Path(state["auth_token_path"]).read_text().strip()}


def list_state(state: dict, resource: str, timeout: float = 10) -> list[dict]:
    """Ray's state API through the dashboard: "nodes" (alive and dead), "actors", "tasks", ..."""
    req = urllib.request.Request(f"{state['dashboard_url']}/api/v0/{resource}?limit=10000&detail=1",
                                 headers=auth_headers(state))
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = json.loads(r.read())
    return body["data"]["result"]["result"]


def list_nodes(state: dict, timeout: float = 10) -> list[dict]:
    return list_state(state, "nodes", timeout)


def alive_nodes(state: dict) -> dict[str, str]:
    """genray node name -> Ray node id, for the nodes that are alive."""
    out = {}
    for node in list_nodes(state):
        name = (node.get("labels") or {}).get("genray-node")
        if node.get("state") == "ALIVE" and name:
            out[name] = node["node_id"]
    return out


def node_names(state: dict) -> dict[str, str]:
    """Ray node id -> genray node name, for every node the head has seen (dead ones too)."""
    return {n["node_id"]: (n.get("labels") or {}).get("genray-node", "?") for n in list_nodes(state)}


def wait_for(predicate, what: str, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, urllib.error.URLError, KeyError, ValueError) as err:  # not up yet
            last_err = err
        time.sleep(poll)
    raise SystemExit(f"ray_local: timed out after {timeout:.0f}s waiting for {what}" +
                     (f" (last error: {last_err})" if last_err else ""))


# -- processes -----------------------------------------------------------------------------------------------------

def node_env(state: dict, temp_dir: str) -> dict[str, str]:
    env = {**NODE_ENV, **os.environ}  # an explicit setting in the caller's environment wins...
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # ...except this one: loopback only
    env["RAY_agent_register_timeout_ms"] = str(max(int(env.get("RAY_agent_register_timeout_ms", 0)),
                                                   AGENT_REGISTER_TIMEOUT_MS))
    env["RAY_TMPDIR"] = temp_dir
    # Jobs run `python ...`: make that the interpreter running this script (the venv with genray installed).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # it would win over the cluster's token file
    if state.get("auth_token_path"):
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state["auth_token_path"])
    else:
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def spawn(state: dict, name: str, argv: list[str], temp_dir: str) -> int:
    log_path = Path(state["dir"]) / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=node_env(state, temp_dir), start_new_session=True)  # one process group per node
    return proc.pid


def start_head(state: dict, cpus: float, resources: dict) -> None:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    argv = [ray_bin, "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={state['gcs_port']}",
            "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={state['dashboard_port']}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={cpus:g}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
            f"--object-store-memory={state['object_store_mb'] * 2**20}", f"--temp-dir={state['temp_dir']}",
            "--labels=genray-node=head", "--disable-usage-stats"]
    pid = spawn(state, "head", argv, state["temp_dir"])
    state["nodes"]["head"] = {"pid": pid, "cpus": cpus, "resources": resources}
    write_state(state["dir"], state)
    def up() -> bool:
        if not _alive(pid):
            _reap(pid)
            raise SystemExit(f"ray_local: the head exited while starting; see {state['dir']}/logs/head.log")
        return "head" in alive_nodes(state)

    wait_for(up, "the head node and its dashboard", timeout=300)


def start_worker(state: dict, name: str, cpus: float, resources: dict, wait: bool = True, gpus: float = 0) -> None:
    # Its own temp dir, as on its own machine: nodes sharing one would share (and garbage-collect) each other's
    # runtime_env files, e.g. a job's working_dir under a live worker's feet.
    temp_dir = str(Path(state["dir"]) / name)
    argv = [sys.executable, os.path.abspath(__file__), "_worker", "--gcs-address", state["gcs_address"],
            "--name", name, "--cpus", f"{cpus:g}", "--gpus", f"{gpus:g}", "--resources", json.dumps(resources),
            "--object-store-mb", str(state["object_store_mb"]), "--temp-dir", temp_dir]
    pid = spawn(state, name, argv, temp_dir)
    state["nodes"][name] = {"pid": pid, "cpus": cpus, "gpus": gpus, "resources": resources}
    write_state(state["dir"], state)
    if not wait:
        return

    def up() -> bool:
        if not _alive(pid):
            _reap(pid)
            log = (Path(state["dir"]) / "logs" / f"{name}.log").read_text(errors="replace").strip()
            raise NodeStartError(f"worker node {name} exited while starting: {log.splitlines()[-1] if log else ''}")
        return name in alive_nodes(state)

    wait_for(up, f"worker node {name}", timeout=300)


class NodeStartError(RuntimeError):
    """A worker node's process exited before the node registered (e.g. its agents were too slow to start)."""


def run_worker_node(args: argparse.Namespace) -> None:
    """A worker node in this process: what `ray start --address=... --block` runs, minus the CLI's refusal."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        # num_gpus: logical GPUs (there may be none on this host): Ray schedules GPU actors by them all the same.
        gcs_address=args.gcs_address, node_ip_address=HOST, num_cpus=args.cpus, num_gpus=args.gpus,
        resources=json.loads(args.resources), labels={"genray-node": args.name},
        object_store_memory=args.object_store_mb * 2**20, temp_dir=args.temp_dir,
        min_worker_port=0, max_worker_port=0, node_manager_port=0,
        include_log_monitor=True,  # this node's logs (its own temp dir) reach the drivers through its monitor
    )
    params.dashboard_agent_listen_port = None  # a free port, not the head's
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"worker node {args.name} up: node id {node.node_id}", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.5)
        dead = [name for name, proc in node.dead_processes()]
        if dead:  # like `ray start --block`: a dead raylet means a dead node
            print(f"worker node {args.name}: {dead} exited; stopping", flush=True)
            break
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) for every process, from /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def node_processes(info: dict) -> list[int]:
    """Every process of a node: its process group (start_new_session made pgid == the leader's pid) and every
    descendant of the leader, since the raylet puts each Ray worker in a process group of its own."""
    table = _process_table()
    found = {pid for pid, (_, pgid, _) in table.items() if pgid == info["pid"]}
    if info["pid"] in table:
        found.add(info["pid"])
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return sorted(found)


def signal_node(info: dict, sig: int, procs: list[int] | None = None) -> None:
    for pid in procs if procs is not None else node_processes(info):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_node(info: dict, timeout: float = 20, procs: list | None = None) -> None:
    """SIGTERM the node's leader (`ray start --block` / the worker launcher), which stops its Ray processes; then
    SIGKILL whatever of the node is left (listed before the leader goes: its children are reparented then)."""
    procs = node_processes(info) if procs is None else procs
    try:
        os.kill(info["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        _reap(info["pid"])
        time.sleep(0.2)
    signal_node(info, signal.SIGKILL, procs)
    _reap(info["pid"])
    _wait_gone(procs)


def _wait_gone(procs: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # when the caller of start() is still our parent
    except ChildProcessError:
        pass


# -- commands ------------------------------------------------------------------------------------------------------

def start(cluster_dir: str, workers: int = 2, head_cpus: float = 0, worker_cpus: float = 1,
          worker_resources: dict | None = None, object_store_mb: int = 200, auth: str = "token",
          worker_gpus: float = 0) -> dict:
    """Start a head and `workers` worker nodes; returns the state (also written to <dir>/cluster.json)."""
    d = Path(cluster_dir).resolve()
    if (d / STATE_FILE).exists():
        raise SystemExit(f"ray_local: {d} already holds a cluster; stop it first")
    d.mkdir(parents=True, exist_ok=True)
    temp_dir = d / "ray"  # short: Ray's unix sockets live under it (path limit ~107 characters)
    temp_dir.mkdir(exist_ok=True)
    token_path = None
    if auth == "token":
        token_path = d / "auth_token"
        token_path.touch(mode=0o600)
        token_path.write_text(secrets.token_hex(32))
    gcs_port, dashboard_port = free_port(), free_port()
    state = {"dir": str(d), "temp_dir": str(temp_dir), "gcs_port": gcs_port, "gcs_address": f"{HOST}:{gcs_port}",
             "dashboard_port": dashboard_port, "dashboard_url": f"http://{HOST}:{dashboard_port}",
             "auth_token_path": str(token_path) if token_path else None, "object_store_mb": object_store_mb,
             "worker_cpus": worker_cpus, "worker_gpus": worker_gpus, "worker_resources": worker_resources or {},
             "next_worker": 1, "nodes": {}}
    write_state(d, state)
    try:
        start_head(state, head_cpus, {"head": 1})
        for _ in range(workers):  # one at a time: nodes starting together on one host pick the same log names
            add_node(str(d), state=state)
    except BaseException:
        stop(str(d))
        raise
    return state


def add_node(cluster_dir: str, cpus: float | None = None, resources: dict | None = None, state: dict | None = None,
             wait: bool = True, gpus: float | None = None) -> str:
    """Add a worker node (default: the cluster's worker CPUs, GPUs and resources); returns its name."""
    state = state or read_state(cluster_dir)
    for attempt in range(3):  # a node that fails to start on an overloaded host gets another go, under a new name
        name = f"worker-{state['next_worker']}"
        state["next_worker"] += 1
        try:
            start_worker(state, name, state["worker_cpus"] if cpus is None else cpus,
                         state["worker_resources"] if resources is None else resources, wait=wait,
                         gpus=state.get("worker_gpus", 0) if gpus is None else gpus)
            return name
        except NodeStartError as err:
            stop_node(state["nodes"].pop(name), timeout=5)
            write_state(state["dir"], state)
            if attempt == 2:
                raise SystemExit(f"ray_local: {err}") from None
            print(f"ray_local: {err}; retrying", file=sys.stderr)
    raise AssertionError("unreachable")


def kill_node(cluster_dir: str, name: str) -> None:
    """SIGKILL every process of the node at once (launcher, raylet, agents, its Ray workers): a lost machine."""
    state = read_state(cluster_dir)
    info = state["nodes"].pop(name)
    procs = node_processes(info)
    signal_node(info, signal.SIGKILL, procs)
    _reap(info["pid"])
    _wait_gone(procs)
    write_state(cluster_dir, state)


def stop(cluster_dir: str, force: bool = False) -> None:
    """Stop exactly the nodes this cluster started (workers first, then the head); `force` SIGKILLs them all at
    once instead (a throwaway test cluster: nothing to drain)."""
    d = Path(cluster_dir)
    if not (d / STATE_FILE).exists():
        return
    state = read_state(d)
    if force:
        everything = [(info, node_processes(info)) for info in state["nodes"].values()]
        for info, procs in everything:
            signal_node(info, signal.SIGKILL, procs)
        for info, procs in everything:
            _reap(info["pid"])
            _wait_gone(procs)
        (d / STATE_FILE).unlink()
        return
    workers = [(info, node_processes(info)) for name, info in state["nodes"].items() if name != "head"]
    for info, _ in workers:  # all workers at once, then the head
        try:
            os.kill(info["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    for info, procs in workers:
        stop_node(info, procs=procs)
    if "head" in state["nodes"]:
        stop_node(state["nodes"]["head"])
    (d / STATE_FILE).unlink()


class LocalCluster:
    """A handle on a cluster started by start(): its addresses, nodes and a Jobs API client (for tests)."""

    def __init__(self, cluster_dir: str):
        self.dir = str(Path(cluster_dir).resolve())

    @property
    def state(self) -> dict:
        return read_state(self.dir)

    @property
    def dashboard_url(self) -> str:
        return self.state["dashboard_url"]

    @property
    def token_path(self) -> str | None:
        return self.state["auth_token_path"]

    def headers(self) -> dict[str, str]:
        return auth_headers(self.state)

    def client_env(self) -> dict[str, str]:
        """Environment for a client process (genray submit, ray job submit) of this cluster."""
        env = {"RAY_ADDRESS": self.dashboard_url}
        if self.token_path:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path)
        return env

    def jobs_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.headers())

    def alive(self) -> dict[str, str]:
        return alive_nodes(self.state)

    def names(self) -> dict[str, str]:
        return node_names(self.state)

    def actors(self, class_part: str) -> list[dict]:
        """Alive actors whose class name contains `class_part`, with their node ids."""
        return [a for a in list_state(self.state, "actors")
                if class_part in a.get("class_name", "") and a.get("state") == "ALIVE"]

    def workers(self) -> list[str]:
        return sorted(name for name in self.alive() if name != "head")

    def add_node(self, **kwargs) -> str:
        return add_node(self.dir, **kwargs)

    def kill_node(self, name: str) -> None:
        kill_node(self.dir, name)

    def wait_dead(self, node_id: str, timeout: float = 120) -> None:
        wait_for(lambda: any(n["node_id"] == node_id and n["state"] == "DEAD" for n in list_nodes(self.state)),
                 f"node {node_id[:8]} to be reported dead", timeout)

    def ensure_workers(self, count: int) -> None:
        """Add worker nodes until `count` are alive (after a node-loss test)."""
        state = self.state
        for name in [n for n in state["nodes"] if n != "head" and n not in self.alive()]:
            stop_node(state["nodes"].pop(name))  # a worker that died on its own: forget it
            write_state(self.dir, state)
        while len(self.workers()) < count:
            self.add_node()

    def stop(self, force: bool = False) -> None:
        stop(self.dir, force)


def env_lines(state: dict) -> list[str]:
    lines = [f"export RAY_ADDRESS={state['dashboard_url']}"]
    if state.get("auth_token_path"):
        lines.append(f"export RAY_AUTH_TOKEN_PATH={state['auth_token_path']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start a head and N worker nodes")
    st.add_argument("--dir", required=True, help="state, logs, Ray's temp dir and the auth token go here")
    st.add_argument("--workers", type=int, default=2)
    st.add_argument("--head-cpus", type=float, default=0, help="0: the head only runs drivers and Ray's own actors")
    st.add_argument("--worker-cpus", type=float, default=1)
    st.add_argument("--worker-resources", default="{}", help='custom resources per worker node, JSON')
    st.add_argument("--worker-gpus", type=float, default=0, help="logical GPUs per worker node (none need exist)")
    st.add_argument("--object-store-mb", type=int, default=200)
    st.add_argument("--auth", choices=("token", "disabled"), default="token")
    ad = sub.add_parser("add-node", help="add a worker node")
    ad.add_argument("--dir", required=True)
    ad.add_argument("--cpus", type=float)
    ad.add_argument("--resources", help="JSON; default: the cluster's worker resources")
    ad.add_argument("--gpus", type=float, help="logical GPUs; default: the cluster's worker GPUs")
    kl = sub.add_parser("kill-node", help="SIGKILL a worker node's processes")
    kl.add_argument("--dir", required=True)
    kl.add_argument("name")
    for name, text in (("stop", "stop every node of this cluster"), ("status", "nodes and their Ray node ids"),
                       ("env", "print export lines for RAY_ADDRESS and the token")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--dir", required=True)
        if name == "stop":
            sp.add_argument("--force", action="store_true", help="SIGKILL every node at once")
    wk = sub.add_parser("_worker")  # internal: one worker node in this process
    for flag in ("--gcs-address", "--name", "--resources", "--temp-dir"):
        wk.add_argument(flag, required=True)
    wk.add_argument("--cpus", type=float, required=True)
    wk.add_argument("--gpus", type=float, default=0)
    wk.add_argument("--object-store-mb", type=int, required=True)
    args = p.parse_args(argv)

    if args.cmd == "_worker":
        run_worker_node(args)
    elif args.cmd == "start":
        state = start(args.dir, args.workers, args.head_cpus, args.worker_cpus, json.loads(args.worker_resources),
                      args.object_store_mb, args.auth, args.worker_gpus)
        print(f"Ray cluster up: head + {args.workers} worker nodes; dashboard and Jobs API at {state['dashboard_url']}")
        print("\n".join(env_lines(state)))
    elif args.cmd == "add-node":
        print(add_node(args.dir, args.cpus, json.loads(args.resources) if args.resources else None, gpus=args.gpus))
    elif args.cmd == "kill-node":
        kill_node(args.dir, args.name)
    elif args.cmd == "stop":
        stop(args.dir, args.force)
    elif args.cmd == "env":
        print("\n".join(env_lines(read_state(args.dir))))
    elif args.cmd == "status":
        state = read_state(args.dir)
        ids = alive_nodes(state)
        for name, info in state["nodes"].items():
            print(f"{name:<10} pid {info['pid']:<8} cpus {info['cpus']:<4g} {json.dumps(info['resources']):<28} "
                  f"{ids.get(name, 'NOT ALIVE')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

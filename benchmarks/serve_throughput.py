"""Serving throughput: Ray Serve (genray's app) against the model's raw batched forward and a bare uvicorn server,
measured side by side in one run on loopback.

Workload: x4 super-resolution with a CPU-sized SRResNet (32 features, 8 blocks; random-init weights: throughput
depends on the architecture and the sizes, not on what the weights learned), 64x64 RGB crops of the embedded
photos as PNG uploads (--side), 256x256 PNG answers. Every phase runs on --device (auto: the GPU when there is one;
Serve then gives each replica a GPU).
- raw: Predictor forward passes on the already decoded images, batches of 8, no HTTP and no PNG. In one process at
  1 and at all-cores torch threads (the better one is (a), the issue's ceiling), and in Serve's own layout
  (--replicas processes x --threads threads), which isolates what HTTP + Serve cost.
- uvicorn: a bare FastAPI app under uvicorn in a subprocess: decode -> Predictor on the one image -> PNG encode,
  inline in the event loop, so requests are served one at a time. At 1 and all-cores threads; the better one is (b).
- serve: `genray.serving.app.build_app` on a local Ray: HTTP proxy -> gateway (decode) -> the superres deployment
  (@serve.batch, max_batch_size 8), --replicas replicas x --threads torch threads.
- floor: a second Serve application whose one FastAPI replica echoes the upload (no model, no PNG work): what any
  Serve request costs before it does anything.
HTTP phases: --clients (16) threads, each with its own keep-alive requests.Session, posting back to back; a phase
counts the requests completed inside its timed window (after a warm-up), latencies are theirs.
Every server starts once; then --rounds rounds each run every phase for --seconds, interleaved, so a change in the
machine's background load hits all of them alike. Ratios are medians of the per-round ratios; latencies are pooled.
On a shared machine wall-clock rates also depend on how many runnable threads a phase has (the scheduler shares
the cores per thread), so CPU seconds per image are reported too (/proc of the serving processes, clients excluded):
those measure what Serve itself costs, whatever else runs.
Last, with the servers gone, the batching gain: per-image forward time at batch 1 over batch 8 at a few input
sides, the most that sharing forward passes can win over one-at-a-time serving on this machine.
Prints progress on stderr, then one JSON line with serve_vs_raw, serve_vs_uvicorn, p50_ms, p99_ms and the rest.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import genray  # noqa: F401  (first: importing genray sets Ray's local env before ray is imported)

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

from genray.images import decode_image, encode_png  # noqa: E402
from genray.runtime import free_port  # noqa: E402

if __package__:  # imported as benchmarks.serve_throughput
    from benchmarks import _common as common
else:  # run as a script: benchmarks/ is sys.path[0]
    import _common as common

log = common.log
BATCH = 8
GAIN_SIDES = (16, 32, 64)  # input sides of the batching-gain sweep
TARGETS = {"serve_vs_raw": 0.7, "serve_vs_uvicorn": 1.5}


# -- [1] raw batched forward ------------------------------------------------------------------------------------

def raw_rate(predictor, images: list[np.ndarray], threads: int, seconds: float, barrier=None,
             batch: int = BATCH) -> tuple[float, float]:
    """(images/s, CPU s per image) of Predictor forward passes on decoded images, `batch` per call, in the calling
    process."""
    torch.set_num_threads(threads)
    predictor(images[:batch])  # warm-up: oneDNN picks its kernels on the first call of a shape (and thread count)
    if barrier is not None:
        barrier.wait()  # the processes of one layout start their timed loops together
    done, started, cpu, i = 0, time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - started < seconds:
        predictor([images[(i + k) % len(images)] for k in range(batch)])
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done


def load_predictor(model_uri: str, device: str):
    from genray.inference import Predictor

    return Predictor.from_uri(model_uri, device=device, batch_size=BATCH)


def batching_gain(predictor, side: int, threads: int, seconds: float) -> float:
    """Per-image forward time at batch 1 over batch BATCH for `side`-pixel inputs: what dynamic batching can win
    at most. Above 1 only where a forward pass has spare parallelism (GPUs, or tiny inputs on a CPU)."""
    images = list(common.lr_crops(2 * BATCH, side, seed=1))
    one, _ = raw_rate(predictor, images, threads, seconds, batch=1)
    many, _ = raw_rate(predictor, images, threads, seconds, batch=BATCH)
    return many / one


def _raw_worker(model_uri, device, images, threads, seconds, barrier, results) -> None:
    results.put(raw_rate(load_predictor(model_uri, device), images, threads, seconds, barrier))


def raw_rate_processes(model_uri: str, device: str, images: list[np.ndarray], processes: int, threads: int,
                       seconds: float) -> tuple[float, float]:
    """(total images/s, mean CPU s per image) of `processes` spawned processes (`threads` torch threads each)
    running at once."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_raw_worker, args=(model_uri, device, images, threads, seconds, barrier, results))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    rates = [results.get(timeout=900) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(r for r, _ in rates), statistics.mean(c for _, c in rates)


# -- [2] HTTP load generator ------------------------------------------------------------------------------------

def drive(url: str, payloads: list[bytes], clients: int, seconds: float, warmup: float,
          server_pids: list[int]) -> dict:
    """`clients` threads posting back to back; figures over the requests that complete in the timed window, and
    the server processes' CPU seconds per request over the whole phase."""
    records: list[tuple[float, float, int]] = []  # (end time, latency s, status)
    lock = threading.Lock()
    begin = time.perf_counter()
    window = (begin + warmup, begin + warmup + seconds)

    def client(index: int) -> None:
        k = index
        with requests.Session() as session:
            while time.perf_counter() < window[1]:
                t0 = time.perf_counter()
                r = session.post(url, data=payloads[k % len(payloads)], timeout=900)
                t1 = time.perf_counter()
                with lock:
                    records.append((t1, t1 - t0, r.status_code))
                k += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    cpu = cpu_seconds(server_pids)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = cpu_seconds(server_pids) - cpu
    timed = [(latency, status) for end, latency, status in records if window[0] <= end <= window[1]]
    ok = [latency for latency, status in timed if status == 200]
    if not ok:
        raise RuntimeError(f"no successful request to {url} in the timed window ({len(records)} in all)")
    return {"rps": len(ok) / seconds, "latencies": ok, "errors": len(timed) - len(ok),
            "cpu_per_request": cpu / len(records)}


def percentile_ms(latencies: list[float], q: float) -> float:
    ordered = sorted(latencies)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# CPU time per request: the share of the machine a phase gets changes with the background load (and with how many
# runnable threads the phase has), the CPU seconds each request costs do not.

def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, from /proc/<pid>/stat (0 for a process that is gone)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def serve_pids(app: str) -> list[int]:
    """One application's request path: the HTTP proxy and the app's replicas, below this process."""
    return [pid for pid in common.descendants(os.getpid(), exclude=set())
            if f"ServeReplica:{app}:" in (title := common.cmdline(pid)) or "ProxyActor" in title]


def check_answer(url: str, payload: bytes, side: int) -> None:
    r = requests.post(url, data=payload, timeout=900)
    if r.status_code != 200 or decode_image(r.content).shape != (4 * side, 4 * side, 3):
        raise RuntimeError(f"{url}: unexpected answer {r.status_code} {r.text[:200]}")


# -- [3] bare uvicorn baseline ------------------------------------------------------------------------------------

def run_uvicorn_server(model_uri: str, device: str, port: int, threads: int) -> None:
    """The baseline server (run in a subprocess): everything inline in the event loop, one request at a time."""
    import uvicorn
    from fastapi import FastAPI, Request, Response

    torch.set_num_threads(threads)
    predictor = load_predictor(model_uri, device)
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.post("/superres")
    async def superres(request: Request) -> Response:
        image = decode_image(await request.body())
        return Response(encode_png(predictor([image])[0]), media_type="image/png")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_uvicorn(model_uri: str, device: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--uvicorn-server", model_uri, "--device", device,
                             "--port", str(port), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                return proc, f"http://127.0.0.1:{port}/superres"
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the uvicorn baseline server did not start")
        time.sleep(0.5)


# -- [4] Ray Serve ----------------------------------------------------------------------------------------------

def start_serve(model_uri: str, args) -> str:
    import ray
    from ray import serve

    from genray.serving.deploy import deploy_app

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Logical CPUs are bookkeeping here: each replica's torch threads are set explicitly (num_threads). On a GPU
    # machine each replica gets a whole GPU, where its Predictor runs (bf16 autocast).
    deploy_app({"models": {"superres": {
        "uri": model_uri, "num_replicas": args.replicas, "num_threads": args.threads, "num_cpus": 0.5,
        "num_gpus": 1 if args.device == "cuda" else 0,
        # A partial batch waits up to 50 ms (a fifth of one image's forward pass here) for company: shorter, and
        # requests trickling in from the gateway rarely meet in a batch.
        "max_batch_size": BATCH, "batch_wait_timeout_s": 0.05, "max_queued_requests": 4 * args.clients}},
        "gateway": {"num_cpus": 0.1}})
    return f"http://127.0.0.1:{port}"


def start_floor() -> str:
    """A second Serve application whose one FastAPI replica echoes the body: what the proxy and one replica hop cost
    per request with no model and no PNG work, the least any Serve app pays (genray's path has two hops)."""
    from fastapi import FastAPI, Request, Response
    from ray import serve

    echo_app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    @serve.ingress(echo_app)
    class Echo:
        @echo_app.post("/")
        async def echo(self, request: Request) -> Response:
            return Response(await request.body(), media_type="image/png")

    serve.run(Echo.bind(), name="floor", route_prefix="/floor")
    return "/floor/"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke-test", action="store_true", help="one short round: checks the plumbing, not the figures")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every phase")
    p.add_argument("--seconds", type=float, default=10.0, help="timed window of each phase in each round")
    p.add_argument("--warmup", type=float, default=3.0, help="untimed load before each HTTP phase's window")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--side", type=int, default=64, help="input side in pixels (outputs are 4x)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where every phase runs its forward passes (auto: cuda when a GPU is visible)")
    p.add_argument("--replicas", type=int, help="Serve replicas of the model (default: one per core, or per GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per Serve replica")
    p.add_argument("--uvicorn-server", metavar="MODEL_URI", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.uvicorn_server:
        return run_uvicorn_server(args.uvicorn_server, args.device, args.port, args.threads)
    if args.smoke_test:
        args.rounds, args.seconds, args.warmup, args.clients = 1, 3.0, 1.0, 4
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = os.cpu_count() or 1
    if args.replicas is None:
        args.replicas = torch.cuda.device_count() if args.device == "cuda" else cores
    thread_options = sorted({1, cores})
    layout = f"{args.replicas}x{args.threads}"  # processes x threads

    import ray
    from ray import serve

    servers: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="genray-serve-bench-") as tmp:
        model_uri = str(Path(tmp) / "srresnet")
        common.save_srresnet(model_uri)
        images = list(common.lr_crops(64, args.side))
        payloads = [encode_png(im) for im in images]
        predictor = load_predictor(model_uri, args.device)
        try:
            # [0] Every server up (and checked) before any timing; idle servers wait while others are measured.
            log(f"[0] starting uvicorn servers ({', '.join(map(str, thread_options))} thread(s)) and Ray Serve "
                f"({args.replicas} replica(s) x {args.threads} thread(s)) ...")
            uvicorn_urls, uvicorn_pids = {}, {}
            for t in thread_options:
                proc, uvicorn_urls[t] = start_uvicorn(model_uri, args.device, t)
                servers.append(proc)
                uvicorn_pids[t] = [proc.pid]
            serve_root = start_serve(model_uri, args)
            serve_url, floor_url = serve_root + "/superres", serve_root + start_floor()
            for url in [*uvicorn_urls.values(), serve_url]:
                check_answer(url, payloads[0], args.side)
            pids, floor_pids = serve_pids("genray"), serve_pids("floor")
            rounds = []
            for r in range(args.rounds):
                fig: dict = {"raw": {}, "raw_cpu": {}, "uvicorn": {}}
                runs = {f"1x{t}": lambda t=t: raw_rate(predictor, images, t, args.seconds) for t in thread_options}
                runs.setdefault(layout, lambda: raw_rate_processes(model_uri, args.device, images, args.replicas,
                                                                   args.threads, args.seconds))
                for key, run in runs.items():  # [1] raw: one process, and Serve's layout
                    fig["raw"][key], fig["raw_cpu"][key] = run()
                for t, url in uvicorn_urls.items():  # [2] uvicorn, one request at a time
                    fig["uvicorn"][t] = drive(url, payloads, args.clients, args.seconds, args.warmup,
                                              uvicorn_pids[t])
                fig["serve"] = drive(serve_url, payloads, args.clients, args.seconds, args.warmup, pids)  # [3]
                fig["floor"] = drive(floor_url, payloads, args.clients, args.seconds, args.warmup, floor_pids)
                rounds.append(fig)
                log(f"round {r + 1}: raw " + ", ".join(f"{k} {v:.2f}" for k, v in fig["raw"].items())
                    + " img/s; uvicorn " + ", ".join(f"{t} thr {v['rps']:.2f}" for t, v in fig["uvicorn"].items())
                    + f" req/s; serve {fig['serve']['rps']:.2f} req/s; CPU ms per image: raw "
                    + ", ".join(f"{k} {1000 * v:.0f}" for k, v in fig["raw_cpu"].items())
                    + ", uvicorn " + ", ".join(f"{t} thr {1000 * v['cpu_per_request']:.0f}"
                                              for t, v in fig["uvicorn"].items())
                    + f", serve {1000 * fig['serve']['cpu_per_request']:.0f} ({len(pids)} processes)"
                    + f"; Serve echo app {fig['floor']['rps']:.0f} req/s, {1000 * fig['floor']['cpu_per_request']:.1f}"
                    " CPU ms per request")
            models = requests.get(serve_url.removesuffix("/superres") + "/models", timeout=60).json()["models"]
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait(60)
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        # [4] With the servers gone: how much one batched forward saves per image at a few input sizes.
        gain_seconds = min(args.seconds, 4.0)
        gains = {side: batching_gain(predictor, side, cores, gain_seconds)
                 for side in sorted({*GAIN_SIDES, args.side})}
        log("batching gain (per-image forward, batch 1 / batch %d, %d threads): %s" % (
            BATCH, cores, ", ".join(f"{side}px {g:.2f}x" for side, g in gains.items())))

    def per_round(value) -> float:
        return statistics.median(value(f) for f in rounds)

    def best_raw(f) -> float:  # (a): the better one-process batched forward
        return max(v for k, v in f["raw"].items() if k.startswith("1x"))

    def best_uvicorn(f) -> float:  # (b): the better of the uvicorn servers
        return max(v["rps"] for v in f["uvicorn"].values())

    serve_latencies = [x for f in rounds for x in f["serve"]["latencies"]]
    uvicorn_latencies = {t: [x for f in rounds for x in f["uvicorn"][t]["latencies"]] for t in thread_options}
    result = {
        "serve_vs_raw": round(per_round(lambda f: f["serve"]["rps"] / best_raw(f)), 3),
        "serve_vs_uvicorn": round(per_round(lambda f: f["serve"]["rps"] / best_uvicorn(f)), 3),
        "p50_ms": round(percentile_ms(serve_latencies, 0.5), 1),
        "p99_ms": round(percentile_ms(serve_latencies, 0.99), 1),
        # Against the same processes x threads doing forward passes only: what HTTP + Serve themselves cost.
        "serve_vs_raw_same_layout": round(per_round(lambda f: f["serve"]["rps"] / f["raw"][layout]), 3),
        "serve_rps": round(per_round(lambda f: f["serve"]["rps"]), 3),
        "serve_errors": sum(f["serve"]["errors"] for f in rounds),
        "serve_recent_batch_sizes": models["superres"]["recent_batch_sizes"],
        "raw_images_per_s": {k: round(per_round(lambda f: f["raw"][k]), 3) for k in rounds[0]["raw"]},
        "uvicorn_rps": {f"{t}_thread": round(per_round(lambda f: f["uvicorn"][t]["rps"]), 3)
                        for t in thread_options},
        "uvicorn_p50_ms": {f"{t}_thread": round(percentile_ms(v, 0.5), 1) for t, v in uvicorn_latencies.items()},
        "uvicorn_p99_ms": {f"{t}_thread": round(percentile_ms(v, 0.99), 1) for t, v in uvicorn_latencies.items()},
        "per_round_serve_vs_raw": [round(f["serve"]["rps"] / best_raw(f), 3) for f in rounds],
        # CPU seconds per image, immune to how much of the machine a phase got: Serve's includes the HTTP proxy,
        # the gateway and PNG decode/encode (the clients' own CPU is not counted, for uvicorn neither).
        "cpu_ms_per_image": {
            **{f"raw_{k}": round(1000 * per_round(lambda f: f["raw_cpu"][k]), 1) for k in rounds[0]["raw_cpu"]},
            **{f"uvicorn_{t}_thread": round(1000 * per_round(lambda f: f["uvicorn"][t]["cpu_per_request"]), 1)
               for t in thread_options},
            "serve": round(1000 * per_round(lambda f: f["serve"]["cpu_per_request"]), 1)},
        # Images per CPU-second, Serve over the cheapest raw / uvicorn layout: below 1 is Serve's own cost.
        "serve_vs_raw_per_cpu": round(per_round(lambda f: min(f["raw_cpu"].values())
                                                / f["serve"]["cpu_per_request"]), 3),
        "serve_vs_uvicorn_per_cpu": round(per_round(lambda f: min(v["cpu_per_request"] for v in f["uvicorn"].values())
                                                    / f["serve"]["cpu_per_request"]), 3),
        "clients": args.clients, "replicas": args.replicas, "threads_per_replica": args.threads,
        "rounds": args.rounds, "seconds": args.seconds, "cores": cores,
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine; ratios matter, not rates
        # What HTTP + Serve cost per image on top of the same forward passes (PNG decode/encode included).
        "serve_overhead_cpu_ms": round(1000 * per_round(lambda f: f["serve"]["cpu_per_request"]
                                                        - f["raw_cpu"][layout]), 1),
        # Proxy + one replica, echoing the upload: the CPU any Serve request costs on this machine before any work.
        "serve_floor_cpu_ms": round(1000 * per_round(lambda f: f["floor"]["cpu_per_request"]), 1),
        "serve_floor_rps": round(per_round(lambda f: f["floor"]["rps"]), 1),
        # Per-image forward at batch 1 over batch BATCH, by input side: the most dynamic batching can win over
        # one-at-a-time serving. serve_vs_uvicorn can only pass 1.5 where this is well above 1.5.
        "batching_gain": round(gains[args.side], 3),
        "batching_gain_by_side": {str(side): round(g, 3) for side, g in gains.items()},
        "device": args.device,
        "model": f"srresnet 32x8 random-init, {args.side}x{args.side} RGB -> {4 * args.side}x{4 * args.side}",
        "smoke_test": args.smoke_test,
    }
    result["targets_met"] = {k: result[k] >= v for k, v in TARGETS.items()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

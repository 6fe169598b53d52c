"""What forwarding costs: dsnode's balancer side by side with nginx, in front of the same backends.

    .venv/bin/python benchmarks/bench_forward.py [--requests 2000] [--rounds 3]

Two `dsnode serve` centrals (the bundled dense model, transformers, one thread, `max_tokens = 1`, so the
proxy's share is as large as a real backend allows) sit behind
- nothing: the load generator balances 3:1 itself (the baseline),
- nginx (a plain process, generated config, `daemon off;`): `upstream { server A weight=3; server B
  weight=1; keepalive 32; }`, HTTP/1.1 to the upstreams, proxy_buffering off (dsnode passes a stream
  on as it comes), access log on (dsnode logs every request too), and connections kept for any number
  of requests on both sides (`keepalive_requests`; nginx's default closes them after 1000, dsnode
  never does),
- a dsnode edge: the same two upstreams with weights 3 and 1, for a model only they serve (so the edge
  forwards without tokenizing, as an edge does for a central-only model).
Each proxy is pinned to its own core (`--proxy-cpu`), backends and load generator to the others. Rounds
alternate the targets; figures are medians over rounds, with the CPU's range (each round is printed too). CPU per
request is the proxy's on-CPU time (/proc/PID/task/*/schedstat, all threads; nginx: master + worker)
over the timed requests only, read by the load generator right before and after them (its warm-up
requests, which open the connections, are not counted), divided by the number of timed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsnode.processes import stop_process

from tests.support.models import bundled_models
from tests.support.nodes import free_port, node_toml

MODEL_CENTRAL = "bench-central"
MODEL_EDGE = "bench-edge"
WEIGHTS = (3, 1)
BODY = json.dumps({"model": MODEL_CENTRAL, "prompt": "It was the best of times", "max_tokens": 1,
                   "temperature": 0}).encode()


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        stop_process(self.process, grace_s=20)


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus and shutil.which("taskset") else argv


def spawn(name: str, argv: list[str], work: Path) -> Proc:
    log = work / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Proc(name, process, log)


def serve(name: str, toml: str, cpus: str | None, work: Path) -> Proc:
    path = work / f"{name}.toml"
    path.write_text(toml)
    return spawn(name, pinned(cpus, [sys.executable, "-m", "dsnode.cli", "serve", "--config", str(path)]), work)


def wait_until(check, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def nginx_conf(work: Path, port: int, backends: list[int]) -> Path:
    servers = "\n".join(f"    server 127.0.0.1:{p} weight={w};" for p, w in zip(backends, WEIGHTS))
    conf = work / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {work}/nginx-access.log;
  keepalive_requests 1000000;
  client_body_temp_path {work}/nginx-body;
  proxy_temp_path {work}/nginx-proxy;
  upstream centrals {{
{servers}
    keepalive 32;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://centrals;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""")
    return conf


def cpu_ns(pids: list[int]) -> int:
    """On-CPU time of every thread of these processes, in ns (schedstat: exact, not 10 ms ticks)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def process_tree(pid: int) -> list[int]:
    import psutil

    proc = psutil.Process(pid)
    return [pid, *(c.pid for c in proc.children(recursive=True))]


# --- load ---------------------------------------------------------------------------------------------
async def run_load(urls: list[str], concurrency: int, total: int, pids: list[int]) -> tuple[list[float], float, int]:
    """`total` requests with `concurrency` in flight. Several `urls` (the baseline) rotate 3:1, as the
    proxies balance. Returns latencies (s), the wall time, and the CPU time (ns) the processes `pids`
    spent meanwhile (the warm-up excluded)."""
    rotation = [url for url, weight in zip(urls, WEIGHTS) for _ in range(weight)] if len(urls) > 1 else urls
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(numbers) -> None:
            for i in numbers:
                url = rotation[i % len(rotation)]
                started = time.perf_counter()
                async with session.post(url + "/v1/completions", data=BODY,
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url}: HTTP {response.status}")
                latencies.append(time.perf_counter() - started)

        warm_up = iter(range(concurrency * 4))  # open the connections first
        await asyncio.gather(*(worker(warm_up) for _ in range(concurrency)))
        latencies.clear()
        numbers = iter(range(total))
        cpu_before = cpu_ns(pids)
        started = time.perf_counter()
        await asyncio.gather(*(worker(numbers) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        return latencies, wall, cpu_ns(pids) - cpu_before


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None


def measure(urls: list[str], pids: list[int], concurrency: int, total: int, client_cpus: str | None) -> Sample:
    argv = pinned(client_cpus, [sys.executable, __file__, "--load", json.dumps([urls, concurrency, total, pids])])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    latencies, wall, spent_ns = json.loads(out.strip().splitlines()[-1])
    cpu = spent_ns / total / 1000 if pids else None
    return Sample(total / wall, percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000, cpu)


def median(samples: list[Sample], field: str) -> float:
    values = [getattr(s, field) for s in samples if getattr(s, field) is not None]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    args = parse_args()
    if args.load:  # the load-generator child
        urls, concurrency, total, pids = json.loads(args.load)
        try:
            import uvloop

            result = uvloop.run(run_load(urls, concurrency, total, pids))
        except ImportError:
            result = asyncio.run(run_load(urls, concurrency, total, pids))
        print(json.dumps(result))
        return 0
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        print("nginx is not installed (Debian: apt-get install -y nginx-light); it is the reference here.")
        return 1
    work = Path(tempfile.mkdtemp(prefix="dsnode-bench-forward-"))
    procs: list[Proc] = []
    try:
        targets, edge_url = start_targets(args, nginx, work, procs)
        print(f"backends: 2 × dsnode central (tiny dense, max_tokens=1), weights {WEIGHTS}; proxy core "
              f"{args.proxy_cpu}, others {args.other_cpus}; {args.requests} requests × {args.rounds} rounds",
              flush=True)
        report(measure_rounds(args, targets))
        split = [p["forwarded"] for p in get_json(edge_url + "/cluster")["peers"]]
        print(f"\ndsnode forwarded per upstream (weights {WEIGHTS}): {split}")
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per target, concurrency and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--proxy-cpu", default="0", help="the core the proxies run on (taskset -c)")
    parser.add_argument("--other-cpus", default="1", help="cores for backends and the load generator")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    return parser.parse_args()


Targets = dict[str, tuple[list[str], list[int]]]  # name → (URLs to load, pids whose CPU is counted)


def start_targets(args: argparse.Namespace, nginx: str, work: Path, procs: list[Proc]) -> tuple[Targets, str]:
    """Two centrals, an edge forwarding to them and nginx doing the same, all ready."""
    models = bundled_models()
    backends = [free_port() for _ in WEIGHTS]
    for i, port in enumerate(backends):
        toml = node_toml(f"central-{i + 1}", "central", port, MODEL_CENTRAL, models.dense, "transformers")
        procs.append(serve(f"central-{i + 1}", toml, args.other_cpus, work))
    edge_port, nginx_port = free_port(), free_port()
    upstreams = "".join(f'\n[[routing.upstream]]\nurl = "http://127.0.0.1:{p}"\nweight = {w}\n'
                        for p, w in zip(backends, WEIGHTS))
    edge_toml = node_toml("edge-1", "edge", edge_port, MODEL_EDGE, models.dense, "transformers",
                          extra=f"[routing]\npoll_interval = 1.0\n{upstreams}")
    edge = serve("edge-1", edge_toml, args.proxy_cpu, work)
    procs.append(edge)
    proxy = spawn("nginx", pinned(args.proxy_cpu, [nginx, "-c", str(nginx_conf(work, nginx_port, backends))]), work)
    procs.append(proxy)
    edge_url, nginx_url = f"http://127.0.0.1:{edge_port}", f"http://127.0.0.1:{nginx_port}"
    backend_urls = [f"http://127.0.0.1:{p}" for p in backends]
    for url in [*backend_urls, edge_url]:
        wait_until(lambda url=url: get_json(url + "/ready")["status"] == "ready", f"{url}/ready")
    wait_until(lambda: all(p["healthy"] for p in get_json(edge_url + "/cluster")["peers"]), "the edge's peers")
    wait_until(lambda: urllib.request.urlopen(nginx_url + "/ready", timeout=2).status == 200, "nginx")
    targets = {
        "direct": (backend_urls, []),
        "nginx": ([nginx_url], process_tree(proxy.process.pid)),
        "dsnode": ([edge_url], [edge.process.pid]),
    }
    return targets, edge_url


def measure_rounds(args: argparse.Namespace, targets: Targets) -> dict[tuple[str, int], list[Sample]]:
    """Interleaved: every round measures every target, so drift in the machine hits them alike."""
    results: dict[tuple[str, int], list[Sample]] = {}
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        for round_ in range(args.rounds):
            for name, (urls, pids) in targets.items():
                sample = measure(urls, pids, concurrency, args.requests, args.other_cpus)
                results.setdefault((name, concurrency), []).append(sample)
                print(f"  c={concurrency:<3} round {round_ + 1} {name:<7} {sample.rps:8.0f} req/s  "
                      f"p50 {sample.p50_ms:7.2f} ms  p99 {sample.p99_ms:7.2f} ms"
                      + (f"  cpu {sample.cpu_us:6.1f} us/req" if sample.cpu_us is not None else ""),
                      flush=True)
    return results


def report(results: dict[tuple[str, int], list[Sample]]) -> None:
    print("\nmedians over rounds (+p50/+p99: added to the direct baseline; cpu: the proxy's, per request)")
    print(f"{'c':>3} {'target':<7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
          f"{'cpu us/req':>10} {'cpu vs nginx':>12} {'cpu range':>13}")
    for concurrency in sorted({c for _, c in results}):
        base = results[("direct", concurrency)]
        nginx_cpu = median(results[("nginx", concurrency)], "cpu_us")
        for name in ("direct", "nginx", "dsnode"):
            samples = results[(name, concurrency)]
            p50, p99 = median(samples, "p50_ms"), median(samples, "p99_ms")
            cpu = median(samples, "cpu_us")
            added = "" if name == "direct" else (
                f"{p50 - median(base, 'p50_ms'):8.3f} {p99 - median(base, 'p99_ms'):8.3f}")
            ratio = "" if name == "direct" else f"{cpu / nginx_cpu:11.2f}x"
            cpu_text = "" if name == "direct" else f"{cpu:10.1f}"
            cpus = [s.cpu_us for s in samples if s.cpu_us is not None]
            spread = f"{min(cpus):6.0f}-{max(cpus):<6.0f}" if cpus else ""
            print(f"{concurrency:>3} {name:<7} {median(samples, 'rps'):8.0f} {p50:8.2f} {p99:8.2f} "
                  f"{added:>17} {cpu_text:>10} {ratio:>12} {spread:>13}")
        over_nginx = median(results[("dsnode", concurrency)], "p50_ms") - median(results[("nginx", concurrency)],
                                                                                 "p50_ms")
        print(f"{'':>3} dsnode p50 - nginx p50 = {over_nginx:+.3f} ms")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Runs chat-bench against Parley and both reference servers, side by side in one run, and writes the
medians of several runs to bench/results/<date>.json. Usage: bench/run_all.py [--runs 3] [--quick]

Needs release builds (cargo build --release -p chat-server -p chat-bench -p raw-baseline), RabbitMQ on
127.0.0.1:5672, and `npm install` in bench/apollo.
"""

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
# A throwaway vhost: every run declares durable quorum queues under a fresh prefix, and hundreds of
# leftover quorum queues slow the broker down for whatever runs next.
VHOST = "parley-bench"
AMQP = os.environ.get("PARLEY_BENCH_AMQP_URL", f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, process):
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.args}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"not ready: {url}")


def start(kind, port):
    """Starts one server of `kind`; returns (processes, graphql urls, pids)."""
    log = open(f"/tmp/bench-{kind}-{port}.log", "w")
    url = f"http://127.0.0.1:{port}/graphql"
    if kind == "raw":
        procs = [subprocess.Popen([TARGET / "raw-baseline", "--listen", f"127.0.0.1:{port}"], stderr=log)]
        ready = f"http://127.0.0.1:{port}/readyz"
    elif kind == "apollo":
        env = dict(os.environ, PORT=str(port))
        procs = [subprocess.Popen(["node", "server.mjs"], cwd=ROOT / "bench" / "apollo", env=env, stdout=log, stderr=log)]
        ready = f"http://127.0.0.1:{port}/healthz"
    elif kind == "parley-inproc":
        procs = [subprocess.Popen([TARGET / "chat-server", "standalone", "--languages", "", "--listen", f"127.0.0.1:{port}",
                                   "--subscriber-buffer", "4096"], stderr=log, env=dict(os.environ, RUST_LOG="warn"))]
        ready = f"http://127.0.0.1:{port}/readyz"
    elif kind == "parley-rabbitmq":
        # As deployed: the gateway and the fanout are separate processes on one RabbitMQ.
        return start_gateways(1)
    else:
        raise ValueError(kind)
    wait_ready(ready, procs[0])
    return procs, [url], [p.pid for p in procs]


def start_gateways(count):
    """`count` gateway processes and one fanout sharing one RabbitMQ; the pids returned are the gateways'."""
    prefix = f"parley.bench.{uuid.uuid4().hex}"
    common = ["--languages", "", "--amqp-url", AMQP, "--topology-prefix", prefix, "--subscriber-buffer", "4096"]
    env = dict(os.environ, RUST_LOG="warn")
    procs, urls = [], []
    fanout_port = free_port()
    procs.append(subprocess.Popen([TARGET / "chat-server", "fanout", "--listen", f"127.0.0.1:{fanout_port}", *common], env=env,
                                  stderr=open("/tmp/bench-fanout.log", "w")))
    for _ in range(count):
        port = free_port()
        procs.append(subprocess.Popen([TARGET / "chat-server", "gateway", "--listen", f"127.0.0.1:{port}", *common], env=env,
                                      stderr=open(f"/tmp/bench-gateway-{port}.log", "w")))
        urls.append(f"http://127.0.0.1:{port}/graphql")
    for p, u in zip(procs[1:], urls):
        wait_ready(u.replace("/graphql", "/readyz"), p)
    wait_ready(f"http://127.0.0.1:{fanout_port}/readyz", procs[0])
    return procs, urls, [p.pid for p in procs[1:]]


def bench(urls, pids, subscribers, chats, rate, duration, extra=()):
    out = pathlib.Path(f"/tmp/bench-{uuid.uuid4().hex}.json")
    # Several source addresses for every run: TIME_WAIT from the previous run otherwise exhausts one
    # address's ports (19k subscribers on 127.0.0.1 alone connected only 13,770).
    cmd = [TARGET / "chat-bench", "--url", ",".join(urls), "--subscribers", str(subscribers), "--chats", str(chats),
           "--rate", str(rate), "--duration", str(duration), "--drain", "3", "--server-pid", ",".join(map(str, pids)),
           "--source-ips", "127.0.0.2-127.0.0.20", "--json", str(out), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    return json.loads(out.read_text())


def stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def median_of(results):
    def med(path):
        values = []
        for r in results:
            v = r
            for key in path:
                v = v[key]
            values.append(v)
        return statistics.median(values)
    return {
        "runs": len(results),
        "connected": med(["connected"]),
        "deliveries_per_sec": med(["deliveries_per_sec"]),
        "reach": med(["reach"]),
        "latency_ms": {k: med(["latency_ms", k]) for k in ("p50", "p95", "p99", "max")},
        "last_subscriber_ms_p99": med(["last_subscriber_ms_p99"]),
        "client_cpu_seconds": med(["client_cpu_seconds"]),
        "server_rss_bytes": med(["server_rss_bytes"]),
        "all": results,
    }


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def idle_memory(kind, subscribers):
    """Server RSS per idle subscription: RSS with `subscribers` connected and quiet, minus RSS before."""
    port = free_port()
    procs, urls, pids = start(kind, port)
    time.sleep(0.5)
    before = sum(rss(p) for p in pids)
    result = bench(urls, pids, subscribers, 10, 0.2, 1)
    stop(procs)
    return {"subscribers": subscribers, "rss_before": before, "rss_after": result["server_rss_bytes"],
            "bytes_per_subscription": (result["server_rss_bytes"] - before) / subscribers}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1k only")
    args = parser.parse_args()
    if "PARLEY_BENCH_AMQP_URL" not in os.environ:
        rabbitmqctl("delete_vhost", VHOST)
        rabbitmqctl("add_vhost", VHOST)
        rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    try:
        run(args)
    finally:
        if "PARLEY_BENCH_AMQP_URL" not in os.environ:
            rabbitmqctl("delete_vhost", VHOST)


def run(args):
    results = {"machine": {"cores": os.cpu_count()}, "method": {"runs": args.runs, "duration_s": args.duration, "drain_s": 3, "chats": 10}}
    scenarios = [(1000, 10), (1000, 100)] + ([] if args.quick else [(10000, 10), (10000, 100)])
    kinds = ["raw", "parley-inproc", "parley-rabbitmq", "apollo"]
    table = {}
    for subscribers, rate in scenarios:
        for kind in kinds:
            runs = []
            for _ in range(args.runs):
                port = free_port()
                procs, urls, pids = start(kind, port)
                try:
                    runs.append(bench(urls, pids, subscribers, 10, rate, args.duration))
                finally:
                    stop(procs)
            key = f"{kind} {subscribers}x{rate}"
            table[key] = median_of(runs)
            m = table[key]
            print(f"{key:32} {m['deliveries_per_sec']:>10.0f}/s reach {m['reach']:.4f} p50 {m['latency_ms']['p50']:.1f} "
                  f"p99 {m['latency_ms']['p99']:.1f} ms rss {m['server_rss_bytes']/2**20:.0f} MiB cpu {m['client_cpu_seconds']:.1f}s",
                  flush=True)
    if not args.quick:
        for kind in ["parley-inproc", "raw"]:
            runs = []
            for _ in range(args.runs):
                port = free_port()
                procs, urls, pids = start(kind, port)
                try:
                    runs.append(bench(urls, pids, 19000, 10, 10, args.duration))
                finally:
                    stop(procs)
            table[f"{kind} 19000x10"] = median_of(runs)
            m = table[f"{kind} 19000x10"]
            print(f"{kind} 19000x10: {m['connected']} connected {m['deliveries_per_sec']:.0f}/s reach {m['reach']:.4f} p99 {m['latency_ms']['p99']:.1f} ms", flush=True)
        runs = []
        for _ in range(args.runs):
            procs, urls, pids = start_gateways(3)
            try:
                runs.append(bench(urls, pids, 50000, 10, 10, args.duration))
            finally:
                stop(procs)
        table["parley-rabbitmq 3 gateways 50000x10"] = median_of(runs)
        m = table["parley-rabbitmq 3 gateways 50000x10"]
        print(f"3 gateways 50000x10: {m['connected']} connected {m['deliveries_per_sec']:.0f}/s reach {m['reach']:.4f} p99 {m['latency_ms']['p99']:.1f} ms", flush=True)
        results["idle"] = {kind: idle_memory(kind, 10000) for kind in ["parley-inproc", "raw", "apollo"]}
        print("idle:", json.dumps({k: round(v["bytes_per_subscription"]) for k, v in results["idle"].items()}), flush=True)
    results["scenarios"] = table
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

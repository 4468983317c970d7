#!/usr/bin/env python3
"""Runs the broadcast benchmarks of BENCHMARKS.md: chat-bench against Parley and the reference servers,
side by side in each round, and the translator benchmark; writes bench/results/<date>.json.

Usage: bench/run_all.py [--runs 3] [--quick]

Needs release builds (cargo build --release -p chat-server -p chat-bench -p raw-baseline -p translate-bench),
RabbitMQ on 127.0.0.1:5672, `npm ci` in bench/apollo, and apertium-apy with apertium-eng-spa.
Then bench/report.py bench/results/<date>.json prints the tables and draws the latency-vs-load plot.
"""

import argparse
import contextlib
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
SOURCE_IPS = "127.0.0.2-127.0.0.20"
# Subscribers of an independent probe process (one thread each, blocking reads) in every measured row.
PROBE = 20


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def bench_vhost():
    """A fresh throwaway VHOST for what runs inside, deleted after (unless PARLEY_BENCH_AMQP_URL names a
    broker of its own)."""
    own = "PARLEY_BENCH_AMQP_URL" not in os.environ
    if own:
        rabbitmqctl("delete_vhost", VHOST)
        rabbitmqctl("add_vhost", VHOST)
        rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    try:
        yield
    finally:
        if own:
            rabbitmqctl("delete_vhost", VHOST)


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


def start(kind):
    """Starts one server of `kind`; returns (processes, graphql urls, pids whose RSS and CPU count)."""
    port = free_port()
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
        procs.append(subprocess.Popen([TARGET / "chat-server", "gateway", "--auth", "none", "--listen", f"127.0.0.1:{port}", *common], env=env,
                                      stderr=open(f"/tmp/bench-gateway-{port}.log", "w")))
        urls.append(f"http://127.0.0.1:{port}/graphql")
    for p, u in zip(procs[1:], urls):
        wait_ready(u.replace("/graphql", "/readyz"), p)
    wait_ready(f"http://127.0.0.1:{fanout_port}/readyz", procs[0])
    return procs, urls, [p.pid for p in procs[1:]]


def stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def chat_bench(urls, pids, subscribers, chats, rate, duration, extra=()):
    out = pathlib.Path(f"/tmp/bench-{uuid.uuid4().hex}.json")
    # Several source addresses for every run: TIME_WAIT from the previous run otherwise exhausts one
    # address's ports (19k subscribers on 127.0.0.1 alone connected only 13,770).
    cmd = [TARGET / "chat-bench", "--url", ",".join(urls), "--subscribers", str(subscribers), "--chats", str(chats),
           "--rate", str(rate), "--duration", str(duration), "--drain", "3", "--server-pid", ",".join(map(str, pids)),
           "--source-ips", SOURCE_IPS, "--json", str(out), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1200)
    return json.loads(out.read_text())


def on_fresh_server(kind, measure):
    procs, urls, pids = start(kind) if kind != "3 gateways" else start_gateways(3)
    try:
        return measure(urls, pids)
    finally:
        stop(procs)
        # Let TIME_WAIT and the broker settle between servers.
        time.sleep(2)


def med(rows, *path):
    values = []
    for r in rows:
        v = r
        for key in path:
            v = v[key]
        values.append(v)
    return statistics.median(values)


def summary(rows):
    """Medians of the rows of one scenario, with every single row kept."""
    m = {
        "runs": len(rows),
        "connected": med(rows, "connected"),
        "deliveries_per_sec": med(rows, "deliveries_per_sec"),
        "drained": med(rows, "drained"),
        "reach": med(rows, "reach"),
        "latency_ms": {k: med(rows, "latency_ms", k) for k in ("p50", "p95", "p99", "max")},
        "last_subscriber_ms_p99": med(rows, "last_subscriber_ms_p99"),
        "client_cpu_seconds": med(rows, "client_cpu_seconds"),
        "server_cpu_seconds": med(rows, "server_cpu_seconds"),
        "server_rss_bytes": med(rows, "server_rss_bytes"),
        "all": rows,
    }
    if all(r.get("send_ms") for r in rows):
        m["send_ms"] = {k: med(rows, "send_ms", k) for k in ("p50", "p99")}
    if all(r.get("probe") for r in rows):
        m["probe_latency_ms"] = {k: med(rows, "probe", "latency_ms", k) for k in ("p50", "p99")}
        m["probe_reach"] = med(rows, "probe", "reach")
    return m


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def idle_memory(kind, subscribers):
    """Server RSS per idle subscription: RSS with `subscribers` connected and quiet, minus RSS before."""
    procs, urls, pids = start(kind)
    try:
        time.sleep(0.5)
        before = sum(rss(p) for p in pids)
        result = chat_bench(urls, pids, subscribers, 10, 0.2, 1)
    finally:
        stop(procs)
    return {"subscribers": subscribers, "rss_before": before, "rss_after": result["server_rss_bytes"],
            "bytes_per_subscription": (result["server_rss_bytes"] - before) / subscribers}


def translate(mode, apy_url):
    cmd = [TARGET / "translate-bench", mode, "--chat-server", TARGET / "chat-server", "--amqp-url", AMQP]
    cmd += ["--messages", "3000"] if mode == "libretranslate" else ["--messages", "1000", "--provider-url", apy_url]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds of sending per measurement")
    parser.add_argument("--quick", action="store_true", help="one chat, no search, no 50k, no Apollo")
    parser.add_argument("--sections", default="main,apollo,big,idle,translate",
                        help="which parts to run, comma-separated: main, apollo, big, idle, translate")
    parser.add_argument("--merge", help="a results file to add these sections to (a run that stopped part way)")
    args = parser.parse_args()
    with bench_vhost():
        run(args)


def say(text):
    print(time.strftime("%H:%M:%S"), text, flush=True)


def save(results):
    """Writes what is measured so far: a failure late in a long run loses nothing before it."""
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return out


def run(args):
    results = {"machine": {"cores": os.cpu_count()},
               "method": {"runs": args.runs, "duration_s": args.duration, "drain_s": 3, "probe": PROBE}}
    if args.merge:
        results = json.loads(pathlib.Path(args.merge).read_text())
        partial = results.pop("partial", None)
        if partial and "fixed" not in results:
            results["fixed"] = {k: summary(v) for k, v in partial["fixed"].items()}
            results["sustained"] = {k: {"median": statistics.median(s["sustained_rate"] for s in v), "all": v}
                                    for k, v in partial["searches"].items()}
    sections = args.sections.split(",")
    if "main" in sections:
        main_scenarios(args, results)
    if args.quick:
        return
    if "apollo" in sections:
        # Apollo, for the latency-vs-load curve: it saturates far below these rates at 10k subscribers.
        apollo = {}
        for _ in range(args.runs):
            for rate in (0.5, 1, 2, 4):
                row = on_fresh_server("apollo", lambda urls, pids: chat_bench(urls, pids, 10000, 1, rate, args.duration))
                apollo.setdefault(str(rate), []).append(row)
                say(f"apollo 10000 x {rate}/s: reach {row['reach']:.4f} p99 {row['latency_ms']['p99']:.0f} ms")
        results["apollo"] = {rate: summary(rows) for rate, rows in apollo.items()}
        save(results)
    if "big" in sections:
        # 50,000 subscribers over three gateways: at 10 messages/s each (as in the earlier runs) and at 1.
        for rate in (10, 1):
            big = []
            for _ in range(args.runs):
                row = on_fresh_server("3 gateways", lambda urls, pids: chat_bench(urls, pids, 50000, 10, rate, args.duration))
                big.append(row)
                say(f"3 gateways 50000x{rate}: {row['connected']} connected reach {row['reach']:.4f} "
                    f"p99 {row['latency_ms']['p99']:.0f} ms")
            results.setdefault("fixed", {})[f"parley-rabbitmq 3 gateways 50000x{rate} 10 chats"] = summary(big)
            save(results)
    if "idle" in sections:
        results["idle"] = {kind: idle_memory(kind, 10000) for kind in ["parley-inproc", "raw", "apollo"]}
        say("idle: " + json.dumps({k: round(v["bytes_per_subscription"]) for k, v in results["idle"].items()}))
        save(results)
    if "translate" in sections:
        # Below the ephemeral range: APY binds every address, and the benchmark's client sockets (from
        # 127.0.0.2–20, many in TIME_WAIT) can hold any ephemeral port number on one of them.
        apy_port = 2738
        apy = subprocess.Popen(["apertium-apy", "-p", str(apy_port), "/usr/share/apertium/modes"],
                               stdout=open("/tmp/bench-apy.log", "w"), stderr=subprocess.STDOUT)
        try:
            wait_ready(f"http://127.0.0.1:{apy_port}/listPairs", apy)
            runs = {"libretranslate": [], "apertium": []}
            for _ in range(args.runs):
                for mode in runs:
                    runs[mode].append(translate(mode, f"http://127.0.0.1:{apy_port}"))
                    say(f"translate {mode}: {runs[mode][-1]['translations_per_sec']:.1f}/s")
        finally:
            apy.kill()
        results["translate"] = runs
    say(f"wrote {save(results)}")


def main_scenarios(args, results):
    """10,000 subscribers, each receiving 100 messages/s at the fixed rate; the search starts at a quarter."""
    layouts = [("1 chat", 1)] + ([] if args.quick else [("10 chats", 10)])
    kinds = ["raw", "parley-inproc", "parley-rabbitmq"]
    fixed = {}
    searches = {}
    for _ in range(args.runs):
        for layout, chats in layouts:
            for kind in kinds:
                key = f"{kind} 10000x100 {layout}"

                def measure(urls, pids):
                    row = chat_bench(urls, pids, 10000, chats, 100, args.duration, ["--probe", str(PROBE)])
                    found = None if args.quick else chat_bench(
                        urls, pids, 10000, chats, 25, max(3, args.duration - 1), ["--search", "--search-steps", "7"])
                    return row, found

                row, found = on_fresh_server(kind, measure)
                fixed.setdefault(key, []).append(row)
                if found:
                    searches.setdefault(key, []).append(found)
                l = row["latency_ms"]
                probe = row.get("probe") or {"latency_ms": {"p99": float("nan")}}
                say(f"{key:36} {row['deliveries_per_sec']:>9,.0f}/s reach {row['reach']:.4f} p50 {l['p50']:.0f} "
                    f"p99 {l['p99']:.0f} ms (probe p99 {probe['latency_ms']['p99']:.0f}) "
                    f"sustained {found['sustained_rate'] if found else '-'}/s per chat")
                save(results | {"partial": {"fixed": fixed, "searches": searches}})
    # Beside whatever other rows an earlier run (`--merge`) measured.
    results["fixed"] = results.get("fixed", {}) | {k: summary(v) for k, v in fixed.items()}
    results["sustained"] = {k: {"median": statistics.median(s["sustained_rate"] for s in v), "all": v}
                            for k, v in searches.items()}
    save(results)


if __name__ == "__main__":
    sys.exit(main())

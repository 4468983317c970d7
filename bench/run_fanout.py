#!/usr/bin/env python3
"""What keeping history costs the fanout: runs fanout-bench with history off (the fanout's memory store)
and on (PostgreSQL), side by side, several times, and prints the medians as Markdown rows.

Usage: bench/run_fanout.py [--runs 3] [--originals 20000] [--rate 500] [--duration 10]
Needs release builds (cargo build --release -p chat-server -p fanout-bench), RabbitMQ on 127.0.0.1:5672 and
PostgreSQL on 127.0.0.1:5432 (PARLEY_BENCH_POSTGRES_URL overrides the admin URL). Every "on" run gets a
fresh database, dropped afterwards. Results go to bench/results/<date>-fanout.json.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
VHOST = "parley-bench-fanout"
AMQP = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
ADMIN = os.environ.get("PARLEY_BENCH_POSTGRES_URL", "postgres://postgres:postgres@127.0.0.1:5432/postgres")


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def psql(sql):
    subprocess.run(["psql", ADMIN, "-qc", sql], check=True, stdout=subprocess.DEVNULL)


def one(mode, history, args):
    database = None
    cmd = [TARGET / "fanout-bench", mode, "--chat-server", TARGET / "chat-server", "--amqp-url", AMQP,
           "--originals", str(args.originals), "--rate", str(args.rate), "--duration", str(args.duration),
           "--languages", "2"]
    if history:
        database = f"parley_bench_{uuid.uuid4().hex}"
        psql(f"CREATE DATABASE {database}")
        cmd += ["--history-url", ADMIN.rsplit("/", 1)[0] + "/" + database]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
        return json.loads(out)
    finally:
        if database:
            psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--originals", type=int, default=20000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    rabbitmqctl("delete_vhost", VHOST)
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    runs = {(mode, history): [] for mode in ("throughput", "latency") for history in (False, True)}
    try:
        for _ in range(args.runs):
            # Off and on alternate within each round, so that both see the same machine.
            for (mode, history) in runs:
                result = one(mode, history, args)
                runs[(mode, history)].append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    finally:
        rabbitmqctl("delete_vhost", VHOST)

    med = lambda values: statistics.median(values)
    summary = {}
    for history in (False, True):
        t = runs[("throughput", history)]
        lat = runs[("latency", history)]
        summary["on" if history else "off"] = {
            "originals_per_sec": med([r["originals_per_sec"] for r in t]),
            "deliveries_per_sec": med([r["deliveries_per_sec"] for r in t]),
            "latency_ms": {q: med([r["latency_ms"][q] for r in lat]) for q in ("p50", "p95", "p99", "max")},
        }
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-fanout.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary,
                               "runs": {f"{m} {'on' if h else 'off'}": r for (m, h), r in runs.items()}}, indent=1) + "\n")
    print("| history | originals/s | deliveries/s | p50 ms | p95 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    for key in ("off", "on"):
        s = summary[key]
        l = s["latency_ms"]
        print(f"| {key} | {s['originals_per_sec']:,.0f} | {s['deliveries_per_sec']:,.0f} | {l['p50']:.1f} | {l['p95']:.1f} | "
              f"{l['p99']:.1f} | {l['max']:.1f} |")
    off, on = summary["off"]["latency_ms"], summary["on"]["latency_ms"]
    print(f"history adds p50 {on['p50'] - off['p50']:+.1f} ms, p99 {on['p99'] - off['p99']:+.1f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

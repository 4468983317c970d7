#!/usr/bin/env python3
"""Where the CPU goes: starts one server, runs chat-bench at each given rate, and prints, per run, what
chat-bench measured beside the CPU seconds each process used (the gateway or standalone server, the
fanout, the RabbitMQ broker). For `parley-rabbitmq` it also prints the gateway's broker path: the
histogram `parley_delivered_latency_seconds`, from a message's `sentAt` (stamped by the gateway that
took the mutation) to its dispatch by the hub, summed over the runs.

Usage: bench/cpu_split.py KIND CHATS RATES [SUBSCRIBERS]
  KIND: raw | parley-inproc | parley-rabbitmq;  RATES: messages/s per chat, comma-separated
  (e.g. `bench/cpu_split.py parley-rabbitmq 10 100,100,100`: three runs on one server).

Needs what bench/run_all.py needs (release builds, RabbitMQ on 127.0.0.1:5672).
"""

import os
import subprocess
import sys
import time
import urllib.request

import run_all as bench


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid():
    found = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def broker_path(metrics):
    """Cumulative shares of the delivered-latency buckets, as `≤bound: share` pairs."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith("parley_delivered_latency_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((bound, float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    return total, [(bound, count / total) for bound, count in buckets if total and bound != "+Inf"]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    kind, chats, rates = sys.argv[1], int(sys.argv[2]), [float(r) for r in sys.argv[3].split(",")]
    subscribers = int(sys.argv[4]) if len(sys.argv) > 4 else 10000
    with bench.bench_vhost():
        measure(kind, chats, rates, subscribers)


def measure(kind, chats, rates, subscribers):
    procs, urls, pids = bench.start(kind)
    # start() puts the fanout first for parley-rabbitmq; the server's own pids are the ones it counts.
    named = {"server": pids[0]}
    if kind == "parley-rabbitmq":
        named["fanout"] = procs[0].pid
    broker = broker_pid()
    if broker:
        named["broker"] = broker
    try:
        for rate in rates:
            before = {name: cpu_seconds(pid) for name, pid in named.items()}
            row = bench.chat_bench(urls, pids, subscribers, chats, rate, 5)
            used = {name: cpu_seconds(pid) - before[name] for name, pid in named.items()}
            latency = row["latency_ms"]
            print(f"{kind} {subscribers}x{rate:g} {chats} chat(s): reach {row['reach']:.4f}, "
                  f"{row['deliveries_per_sec']:,.0f} deliveries/s in the window, p50 {latency['p50']:.0f} "
                  f"p99 {latency['p99']:.0f} ms; CPU s: client {row['client_cpu_seconds']:.1f} "
                  + " ".join(f"{name} {seconds:.1f}" for name, seconds in used.items()), flush=True)
            time.sleep(1)
        if kind == "parley-rabbitmq":
            metrics = urllib.request.urlopen(urls[0].replace("/graphql", "/metrics")).read().decode()
            total, shares = broker_path(metrics)
            # Up to the first bucket that holds every delivery.
            upto = next((i for i, (_, share) in enumerate(shares) if share >= 1.0), len(shares) - 1)
            print(f"broker path (sentAt to the hub), {total:.0f} deliveries: "
                  + ", ".join(f"≤{bound} s {share:.0%}" for bound, share in shares[: upto + 1]))
    finally:
        bench.stop(procs)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Turns bench/run_all.py's results JSON into the Markdown tables of BENCHMARKS.md. Usage: report.py RESULTS.json"""

import json
import sys


def row(name, m):
    l = m["latency_ms"]
    return (f"| {name} | {m['connected']:.0f} | {m['deliveries_per_sec']:,.0f} | {m['reach']:.4f} | {l['p50']:.1f} | {l['p95']:.1f} | "
            f"{l['p99']:.1f} | {l['max']:.0f} | {m['last_subscriber_ms_p99']:.1f} | {m['client_cpu_seconds']:.1f} | "
            f"{m['server_rss_bytes'] / 2**20:.0f} |")


def main():
    results = json.load(open(sys.argv[1]))
    s = results["scenarios"]
    print("| server · subscribers × msg/s per chat | connected | deliveries/s | reach | p50 ms | p95 ms | p99 ms | max ms "
          "| last-subscriber p99 ms | client CPU s | server RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m in s.items():
        print(row(name, m))
    print()
    print("Deliveries/s as ratios, with the p99 latencies (ms) of the two servers compared:")
    print()
    print("| scenario | Parley in-process ÷ Apollo | Parley in-process ÷ raw | Parley RabbitMQ ÷ Apollo | Parley RabbitMQ ÷ raw |")
    print("|---|---|---|---|---|")
    for scenario in sorted({k.split(" ", 1)[1] for k in s if k.startswith("apollo ")}):
        get = lambda kind: s.get(f"{kind} {scenario}")
        cells = []
        for kind in ("parley-inproc", "parley-rabbitmq"):
            for ref in ("apollo", "raw"):
                m, r = get(kind), get(ref)
                if not m or not r or not r["deliveries_per_sec"]:
                    cells.append("–")
                    continue
                cells.append(f"{m['deliveries_per_sec'] / r['deliveries_per_sec']:.2f}× "
                             f"(p99 {m['latency_ms']['p99']:,.0f} vs {r['latency_ms']['p99']:,.0f})")
        print(f"| {scenario} | {' | '.join(cells)} |")
    if "idle" in results:
        print()
        print("| server | RSS before | RSS with 10,000 idle subscriptions | per subscription |")
        print("|---|---|---|---|")
        for kind, m in results["idle"].items():
            print(f"| {kind} | {m['rss_before'] / 2**20:.0f} MiB | {m['rss_after'] / 2**20:.0f} MiB | {m['bytes_per_subscription'] / 1024:.1f} KiB |")


if __name__ == "__main__":
    main()

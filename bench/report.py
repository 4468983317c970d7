#!/usr/bin/env python3
"""Turns bench/run_all.py's results JSON into the Markdown tables of BENCHMARKS.md and draws the
latency-vs-load plot next to it. Usage: report.py RESULTS.json [PLOT.png]  (the plot needs matplotlib)"""

import json
import pathlib
import statistics
import sys


def fixed_row(name, m):
    l = m["latency_ms"]
    probe = m.get("probe_latency_ms")
    probe_cells = f"{probe['p50']:.0f} / {probe['p99']:.0f}" if probe else "–"
    return (f"| {name} | {m['connected']:,.0f} | {m['deliveries_per_sec']:,.0f} | {m['drained']:,.0f} | {m['reach']:.4f} | "
            f"{l['p50']:.0f} | {l['p95']:.0f} | {l['p99']:.0f} | {l['max']:.0f} | {probe_cells} | "
            f"{m['client_cpu_seconds']:.1f} | {m['server_cpu_seconds']:.1f} | {m['server_rss_bytes'] / 2**20:.0f} |")


def points(results, kind, layout="1 chat"):
    """(offered deliveries/s, p99 ms) of every measured step of `kind`, sorted by load."""
    found = []
    key = f"{kind} 10000x100 {layout}"
    for search in results.get("sustained", {}).get(key, {}).get("all", []):
        for step in search["steps"]:
            found.append((step["rate"] * 10000, step["latency_ms"]["p99"]))
    for row in results["fixed"].get(key, {}).get("all", []):
        found.append((100 * 10000, row["latency_ms"]["p99"]))
    if kind == "apollo":
        for rate, m in results.get("apollo", {}).items():
            for row in m["all"]:
                found.append((float(rate) * 10000, row["latency_ms"]["p99"]))
    return sorted(found)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, label, style in [("raw", "raw broadcast", "o-"), ("parley-inproc", "Parley in-process", "s-"),
                               ("parley-rabbitmq", "Parley on RabbitMQ", "^-"), ("apollo", "Apollo", "x-")]:
        pts = points(results, kind)
        if not pts:
            continue
        # The median p99 of each offered load, over the runs.
        loads = sorted({x for x, _ in pts})
        ys = [statistics.median(y for x, y in pts if x == load) for load in loads]
        ax.plot(loads, ys, style, label=label)
    ax.axhline(250, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered deliveries/s (10,000 subscribers in one chat)")
    ax.set_ylabel("p99 latency, ms")
    ax.set_title("Broadcast latency against load (2 cores: server, broker and client together)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    results = json.load(open(sys.argv[1]))
    f = results["fixed"]
    print("| server · subscribers × msg/s per subscriber · layout | connected | deliveries/s in window | drained after | reach "
          "| p50 ms | p95 ms | p99 ms | max ms | probe p50 / p99 ms | client CPU s | server CPU s | server RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m in f.items():
        print(fixed_row(name, m))
    for rate, m in results.get("apollo", {}).items():
        print(fixed_row(f"apollo 10000x{rate} 1 chat", m))
    print()
    sends = [(name, m["send_ms"]) for name, m in f.items() if m.get("send_ms")]
    if sends:
        print("| server · scenario | sendMessage round trip p50 ms | p99 ms |")
        print("|---|---|---|")
        for name, send in sends:
            print(f"| {name} | {send['p50']:.1f} | {send['p99']:.1f} |")
        print()
    if results.get("sustained"):
        print("| scenario | raw sustained (msg/s per chat) | Parley in-process | Parley on RabbitMQ | in-process ÷ raw | RabbitMQ ÷ raw "
              "| p99 in-process ÷ raw | p99 RabbitMQ ÷ raw |")
        print("|---|---|---|---|---|---|---|---|")
        s = results["sustained"]
        for layout in ("1 chat", "10 chats"):
            get = lambda kind: s.get(f"{kind} 10000x100 {layout}", {}).get("median")
            p99 = lambda kind: f.get(f"{kind} 10000x100 {layout}", {}).get("latency_ms", {}).get("p99")
            raw, inproc, rabbit = get("raw"), get("parley-inproc"), get("parley-rabbitmq")
            if None in (raw, inproc, rabbit):
                continue
            print(f"| 10000x100 {layout} | {raw:.1f} | {inproc:.1f} | {rabbit:.1f} | {inproc / raw:.2f} | {rabbit / raw:.2f} "
                  f"| {p99('parley-inproc') / p99('raw'):.2f} | {p99('parley-rabbitmq') / p99('raw'):.2f} |")
        print()
    if "idle" in results:
        print("| server | RSS before | RSS with 10,000 idle subscriptions | per subscription |")
        print("|---|---|---|---|")
        for kind, m in results["idle"].items():
            print(f"| {kind} | {m['rss_before'] / 2**20:.0f} MiB | {m['rss_after'] / 2**20:.0f} MiB | "
                  f"{m['bytes_per_subscription'] / 1024:.1f} KiB |")
        print()
    if "translate" in results:
        print("| translator against | translations/s (median) | runs | beside |")
        print("|---|---|---|---|")
        lt = results["translate"]["libretranslate"]
        ap = results["translate"]["apertium"]
        print(f"| LibreTranslate stand-in, 300 ms a call, default concurrency | "
              f"{statistics.median(r['translations_per_sec'] for r in lt):.1f} | "
              f"{', '.join(format(r['translations_per_sec'], '.0f') for r in lt)} | "
              f"{statistics.median(r['texts_per_call'] for r in lt):.1f} texts a call |")
        print(f"| Apertium APY (eng→spa) | {statistics.median(r['translations_per_sec'] for r in ap):.1f} | "
              f"{', '.join(format(r['translations_per_sec'], '.1f') for r in ap)} | APY itself "
              f"{statistics.median(r['apy_direct_per_sec'] for r in ap):.1f}/s to 16 concurrent requests: "
              f"{statistics.median(r['share_of_apy'] for r in ap):.0%} |")
    if len(sys.argv) > 2:
        plot(results, sys.argv[2])
        print(f"\nplot: {pathlib.Path(sys.argv[2])}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Medians of the loadtest JSON reports under DIR, one row per sub-directory (a rate or a
phase): the table docs/benchmarks.md quotes."""
import json
import statistics
import sys
from pathlib import Path


def row(reports):
    med = lambda f: statistics.median(f(r) for r in reports)
    late = lambda k: med(lambda r: r["lateness_ms"][k])
    rss = [r["server"]["peak_rss_bytes"] for r in reports if r.get("server")]
    cpu = [r["server"]["mean_cpu_pct"] for r in reports if r.get("server")]
    load = [r["load_avg"][0] for r in reports if r.get("load_avg") and r["load_avg"][0] is not None]
    return (
        f"{reports[0]['settings']['rate']:>7} {len(reports):>4} {med(lambda r: r['acked_rate']):>9.0f} "
        f"{late('p50'):>5} {late('p90'):>5} {late('p99'):>5} {late('p999'):>6} {late('max'):>5} "
        f"{med(lambda r: r['call_latency_us']['p99']) / 1000:>8.1f} "
        f"{sum(r['counts']['lost'] for r in reports):>5} {sum(r['counts']['early'] for r in reports):>5} "
        f"{(statistics.median(rss) / 2**20 if rss else 0):>7.0f} {(statistics.median(cpu) if cpu else 0):>5.0f} "
        f"{(statistics.median(load) if load else 0):>5.1f}"
    )


def main():
    out = Path(sys.argv[1])
    print(f"{'phase':<12} {'target':>7} {'runs':>4} {'acked/s':>9} {'p50':>5} {'p90':>5} {'p99':>5} "
          f"{'p99.9':>6} {'max':>5} {'call99ms':>8} {'lost':>5} {'early':>5} {'RSS MiB':>7} {'CPU%':>5} {'load':>5}")
    dirs = sorted((d for d in out.iterdir() if d.is_dir()),
                  key=lambda d: (len(d.name), d.name))
    for d in dirs:
        reports = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
        if reports:
            print(f"{d.name:<12} {row(reports)}")
        for r in reports:
            b = r.get("backlog")
            if b:
                rss = (b["rss_after_bytes"] or 0) / 2**20
                print(f"{'':<12} backlog fill: {b['acked']} of {b['count']} stored in {b['secs']:.0f} s "
                      f"({b['rate']:.0f}/s), {b['failed']} failed, node RSS after fill {rss:.0f} MiB")
    print("lateness in ms (median of runs), lost/early summed over runs, RSS = node peak, "
          "CPU = node mean % of one core, load = machine 1-min load average at start")


if __name__ == "__main__":
    main()

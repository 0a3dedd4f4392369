#!/usr/bin/env python3
"""Per-token latency and jitter of partitions alone and two at once.

    bench/isolation.sh [options]          (fetches the model, builds the release binary)
    python3 bench/isolation.py --aivmm target/release/aivmm --model PATH [--cpus 0,1]
        [--reps 3] [-n 256] [--ctx-size 1024] [--cgroup] [--json OUT]

For guest RAM on anonymous memory and on 2 MiB hugepages (`--hugepages`,
reserved beforehand by tests/setup-hugepages.sh), each repetition runs, with
greedy sampling and --ignore-eos:

- alone: one partition, one vCPU pinned to the first CPU of --cpus;
- two at once: two partitions (two `aivmm run` processes started together),
  one vCPU each, pinned to the first and the second CPU.

Reported per configuration, as the median over repetitions (over both
partitions for "two at once"): per-token latency p50 and p99 (the time
between consecutive tokens on the guest's TSC, from `aivmm run --json`'s
token_latency), jitter = p99 - p50 (absolute and as a share of p50; target
< 5% on a dedicated core), the generation rate, and the rate ratio
two-at-once / alone. The machine's own floor is measured in the same run:
the same generation by the engine on the host (`aivmm generate --host`, one
thread pinned to the first CPU, no VM), and the partition's jitter is also
given as a ratio to it.

The two processes start together, but each boots and warms up on its own
(~2 s), so their generations overlap for most, not all, of the run; the
report prints how long each generation took for that reason. Partition
cgroups are off unless --cgroup (`aivmm run` moves the whole process into
one, which is not what a benchmark under a supervisor should do). Only the
Python standard library is needed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchlib import log, parse_cpus

PROMPT = "Write a detailed account of a single night in the life of a lighthouse keeper during a winter storm:"


def command(args, cpu, hugepages):
    argv = [
        args.aivmm, "run", "--model", args.model, "--cpus", str(cpu), "--prompt", PROMPT,
        "--temp", "0", "-n", str(args.n), "--ignore-eos", "--json", "--ctx-size", str(args.ctx_size),
    ]
    if hugepages:
        argv.append("--hugepages")
    if not args.cgroup:
        argv.append("--no-cgroup")
    return argv


def host_command(args):
    """The same generation by the engine on the host, in this process's
    thread: the machine's own per-token jitter, the floor a partition is
    judged against."""
    return [
        args.aivmm, "generate", "--host", "--threads", "1", "--model", args.model, "--prompt", PROMPT,
        "--temp", "0", "-n", str(args.n), "--ignore-eos", "--json", "--ctx-size", str(args.ctx_size),
    ]


def run_host(args, cpu):
    """Runs host_command pinned to `cpu`; returns a report shaped like a
    partition's (token_latency from the gaps between tokens)."""
    proc = subprocess.run(
        host_command(args), capture_output=True, text=True, preexec_fn=lambda: os.sched_setaffinity(0, {cpu})
    )
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(host_command(args))} failed:\n{proc.stderr}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    times = report["token_ms"]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))

    def pct(q):
        return gaps[min(len(gaps) - 1, int(q * len(gaps)))]

    report["token_latency"] = {
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "max_ms": gaps[-1],
        "jitter_ms": pct(0.99) - pct(0.5),
    }
    return report


def run_together(argvs):
    """Starts every command at once; returns their JSON reports."""
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    reports = []
    for argv, proc in zip(argvs, procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"bench: {' '.join(argv)} failed:\n{err}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def summary(reports):
    lat = [r["token_latency"] for r in reports]
    p50 = statistics.median(l["p50_ms"] for l in lat)
    p99 = statistics.median(l["p99_ms"] for l in lat)
    jitter = statistics.median(l["jitter_ms"] for l in lat)
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": max(l["max_ms"] for l in lat),
        "jitter_ms": jitter,
        "jitter_pct_of_p50": 100.0 * jitter / p50 if p50 else 0.0,
        "gen_tok_s": statistics.median(r["gen_tok_s"] for r in reports),
        "gen_ms": statistics.median(r["gen_ms"] for r in reports),
        "samples": len(reports),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aivmm", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cpus", default="0,1")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("-n", type=int, default=256)
    parser.add_argument("--ctx-size", type=int, default=1024)
    parser.add_argument("--no-hugepages", action="store_true", help="skip the hugepage runs")
    parser.add_argument("--cgroup", action="store_true", help="let aivmm run create its cgroup")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    cpus = parse_cpus(args.cpus)
    if len(cpus) < 2:
        sys.exit("bench: --cpus needs two CPUs (one per partition)")
    allowed = os.sched_getaffinity(0)
    if not set(cpus[:2]) <= allowed:
        sys.exit(f"bench: CPUs {cpus[:2]} are not all allowed for this process ({sorted(allowed)})")

    results = {}
    host = []
    for rep in range(args.reps):
        log(f"host engine on CPU {cpus[0]}: repetition {rep + 1}/{args.reps}")
        host.append(run_host(args, cpus[0]))
    host_summary = summary(host)
    for hugepages in [False] + ([] if args.no_hugepages else [True]):
        backing = "hugepages" if hugepages else "anonymous"
        alone, together = [], []
        for rep in range(args.reps):
            log(f"{backing}: repetition {rep + 1}/{args.reps}: alone")
            alone += run_together([command(args, cpus[0], hugepages)])
            log(f"{backing}: repetition {rep + 1}/{args.reps}: two at once")
            together += run_together([command(args, cpus[0], hugepages), command(args, cpus[1], hugepages)])
        a, t = summary(alone), summary(together)
        results[backing] = {
            "alone": a,
            "two_at_once": t,
            "rate_ratio_two_over_alone": t["gen_tok_s"] / a["gen_tok_s"] if a["gen_tok_s"] else 0.0,
            "jitter_ratio_alone_over_host": a["jitter_ms"] / host_summary["jitter_ms"]
            if host_summary["jitter_ms"]
            else 0.0,
        }

    print(f"model {os.path.basename(args.model)}, {args.n} tokens, greedy, 1 vCPU per partition, CPUs {cpus[:2]}, "
          f"median of {args.reps} repetitions")
    print(f"{'backing':<10} {'run':<12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'jitter ms':>10} {'jitter %':>9} "
          f"{'tok/s':>7} {'gen s':>6}")
    s = host_summary
    print(f"{'host':<10} {'no VM':<12} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {s['max_ms']:8.3f} "
          f"{s['jitter_ms']:10.3f} {s['jitter_pct_of_p50']:8.1f}% {s['gen_tok_s']:7.1f} {s['gen_ms'] / 1e3:6.2f}")
    for backing, r in results.items():
        for name in ("alone", "two_at_once"):
            s = r[name]
            print(f"{backing:<10} {name:<12} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {s['max_ms']:8.3f} "
                  f"{s['jitter_ms']:10.3f} {s['jitter_pct_of_p50']:8.1f}% {s['gen_tok_s']:7.1f} {s['gen_ms'] / 1e3:6.2f}")
        print(f"{backing:<10} rate ratio two at once / alone: {r['rate_ratio_two_over_alone']:.3f}; "
              f"jitter alone / the host engine's on the same core: {r['jitter_ratio_alone_over_host']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "cpus": cpus[:2], "reps": args.reps, "host": host_summary, "results": results},
                      f, indent=2)


if __name__ == "__main__":
    main()

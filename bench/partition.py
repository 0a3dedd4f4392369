#!/usr/bin/env python3
"""The engine inside a partition against the same engine on the host, in one run.

    bench/partition.sh [options]           (fetches the model, builds the release binary)
    python3 bench/partition.py --aivmm target/release/aivmm --model PATH [--cpus 0,1] [--reps 3]
        [--n1 16] [--n2 128] [--ctx-size 0] [--hugepages] [--json OUT]

Each repetition runs, on the same host CPUs, with the same model and prompt
and greedy sampling, one request each way (alternating, so that drift in the
machine's load hits both alike):

- in a partition: `aivmm run --cpus C --prompt P --temp 0 -n N2 --ignore-eos --json`
  (one vCPU per CPU, vCPU threads pinned), a fresh partition per repetition;
- on the host: `aivmm generate --host --threads len(C) ... --json`, the process
  pinned to the same CPUs.

Printed, as the median over the repetitions:
- partition start: VMM set-up and guest boot to READY, without the warm-up
  (target < 50 ms), and the warm-up (touching the working memory and the
  model window; ~11 us per 4 KiB page under nested KVM), and the host's own
  preparation before the partition starts (mapping and sizing the model);
- time to first token (guest clock, from the tokenized request);
- generation tok/s = (N2 - N1) / (t(N2) - t(N1)), t(N) being the time at which
  the N-th token was produced (guest TSC in the partition, host clock on the
  host), so that start-up and prompt costs cancel; the ratio partition / host
  (target >= 0.95);
- exits per generated token in the partition (target <= 1).

Only the Python standard library is needed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchlib import log, parse_cpus

PROMPT = (
    "The history of the lighthouse begins in the ancient world, when fires were lit on hilltops to guide "
    "ships into harbour. The most famous of these early lights stood at Alexandria, on the island of Pharos, "
    "and its name became the word for lighthouse in several languages. Over the centuries the towers grew "
    "taller and the lamps brighter: wood gave way to coal, coal to oil, and oil to electricity. Lenses "
    "designed by Augustin Fresnel in the nineteenth century gathered the light into a narrow beam that could "
    "be seen far out at sea, and every lighthouse was given its own pattern of flashes so that sailors could "
    "tell them apart at night. Write a detailed account of a single night in the life of a lighthouse keeper "
    "during a winter storm:"
)


def run_json(argv, cpus):
    """Runs an aivmm command pinned to `cpus` and returns its JSON report."""
    done = subprocess.run(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gen_rate(report, n1, n2):
    """(N2 - N1) / (t(N2) - t(N1)) from the token timestamps, in tokens/s."""
    token_ms = report["token_ms"]
    if len(token_ms) < n2:
        sys.exit(f"bench: only {len(token_ms)} tokens were generated, {n2} needed")
    elapsed = token_ms[n2 - 1] - token_ms[n1 - 1]
    return (n2 - n1) * 1e3 / elapsed if elapsed > 0 else float("nan")


def median(values):
    return statistics.median(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aivmm", required=True, help="the aivmm binary")
    parser.add_argument("--model", required=True, help="GGUF model file")
    parser.add_argument("--cpus", help="host CPUs to use (default: all this process may use)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n1", type=int, default=16)
    parser.add_argument("--n2", type=int, default=128)
    parser.add_argument("--ctx-size", type=int, default=0, help="0: the default of aivmm run (4096)")
    parser.add_argument("--hugepages", action="store_true", help="back the partition's memory with hugepages")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()

    cpus = parse_cpus(args.cpus) if args.cpus else sorted(os.sched_getaffinity(0))
    cpu_list = ",".join(map(str, cpus))
    common = ["--model", args.model, "--prompt", PROMPT, "--temp", "0", "--max-tokens", str(args.n2),
              "--ignore-eos", "--json", "--ctx-size", str(args.ctx_size)]
    partition_argv = [args.aivmm, "run", "--cpus", cpu_list] + common
    if args.hugepages:
        partition_argv.append("--hugepages")
    host_argv = [args.aivmm, "generate", "--host", "--threads", str(len(cpus))] + common

    with open("/proc/loadavg") as f:
        log(f"load average before: {f.read().split()[:3]}")
    results = {"partition": [], "host": []}
    for rep in range(1, args.reps + 1):
        log(f"repetition {rep}/{args.reps}: partition on CPUs {cpu_list}")
        partition = run_json(partition_argv, cpus)
        log(f"repetition {rep}/{args.reps}: host engine on CPUs {cpu_list}")
        host = run_json(host_argv, cpus)
        if partition["tokens"] != host["tokens"]:
            at = next((i for i, (a, b) in enumerate(zip(partition["tokens"], host["tokens"])) if a != b), None)
            sys.exit(f"bench: the partition's tokens differ from the host engine's at token {at}")
        for side, report in (("partition", partition), ("host", host)):
            report["gen_rate"] = gen_rate(report, args.n1, args.n2)
            results[side].append(report)
    with open("/proc/loadavg") as f:
        log(f"load average after: {f.read().split()[:3]}")

    def med(side, key):
        return median([r[key] for r in results[side]])

    part_gen, host_gen = med("partition", "gen_rate"), med("host", "gen_rate")
    ratio = part_gen / host_gen if host_gen > 0 else float("nan")
    start, warmup = med("partition", "partition_start_ms"), med("partition", "warmup_ms")
    exits_per_token = med("partition", "exits_per_token")
    first = results["partition"][0]
    print(f"model {first['model']} ({first['arch']}), {len(cpus)} CPU(s) [{cpu_list}], {first['simd']}, "
          f"context {first['n_ctx']}, prompt {first['context_tokens']} tokens, "
          f"N1={args.n1} N2={args.n2}, median of {args.reps}")
    print(f"  partition start (VMM + boot to ready, no warm-up): {start:8.1f} ms   "
          f"[target < 50 ms: {'met' if start < 50 else 'NOT met'}]")
    print(f"    of which VMM set-up {med('partition', 'vmm_setup_ms'):.1f} ms, guest model load "
          f"{med('partition', 'guest_model_load_ms'):.1f} ms (GGUF parse "
          f"{med('partition', 'guest_model_parse_ms'):.1f} ms); host preparation before it "
          f"{med('partition', 'host_prepare_ms'):.1f} ms")
    print(f"  warm-up (memory and model window first touch):     {warmup:8.1f} ms   "
          f"({first['memory_bytes'] >> 20} MiB partition)")
    print(f"  time to first token:      partition {med('partition', 'ttft_ms'):8.1f} ms | "
          f"host {med('host', 'ttft_ms'):8.1f} ms")
    print(f"  prompt tok/s:             partition {med('partition', 'prompt_tok_s'):8.1f}    | "
          f"host {med('host', 'prompt_tok_s'):8.1f}")
    print(f"  generation tok/s:         partition {part_gen:8.2f}    | host {host_gen:8.2f}    | "
          f"ratio {ratio:.3f}   [target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}]")
    print(f"  exits per generated token: {exits_per_token:.3f} "
          f"({med('partition', 'exits'):.0f} exits for {args.n2} tokens)   "
          f"[target <= 1: {'met' if exits_per_token <= 1 else 'NOT met'}]")
    print("  per repetition, generation tok/s partition / host: "
          + ", ".join(f"{p['gen_rate']:.2f}/{h['gen_rate']:.2f}"
                      for p, h in zip(results["partition"], results["host"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": cpus, "n1": args.n1, "n2": args.n2, "results": results}, f)


if __name__ == "__main__":
    main()

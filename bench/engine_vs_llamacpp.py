#!/usr/bin/env python3
"""aivmm's engine against llama.cpp on the same model, prompt and thread count, in one run.

    bench/engine-vs-llamacpp.sh [options]          (ensures the venv, the models and the release build)
    ~/.cache/aivmm-ref/bin/python bench/engine_vs_llamacpp.py --aivmm target/release/aivmm \
        --model gemma=PATH --model tinyllama=PATH [--threads 1,2] [--reps 3] [--json OUT]

For every model and thread count, each repetition runs one request on each
side: a 128-token prompt, then greedy generation of N2 tokens (temperature 0).

- prompt tok/s = prompt tokens / time to process the prompt;
- generation tok/s = (N2 - N1) / (t(N2) - t(N1)), t(N) being the time at
  which the N-th generated token was produced (N1 = 16, N2 = 128), so start-up
  and prompt costs cancel;

and the table shows the median over the repetitions, the ratio ours /
llama.cpp, the machine's memory read bandwidth measured in the same run
(numpy streaming read of a 1 GiB array, with 1 thread and with each thread
count benchmarked) and the bandwidth bound on generation speed (weight bytes
read per token / bandwidth with that many threads).

llama.cpp runs through llama-cpp-python (llama_cpp.Llama) with flash attention
enabled (the llama.cpp CLI default on CPU). Our engine runs as
`aivmm generate --host --model M --prompt P --max-tokens N2 --threads T --temp 0 --json`
whose JSON has tokens, text, prompt_tokens, prompt_ms, ttft_ms, token_ms (ms
since the start of the request at which each token was produced) and gen_tokens.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError:
    sys.exit("engine_vs_llamacpp: llama_cpp is missing; run tests/reference/setup.sh and use "
             "~/.cache/aivmm-ref/bin/python (or bench/engine-vs-llamacpp.sh)")

try:
    import gguf
except ImportError:
    sys.exit("engine_vs_llamacpp: gguf is missing; run tests/reference/setup.sh")

# Prose long enough for a 128-token prompt with any of the tokenizers; the
# continuation must not hit end-of-generation before N2 tokens on llama.cpp
# (checked; other candidates are tried in order otherwise).
PROMPT_SOURCES = [
    "The history of the lighthouse begins in the ancient world, when fires were lit on hilltops to guide "
    "ships into harbour. The most famous of these early lights stood at Alexandria, on the island of Pharos, "
    "and its name became the word for lighthouse in several languages. Over the centuries the towers grew "
    "taller and the lamps brighter: wood gave way to coal, coal to oil, and oil to electricity. Lenses "
    "designed by Augustin Fresnel in the nineteenth century gathered the light into a narrow beam that could "
    "be seen far out at sea, and every lighthouse was given its own pattern of flashes so that sailors could "
    "tell them apart at night. Keepers lived in small houses at the foot of the towers, trimming wicks, "
    "polishing glass and writing the weather into their logbooks, until automation made the job unnecessary. "
    "Today most lights are run by computers, but the towers remain, and many of them have become museums. "
    "Write a detailed account of a single night in the life of a lighthouse keeper during a winter storm:",
    "Memory bandwidth, not arithmetic, limits how fast a small language model generates text on a CPU. Each "
    "new token requires reading every weight of the model once, so a model whose weights occupy two hundred "
    "and fifty megabytes, on a machine that can stream thirty gigabytes per second, cannot exceed about one "
    "hundred and twenty tokens per second no matter how clever the code is. Prompt processing is different: "
    "many tokens share each weight read, so it is limited by the matrix multiplication throughput instead. "
    "Explain, step by step and with numbers, how quantization changes both of these limits, and describe "
    "what an engine has to do to approach them on a machine with two cores and vector instructions that "
    "operate on five hundred and twelve bits at a time. Begin with the storage format of the weights:",
]

N_CTX = 512


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# Machine limits
# ---------------------------------------------------------------------------

def read_bandwidth_gbs(threads=1, size=1 << 30, reps=5):
    """Best of reps streaming reads of a size-byte array (max-reduction of float32), in GB/s.

    np.max is a SIMD reduction that is much faster than DRAM on cached data,
    so on a 1 GiB array it measures the memory read bandwidth. With threads >
    1, each thread reduces its own contiguous slice (numpy releases the GIL).
    """
    data = np.ones(size // 4, dtype=np.float32)
    slices = np.array_split(data, threads)
    best = float("inf")
    for _ in range(reps):
        if threads == 1:
            start = time.perf_counter()
            data.max()
            elapsed = time.perf_counter() - start
        else:
            workers = [threading.Thread(target=s.max) for s in slices]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - start
        best = min(best, elapsed)
    return size / best / 1e9


def weight_bytes_per_token(path):
    """Bytes of weights a generated token reads: every tensor except the token embedding table,
    which is read in full only when it is also the output projection (tied)."""
    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        total -= sizes.get("token_embd.weight", 0)
    return total


# ---------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------

def choose_prompt(llm, n_prompt, n_gen):
    """A prompt text that llama.cpp tokenizes to n_prompt tokens (BOS included) and whose greedy
    continuation has no end-of-generation token within n_gen tokens."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for source in PROMPT_SOURCES:
        ids = llm.tokenize(source.encode(), add_bos=True, special=True)
        if len(ids) < n_prompt:
            continue
        text = source
        # Trim words until the prompt is exactly n_prompt tokens (or just below).
        words = source.split(" ")
        while len(llm.tokenize(text.encode(), add_bos=True, special=True)) > n_prompt and len(words) > 1:
            words.pop()
            text = " ".join(words)
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        generated = greedy_llama(llm, ids, n_gen)[0]
        if not any(llama_cpp.llama_vocab_is_eog(vocab, t) for t in generated):
            return text, ids
    raise BenchError(f"no prompt candidate reaches {n_gen} tokens without an end-of-generation token")


def greedy_llama(llm, prompt_ids, n_gen):
    """(generated ids, prompt seconds, [seconds since start at which token i was produced]).

    The loop of llama.cpp's `simple` example through the C API (one decode of
    the whole prompt, then the greedy sampler and a one-token decode per
    token), so Python adds next to nothing per token. Does not stop at EOG.
    """
    ctx = llm.ctx
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    sampler = llama_cpp.llama_sampler_init_greedy()
    try:
        prompt = (llama_cpp.llama_token * len(prompt_ids))(*prompt_ids)
        one = (llama_cpp.llama_token * 1)()
        start = time.perf_counter()
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(prompt, len(prompt_ids))) != 0:
            raise BenchError("llama_decode failed on the prompt")
        prompt_s = time.perf_counter() - start
        tokens, stamps = [], []
        while True:
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
            tokens.append(token)
            stamps.append(time.perf_counter() - start)
            if len(tokens) == n_gen:
                break
            one[0] = token
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                raise BenchError("llama_decode failed during generation")
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return tokens, prompt_s, stamps


def run_llama(llm, prompt_ids, n_gen):
    tokens, prompt_s, stamps = greedy_llama(llm, prompt_ids, n_gen)
    return {"tokens": tokens, "prompt_tokens": len(prompt_ids), "prompt_ms": prompt_s * 1000.0,
            "token_ms": [s * 1000.0 for s in stamps]}


def run_ours(aivmm, model, prompt, n_gen, threads, ignore_eos):
    cmd = [aivmm, "generate", "--host", "--model", model, "--prompt", prompt, "--max-tokens", str(n_gen),
           "--threads", str(threads), "--temp", "0", "--json"]
    if ignore_eos:
        cmd.append("--ignore-eos")
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise BenchError(f"`{' '.join(cmd[:4])} ...` failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError as e:
        raise BenchError(f"aivmm --json printed something that is not JSON ({e}): {result.stdout[:500]!r}")
    missing = [k for k in ("tokens", "prompt_tokens", "prompt_ms", "token_ms", "gen_tokens") if k not in report]
    if missing:
        raise BenchError(f"aivmm --json output lacks {', '.join(missing)}")
    return report


def rates(run, n1, n2):
    """(prompt tok/s, generation tok/s from tokens n1..n2) of one run; None where unmeasurable."""
    prompt = run["prompt_tokens"] / (run["prompt_ms"] / 1000.0) if run["prompt_ms"] > 0 else None
    stamps = run["token_ms"]
    gen = None
    if len(stamps) >= n2 and stamps[n2 - 1] > stamps[n1 - 1]:
        gen = (n2 - n1) / ((stamps[n2 - 1] - stamps[n1 - 1]) / 1000.0)
    return prompt, gen


def first_divergence(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------

def bench_model(label, path, args, bandwidths, supports_ignore_eos):
    rows = []
    bytes_per_token = weight_bytes_per_token(path)
    for threads in args.threads:
        llm = Llama(model_path=path, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, n_batch=512,
                    flash_attn=True, seed=0, verbose=False)
        prompt, prompt_ids = choose_prompt(llm, args.prompt_tokens, args.n2)
        greedy_llama(llm, prompt_ids, 4)  # warm-up: page in the weights, allocate buffers
        ours_runs, llama_runs = [], []
        for rep in range(args.reps):
            log(f"{label}, {threads} thread(s), repetition {rep + 1}/{args.reps}")
            llama_runs.append(run_llama(llm, prompt_ids, args.n2))
            if args.aivmm:
                ours_runs.append(run_ours(args.aivmm, path, prompt, args.n2, threads, supports_ignore_eos))
        del llm
        if ours_runs and ours_runs[0]["prompt_tokens"] != len(prompt_ids):
            log(f"warning: {label}: our tokenizer made {ours_runs[0]['prompt_tokens']} prompt tokens, "
                f"llama.cpp {len(prompt_ids)}; the prompt rates are per each side's own count")
        if ours_runs and ours_runs[0]["gen_tokens"] < args.n2:
            log(f"warning: {label}: aivmm stopped after {ours_runs[0]['gen_tokens']} tokens (< {args.n2}); "
                "no generation rate for it")
        llama_rates = [rates(r, args.n1, args.n2) for r in llama_runs]
        ours_rates = [rates(r, args.n1, args.n2) for r in ours_runs]
        row = {
            "model": label, "model_file": os.path.basename(path), "threads": threads,
            "prompt_tokens": {"llama": len(prompt_ids), "ours": ours_runs[0]["prompt_tokens"] if ours_runs else None},
            "llama_prompt_tok_s": median_or_none([p for p, _ in llama_rates]),
            "llama_gen_tok_s": median_or_none([g for _, g in llama_rates]),
            "ours_prompt_tok_s": median_or_none([p for p, _ in ours_rates]),
            "ours_gen_tok_s": median_or_none([g for _, g in ours_rates]),
            "ours_gen_tokens": ours_runs[0]["gen_tokens"] if ours_runs else None,
            "bytes_per_token": bytes_per_token,
            "bandwidth_gbs": bandwidths[threads],
            "bound_tok_s": bandwidths[threads] * 1e9 / bytes_per_token,
            "first_divergence": first_divergence(llama_runs[0]["tokens"], ours_runs[0]["tokens"]) if ours_runs else None,
            "reps": args.reps,
        }
        rows.append(row)
    return rows


def ratio(ours, theirs):
    return f"{ours / theirs:.2f}" if ours and theirs else "-"


def fmt(x, digits=1):
    return f"{x:.{digits}f}" if x is not None else "-"


def print_table(rows, bandwidths, args):
    measured = ", ".join(f"{bw:.1f} GB/s ({t} thread{'s' if t > 1 else ''})" for t, bw in sorted(bandwidths.items()))
    print(f"\nmemory read bandwidth (1 GiB numpy read): {measured}; "
          f"generation rate over tokens {args.n1}..{args.n2}; median of {args.reps}")
    header = ["model", "thr", "pp llama", "pp ours", "ratio", "gen llama", "gen ours", "ratio",
              "MB/token", "bound", "llama %bound", "ours %bound", "same tokens"]
    lines = [header]
    for r in rows:
        bound = r["bound_tok_s"]
        div = r["first_divergence"]
        same = "-" if r["ours_gen_tok_s"] is None and div is None else ("all" if div is None else f"first {div}")
        lines.append([
            r["model"], str(r["threads"]),
            fmt(r["llama_prompt_tok_s"]), fmt(r["ours_prompt_tok_s"]), ratio(r["ours_prompt_tok_s"], r["llama_prompt_tok_s"]),
            fmt(r["llama_gen_tok_s"]), fmt(r["ours_gen_tok_s"]), ratio(r["ours_gen_tok_s"], r["llama_gen_tok_s"]),
            f"{r['bytes_per_token'] / 1e6:.0f}", fmt(bound),
            fmt(100 * r["llama_gen_tok_s"] / bound if r["llama_gen_tok_s"] else None, 0),
            fmt(100 * r["ours_gen_tok_s"] / bound if r["ours_gen_tok_s"] else None, 0),
            same,
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print("(pp = prompt processing tok/s; gen = generation tok/s; bound = bandwidth with that many threads / weight "
          "bytes read per token; same tokens = index of the first generated token where ours differs from llama.cpp)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aivmm", help="path of the aivmm binary (omit to run llama.cpp alone)")
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                        help="a model to compare on (repeatable)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per configuration (default 3)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--n1", type=int, default=16)
    parser.add_argument("--n2", type=int, default=128)
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",") if t]
    if not (0 < args.n1 < args.n2) or args.reps < 1 or not args.threads or min(args.threads) < 1:
        parser.error("need 0 < n1 < n2, reps >= 1 and thread counts >= 1")
    models = []
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or not os.path.isfile(path):
            parser.error(f"--model {spec}: expected LABEL=PATH of an existing file")
        models.append((label, path))

    from llama_cpp import _logger
    _logger.set_verbose(False)
    supports_ignore_eos = False
    if args.aivmm:
        help_text = subprocess.run([args.aivmm, "generate", "--help"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True).stdout
        supports_ignore_eos = "--ignore-eos" in help_text

    log("measuring memory read bandwidth (1 GiB)")
    bandwidths = {t: read_bandwidth_gbs(threads=t) for t in sorted(set([1] + args.threads))}
    rows = []
    try:
        for label, path in models:
            rows += bench_model(label, path, args, bandwidths, supports_ignore_eos)
    except BenchError as e:
        log(f"error: {e}")
        return 1
    print_table(rows, bandwidths, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_gbs": {str(t): bw for t, bw in bandwidths.items()}, "n1": args.n1, "n2": args.n2,
                       "llama_cpp_python": llama_cpp.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

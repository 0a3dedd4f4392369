#!/usr/bin/env python3
"""Runs llama.cpp on the test models and writes the expected outputs the tests compare against.

    ~/.cache/aivmm-ref/bin/python tests/reference/make_fixtures.py [MODEL ...] [--threads N] [--out-dir DIR]

Needs the reference environment (tests/reference/setup.sh: llama-cpp-python,
which compiles llama.cpp). For each model (Gemma 3 270M fetched with
images/fetch-model.sh, the committed tiny models, and the TinyLlama-shaped
Q4_K_M when gen_models.py --tinyllama made it) it writes into
tests/fixtures/reference/:

- greedy_<model>.json: fixed prompts, their token ids, greedy continuations
  (temperature 0, top_k 1, no repeat penalty) with the top-1/top-2 logit
  margin and runner-up of every step, and the logits at the last prompt
  position (the full vector for small vocabularies, the top 64 plus summary
  statistics for large ones).
- tokenizer_<model>.json: token ids for a list of tricky strings under
  several add_special/parse_special combinations, and their detokenization.

The field names are documented in tests/reference/README.md.
"""

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError:
    sys.exit("make_fixtures: llama_cpp is missing; run tests/reference/setup.sh and use ~/.cache/aivmm-ref/bin/python")

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE_MODELS_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "models")
FIXTURE_OUT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "reference")
CACHE_DIR = os.environ.get("AIVMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aivmm")

GREEDY_SCHEMA = "aivmm-reference-greedy/1"
TOKENIZER_SCHEMA = "aivmm-reference-tokenizer/1"

# The llama.cpp commit vendored by each llama-cpp-python release we have used
# (the compiled library does not report it).
LLAMA_CPP_COMMITS = {"0.3.36": "0c1e57098"}

FULL_LOGITS_MAX_VOCAB = 4096
TOP_LOGITS = 64
N_CTX = 512

PLAIN_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Here is a list of prime numbers: 2, 3, 5, 7,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Water boils at 100 degrees Celsius. At high altitude, the boiling point",
    "Translate to French: Good morning, how are you?",
]

GEMMA_CHAT_PROMPTS = [
    "<start_of_turn>user\nWhat is the largest planet in the solar system?<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nWrite a haiku about the ocean.<end_of_turn>\n<start_of_turn>model\n",
]

TINY_LLAMA_PROMPTS = [
    "The old lighthouse stood at the end of",
    "Ada counted the steps of the tower",
    "1, 2, 3, 10, 42,",
    "Hello world! What is the answer?",
    "The machine read the journal and",
    "你好 世界: café, naïve",
]

TINY_QWEN2_PROMPTS = [
    "The old lighthouse stood at the end of",
    "In the spring the village below the hill",
    "Her numbers were simple: 1, 2, 3,",
    "Hello world! What is the answer?",
    "<|im_start|>user\nWho kept the journal?<|im_end|>\n<|im_start|>assistant\n",
]

TOKENIZER_STRINGS = [
    "",
    "Hello world",
    " Hello world",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    spaces   inside",
    "   ",
    "tabs\tand\t\ttabs",
    "new\nline\n\nand\r\ncrlf",
    "\n\n\n",
    " \n \t  \n",
    "digits 0123456789",
    "a long number 31415926535897932384626433832795028841971",
    "year 2026, price $1,234.56, 3.14e-10",
    "Punctuation: (a), [b], {c}; 'single' \"double\" -- em\u2014dash\u2026 !?",
    "emoji \U0001F600 \U0001F44D\U0001F3FD",
    "ZWJ family \U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466 and flag \U0001F1EB\U0001F1F7",
    "CJK: \u4f60\u597d\uff0c\u4e16\u754c\u3002\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "Korean \uc548\ub155\ud558\uc138\uc694",
    "accented: caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c6r\u00f8sk\u00f8bing \u00fcber",
    "mixed: English, \u0440\u0443\u0441\u0441\u043a\u0438\u0439, \u0627\u0644\u0639\u0631\u0628\u064a\u0629, "
    "\u05e2\u05d1\u05e8\u05d9\u05ea, \u0939\u093f\u0928\u094d\u0926\u0940",
    "non-breaking\u00a0space and zero\u200bwidth",
    "\u2581literal lower one eighth block",
    "<0x41> looks like a byte token",
    "code: def f(x):\n    return x**2  # square\n",
    "URL https://example.com/path?q=1&r=2#frag",
    "antidisestablishmentarianism",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "a",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "hello<start_of_turn>world<end_of_turn>",
    "<s>bos and eos in text</s>",
    "<unk> <pad> <mask>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n",
    "<|endoftext|>",
    "<bos><eos>",
]

TOKENIZER_FLAGS = [(True, True), (True, False), (False, True), (False, False)]


class FixtureError(Exception):
    pass


def log(msg):
    print(f"make_fixtures: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Which models
# ---------------------------------------------------------------------------

def fetch_gemma():
    script = os.path.join(REPO_ROOT, "images", "fetch-model.sh")
    result = subprocess.run([script], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise FixtureError(f"{script} failed (exit {result.returncode})")
    return result.stdout.strip()


def model_table():
    """name -> (path resolver, prompts, max_tokens, tokenizer fixture name or None, required).

    Models that share a vocabulary (the tiny-llama quantizations) get one
    tokenizer fixture, made from the first of them."""
    fixture = lambda file_name: lambda: os.path.join(FIXTURE_MODELS_DIR, file_name)
    cached = lambda file_name: lambda: os.path.join(CACHE_DIR, "models", file_name)
    return {
        "gemma3-270m-q4_k_m": (fetch_gemma, PLAIN_PROMPTS + GEMMA_CHAT_PROMPTS, 64, "gemma3", True),
        "tiny-llama-f16": (fixture("tiny-llama-f16.gguf"), TINY_LLAMA_PROMPTS, 32, "tiny-llama", True),
        "tiny-llama-q8_0": (fixture("tiny-llama-q8_0.gguf"), TINY_LLAMA_PROMPTS, 32, None, True),
        "tiny-llama-q4_k_m": (fixture("tiny-llama-q4_k_m.gguf"), TINY_LLAMA_PROMPTS, 32, None, True),
        "tiny-qwen2-f16": (fixture("tiny-qwen2-f16.gguf"), TINY_QWEN2_PROMPTS, 32, "tiny-qwen2", True),
        "tinyllama-shaped-q4_k_m": (cached("tinyllama-shaped-q4_k_m.gguf"), PLAIN_PROMPTS[:5], 32,
                                    "tinyllama-shaped", False),
        "tinyllama-shaped-q8_0": (cached("tinyllama-shaped-q8_0.gguf"), PLAIN_PROMPTS[:5], 32, None, False),
    }


# ---------------------------------------------------------------------------
# llama.cpp helpers
# ---------------------------------------------------------------------------

def quiet_llama_cpp():
    from llama_cpp import _logger
    _logger.set_verbose(False)


def open_model(path, threads):
    # flash_attn=True matches the llama.cpp CLI default on CPU ("auto" resolves to enabled).
    return Llama(model_path=path, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, seed=0,
                 flash_attn=True, verbose=False)


def vocab_of(llm):
    return llama_cpp.llama_model_get_vocab(llm.model)


def tokenize(llm, text, add_special, parse_special):
    data = text.encode("utf-8")
    capacity = len(data) + 16
    buf = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(vocab_of(llm), data, len(data), buf, capacity, add_special, parse_special)
    if n < 0:
        capacity = -n
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(vocab_of(llm), data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            raise FixtureError(f"llama_tokenize failed on {text!r}")
    return list(buf[:n])


def detokenize(llm, ids, unparse_special):
    """llama_detokenize(remove_special=False, unparse_special) as bytes."""
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    capacity = 64 + 32 * len(ids)
    buf = ctypes.create_string_buffer(capacity)
    n = llama_cpp.llama_detokenize(vocab_of(llm), arr, len(ids), buf, capacity, False, unparse_special)
    if n < 0:
        capacity = -n
        buf = ctypes.create_string_buffer(capacity)
        n = llama_cpp.llama_detokenize(vocab_of(llm), arr, len(ids), buf, capacity, False, unparse_special)
        if n < 0:
            raise FixtureError(f"llama_detokenize failed on {ids}")
    return buf.raw[:n]


def text_fields(prefix, data):
    """{prefix: str} for valid UTF-8, else {prefix: None, prefix_hex: hex}."""
    try:
        return {prefix: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {prefix: None, prefix + "_hex": data.hex()}


def last_logits(llm):
    n_vocab = llm.n_vocab()
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()


def is_eog(llm, token):
    return bool(llama_cpp.llama_vocab_is_eog(vocab_of(llm), token))


def f32(x):
    """A float32 value as the shortest decimal that round-trips to the same float32."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def logits_stats(logits):
    return {"count": int(logits.size), "min": f32(logits.min()), "max": f32(logits.max()),
            "mean": f32(logits.astype(np.float64).mean()), "std": f32(logits.astype(np.float64).std())}


def top_pairs(logits, k):
    order = np.argsort(-logits, kind="stable")[:k]
    return [[int(i), f32(logits[i])] for i in order]


# ---------------------------------------------------------------------------
# Greedy fixture
# ---------------------------------------------------------------------------

def greedy_case(llm, prompt, max_tokens):
    prompt_ids = tokenize(llm, prompt, True, True)
    llm.reset()
    llm.eval(prompt_ids)
    prompt_logits = last_logits(llm)
    logits = prompt_logits
    tokens, margins, runner_ups = [], [], []
    stop_reason = "max_tokens"
    for step in range(max_tokens):
        top2 = np.argsort(-logits, kind="stable")[:2]
        token = int(top2[0])
        tokens.append(token)
        margins.append(f32(logits[top2[0]] - logits[top2[1]]))
        runner_ups.append(int(top2[1]))
        if is_eog(llm, token):
            stop_reason = "eog"
            break
        if step + 1 < max_tokens:
            llm.eval([token])
            logits = last_logits(llm)

    # Cross-check against llama.cpp's own sampler chain (greedy with these settings).
    sampled = []
    llm.reset()
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        sampled.append(token)
        if len(sampled) == len(tokens) or is_eog(llm, token):
            break
    if sampled != tokens:
        raise FixtureError(f"argmax loop and llama.cpp's greedy sampler disagree on {prompt!r}: {tokens} vs {sampled}")

    case = {"prompt": prompt, "prompt_ids": prompt_ids, "tokens": tokens,
            **text_fields("text", detokenize(llm, tokens, False)),
            "stop_reason": stop_reason, "margins": margins, "runner_up_ids": runner_ups,
            "min_margin": min(margins)}
    if prompt_logits.size <= FULL_LOGITS_MAX_VOCAB:
        case["logits"] = [f32(x) for x in prompt_logits]
    else:
        case["top_logits"] = top_pairs(prompt_logits, TOP_LOGITS)
    case["logits_stats"] = logits_stats(prompt_logits)
    return case


def provenance(model_name, path, threads):
    version = llama_cpp.__version__
    return {
        "model": model_name,
        "model_file": os.path.basename(path),
        "model_sha256": sha256_of(path),
        "model_size": os.path.getsize(path),
        "generator": {
            "script": "tests/reference/make_fixtures.py",
            "llama_cpp_python": version,
            "llama_cpp_commit": LLAMA_CPP_COMMITS.get(version),
            "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        },
        "n_threads": threads,
    }


def greedy_fixture(model_name, path, prompts, max_tokens, threads):
    llm = open_model(path, threads)
    cases = []
    for prompt in prompts:
        log(f"{model_name}: greedy {prompt[:40]!r}")
        cases.append(greedy_case(llm, prompt, max_tokens))
    n_vocab = llm.n_vocab()
    return {
        "schema": GREEDY_SCHEMA,
        **provenance(model_name, path, threads),
        "n_ctx": N_CTX,
        "n_vocab": n_vocab,
        "flash_attn": True,
        "kv_cache_type": "f16",
        "sampling": {"temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0},
        "max_tokens": max_tokens,
        "logits_format": "full" if n_vocab <= FULL_LOGITS_MAX_VOCAB else f"top{TOP_LOGITS}",
        "min_margin": min(c["min_margin"] for c in cases),
        "cases": cases,
    }


# ---------------------------------------------------------------------------
# Tokenizer fixture
# ---------------------------------------------------------------------------

def tokenizer_fixture(model_name, path, threads):
    llm = open_model(path, threads)
    vocab = vocab_of(llm)
    cases = []
    for text in TOKENIZER_STRINGS:
        for add_special, parse_special in TOKENIZER_FLAGS:
            ids = tokenize(llm, text, add_special, parse_special)
            cases.append({"text": text, "add_special": add_special, "parse_special": parse_special, "ids": ids,
                          **text_fields("detokenized", detokenize(llm, ids, False)),
                          **text_fields("detokenized_special", detokenize(llm, ids, True))})
    n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
    return {
        "schema": TOKENIZER_SCHEMA,
        **provenance(model_name, path, threads),
        "vocab": {
            "n_tokens": n_tokens,
            "bos_id": llama_cpp.llama_vocab_bos(vocab),
            "eos_id": llama_cpp.llama_vocab_eos(vocab),
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
            "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
            "eog_ids": [t for t in range(n_tokens) if llama_cpp.llama_vocab_is_eog(vocab, t)],
        },
        "cases": cases,
    }


# ---------------------------------------------------------------------------

def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, path)
    log(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    table = model_table()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help=f"models (default: all available; known: {', '.join(table)})")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1; the results do not depend on it)")
    parser.add_argument("--out-dir", default=FIXTURE_OUT_DIR)
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in table]
    if unknown:
        log(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(table)}")
        return 2
    quiet_llama_cpp()
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        for name in args.models or list(table):
            resolve, prompts, max_tokens, tokenizer_name, required = table[name]
            path = resolve()
            if not os.path.isfile(path):
                if required or args.models:
                    raise FixtureError(f"{name}: {path} does not exist (run tests/reference/gen_models.py"
                                       f"{' --tinyllama' if not required else ''})")
                log(f"{name}: {path} not present, skipped")
                continue
            greedy = greedy_fixture(name, path, prompts, max_tokens, args.threads)
            write_json(os.path.join(args.out_dir, f"greedy_{name}.json"), greedy)
            log(f"{name}: min greedy margin {greedy['min_margin']}")
            if tokenizer_name:
                write_json(os.path.join(args.out_dir, f"tokenizer_{tokenizer_name}.json"),
                           tokenizer_fixture(name, path, args.threads))
    except FixtureError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""How far llama.cpp moves from its own fixtures when only flash attention is
toggled: the yardstick for how close our engine can be expected to be.

    ~/.cache/aivmm-ref/bin/python tests/reference/llama_cpp_spread.py [FIXTURE_NAME ...]

For each greedy fixture (default: all whose model is present) and each
prompt, prints the max |logit difference| after the prompt and how many of
the greedy tokens stay equal, with llama.cpp run with flash_attn=False
(the fixtures were made with flash_attn=True).
"""
import glob, json, os, subprocess, sys

import numpy as np
import llama_cpp

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def model_path(fx):
    if fx["model"].startswith("gemma3"):
        return subprocess.run([os.path.join(ROOT, "images/fetch-model.sh")], check=True,
                              capture_output=True, text=True).stdout.strip()
    committed = os.path.join(ROOT, "tests/fixtures/models", fx["model_file"])
    if os.path.exists(committed):
        return committed
    cache = os.environ.get("AIVMM_CACHE") or os.path.expanduser("~/.cache/aivmm")
    return os.path.join(cache, "models", fx["model_file"])


def main():
    names = sys.argv[1:] or [os.path.basename(p)[7:-5] for p in
                             sorted(glob.glob(os.path.join(ROOT, "tests/fixtures/reference/greedy_*.json")))]
    for name in names:
        fx = json.load(open(os.path.join(ROOT, "tests/fixtures/reference", f"greedy_{name}.json")))
        path = model_path(fx)
        if not os.path.exists(path):
            print(f"{name}: model not present, skipped")
            continue
        m = llama_cpp.Llama(path, n_ctx=fx["n_ctx"], n_threads=1, verbose=False, flash_attn=False)
        worst, equal, total, full = 0.0, 0, 0, 0
        for case in fx["cases"]:
            m.reset()
            m.eval(case["prompt_ids"])
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m.ctx, -1), shape=(m.n_vocab(),))
            pairs = case.get("top_logits") or list(enumerate(case["logits"]))
            worst = max(worst, max(abs(float(logits[i]) - v) for i, v in pairs))
            toks = []
            for t in m.generate(case["prompt_ids"], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                toks.append(t)
                if len(toks) == len(case["tokens"]):
                    break
            n = 0
            while n < min(len(toks), len(case["tokens"])) and toks[n] == case["tokens"][n]:
                n += 1
            equal += n
            total += len(case["tokens"])
            full += toks == case["tokens"]
        print(f"{name}: llama.cpp flash_attn off vs on: max |logit diff| {worst:.3f}; "
              f"{full}/{len(fx['cases'])} prompts fully equal; {equal}/{total} greedy tokens equal")


if __name__ == "__main__":
    main()

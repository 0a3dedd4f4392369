#!/usr/bin/env python3
"""Checks that the installed llama.cpp can run quantized models on this machine.

    VENV/bin/python tests/reference/smoke_llama_cpp.py

Writes a one-layer random model, quantizes it to Q8_0 and Q4_K_M and
evaluates a batch and single tokens with each. Exits 0 when all of that works;
a llama.cpp built with kernels this machine cannot run dies here (SIGILL)
instead of in the middle of make_fixtures.py.
"""

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_models  # noqa: E402


def main():
    llama_cpp = gen_models.load_llama_cpp()
    if llama_cpp is None:
        print("smoke: llama_cpp is not installed", file=sys.stderr)
        return 1
    from llama_cpp import Llama

    shape = gen_models.ModelShape(arch="llama", n_vocab=512, n_embd=256, n_layer=1, n_head=4, n_head_kv=2, n_ff=512,
                                  n_ctx=512, rope_base=10000.0, rms_eps=1e-5, tied_output=False)
    vocab = gen_models.spm_vocab(shape.n_vocab, np.random.default_rng(0))
    with tempfile.TemporaryDirectory(prefix="aivmm-smoke-") as tmp:
        original = os.path.join(tmp, "f32.gguf")
        gen_models.write_model(original, "smoke", shape, vocab, gen_models.WeightScales(), 1, "f32")
        for ftype in ("Q8_0", "Q4_K_M"):
            path = os.path.join(tmp, ftype + ".gguf")
            gen_models.quantize(llama_cpp, original, path, "MOSTLY_" + ftype)
            llm = Llama(model_path=path, n_ctx=128, n_threads=2, verbose=False)
            llm.eval(list(range(3, 19)))
            llm.eval([20])
            llm.eval([21])
            del llm
    print("smoke: llama.cpp runs quantized models on this machine", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

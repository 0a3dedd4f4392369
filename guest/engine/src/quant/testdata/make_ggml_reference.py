#!/usr/bin/env python3
"""Writes ggml_reference.bin: activations quantized, weights dequantized and
dot products computed by the real ggml (the libggml bundled with
llama-cpp-python, see shared/bench/README.md), for the tests in ../tests.rs.

Usage: VENV/bin/python make_ggml_reference.py  (VENV from setup-reference.sh)

Format (little-endian): b"GGMLREF1", u32 record count, then per record:
u32 type id, u32 n, u32 rows, f32[n] activation, u8[act row bytes] ggml's
activation row, u8[rows * row bytes] weights, f32[rows] ggml dot products,
f32[n] ggml's dequantization of weight row 0.
"""
import ctypes
import os
import struct

import llama_cpp
import numpy as np

LIB = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
base = ctypes.CDLL(os.path.join(LIB, "libggml-base.so"))
cpu = ctypes.CDLL(os.path.join(LIB, "libggml-cpu.so"))
cpu.ggml_cpu_init()

# name: (id, block values, block bytes, act type, [(f16 scale field offsets)])
TYPES = {
    "F32": (0, 1, 4, "F32", []),
    "F16": (1, 1, 2, "F16", []),
    "BF16": (30, 1, 2, "BF16", []),
    "Q4_0": (2, 32, 18, "Q8_0", [0]),
    "Q4_1": (3, 32, 20, "Q8_1", [0, 2]),
    "Q5_0": (6, 32, 22, "Q8_0", [0]),
    "Q5_1": (7, 32, 24, "Q8_1", [0, 2]),
    "Q8_0": (8, 32, 34, "Q8_0", [0]),
    "Q4_K": (12, 256, 144, "Q8_K", [0, 2]),
    "Q5_K": (13, 256, 176, "Q8_K", [0, 2]),
    "Q6_K": (14, 256, 210, "Q8_K", [208]),
}
ACT = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q8_1": (32, 36), "Q8_K": (256, 292)}
QUANTIZE = {
    "F32": cpu.ggml_cpu_fp32_to_fp32,
    "F16": cpu.ggml_cpu_fp32_to_fp16,
    "BF16": cpu.ggml_cpu_fp32_to_bf16,
    "Q8_0": cpu.quantize_row_q8_0,
    "Q8_1": cpu.quantize_row_q8_1,
    "Q8_K": cpu.quantize_row_q8_K,
}
VEC_DOT = {
    "F32": cpu.ggml_vec_dot_f32,
    "F16": cpu.ggml_vec_dot_f16,
    "BF16": cpu.ggml_vec_dot_bf16,
    "Q4_0": cpu.ggml_vec_dot_q4_0_q8_0,
    "Q4_1": cpu.ggml_vec_dot_q4_1_q8_1,
    "Q5_0": cpu.ggml_vec_dot_q5_0_q8_0,
    "Q5_1": cpu.ggml_vec_dot_q5_1_q8_1,
    "Q8_0": cpu.ggml_vec_dot_q8_0_q8_0,
    "Q4_K": cpu.ggml_vec_dot_q4_K_q8_K,
    "Q5_K": cpu.ggml_vec_dot_q5_K_q8_K,
    "Q6_K": cpu.ggml_vec_dot_q6_K_q8_K,
}
for f in QUANTIZE.values():
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
for f in VEC_DOT.values():
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                  ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def dequantize(name, data, n):
    out = np.zeros(n, dtype=np.float32)
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    if name == "F32":
        return np.frombuffer(data, dtype=np.float32).copy()
    if name == "F16":
        f = base.ggml_fp16_to_fp32_row
    elif name == "BF16":
        f = base.ggml_bf16_to_fp32_row
    else:
        f = getattr(base, "dequantize_row_" + name.lower().replace("_k", "_K"))
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    f(buf, out.ctypes.data, n)
    return out


def random_weights(rng, name, n, rows):
    _, blen, bbytes, _, fields = TYPES[name]
    if name in ("F32", "F16", "BF16"):
        x = rng.uniform(-2, 2, n * rows).astype(np.float32)
        out = (ctypes.c_uint8 * (n * rows * bbytes))()
        QUANTIZE[name](x.ctypes.data, out, n * rows)
        return bytearray(out)
    data = bytearray(rng.integers(0, 256, n // blen * rows * bbytes, dtype=np.uint8).tobytes())
    for b in range(n // blen * rows):
        for at in fields:
            scale = np.float16(rng.choice([-1, 1]) * 2.0 ** rng.uniform(-10, 1))
            data[b * bbytes + at:b * bbytes + at + 2] = scale.tobytes()
    return data


def activation(rng, n):
    x = rng.uniform(-1, 1, (n, 4)).sum(axis=1).astype(np.float32)
    outliers = rng.integers(0, 50, n) == 0
    x[outliers] *= 20
    # One block of exact ties (values k/2 scale to k * 127 / amax) and a zero block.
    x[:32] = (np.arange(32, dtype=np.float32) - 16) / 2
    if n >= 512:
        x[256:288] = 0
    return x


def record(rng, name, n, rows):
    tid, blen, bbytes, act, _ = TYPES[name]
    alen, abytes = ACT[act]
    x = activation(rng, n)
    qa = (ctypes.c_uint8 * (n // alen * abytes))()
    QUANTIZE[act](x.ctypes.data, qa, n)
    w = random_weights(rng, name, n, rows)
    wbuf = ctypes.create_string_buffer(bytes(w), len(w))
    row_bytes = n // blen * bbytes
    dots = []
    for r in range(rows):
        s = ctypes.c_float()
        VEC_DOT[name](n, ctypes.byref(s), 0, ctypes.addressof(wbuf) + r * row_bytes, 0, qa, 0, 1)
        dots.append(s.value)
    deq = dequantize(name, w[:row_bytes], n)
    out = struct.pack("<III", tid, n, rows) + x.tobytes() + bytes(qa) + bytes(w)
    return out + struct.pack("<%df" % rows, *dots) + deq.astype(np.float32).tobytes()


def main():
    rng = np.random.default_rng(20261122)
    records = []
    for name in TYPES:
        blen = TYPES[name][1]
        n = 512 if blen == 256 else (256 if blen == 32 else 67)
        records.append(record(rng, name, n, 3))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ggml_reference.bin")
    with open(path, "wb") as f:
        f.write(b"GGMLREF1" + struct.pack("<I", len(records)) + b"".join(records))
    print(path, os.path.getsize(path), "bytes")


main()

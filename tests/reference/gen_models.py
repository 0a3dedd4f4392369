#!/usr/bin/env python3
"""Generates the GGUF models the tests run: deterministic, random weights, real tokenizers.

    python3 tests/reference/gen_models.py [MODEL ...] [--tinyllama] [--no-quantize] [--out-dir DIR] [--check]

Models (LLaMA and Qwen2 architectures, tensors named and laid out as llama.cpp
expects them; weights drawn from numpy PCG64 with fixed seeds, so every run
writes byte-identical files):

- tiny-llama (committed, tests/fixtures/models/): architecture llama, a
  SentencePiece-style vocabulary of 512 pieces learned from an embedded English
  text, 2 layers, n_embd 256, 4 heads, 2 KV heads, n_ff 512, untied output.
  Written as F16, and quantized from a temporary F32 original to Q8_0 and
  Q4_K_M with llama.cpp's llama_model_quantize (needs llama_cpp; with
  --no-quantize only the F16 file is written).
- tiny-qwen2 (committed): architecture qwen2, byte-level BPE vocabulary
  (tokenizer.ggml.model gpt2, pre qwen2) with merges learned here, Q/K/V
  biases, output tied to the token embedding. F16.
- tinyllama-shaped (--tinyllama; NOT committed, written to
  $AIVMM_CACHE/models, default ~/.cache/aivmm/models): TinyLlama-1.1B shape,
  vocab 32000, random weights, quantized to Q4_K_M and Q8_0; the 2.2 GB F16
  intermediate is deleted afterwards.

The weights are scaled so the logits are peaked (top-1 well ahead of top-2),
which keeps greedy comparisons between implementations meaningful: see
`WeightScales` and the margins recorded by make_fixtures.py.

sha256 sums go to tests/fixtures/models/SHA256SUMS and
tests/reference/tinyllama.sha256; `--check` verifies the files against them.
Needs only numpy and gguf (requirements-light.txt), plus llama_cpp to quantize.
"""

import argparse
import collections
import dataclasses
import ctypes
import hashlib
import os
import re
import sys
import zlib
from dataclasses import dataclass

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover - message for users without the venv
    sys.exit("gen_models: the 'gguf' package is missing: pip install -r tests/reference/requirements-light.txt "
             "(or run tests/reference/setup.sh and use ~/.cache/aivmm-ref/bin/python)")

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE_MODELS_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "models")
TINYLLAMA_SUMS = os.path.join(REPO_ROOT, "tests", "reference", "tinyllama.sha256")
CACHE_DIR = os.environ.get("AIVMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aivmm")

SEED = 20261122

# Original prose (written for this project) from which the tokenizers learn
# their pieces and merges. Changing it changes every generated model.
CORPUS = """\
The old lighthouse stood at the end of the rocky point, and every night its lamp turned slowly over the water.
Sailors who passed the coast in winter said that the light was the first thing they saw and the last thing
they remembered. The keeper was a quiet woman named Ada, who kept a journal of the weather, the ships and the
birds. She wrote in the morning, when the sea was grey and the kettle was warm, and she wrote again at night.

In the spring the village below the hill came back to life. The fishermen painted their boats blue and white,
the children ran along the harbour wall, and the baker opened his door early so that the smell of fresh bread
could reach the market square. There were apples and pears, cheese from the farms in the valley, honey, eggs,
and bright flowers that the gardeners grew in long rows behind the church.

Ada liked to count things. She counted the steps of the tower (one hundred and twelve), the ships that passed
in a year (about three thousand four hundred), and the days of fog (far too many). Her numbers were simple:
1, 2, 3, 10, 42, 100, 365, 1024, 2026. When a storm came she measured the wind and the rain, and she noted the
time, the pressure and the height of the waves. "A good record," she often said, "is a letter to the future."

One evening a young engineer arrived with a box of tools and a new machine. It was small, it was fast, and it
could think about words. It read the journal, learned the patterns of the weather, and began to predict the
next storm before the clouds appeared. The engineer explained how the machine worked: it turned each word into
numbers, multiplied the numbers by large tables, and chose the most likely next word, again and again.

Ada was not sure that she trusted it. Still, she watched it carefully for a whole season. The machine was right
more often than it was wrong, and it never got tired. In the end she decided that a lighthouse and a machine
have the same job: to see a little further into the dark, and to help people find their way home safely.
Today the lamp still turns, the journal is still written by hand, and the little machine hums in the corner.
"""

# Characters the SentencePiece-style vocabulary always contains besides the
# corpus ones (so tests see them as pieces rather than byte fallbacks); other
# non-ASCII text falls back to <0xXX> byte tokens.
SPM_EXTRA_CHARS = "0123456789" + "éèàüç" + "你好世界日本中文" + "!?-_:;'\"()[]{}<>/@#$%&*+=~|"
# Common words forced in as whole pieces (after the learned merges).
SPM_EXTRA_WORDS = ["▁hello", "▁world", "▁model", "▁token", "▁test", "▁you", "▁what", "▁is", "▁are",
                   "▁Hello", "▁The", "▁this", "▁question", "▁answer", "▁▁", "▁▁▁▁"]

SPM_SPACE = "\u2581"

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GenError(Exception):
    pass


def log(msg):
    print(f"gen_models: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# SentencePiece-style vocabulary (tokenizer.ggml.model = llama)
# ---------------------------------------------------------------------------

@dataclass
class Vocab:
    tokens: list  # str or bytes per id
    scores: list  # float per id
    types: list  # llama.cpp token type per id
    merges: list  # BPE merges "a b" (gpt2 vocabularies only)


def _most_frequent_pair(words):
    """The most frequent adjacent symbol pair over words ({tuple(symbols): count}); ties by pair text."""
    pair_counts = collections.Counter()
    for symbols, count in words.items():
        for left, right in zip(symbols, symbols[1:]):
            pair_counts[(left, right)] += count
    if not pair_counts:
        return None
    return min(pair_counts.items(), key=lambda item: (-item[1], item[0]))[0]


def _apply_merge(words, pair):
    merged = {}
    joined = pair[0] + pair[1]
    for symbols, count in words.items():
        out = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
                out.append(joined)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        key = tuple(out)
        merged[key] = merged.get(key, 0) + count
    return merged


def learn_merges(words, max_merges):
    """Greedy BPE over {tuple(symbols): count}: the merged (left, right) pairs in rank order."""
    pieces = []
    for _ in range(max_merges):
        pair = _most_frequent_pair(words)
        if pair is None:
            break
        words = _apply_merge(words, pair)
        pieces.append(pair)
    return pieces


def spm_vocab(n_vocab, rng):
    """<unk>, <s>, </s>, the 256 byte tokens, merged pieces (score = -rank), then single characters.

    Scores decrease with the id, as in LLaMA's SentencePiece BPE vocabularies, so
    llama.cpp's highest-score-first merging replays the learned merge order.
    SPM_EXTRA_WORDS come after the learned merges together with all their
    prefixes (so they are reachable by merging). When the corpus runs out of
    merges (large vocabularies), further pieces are concatenations of an
    existing piece and a lowercase letter or piece chosen with rng.
    """
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    words = collections.Counter(SPM_SPACE + w for w in CORPUS.split())
    chars = sorted(set("".join(words)) | set(SPM_EXTRA_CHARS) | {SPM_SPACE})
    n_pieces = n_vocab - len(specials) - len(byte_tokens) - len(chars)

    extra = []
    for word in SPM_EXTRA_WORDS:
        extra += [word[:end] for end in range(2, len(word) + 1)]
    extra = list(dict.fromkeys(extra))
    if len(extra) > n_pieces:
        raise GenError(f"vocabulary of {n_vocab} is too small for {len(chars)} characters and the extra words")

    learned = list(dict.fromkeys(a + b for a, b in learn_merges({tuple(w): c for w, c in words.items()}, n_pieces)))
    while len(set(learned) | set(extra)) > n_pieces:
        learned.pop()
    pieces = learned + [p for p in extra if p not in set(learned)]
    seen = set(pieces) | set(chars)
    letters = [c for c in chars if "a" <= c <= "z"]
    while len(pieces) < n_pieces:
        left = pieces[rng.integers(len(pieces))]
        right = letters[rng.integers(len(letters))] if rng.random() < 0.6 else pieces[rng.integers(len(pieces))]
        candidate = left + right
        if SPM_SPACE in candidate[1:] or len(candidate) > 16 or candidate in seen:
            continue
        seen.add(candidate)
        pieces.append(candidate)

    tokens = specials + byte_tokens + pieces + chars
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(pieces) + len(chars))
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces) + len(chars))]
    assert len(tokens) == n_vocab, (len(tokens), n_vocab)
    return Vocab(tokens=tokens, scores=scores, types=types, merges=[])


# ---------------------------------------------------------------------------
# Byte-level BPE vocabulary (tokenizer.ggml.model = gpt2, pre = qwen2)
# ---------------------------------------------------------------------------

def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


# Qwen2's pre-tokenizer regex with \p{L} / \p{N} spelled with Python's re classes.
QWEN2_PRETOKENIZER = re.compile(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\w]?[^\W\d_]+|\d| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_vocab(n_merges):
    """256 byte symbols, merged tokens in rank order, then the control tokens."""
    byte_map = bytes_to_unicode()
    words = collections.Counter(
        tuple(byte_map[b] for b in piece.encode("utf-8")) for piece in QWEN2_PRETOKENIZER.findall(CORPUS))
    merges = learn_merges(dict(words), n_merges)
    tokens = [byte_map[b] for b in range(256)] + [a + b for a, b in merges]
    if len(set(tokens)) != len(tokens):
        raise GenError("byte-level BPE produced a duplicate token")
    tokens += QWEN2_SPECIALS
    types = [NORMAL] * (len(tokens) - len(QWEN2_SPECIALS)) + [CONTROL] * len(QWEN2_SPECIALS)
    return Vocab(tokens=tokens, scores=[], types=types, merges=[f"{a} {b}" for a, b in merges])


# ---------------------------------------------------------------------------
# Model shapes and weights
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightScales:
    """Standard deviations of the random weights (matrices: multiples of 1/sqrt(fan_in)).

    Plain Gaussian weights give Gaussian logits, whose top two are often within
    a few hundredths of each other (with 512 tokens, ~4 % of greedy steps have
    a top-1/top-2 margin under 1 % of the logit std), which makes greedy
    comparisons between two implementations fragile. Two knobs make the logits
    peaked: `output` scales them (logit std ~ output), and `ffn_vote` makes
    every hidden unit of the last FFN write one token's output direction into
    the residual stream (see vote_directions), which gives the logits a heavy,
    context-dependent upper tail.
    """
    embedding: float = 1.0
    attn_qk: float = 1.0
    attn_v: float = 1.0
    attn_out: float = 1.0
    ffn_in: float = 2.0
    ffn_down: float = 1.0
    output: float = 8.0
    ffn_vote: float = 16.0
    norm_jitter: float = 0.1
    bias: float = 0.1


@dataclass(frozen=True)
class ModelShape:
    arch: str  # "llama" or "qwen2"
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    rope_base: float
    rms_eps: float
    tied_output: bool

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def tensor_plan(shape):
    """(name, numpy shape (rows, row length), kind) for every tensor, in file order.

    numpy shape (rows, cols) becomes GGUF dims [cols, rows]: dims[0] is the row
    length, the layout llama.cpp expects (attn_q: {n_embd, n_head*head_dim},
    ffn_down: {n_ff, n_embd}, token_embd: {n_embd, n_vocab}). Since the weights
    are random and written directly in GGUF layout, the Q/K row permutation
    that convert_hf_to_gguf.py applies for llama does not arise.
    """
    e, q, kv, ff = shape.n_embd, shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim, shape.n_ff
    plan = [("token_embd.weight", (shape.n_vocab, e), "embedding")]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (e,), "norm"),
                 (b + "attn_q.weight", (q, e), "attn_qk"),
                 (b + "attn_k.weight", (kv, e), "attn_qk"),
                 (b + "attn_v.weight", (kv, e), "attn_v")]
        if shape.arch == "qwen2":
            plan += [(b + "attn_q.bias", (q,), "bias"),
                     (b + "attn_k.bias", (kv,), "bias"),
                     (b + "attn_v.bias", (kv,), "bias")]
        plan += [(b + "attn_output.weight", (e, q), "attn_out"),
                 (b + "ffn_norm.weight", (e,), "norm"),
                 (b + "ffn_gate.weight", (ff, e), "ffn_in"),
                 (b + "ffn_up.weight", (ff, e), "ffn_in"),
                 (b + "ffn_down.weight", (e, ff), "ffn_down")]
    plan.append(("output_norm.weight", (e,), "norm"))
    if not shape.tied_output:
        plan.append(("output.weight", (shape.n_vocab, e), "output"))
    return plan


def _rng(seed, label):
    return np.random.Generator(np.random.PCG64([seed, zlib.crc32(label.encode())]))


def tensor_values(name, np_shape, kind, scales, seed, shape):
    """The float32 values of one tensor; a PCG64 stream per tensor name, so the order of generation is free."""
    normal = _rng(seed, name).standard_normal(np_shape, dtype=np.float32)
    if kind == "norm":
        return 1.0 + scales.norm_jitter * normal
    if kind == "bias":
        return scales.bias * normal
    if kind == "embedding":
        return scales.embedding * normal
    fan_in = np_shape[1]
    values = normal * np.float32(getattr(scales, kind) / np.sqrt(fan_in))
    if kind == "ffn_down" and scales.ffn_vote > 0 and name == f"blk.{shape.n_layer - 1}.ffn_down.weight":
        values += vote_directions(scales, seed, shape)
    return values


def output_matrix(scales, seed, shape):
    if shape.tied_output:
        return tensor_values("token_embd.weight", (shape.n_vocab, shape.n_embd), "embedding", scales, seed, shape)
    return tensor_values("output.weight", (shape.n_vocab, shape.n_embd), "output", scales, seed, shape)


def vote_directions(scales, seed, shape):
    """(n_embd, n_ff): column k is ffn_vote times the unit output row of token voted[k].

    Each hidden unit of the last FFN then writes the direction of one token's
    output row into the residual stream. The unit activations silu(g.x)*(u.x)
    are products of Gaussians, heavy-tailed and context dependent, so the
    strongest unit's token gets a logit well clear of the rest.
    """
    rows = output_matrix(scales, seed, shape)
    voted = _rng(seed, "ffn_vote").permutation(max(shape.n_vocab, shape.n_ff))[:shape.n_ff] % shape.n_vocab
    directions = rows[voted] / np.linalg.norm(rows[voted], axis=1, keepdims=True)
    return (np.float32(scales.ffn_vote) * directions).T


def write_model(path, name, shape, vocab, scales, seed, float_type):
    """Writes an F32 or F16 GGUF (1-D tensors always F32, as llama.cpp's converter does), streaming tensor by tensor."""
    if float_type not in ("f32", "f16"):
        raise GenError(f"unsupported float type {float_type}")
    arch = shape.arch
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_description("random weights generated by aivmm tests/reference/gen_models.py (not a trained model)")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_rope_dimension_count(shape.head_dim)

    if arch == "llama":
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(True)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        endoftext = vocab.tokens.index("<|endoftext|>")
        writer.add_bos_token_id(endoftext)
        writer.add_eos_token_id(vocab.tokens.index("<|im_end|>"))
        writer.add_pad_token_id(endoftext)
        writer.add_add_bos_token(False)
        writer.add_chat_template(
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
            " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% endif %}")

    plan = tensor_plan(shape)
    for tensor_name, np_shape, kind in plan:
        dtype = np.float16 if float_type == "f16" and len(np_shape) == 2 else np.float32
        writer.add_tensor_info(tensor_name, np_shape, np.dtype(dtype), int(np.prod(np_shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor_name, np_shape, kind in plan:
        values = tensor_values(tensor_name, np_shape, kind, scales, seed, shape)
        if float_type == "f16" and len(np_shape) == 2:
            values = values.astype(np.float16)
        writer.write_tensor_data(values)
    writer.close()


# ---------------------------------------------------------------------------
# Quantization through llama.cpp
# ---------------------------------------------------------------------------

def load_llama_cpp():
    """The llama_cpp module, or None when the reference venv is not in use."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def quantize(llama_cpp, src, dst, ftype_name, verbose=False):
    """llama_model_quantize(src -> dst) with ftype llama_cpp.LLAMA_FTYPE_<ftype_name> (e.g. MOSTLY_Q4_K_M)."""
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype_name}", None)
    if ftype is None:
        raise GenError(f"llama_cpp has no LLAMA_FTYPE_{ftype_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    set_llama_verbose(llama_cpp, verbose)
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if status != 0:
        raise GenError(f"llama_model_quantize({src} -> {dst}, {ftype_name}) failed with status {status}")


def set_llama_verbose(llama_cpp, verbose):
    """llama.cpp logs through llama-cpp-python's logger: errors only unless verbose."""
    from llama_cpp import _logger
    _logger.set_verbose(verbose)


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRecipe:
    name: str
    shape: ModelShape
    vocab_kind: str  # "spm" or "bpe"
    float_files: tuple  # float types written directly ("f16")
    quant_files: tuple  # llama.cpp ftype names quantized from the float original
    quantize_from: str  # "f32" (temporary, deleted) or "f16"
    committed: bool


TINY_LLAMA = ModelRecipe(
    name="tiny-llama",
    shape=ModelShape(arch="llama", n_vocab=512, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512,
                     n_ctx=512, rope_base=10000.0, rms_eps=1e-5, tied_output=False),
    vocab_kind="spm", float_files=("f16",), quant_files=("Q8_0", "Q4_K_M"), quantize_from="f32", committed=True)

TINY_QWEN2 = ModelRecipe(
    name="tiny-qwen2",
    shape=ModelShape(arch="qwen2", n_vocab=512, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=192,
                     n_ctx=512, rope_base=1000000.0, rms_eps=1e-6, tied_output=True),
    vocab_kind="bpe", float_files=("f16",), quant_files=(), quantize_from="f16", committed=True)

TINYLLAMA_SHAPED = ModelRecipe(
    name="tinyllama-shaped",
    shape=ModelShape(arch="llama", n_vocab=32000, n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632,
                     n_ctx=2048, rope_base=10000.0, rms_eps=1e-5, tied_output=False),
    vocab_kind="spm", float_files=(), quant_files=("Q4_K_M", "Q8_0"), quantize_from="f16", committed=False)

RECIPES = {r.name: r for r in (TINY_LLAMA, TINY_QWEN2, TINYLLAMA_SHAPED)}


def model_file(recipe, variant):
    """File name of one variant: tiny-llama-f16.gguf, tiny-llama-q4_k_m.gguf, ..."""
    return f"{recipe.name}-{variant.lower()}.gguf"


def build_vocab(recipe):
    if recipe.vocab_kind == "spm":
        return spm_vocab(recipe.shape.n_vocab, _rng(SEED, recipe.name + "/vocab"))
    n_merges = recipe.shape.n_vocab - 256 - len(QWEN2_SPECIALS)
    return bpe_vocab(n_merges)


def generate(recipe, out_dir, llama_cpp, verbose):
    """Writes every variant of recipe into out_dir; returns the file names written."""
    os.makedirs(out_dir, exist_ok=True)
    vocab = build_vocab(recipe)
    seed = SEED + zlib.crc32(recipe.name.encode())
    written = []
    for float_type in recipe.float_files:
        path = os.path.join(out_dir, model_file(recipe, float_type))
        log(f"writing {path}")
        write_atomically(path, lambda tmp: write_model(tmp, recipe.name, recipe.shape, vocab, WeightScales(), seed,
                                                       float_type))
        written.append(os.path.basename(path))
    if not recipe.quant_files:
        return written
    if llama_cpp is None:
        raise GenError(f"quantizing {recipe.name} needs llama_cpp: run tests/reference/setup.sh and use "
                       "~/.cache/aivmm-ref/bin/python, or pass --no-quantize to write only the float files")
    original = os.path.join(out_dir, model_file(recipe, recipe.quantize_from))
    temporary_original = recipe.quantize_from not in recipe.float_files
    if temporary_original:
        original = os.path.join(out_dir, f".{recipe.name}-{recipe.quantize_from}.tmp.gguf")
        log(f"writing the {recipe.quantize_from.upper()} original {original}")
        write_model(original, recipe.name, recipe.shape, vocab, WeightScales(), seed, recipe.quantize_from)
    try:
        for ftype in recipe.quant_files:
            path = os.path.join(out_dir, model_file(recipe, ftype))
            log(f"quantizing to {ftype}: {path}")
            write_atomically(path, lambda tmp: quantize(llama_cpp, original, tmp, "MOSTLY_" + ftype, verbose))
            written.append(os.path.basename(path))
    finally:
        if temporary_original:
            os.remove(original)
    return written


def write_atomically(path, write):
    tmp = path + ".partial"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_sums(sums_path, directory, names):
    """`sha256  name` lines (sha256sum format), sorted by name."""
    lines = [f"{sha256_of(os.path.join(directory, n))}  {n}\n" for n in sorted(names)]
    with open(sums_path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(sums_path + ".tmp", sums_path)
    log(f"wrote {sums_path}")


def read_sums(sums_path):
    sums = {}
    with open(sums_path) as f:
        for line in f:
            if line.strip():
                digest, name = line.split(maxsplit=1)
                sums[name.strip()] = digest
    return sums


def check_sums(sums_path, directory):
    """Verifies every file listed in sums_path; returns the list of problems."""
    problems = []
    for name, digest in read_sums(sums_path).items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif sha256_of(path) != digest:
            problems.append(f"{path}: sha256 differs from {sums_path} (stale or modified)")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=[TINY_LLAMA.name, TINY_QWEN2.name],
                        help=f"models to generate (default: the committed ones; known: {', '.join(RECIPES)})")
    parser.add_argument("--tinyllama", action="store_true",
                        help="also generate the TinyLlama-shaped models into the model cache (several GB while running)")
    parser.add_argument("--out-dir", default=FIXTURE_MODELS_DIR, help="directory of the committed models")
    parser.add_argument("--cache-dir", default=os.path.join(CACHE_DIR, "models"),
                        help="directory of the TinyLlama-shaped models (default $AIVMM_CACHE/models)")
    parser.add_argument("--no-quantize", action="store_true", help="only write the float files (no llama_cpp needed)")
    parser.add_argument("--check", action="store_true", help="verify the files against the recorded sha256 sums")
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's quantization log")
    args = parser.parse_args()

    if args.check:
        problems = check_sums(os.path.join(args.out_dir, "SHA256SUMS"), args.out_dir)
        if args.tinyllama:
            problems += check_sums(TINYLLAMA_SUMS, args.cache_dir)
        for p in problems:
            log(p)
        log("all files match" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0

    names = list(dict.fromkeys(args.models + ([TINYLLAMA_SHAPED.name] if args.tinyllama else [])))
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        log(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
        return 2
    llama_cpp = None if args.no_quantize else load_llama_cpp()
    try:
        for name in names:
            recipe = RECIPES[name]
            if args.no_quantize:
                recipe = dataclasses.replace(recipe, quant_files=())
            out_dir = args.out_dir if recipe.committed else args.cache_dir
            written = generate(recipe, out_dir, llama_cpp, args.verbose)
            for file_name in written:
                log(f"  {file_name}: {os.path.getsize(os.path.join(out_dir, file_name))} bytes")
            if not recipe.committed:
                write_sums(TINYLLAMA_SUMS, out_dir, written)
        committed = [f for f in os.listdir(args.out_dir) if f.endswith(".gguf")] if os.path.isdir(args.out_dir) else []
        if committed:
            write_sums(os.path.join(args.out_dir, "SHA256SUMS"), args.out_dir, committed)
    except (GenError, OSError) as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

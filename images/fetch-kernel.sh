#!/usr/bin/env bash
# Fetches a real Debian x86-64 Linux kernel for Linux-guest partitions and
# prints three paths on stdout, one per line (progress goes to stderr):
#
#   line 1: the bzImage (/boot/vmlinuz-* of the package)
#   line 2: the uncompressed vmlinux ELF, taken out of the bzImage's payload
#   line 3: a directory with the package's virtio modules for virtio-mmio
#           disks (virtio, virtio_ring, virtio_mmio, virtio_blk .ko; empty
#           when the kernel has them built in), for make-initrd.sh --modules
#
#   images/fetch-kernel.sh [--dest DIR] [PACKAGE]
#
# PACKAGE defaults to the linux-image-<version>-amd64 package that Debian's
# linux-image-amd64 metapackage depends on. It is downloaded with
# `apt-get download` (apt checks the .deb against the hashes of the signed
# archive index) into DIR (default $AIVMM_CACHE/kernels, AIVMM_CACHE defaulting
# to ~/.cache/aivmm), unpacked with dpkg-deb, and the vmlinux is decompressed
# from the payload that the bzImage's setup header locates (payload_offset and
# payload_length, boot protocol 2.08+), with python3's lzma/zlib/bz2 or the
# zstd/lz4/lzop tools for the other formats the kernel supports. Files already
# in DIR are reused.
set -euo pipefail

die() {
  echo "fetch-kernel: $*" >&2
  exit 1
}

cache="${AIVMM_CACHE:-$HOME/.cache/aivmm}"
dest="$cache/kernels"
package=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dest)
      [ $# -ge 2 ] || die "--dest needs a directory"
      dest="$2"
      shift 2
      ;;
    -h | --help)
      sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [ -z "$package" ] || die "one package at most"
      package="$1"
      shift
      ;;
  esac
done

command -v apt-get >/dev/null 2>&1 || die "apt-get is required (a Debian or Ubuntu host)"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is required"
command -v python3 >/dev/null 2>&1 || die "python3 is required (it decompresses the payload)"

metapackage_target() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }'
}
if [ -z "$package" ]; then
  package="$(metapackage_target)"
  if [ -z "$package" ] && [ "$(id -u)" = 0 ]; then
    # A fresh machine may have no package lists yet.
    echo "fetch-kernel: apt does not know linux-image-amd64; running apt-get update" >&2
    apt-get update -q >&2 || true
    package="$(metapackage_target)"
  fi
  if [ -z "$package" ]; then
    die "apt does not know linux-image-amd64 or what it depends on; run 'apt-get update' (as root) and retry, or name a package: images/fetch-kernel.sh linux-image-6.1.0-NN-amd64"
  fi
fi
case "$package" in
  linux-image-*) ;;
  *) die "$package is not a linux-image-* package" ;;
esac

mkdir -p "$dest"
dir="$dest/$package"
bzimage="$(ls "$dir"/vmlinuz-* 2>/dev/null | head -n 1 || true)"
vmlinux="${bzimage/vmlinuz-/vmlinux-}"
if [ -n "$bzimage" ] && [ -s "$bzimage" ] && [ -s "$vmlinux" ] && [ -d "$dir/modules" ]; then
  echo "$bzimage"
  echo "$vmlinux"
  echo "$dir/modules"
  exit 0
fi

work="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "fetch-kernel: downloading $package with apt-get" >&2
# apt-get download as root runs unsandboxed (the _apt user cannot write here);
# the warning it prints about that is expected.
(cd "$work" && apt-get download -q "$package" >&2) ||
  die "apt-get download $package failed (is the network up? does 'apt-get update' help?)"
deb="$(ls "$work"/*.deb 2>/dev/null | head -n 1 || true)"
[ -n "$deb" ] || die "apt-get download $package left no .deb"
dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb cannot unpack $deb"
found="$(ls "$work"/root/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)"
[ -n "$found" ] || die "$package has no /boot/vmlinuz-* (is it a kernel image package?)"
name="$(basename "$found")"
mkdir -p "$work/out/modules"
cp "$found" "$work/out/$name"
for module in virtio virtio_ring virtio_mmio virtio_blk; do
  ko="$(find "$work"/root/lib/modules -name "$module.ko*" 2>/dev/null | head -n 1)"
  [ -z "$ko" ] || cp "$ko" "$work/out/modules/"
done
echo "fetch-kernel: extracting vmlinux from $name" >&2
python3 - "$work/out/$name" "$work/out/${name/vmlinuz-/vmlinux-}" <<'PYTHON'
import bz2
import lzma
import shutil
import struct
import subprocess
import sys
import zlib

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()


def fail(message):
    sys.exit(f"fetch-kernel: {src}: {message}")


if len(data) < 0x270 or data[0x202:0x206] != b"HdrS":
    fail("not a bzImage (no HdrS setup header at 0x202)")
version = struct.unpack_from("<H", data, 0x206)[0]
if version < 0x208:
    fail(f"boot protocol {version:#x} predates payload_offset (2.08)")
setup_sects = data[0x1F1] or 4
payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
start = (setup_sects + 1) * 512 + payload_offset
payload = data[start:start + payload_length]
if len(payload) != payload_length:
    fail("payload runs past the end of the file")

# The same magics scripts/extract-vmlinux looks for.
tools = {
    b"\x28\xb5\x2f\xfd": ("zstd", ["zstd", "-dcq"]),
    b"\x02\x21\x4c\x18": ("lz4", ["lz4", "-dcq"]),
    b"\x89\x4c\x5a\x4f": ("lzo", ["lzop", "-dcq"]),
}
if payload.startswith(b"\x1f\x8b"):
    kind, out = "gzip", zlib.decompressobj(wbits=31).decompress(payload)
elif payload.startswith(b"\xfd7zXZ\x00"):
    kind, out = "xz", lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
elif payload.startswith(b"\x5d\x00\x00"):
    kind, out = "lzma", lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
elif payload.startswith(b"BZh"):
    kind, out = "bzip2", bz2.decompress(payload)
elif payload[:4] in tools:
    kind, cmd = tools[payload[:4]]
    if shutil.which(cmd[0]) is None:
        fail(f"the payload is {kind}-compressed and {cmd[0]} is not installed (apt-get install {cmd[0]})")
    # The kernel appends the uncompressed size after the frame; stop at the frame.
    run = subprocess.run(cmd, input=payload, capture_output=True)
    out = run.stdout
    if not out:
        fail(f"{cmd[0]} could not decompress the payload: {run.stderr.decode(errors='replace').strip()}")
elif payload.startswith(b"\x7fELF"):
    kind, out = "none", payload
else:
    fail(f"unknown payload compression (magic {payload[:6].hex()})")
if not out.startswith(b"\x7fELF"):
    fail(f"the {kind} payload does not decompress to an ELF file")
with open(dst, "wb") as f:
    f.write(out)
print(f"fetch-kernel: {kind} payload, vmlinux of {len(out)} bytes", file=sys.stderr)
PYTHON
rm -rf "$dir"
mv "$work/out" "$dir"
echo "$dir/$name"
echo "$dir/${name/vmlinuz-/vmlinux-}"
echo "$dir/modules"

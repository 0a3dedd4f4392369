#!/usr/bin/env bash
# Builds a small initramfs for Linux guests: Debian's static busybox and an
# /init that mounts /proc, /sys and /dev, prints a marker line and starts a
# shell on the serial console. Prints the image's path on stdout (progress
# goes to stderr):
#
#   images/make-initrd.sh [--out FILE] [--marker TEXT] [--modules DIR]
#
#   aivmm run --kernel vmlinux --initrd "$(images/make-initrd.sh)" [--disk root.img]
#
# --modules DIR (line 3 of images/fetch-kernel.sh) puts the kernel's virtio
# modules in /lib/modules; /init loads virtio, virtio_ring, virtio_mmio and
# virtio_blk (those present) with their parameters from the command line.
#
# busybox-static is downloaded with `apt-get download` (apt checks the .deb
# against the hashes of the signed archive index) and unpacked with dpkg-deb
# into $AIVMM_CACHE/initrd (AIVMM_CACHE defaulting to ~/.cache/aivmm); the
# host's own packages are not touched and root is not needed. The archive is
# an uncompressed newc cpio (what the kernel unpacks fastest), written by
# python3 so that /dev/console can be in it without mknod. FILE defaults to
# $AIVMM_CACHE/initrd/initrd-busybox.cpio. The marker (default
# AIVMM-INITRD-READY) is printed by /init once the mounts are done.
set -euo pipefail

die() {
  echo "make-initrd: $*" >&2
  exit 1
}

cache="${AIVMM_CACHE:-$HOME/.cache/aivmm}/initrd"
out=""
marker="AIVMM-INITRD-READY"
modules=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out)
      [ $# -ge 2 ] || die "--out needs a file name"
      out="$2"
      shift 2
      ;;
    --marker)
      [ $# -ge 2 ] || die "--marker needs a text"
      marker="$2"
      shift 2
      ;;
    --modules)
      [ $# -ge 2 ] || die "--modules needs a directory"
      [ -d "$2" ] || die "--modules $2: not a directory (line 3 of images/fetch-kernel.sh names one)"
      modules="$2"
      shift 2
      ;;
    -h | --help)
      sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$marker" in
  *[!A-Za-z0-9_.:-]*) die "the marker may hold only letters, digits and _.:-" ;;
esac
[ -n "$out" ] || out="$cache/initrd-busybox.cpio"

command -v apt-get >/dev/null 2>&1 || die "apt-get is required (a Debian or Ubuntu host)"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is required"
command -v python3 >/dev/null 2>&1 || die "python3 is required (it writes the cpio archive)"

mkdir -p "$cache"
busybox="$cache/busybox-static/bin/busybox"
if [ ! -x "$busybox" ]; then
  work="$(mktemp -d "$cache/.fetch.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "make-initrd: downloading busybox-static with apt-get" >&2
  # apt-get download as root runs unsandboxed (the _apt user cannot write
  # here); the warning it prints about that is expected.
  (cd "$work" && apt-get download -q busybox-static >&2) ||
    die "apt-get download busybox-static failed (is the network up? does 'apt-get update' help?)"
  deb="$(ls "$work"/*.deb 2>/dev/null | head -n 1 || true)"
  [ -n "$deb" ] || die "apt-get download busybox-static left no .deb"
  dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb cannot unpack $deb"
  [ -x "$work/root/bin/busybox" ] || die "busybox-static has no /bin/busybox"
  rm -rf "$cache/busybox-static"
  mv "$work/root" "$cache/busybox-static"
fi

mkdir -p "$(dirname "$out")"
tmp="$(mktemp "$out.XXXXXX")"
python3 - "$busybox" "$tmp" "$marker" "$modules" <<'PYTHON' || { rm -f "$tmp"; die "cannot write the archive"; }
import os
import sys

busybox, out, marker, modules = sys.argv[1:5]

INIT = f"""#!/bin/busybox sh
# aivmm's initramfs: mounts, a marker line, a shell on the console.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
# Links to the path /proc/self/exe names: after /proc.
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || echo "no devtmpfs: /dev holds only the archive's nodes"
# virtio-mmio disks, when the kernel has them as modules (--modules).
for module in virtio virtio_ring virtio_mmio virtio_blk; do
  ko=/lib/modules/$module.ko
  [ -e "$ko" ] || continue
  insmod "$ko" $(tr ' ' '\\n' </proc/cmdline | sed -n "s/^$module\\.//p") ||
    echo "insmod $module failed"
done
echo "{marker}: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) CPU(s)"
for disk in /sys/block/vd*; do
  [ -e "$disk" ] && echo "disk /dev/${{disk##*/}}: $(cat "$disk/size") sectors"
done
echo "busybox shell on the serial console; 'reboot -f' (or exit) ends the VM"
setsid cttyhack sh -l
reboot -f
"""

entries = []  # (name, mode, data, (major, minor))
def add(name, mode, data=b"", rdev=(0, 0)):
    entries.append((name, mode, data, rdev))

for d in ("bin", "dev", "proc", "sys", "tmp", "root", "etc", "lib", "lib/modules"):
    add(d, 0o040755)
add("dev/console", 0o020600, rdev=(5, 1))
add("dev/ttyS0", 0o020660, rdev=(4, 64))
add("dev/null", 0o020666, rdev=(1, 3))
with open(busybox, "rb") as f:
    add("bin/busybox", 0o100755, f.read())
add("bin/sh", 0o120777, b"busybox")
add("etc/profile", 0o100644, b"export PATH=/bin:/sbin:/usr/bin:/usr/sbin\nexport PS1='aivmm# '\n")
add("init", 0o100755, INIT.encode())
if modules:
    for name in sorted(os.listdir(modules)):
        if name.endswith(".ko"):
            with open(os.path.join(modules, name), "rb") as f:
                add(f"lib/modules/{name}", 0o100644, f.read())

def pad(n):
    return b"\0" * (-n % 4)

with open(out, "wb") as f:
    for ino, (name, mode, data, (major, minor)) in enumerate(entries + [("TRAILER!!!", 0, b"", (0, 0))], 1):
        encoded = name.encode() + b"\0"
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, major, minor, len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        f.write(header + encoded + pad(len(header) + len(encoded)))
        f.write(data + pad(len(data)))
PYTHON
chmod 0644 "$tmp"
mv "$tmp" "$out"
echo "make-initrd: $(stat -c %s "$out") bytes" >&2
echo "$out"

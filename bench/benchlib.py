"""Helpers shared by the benchmark scripts in bench/."""

import sys


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_cpus(text):
    """A CPU list such as "0,2-3" as [0, 2, 3]."""
    cpus = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus

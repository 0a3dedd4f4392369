"""API overhead of `aivmm serve`: what the daemon adds to a completion, and
how many small completions per second it delivers with 1, 4 and 16 clients.

    python3 bench/api.py --aivmm target/release/aivmm --model M.gguf [--requests 40] [--json OUT]

Starts a daemon on a temporary Unix socket, creates one partition (1 vCPU),
then, over loopback (the socket), with the standard library only:

- overhead: for small non-streamed completions (max_tokens 1), the client's
  latency minus the guest's own time to first token (`ttft_ms`, measured by
  the guest's clock), and for streamed ones the client's time to the first
  `token` event minus the same; median and p90 over the requests;
- throughput: requests/s with 1, 4 and 16 concurrent clients (each client a
  thread with its own keep-alive connection, a fixed number of requests in
  all), against the partition's own limit measured in the same run
  (1000 / median guest time per request): the ratio says how much of the
  partition's capacity reaches the clients through the API.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=300):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(conn, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    if response.status >= 300:
        raise RuntimeError(f"{method} {path}: {response.status} {payload.decode(errors='replace')}")
    return json.loads(payload) if payload else None


def completion(conn, prompt, max_tokens):
    start = time.perf_counter()
    result = call(
        conn,
        "POST",
        "/partitions/bench/completions",
        {"prompt": prompt, "max_tokens": max_tokens, "sampling": {"temperature": 0}, "stream": False},
    )
    return (time.perf_counter() - start) * 1e3, result


def streamed_first_token(conn, prompt):
    body = json.dumps(
        {"prompt": prompt, "max_tokens": 1, "sampling": {"temperature": 0}, "stream": True}
    ).encode()
    start = time.perf_counter()
    conn.request(
        "POST", "/partitions/bench/completions", body=body, headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    first = None
    done = None
    event = None
    for raw in response:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            if event == "token" and first is None:
                first = (time.perf_counter() - start) * 1e3
            elif event == "done":
                done = json.loads(line[6:])
            elif event == "error":
                raise RuntimeError(line)
    return first, done


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--aivmm", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--json")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="aivmm-bench-api-")
    sock = os.path.join(workdir, "api.sock")
    daemon = subprocess.Popen(
        [args.aivmm, "serve", "--api-sock", sock, "--model-dir", workdir, "--model", f"bench={args.model}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.time() > deadline:
                sys.exit("bench/api.py: the daemon did not start")
            time.sleep(0.05)
        conn = UnixConnection(sock)
        call(conn, "POST", "/partitions", {"id": "bench", "model": "bench", "vcpus": 1})
        # Warm up: the first requests fill caches on both sides.
        for _ in range(3):
            completion(conn, args.prompt, 1)

        n = args.requests
        whole = [completion(conn, args.prompt, 1) for _ in range(n)]
        overhead = [latency - result["ttft_ms"] for latency, result in whole]
        guest_ms = [result["ttft_ms"] for _, result in whole]
        streamed = [streamed_first_token(conn, args.prompt) for _ in range(n)]
        stream_overhead = [first - done["ttft_ms"] for first, done in streamed]

        capacity = 1000.0 / statistics.median(guest_ms)
        rates = {}
        for clients in (1, 4, 16):
            per_client = max(1, n // clients)
            errors = []

            def client():
                c = UnixConnection(sock)
                try:
                    for _ in range(per_client):
                        completion(c, args.prompt, 1)
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(str(error))
                finally:
                    c.close()

            threads = [threading.Thread(target=client) for _ in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            if errors:
                sys.exit(f"bench/api.py: {len(errors)} requests failed with {clients} clients: {errors[0]}")
            rates[clients] = clients * per_client / elapsed

        report = {
            "model": args.model,
            "requests": n,
            "guest_ttft_ms_median": statistics.median(guest_ms),
            "overhead_ms": {"median": statistics.median(overhead), "p90": pct(overhead, 0.9)},
            "stream_first_token_overhead_ms": {
                "median": statistics.median(stream_overhead),
                "p90": pct(stream_overhead, 0.9),
            },
            "partition_capacity_rps": capacity,
            "requests_per_sec": rates,
            "ratio_to_capacity": {k: v / capacity for k, v in rates.items()},
        }
        print(f"model {os.path.basename(args.model)}, one partition with 1 vCPU, {n} requests of max_tokens 1")
        print(f"guest time to first token (median)      {report['guest_ttft_ms_median']:8.2f} ms")
        print(
            f"API overhead, whole answer              {report['overhead_ms']['median']:8.2f} ms median, "
            f"{report['overhead_ms']['p90']:.2f} ms p90"
        )
        print(
            f"API overhead, first streamed token      {report['stream_first_token_overhead_ms']['median']:8.2f} ms median, "
            f"{report['stream_first_token_overhead_ms']['p90']:.2f} ms p90"
        )
        print(f"partition capacity (1000 / guest time)  {capacity:8.1f} requests/s")
        for clients, rate in rates.items():
            print(
                f"{clients:2d} client(s)                            {rate:8.1f} requests/s "
                f"= {rate / capacity:.2f} x capacity"
            )
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        call(conn, "DELETE", "/partitions/bench")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


if __name__ == "__main__":
    main()

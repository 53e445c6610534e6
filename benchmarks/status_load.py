#!/usr/bin/env python3
"""Load on the spoke status service: many keep-alive clients against /status.

Starts status/dstack_vpn_status.py on 127.0.0.1 (an ephemeral port) with the
test suite's stand-in `wg` first on PATH, printing a recorded dump with four
peers; runs CLIENTS concurrent clients for DURATION seconds, each on one
keep-alive connection; prints one JSON object:

  requests_per_sec, p50_ms, p99_ms, errors, server_peak_rss_mb (VmHWM),
  wg_calls, wg_calls_per_sec (during the measured run)

Goals on the project's 2-core machines: p99 under 20 ms, RSS under 30 MB,
wg at most once per second.

Then a slowloris phase (--slowloris-sockets, 0 to skip): that many sockets
from --slowloris-sources addresses (127.0.1.x) each send one more byte of a
request head every second and never finish it; one the server closes is
opened again at once. Meanwhile a probe asks /health from an address of its
own every 50 ms, on a new connection each time. Printed under "slowloris":
/health p50/p99/max latency and errors, the server's peak descriptors and
RSS, and the attack's connections opened and cut.

The clients connect from several loopback addresses (127.0.0.0/8 is all
local; at most 16 clients per address), as they would from several hosts:
one address may hold 32 connections. --script runs another version of the
program (e.g. an older one, for a comparison); --open-files sets its
RLIMIT_NOFILE as the unit's LimitNOFILE does (4096).

By default every client waits for its answer and then asks again at once
(a closed loop: the load is as high as client and server can make it). With
--rate R each client asks R times a second instead, as pollers do, and the
latency is measured from when the request was due. The client threads are
spread over --processes processes (4 by default), so that the clients' own
GIL adds little to what is measured.

Standard library only; loopback only; stops by itself.

    python3 benchmarks/status_load.py [--clients 100] [--duration 10] [--rate 0] [--processes 4]
        [--slowloris-sockets 1000] [--slowloris-sources 50] [--slowloris-duration 15]
        [--open-files 4096] [--script status/dstack_vpn_status.py]
"""

import argparse
import json
import multiprocessing
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lab.slowloris import Slowloris  # noqa: E402

SCRIPT = ROOT / "status" / "dstack_vpn_status.py"
FIXTURES = ROOT / "tests" / "unit" / "fixtures" / "status"
HUB = "srhWIN5T+BTQx1LV1XJDrZdCeAA6V0kqz7fUIVkXyUw="
REQUEST = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
CLIENTS_PER_ADDRESS = 16


def client_address(i: int) -> str:
    return "127.0.0.%d" % (10 + i // CLIENTS_PER_ADDRESS)


def start_server(workdir: Path, python: str, script: Path = SCRIPT,
                 open_files: int = 4096) -> "tuple[subprocess.Popen, int]":
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    shutil.copy(FIXTURES / "wg", bin_dir / "wg")
    (bin_dir / "wg").chmod(0o755)
    env = {
        "PATH": "%s:%s" % (bin_dir, os.environ.get("PATH", "/usr/bin:/bin")),
        "FAKE_WG_DUMP": str(FIXTURES / "spoke.dump"),
        "FAKE_WG_REBASE": "5",
        "FAKE_WG_CALLS": str(workdir / "calls"),
    }
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [python, "-I", "-S", str(script), "--listen-address", "127.0.0.1", "--listen-port", "0",
             "--node-name", "bench", "--overlay-ip", "10.88.0.11", "--hub-public-key", HUB],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files)))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = re.search(r"listening on 127\.0\.0\.1 port (\d+)", log_path.read_text())
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise SystemExit("the server did not start:\n" + log_path.read_text())


def wg_calls(workdir: Path) -> int:
    path = workdir / "calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_mb(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def rss_mb(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class Client(threading.Thread):
    """One keep-alive connection asking for /status until the run ends."""

    def __init__(self, port: int, start_at: float, stop_at: float, interval: float, source: str = "127.0.0.1"):
        super().__init__(daemon=True)
        self.port, self.start_at, self.stop_at, self.interval = port, start_at, stop_at, interval
        self.source = source
        self.latencies = []
        self.errors = 0

    def run(self) -> None:
        sock = None
        buffer = b""
        due = self.start_at
        while True:
            now = time.perf_counter()
            if self.interval:
                if due > now:
                    time.sleep(due - now)
                sent_at = due  # latency counts any delay in sending, too
                due += self.interval
            else:
                sent_at = now
            if sent_at >= self.stop_at:
                break
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                                    source_address=(self.source, 0))
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buffer = b""
                sock.sendall(REQUEST)
                buffer = self.read_response(sock, buffer)
                self.latencies.append(time.perf_counter() - sent_at)
            except (OSError, ValueError):
                self.errors += 1
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()

    @staticmethod
    def read_response(sock: socket.socket, buffer: bytes) -> bytes:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ValueError("connection closed")
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise ValueError(head[:40])
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ValueError("connection closed")
            rest += chunk
        return rest[length:]


def percentile(sorted_values, fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def run_clients(port: int, first: int, count: int, total: int, start_at: float, stop_at: float,
                interval: float, results) -> None:
    """One client process: `count` client threads; puts (latencies, errors) on `results`."""
    # Pollers are not in step: spread their first requests over one interval.
    clients = [Client(port, start_at + (first + i) * interval / total, stop_at, interval, client_address(first + i))
               for i in range(count)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(stop_at - time.perf_counter() + 30)
    results.put(([l for c in clients for l in c.latencies], sum(c.errors for c in clients)))


def slowloris(port: int, sockets: int, sources: int, stop_at: float, results) -> None:
    """The attack, in a process of its own: `sockets` connections from `sources` addresses,
    one byte of a head each per second, reopened when cut. Puts (opened, cut) on `results`."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (sockets + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    attack = Slowloris(port, ["127.0.1.%d" % (1 + i) for i in range(sources)], sockets, path="/health")
    attack.start()
    time.sleep(max(0.0, stop_at - time.perf_counter()))
    attack.stop.set()
    attack.join(30)
    results.put((attack.opened, attack.closed))


def slowloris_phase(proc: subprocess.Popen, port: int, args) -> dict:
    """/health from a fresh address every 50 ms while the slowloris attack runs."""
    results = multiprocessing.Queue()
    warmup = 2.0  # the attack's sockets all open before the clock starts
    stop_at = time.perf_counter() + warmup + args.slowloris_duration
    attack = multiprocessing.Process(target=slowloris, args=(
        port, args.slowloris_sockets, args.slowloris_sources, stop_at, results))
    attack.start()
    time.sleep(warmup)
    latencies, errors, peak_fds, peak_rss = [], 0, 0, 0.0
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.2.1", 0)) as sock:
                sock.sendall(request)
                answer = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            if not answer.startswith(b"HTTP/1.1 200 "):
                raise ValueError(answer[:40])
            latencies.append(time.perf_counter() - started)
        except (OSError, ValueError):
            errors += 1
        peak_fds = max(peak_fds, open_fds(proc.pid))
        peak_rss = max(peak_rss, rss_mb(proc.pid))
        time.sleep(max(0.0, 0.05 - (time.perf_counter() - started)))
    opened, cut = results.get(timeout=60)
    attack.join(10)
    latencies.sort()
    return {
        "health_p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "health_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "health_max_ms": round(latencies[-1] * 1000, 2) if latencies else None,
        "health_requests": len(latencies),
        "health_errors": errors,
        "server_peak_fds": peak_fds,
        "server_peak_rss_mb": peak_rss,
        "attack_sockets": args.slowloris_sockets,
        "attack_addresses": args.slowloris_sources,
        "attack_connections_opened": opened,
        "attack_connections_cut": cut,
        "duration_s": args.slowloris_duration,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second per client; 0: closed loop")
    parser.add_argument("--processes", type=int, default=4,
                        help="client processes the clients are spread over (the clients' own GIL "
                             "would otherwise add its queueing to the latencies measured)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the server")
    parser.add_argument("--script", type=Path, default=SCRIPT, help="the status program to run")
    parser.add_argument("--open-files", type=int, default=4096, help="the server's RLIMIT_NOFILE")
    parser.add_argument("--slowloris-sockets", type=int, default=1000, help="0: no slowloris phase")
    parser.add_argument("--slowloris-sources", type=int, default=50)
    parser.add_argument("--slowloris-duration", type=float, default=15.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="status-load-") as tmp:
        workdir = Path(tmp)
        proc, port = start_server(workdir, args.python, args.script, args.open_files)
        under_attack = None
        workers = []
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as warm:
                warm.sendall(REQUEST)
                Client.read_response(warm, b"")
            start_at = time.perf_counter() + 1.0  # every client connected before the clock starts
            stop_at = start_at + args.duration
            interval = 1.0 / args.rate if args.rate else 0.0
            results = multiprocessing.Queue()
            shares = [args.clients // args.processes + (i < args.clients % args.processes)
                      for i in range(args.processes)]
            for i, share in enumerate(shares):
                worker = multiprocessing.Process(target=run_clients, args=(
                    port, sum(shares[:i]), share, args.clients, start_at, stop_at, interval, results))
                worker.start()
                workers.append(worker)
            time.sleep(max(0.0, start_at - time.perf_counter()))
            calls_before = wg_calls(workdir)
            cpu_before = cpu_seconds(proc.pid)
            collected = [results.get(timeout=args.duration + 60) for _ in workers]
            elapsed = time.perf_counter() - start_at
            calls = wg_calls(workdir) - calls_before
            cpu = cpu_seconds(proc.pid) - cpu_before
            rss = peak_rss_mb(proc.pid)
            alive = proc.poll() is None
            for worker in workers:
                worker.join(10)
            if args.slowloris_sockets and alive:
                under_attack = slowloris_phase(proc, port, args)
                alive = proc.poll() is None
                log = (workdir / "server.log").read_text()
                under_attack["server_log_lines"] = len(log.splitlines())
                under_attack["server_tracebacks"] = log.count("Traceback")
        finally:
            for worker in workers:
                worker.join(10)
                if worker.is_alive():
                    worker.kill()
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    latencies = sorted(l for got, _ in collected for l in got)
    print(json.dumps({
        "requests_per_sec": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "errors": sum(errors for _, errors in collected) + (0 if alive else 1),
        "server_peak_rss_mb": rss,
        "wg_calls": calls,
        "wg_calls_per_sec": round(calls / elapsed, 2),
        "requests": len(latencies),
        "server_cpu_us_per_request": round(cpu / max(1, len(latencies)) * 1e6, 1),
        "clients": args.clients,
        "client_processes": args.processes,
        "duration_s": round(elapsed, 2),
        "rate_per_client": args.rate or "closed loop",
        "server_python": subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                                        capture_output=True, text=True).stdout.strip(),
        "server_open_files": args.open_files,
        "slowloris": under_attack,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The status service as a running program: real HTTP on 127.0.0.1, a fake wg.

Each test starts `python3 -I -S status/dstack_vpn_status.py` (no site
packages: proves it needs nothing but the standard library) on an ephemeral
loopback port, with a stand-in `wg` (fixtures/status/wg) first on PATH that
prints a recorded dump, fails, hangs or prints garbage on demand. Some start
the same program as the dump helper too, on a UNIX socket in the test's
folder, and the page reading from it. Clients that must count as different
addresses connect from other loopback addresses (127.0.0.0/8 is all local).
"""

import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import need_tool
from lab.slowloris import Slowloris

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "status" / "dstack_vpn_status.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "status"

HUB = "srhWIN5T+BTQx1LV1XJDrZdCeAA6V0kqz7fUIVkXyUw="
HUB2 = "aRg6GEEfHnCFk28KRvuE5zPhDPkNnz9dA74O0LcvMCo="
BARE = "sBOHNkL41ZFqqCRF8niM4DJFpeYr3vGPIVj7iMK1Rio="
SILENT = "y5M20sIszd5imzym1ES2lKbF20AFsE/sfv6OR+t+pjM="
SECRETS = ["oDI4TG8WCzwwJazGGCW+vwIeww4vecgqZFuI7lwjlHQ=",  # spoke.dump: interface private key
           "7RG8m+4ICzC+TYNuVD4W2ExzZRB26f9DgRAmYaUy1mk="]  # spoke.dump: the hub's preshared key

STATUS_KEYS = {"node", "overlay_ip", "interface", "peer_count", "peers_up", "max_last_handshake_sec",
               "peers", "disk_free_gb", "time"}
STALE = 2.1  # past the service's STALE_SECONDS: the next answer waits for a new reading
PEER_KEYS = {"public_key", "endpoint", "allowed_ips", "last_handshake_sec", "rx_bytes", "tx_bytes"}


class Server:
    def __init__(self, proc, port, workdir):
        self.proc, self.port, self.workdir = proc, port, workdir

    @property
    def log(self) -> str:
        return (self.workdir / "server.log").read_text()

    def calls(self) -> list:
        path = self.workdir / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def set_mode(self, mode: str) -> None:
        (self.workdir / "mode").write_text(mode)

    def request(self, path, method="GET", headers=None, timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response, response.read()
        finally:
            conn.close()

    def get_json(self, path):
        status, response, body = self.request(path)
        assert response.getheader("Content-Type") == "application/json"
        return status, json.loads(body)

    def connect(self, timeout=10) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def raw(self, data: bytes, timeout=10) -> bytes:
        """Send bytes, return everything the server says until it closes."""
        with self.connect(timeout) as sock:
            sock.sendall(data)
            return read_until_closed(sock)

    def assert_serving(self):
        assert self.proc.poll() is None, "the server died:\n" + self.log
        status, _, body = self.request("/status")
        assert status in (200, 503) and json.loads(body)


def read_until_closed(sock) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def fake_wg_env(workdir: Path, dump="spoke.dump", rebase="5", env=None) -> dict:
    """The environment that puts the stand-in wg first on PATH."""
    (workdir / "bin").mkdir(parents=True, exist_ok=True)
    wg = workdir / "bin" / "wg"
    shutil.copy(FIXTURES / "wg", wg)
    wg.chmod(0o755)
    environment = {
        "PATH": "%s:%s" % (workdir / "bin", os.environ.get("PATH", "/usr/bin:/bin")),
        "FAKE_WG_DUMP": str(FIXTURES / dump),
        "FAKE_WG_CALLS": str(workdir / "calls"),
        "FAKE_WG_MODE_FILE": str(workdir / "mode"),
    }
    if rebase is not None:
        environment["FAKE_WG_REBASE"] = rebase
    environment.update(env or {})
    return environment


def limit_open_files(n: int):
    """A preexec_fn: the child may hold n descriptors (soft and hard), as LimitNOFILE=n gives it."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def wait_for(check, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        time.sleep(0.02)


def status_of(raw: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert match, raw[:200]
    return int(match.group(1))


def body_of(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head
    return json.loads(body)


@pytest.fixture
def start(tmp_path):
    """start(*args, dump=..., rebase=..., env=...) -> Server; every server is stopped afterwards."""
    procs, servers = [], []

    def _start(*args, dump="spoke.dump", rebase="5", env=None, hub=HUB, name="run", preexec_fn=None):
        workdir = tmp_path / name
        environment = fake_wg_env(workdir, dump, rebase, env)
        argv = [sys.executable, "-I", "-S", str(SCRIPT), "--listen-address", "127.0.0.1", "--listen-port", "0"]
        if hub is not None:
            argv += ["--hub-public-key", hub]
        with open(workdir / "server.log", "wb") as log:
            proc = subprocess.Popen(argv + list(args), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=environment, cwd=str(workdir), preexec_fn=preexec_fn)
        procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = (workdir / "server.log").read_text()
            found = re.search(r"listening on 127\.0\.0\.1 port (\d+)", text)
            if found:
                servers.append(Server(proc, int(found.group(1)), workdir))
                return servers[-1]
            if proc.poll() is not None:
                pytest.fail("the server exited %s:\n%s" % (proc.returncode, text))
            time.sleep(0.02)
        pytest.fail("the server did not start listening:\n" + (workdir / "server.log").read_text())

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    # A server that failed to kill a hung wg leaves it behind: end each fake
    # wg this test started (the fake logs its PID; its environment names
    # this test's files, which guards against a reused PID).
    for server in servers:
        for line in server.calls():
            kill_if_ours(int(line.split()[0]), str(server.workdir / "calls"))


def kill_if_ours(pid: int, marker: str) -> None:
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            if ("FAKE_WG_CALLS=%s\0" % marker).encode() in f.read():
                os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass  # gone already


# ---------------------------------------------------------------- the endpoints


def test_status_document_field_by_field(start):
    server = start("--node-name", "node-a", "--overlay-ip", "10.88.0.11", "--interface", "wgtest0")
    status, doc = server.get_json("/status")
    assert status == 200
    assert set(doc) - {"postgres"} == STATUS_KEYS
    assert doc["node"] == "node-a"
    assert doc["overlay_ip"] == "10.88.0.11"
    assert doc["interface"] == "wgtest0"
    assert doc["peer_count"] == 4 and type(doc["peer_count"]) is int
    assert doc["peers_up"] == 2 and type(doc["peers_up"]) is int
    assert doc["max_last_handshake_sec"] is None  # two peers never shook hands

    peers = doc["peers"]
    assert isinstance(peers, list) and [p["public_key"] for p in peers] == [HUB, HUB2, BARE, SILENT]
    for peer in peers:
        assert set(peer) == PEER_KEYS
        assert type(peer["rx_bytes"]) is int and type(peer["tx_bytes"]) is int
        assert isinstance(peer["allowed_ips"], list)
    hub, hub2, bare, silent = peers
    assert hub["endpoint"] == "[2001:db8:5::1]:51820"
    assert hub["allowed_ips"] == ["10.88.0.0/24"]
    assert type(hub["last_handshake_sec"]) is int and 5 <= hub["last_handshake_sec"] <= 8
    assert (hub["rx_bytes"], hub["tx_bytes"]) == (284, 308)
    assert hub2["endpoint"] == "198.51.100.10:51821"
    assert hub2["allowed_ips"] == ["10.99.0.0/24", "fd00:99::/64"]
    assert 5 <= hub2["last_handshake_sec"] <= 8
    assert bare == {"public_key": BARE, "endpoint": None, "allowed_ips": [], "last_handshake_sec": None,
                    "rx_bytes": 0, "tx_bytes": 0}
    assert silent["last_handshake_sec"] is None and silent["tx_bytes"] == 148

    st = os.statvfs("/")
    assert type(doc["disk_free_gb"]) is float and doc["disk_free_gb"] == round(doc["disk_free_gb"], 1)
    assert abs(doc["disk_free_gb"] - st.f_bavail * st.f_frsize / 2 ** 30) < 0.5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["time"])
    stamp = datetime.strptime(doc["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs(stamp.timestamp() - time.time()) < 5
    if "postgres" in doc:  # only where this machine happens to run PostgreSQL
        assert doc["postgres"]["role"] in ("primary", "replica", None)
    server.assert_serving()


def test_oldest_handshake_when_every_peer_has_one(start):
    server = start(dump="spoke-stale-peer.dump")
    status, doc = server.get_json("/status")
    assert status == 200
    assert (doc["peer_count"], doc["peers_up"]) == (2, 1)
    assert 405 <= doc["max_last_handshake_sec"] <= 408


def test_health_ok_with_recent_hub_handshake(start):
    status, doc = start().get_json("/health")
    assert (status, doc) == (200, {"ok": True})


def test_health_503_when_hub_handshake_is_old(start):
    status, doc = start(rebase="500").get_json("/health")
    assert status == 503 and doc["ok"] is False
    assert re.fullmatch(r"last handshake with the hub was 50[0-3] s ago \(limit 180 s\)", doc["reason"])


def test_health_limit_is_an_option(start):
    status, doc = start("--handshake-recent", "1000", rebase="500").get_json("/health")
    assert (status, doc) == (200, {"ok": True})


def test_health_503_when_hub_is_not_a_peer(start):
    other = "B" * 43 + "="
    status, doc = start(hub=other).get_json("/health")
    assert status == 503 and doc["ok"] is False and other in doc["reason"]


def test_health_503_when_hub_never_shook_hands(start):
    status, doc = start(hub=BARE).get_json("/health")
    assert (status, doc) == (503, {"ok": False, "reason": "no handshake with the hub yet"})


def test_health_without_hub_key_uses_the_only_peer(start):
    assert start(hub=None, dump="hub.dump", name="fresh").get_json("/health") == (200, {"ok": True})
    status, doc = start(hub=None, dump="hub.dump", rebase="300", name="stale").get_json("/health")
    assert status == 503 and doc["reason"].startswith("last handshake with the hub was 30")


def test_metrics(start):
    server = start("--node-name", 'say "hi"\\')
    status, response, body = server.request("/metrics")
    assert status == 200
    assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    for family, kind in [("dstack_vpn_peers", "gauge"), ("dstack_vpn_peers_up", "gauge"),
                         ("dstack_vpn_peer_last_handshake_age_seconds", "gauge"),
                         ("dstack_vpn_peer_receive_bytes_total", "counter"),
                         ("dstack_vpn_peer_transmit_bytes_total", "counter"),
                         ("dstack_vpn_disk_free_bytes", "gauge")]:
        assert re.search(r"^# HELP %s \S.*\n# TYPE %s %s$" % (family, family, kind), text, re.M), family
    assert 'node="say \\"hi\\"\\\\"' in text
    assert 'dstack_vpn_peers{interface="wg0"} 4\n' in text
    assert 'dstack_vpn_peers_up{interface="wg0"} 2\n' in text
    assert re.search(r'^dstack_vpn_peer_last_handshake_age_seconds\{interface="wg0",public_key="%s"\} [5-8]$'
                     % re.escape(HUB), text, re.M)
    assert ('dstack_vpn_peer_last_handshake_age_seconds{interface="wg0",public_key="%s"} +Inf\n' % BARE) in text
    assert ('dstack_vpn_peer_receive_bytes_total{interface="wg0",public_key="%s"} 284\n' % HUB) in text
    assert ('dstack_vpn_peer_transmit_bytes_total{interface="wg0",public_key="%s"} 148\n' % SILENT) in text


def test_head_gets_headers_without_body(start):
    server = start()
    raw = server.raw(b"HEAD /status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert status_of(raw) == 200 and body == b""
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) > 100


def test_query_string_and_absolute_form(start):
    server = start()
    assert server.request("/status?pretty=1")[0] == 200
    raw = server.raw(b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status_of(raw) == 200 and body_of(raw) == {"ok": True}


def test_no_secret_anywhere(start):
    server = start("--log-requests")
    seen = [server.request(p)[2].decode() for p in ("/status", "/metrics", "/health", "/nope")]
    server.set_mode("garbage")
    time.sleep(STALE)
    seen += [server.request(p)[2].decode() for p in ("/status", "/health")]
    seen.append(server.log)
    for secret in SECRETS:
        assert secret in (FIXTURES / "spoke.dump").read_text()  # the fixture really holds it
        for text in seen:
            assert secret not in text


# ---------------------------------------------------------------- wg failing


def test_wg_exit_status_gives_503_with_reason(start):
    server = start()
    server.set_mode("fail")
    for path in ("/status", "/metrics"):
        status, doc = server.get_json(path)
        assert status == 503
        assert doc["reason"] == "`wg show wg0 dump` exited 1: Unable to access interface: Operation not permitted"
    status, doc = server.get_json("/health")
    assert status == 503 and doc["ok"] is False and "exited 1" in doc["reason"]
    assert "Traceback" not in server.log
    # It recovers once wg does, at the next reading.
    server.set_mode("ok")
    time.sleep(STALE)
    assert server.get_json("/health") == (200, {"ok": True})


def test_missing_interface(start):
    server = start("--interface", "wg9", env={"FAKE_WG_INTERFACE": "wg0"})
    status, doc = server.get_json("/status")
    assert status == 503 and doc["reason"].endswith("exited 1: Unable to access interface: No such device")


def test_wg_binary_missing(start):
    server = start("--wg", "/nonexistent/wg")
    status, doc = server.get_json("/health")
    assert status == 503 and doc["reason"].startswith("cannot run `/nonexistent/wg show wg0 dump`")
    server.assert_serving()


def test_wg_hanging_is_killed_and_reported(start):
    server = start("--wg-timeout", "1")
    server.set_mode("hang")
    started = time.monotonic()
    status, doc = server.get_json("/status")
    assert time.monotonic() - started < 4
    assert status == 503 and doc["reason"] == "`wg show wg0 dump` timed out after 1 s"
    # The hung wg (the fake execs `sleep` in place) was killed and reaped.
    pid = int(server.calls()[0].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.assert_serving()


@pytest.mark.parametrize("mode, reason", [
    ("garbage", "cannot parse wg output: line 1 has 2 tab-separated fields, expected 4"),
    ("empty", "wg printed nothing"),
])
def test_wg_garbage_output(start, mode, reason):
    server = start()
    server.set_mode(mode)
    status, doc = server.get_json("/status")
    assert status == 503 and doc["reason"].startswith(reason)
    server.assert_serving()


# ---------------------------------------------------------------- the wg cache


def test_fifty_concurrent_requests_share_one_wg_call(start):
    server = start("--max-connections-per-source", "50")  # all from 127.0.0.1
    assert server.calls() == []  # nothing is read before someone asks
    barrier = threading.Barrier(50)
    results = []

    def client():
        barrier.wait()
        results.append(server.request("/status")[0])

    threads = [threading.Thread(target=client) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 50
    assert 1 <= len(server.calls()) <= 2


def test_a_slightly_old_reading_is_served_while_the_next_is_taken(start):
    server = start()
    server.set_mode("slow")  # wg takes 0.5 s
    started = time.monotonic()
    assert server.request("/health")[0] == 200
    assert time.monotonic() - started >= 0.5  # the first answer waits for the first reading
    time.sleep(1.2)
    started = time.monotonic()
    assert server.request("/health")[0] == 200
    assert time.monotonic() - started < 0.3  # served from the 1.2 s old reading...
    time.sleep(0.8)
    assert len(server.calls()) == 2  # ...while the next was taken
    time.sleep(STALE)
    started = time.monotonic()
    assert server.request("/health")[0] == 200
    assert time.monotonic() - started >= 0.5  # too old to serve: it waited
    assert len(server.calls()) == 3


def test_wg_runs_at_most_once_a_second_under_steady_load(start):
    server = start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    started = time.monotonic()
    count = 0
    while time.monotonic() - started < 3:
        conn.request("GET", "/metrics")
        assert conn.getresponse().read()
        count += 1
    conn.close()
    assert count > 100
    assert 2 <= len(server.calls()) <= 4


# ---------------------------------------------------------------- HTTP errors


def test_unknown_path_404(start):
    status, doc = start().get_json("/secrets")
    assert status == 404 and "error" in doc


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_405_with_allow(start, method):
    status, response, body = start().request("/status", method=method)
    assert status == 405
    assert response.getheader("Allow") == "GET, HEAD"
    assert json.loads(body) == {"error": "method not allowed"}


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /status\r\n\r\n", 400),  # HTTP/0.9
    (b"GET /status HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET /status HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n", 400),
    (b"GE(T /status HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET /status HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    (b"GET /status HTTP/one\r\nHost: t\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"GET /status HTTP/1.1\r\nHost: t\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
    (b"GET /status HTTP/1.1\r\nHost: t\r\n" + b"X-A: b\r\n" * 80 + b"\r\n", 431),
    (b"\xff\xfe\x00\x01garbage\r\n\r\n", 400),
])
def test_malformed_requests(start, request_bytes, status):
    server = start()
    raw = server.raw(request_bytes)
    assert status_of(raw) == status
    assert b"Connection: close" in raw
    assert "error" in body_of(raw)
    server.assert_serving()


def test_endless_header_without_newline_is_refused(start):
    server = start()
    with server.connect() as sock:
        try:
            for _ in range(40):
                sock.sendall(b"x" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close while we are still sending
        raw = read_until_closed(sock)
    assert status_of(raw) == 414
    server.assert_serving()


def test_keep_alive_and_pipelining(start):
    server = start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for path in ("/status", "/health", "/metrics", "/nope"):
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.getheader("Connection") is None  # HTTP/1.1: stays open
    conn.close()
    raw = server.raw(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n\r\n"
                     b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 2


def test_request_with_body_is_answered_then_closed(start):
    server = start()
    raw = server.raw(b"POST /status HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
    assert status_of(raw) == 405 and b"Connection: close" in raw


def test_client_that_shuts_down_its_side_still_gets_answers(start):
    server = start()
    server.set_mode("slow")  # the first answer has to wait for wg
    with server.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /status HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        raw = read_until_closed(sock)
    assert raw.count(b"HTTP/1.1 200 OK") == 2


def test_client_that_never_reads_cannot_grow_memory(start):
    server = start()
    request = b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n"
    with server.connect() as hog:
        hog.settimeout(1)
        sent = 0
        try:
            while sent < 50 * 1024 * 1024:  # 1.4 million requests, a GB of answers
                sent += hog.send(request * 1000)
        except socket.timeout:
            pass  # the server stopped reading: the point
        assert sent < 20 * 1024 * 1024
        server.assert_serving()  # others are still served meanwhile
        with open("/proc/%d/status" % server.proc.pid) as f:
            rss_kb = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
        assert rss_kb < 60 * 1024


def test_http10_closes_unless_asked(start):
    server = start()
    raw = server.raw(b"GET /health HTTP/1.0\r\n\r\n")  # the server must close by itself
    assert status_of(raw) == 200 and b"Connection: close" in raw


# ---------------------------------------------------------------- slow and many clients


def test_client_sending_nothing_is_disconnected(start):
    server = start("--request-timeout", "1")
    with server.connect() as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert 0.8 <= time.monotonic() - started < 3
    server.assert_serving()


def test_client_stalling_mid_request_gets_408(start):
    server = start("--request-timeout", "1")
    with server.connect() as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        raw = read_until_closed(sock)
        assert time.monotonic() - started < 3
    assert status_of(raw) == 408 and body_of(raw) == {"error": "request timed out"}


def test_trickling_client_cannot_stretch_the_deadline(start):
    server = start("--request-timeout", "1")
    with server.connect() as sock:
        sock.settimeout(0.2)
        started = time.monotonic()
        received = b""
        for _ in range(25):  # a byte every 0.2 s for up to 5 s
            try:
                sock.sendall(b"X")
                received += sock.recv(1000)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if received.endswith(b"}\n"):
                break
        assert time.monotonic() - started < 3
    assert status_of(received) == 408
    server.assert_serving()


def test_connection_limit(start):
    server = start("--max-connections", "3")
    idle = [server.connect() for _ in range(3)]
    try:
        time.sleep(0.3)
        raw = server.raw(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status_of(raw) == 503 and body_of(raw) == {"error": "too many connections"}
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while server.request("/health")[0] != 200:
        assert time.monotonic() < deadline, "slots were not given back"
        time.sleep(0.1)


# ---------------------------------------------------------------- the process


def test_configured_from_environment(start):
    env = {"DSTACK_VPN_STATUS_NODE_NAME": "env-node", "DSTACK_VPN_STATUS_OVERLAY_IP": "10.88.0.12",
           "DSTACK_VPN_STATUS_INTERFACE": "wgenv", "DSTACK_VPN_STATUS_HUB_PUBLIC_KEY": BARE}
    server = start(hub=None, env=env)
    status, doc = server.get_json("/status")
    assert (doc["node"], doc["overlay_ip"], doc["interface"]) == ("env-node", "10.88.0.12", "wgenv")
    assert server.calls()[0].split()[1:] == ["show", "wgenv", "dump"]
    assert server.get_json("/health")[1]["reason"] == "no handshake with the hub yet"  # BARE is the hub
    overridden = start("--node-name", "cli-node", hub=None, env=env, name="cli")
    assert overridden.get_json("/status")[1]["node"] == "cli-node"


def test_request_log_is_quiet_by_default_and_one_line_per_request(start):
    quiet = start(name="quiet")
    quiet.request("/status")
    quiet.request("/nope")
    assert len(quiet.log.splitlines()) == 1  # "listening on ..."
    loud = start("--log-requests", name="loud")
    loud.request("/status")
    loud.request("/nope")
    loud.request("/health", method="POST")
    lines = loud.log.splitlines()[1:]
    assert len(lines) == 3
    assert re.search(r'127\.0\.0\.1 "GET /status HTTP/1\.1" 200 \d+ [\d.]+ms$', lines[0])
    assert '"GET /nope HTTP/1.1" 404' in lines[1] and '"POST /health HTTP/1.1" 405' in lines[2]


def test_probe_for_container_health_checks(start):
    def probe(port):
        return subprocess.run([sys.executable, "-I", "-S", str(SCRIPT), "--probe", "--listen-address",
                               "127.0.0.1", "--listen-port", str(port), "--request-timeout", "5"],
                              capture_output=True, text=True, timeout=30)

    healthy = probe(start(name="healthy").port)
    assert (healthy.returncode, json.loads(healthy.stdout)) == (0, {"ok": True})
    unhealthy = probe(start(rebase="900", name="unhealthy").port)
    assert unhealthy.returncode == 1 and json.loads(unhealthy.stdout)["ok"] is False
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert probe(port).returncode == 1  # nothing listens there


def test_sigterm_stops_promptly_despite_open_connections(start):
    server = start()
    with server.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.recv(1000)  # served, and held open by keep-alive
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(5) == 0


def test_sigterm_during_a_hung_wg_leaves_no_wg_behind(start):
    server = start("--wg-timeout", "60")
    server.set_mode("hang")
    with server.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # waits for the hung wg
        deadline = time.monotonic() + 5
        while not server.calls():
            assert time.monotonic() < deadline, "wg was not called"
            time.sleep(0.05)
        pid = int(server.calls()[0].split()[0])
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(5) == 0
    deadline = time.monotonic() + 5
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the hung wg outlived the server"
        time.sleep(0.05)


def test_refuses_to_start_on_a_taken_port(start, tmp_path):
    server = start()
    result = subprocess.run([sys.executable, "-I", "-S", str(SCRIPT), "--listen-address", "127.0.0.1",
                             "--listen-port", str(server.port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "cannot listen on 127.0.0.1 port %d" % server.port in result.stderr


# ---------------------------------------------------------------- the dump helper
#
# Where it is deployed, the page holds no capability: a root helper runs
# `wg show <if> dump` for it and hands on the dump with the keys taken out
# (templates/systemd/dstack-vpn-status-helper.*, the dstack entrypoint).


class Helper(Server):
    """The dump helper: the stand-in `wg` and its log as the server's, a socket path for a port."""

    def __init__(self, proc, path, workdir):
        super().__init__(proc, None, workdir)
        self.path = path

    @property
    def log(self) -> str:
        return (self.workdir / "helper.log").read_text()

    def ask(self, send: bytes = b"") -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.path))
            if send:
                try:
                    sock.sendall(send)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # it answers without reading and closes
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""  # closed with what we sent unread: after its answer
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)


@pytest.fixture
def start_helper(tmp_path):
    """start_helper(*args, name=..., wrap=[...]) -> Helper: the program as the dump helper, as
    this user, on <tmp>/<name>/run/wg-dump.sock (or under a wrapper such as systemd-socket-activate)."""
    procs = []

    def _start(*args, name="helper", wrap=(), dump="spoke.dump", wait=True):
        workdir = tmp_path / name
        environment = fake_wg_env(workdir, dump)
        (workdir / "run").mkdir(exist_ok=True)
        path = workdir / "run" / "wg-dump.sock"
        argv = [*wrap, sys.executable, "-I", "-S", str(SCRIPT), "--dump-helper", "--wg-dump-socket", str(path),
                *args]
        with open(workdir / "helper.log", "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment,
                                    cwd=str(workdir))
        procs.append(proc)
        helper = Helper(proc, path, workdir)
        if wait:
            wait_for(lambda: path.exists() and "dump helper: " in helper.log or proc.poll() is not None,
                     what="the helper's socket")
            assert proc.poll() is None, helper.log
        return helper

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(5)


def test_dump_helper_hands_on_the_dump_without_keys(start_helper):
    helper = start_helper()
    answer = helper.ask().decode()
    status, _, dump = answer.partition("\n")
    assert status == "ok"
    lines = dump.splitlines()
    assert len(lines) == 5 and lines[0].startswith("(hidden)\t")
    assert [line.split("\t")[:2] for line in lines[1:]] == [[k, "(hidden)"] for k in (HUB, HUB2, BARE, SILENT)]
    for secret in SECRETS:
        assert secret in (FIXTURES / "spoke.dump").read_text()  # the fixture really holds it
        assert secret not in answer and secret not in helper.log
    assert oct(os.stat(helper.path).st_mode & 0o777) == "0o666"  # the folder decides who gets in
    assert helper.calls()[0].split()[1:] == ["show", "wg0", "dump"]


def test_dump_helper_passes_on_why_wg_failed(start_helper):
    helper = start_helper()
    helper.set_mode("fail")
    assert helper.ask() == b"error `wg show wg0 dump` exited 1: Unable to access interface: Operation not permitted\n"
    time.sleep(0.6)
    helper.set_mode("garbage")
    answer = helper.ask().decode()
    assert answer.startswith("error cannot parse wg output: line 1 has 2 tab-separated fields") and "html" not in answer


def test_dump_helper_reads_nothing_and_runs_wg_at_most_twice_a_second(start_helper):
    helper = start_helper()
    first = helper.ask()
    answers = [helper.ask(b"GET /private-key HTTP/1.1\r\n\r\n" * i) for i in range(20)]
    assert answers == [first] * 20  # whatever a client sends, the same answer
    assert len(helper.calls()) <= 2
    time.sleep(0.6)
    helper.ask()
    assert len(helper.calls()) <= 3
    assert helper.proc.poll() is None


def test_dump_helper_under_systemd_socket_activation(tmp_path):
    # systemd-socket-activate makes the socket and passes it as fd 3 with LISTEN_PID and
    # LISTEN_FDS, as systemd does for dstack-vpn-status-helper.socket: the helper takes it
    # rather than a path of its own (it is given none)
    activate = need_tool("systemd-socket-activate")
    path = tmp_path / "activated.sock"
    env = fake_wg_env(tmp_path)
    passed = [arg for name, value in env.items() for arg in ("-E", "%s=%s" % (name, value))]
    with open(tmp_path / "helper.log", "wb") as log:
        proc = subprocess.Popen([activate, "-l", str(path), *passed, sys.executable, "-I", "-S", str(SCRIPT),
                                 "--dump-helper", "--wg-dump-socket", ""], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, env=env)
    try:
        wait_for(path.exists, what="systemd-socket-activate's socket")
        helper = Helper(proc, path, tmp_path)
        assert helper.ask().startswith(b"ok\n(hidden)\t")
        assert helper.ask().startswith(b"ok\n(hidden)\t")  # the same process, still listening
        assert len(helper.calls()) == 1
        assert "dump helper: `wg show wg0 dump` without keys on %s" % path in helper.log
    finally:
        proc.terminate()
        proc.wait(5)


def test_dump_helper_takes_over_a_stale_socket_and_removes_its_own(start_helper, tmp_path):
    (tmp_path / "helper" / "run").mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "helper" / "run" / "wg-dump.sock"))  # as a killed helper leaves it
    stale.close()
    helper = start_helper()
    assert helper.ask().startswith(b"ok\n")
    helper.proc.send_signal(signal.SIGTERM)
    assert helper.proc.wait(5) == 0
    assert not helper.path.exists()


def test_dump_helper_never_removes_what_is_not_a_socket(start_helper, tmp_path):
    (tmp_path / "helper" / "run").mkdir(parents=True)
    precious = tmp_path / "helper" / "run" / "wg-dump.sock"
    precious.write_text("not a socket")
    helper = start_helper(wait=False)
    assert helper.proc.wait(10) == 1
    assert "dump helper: cannot listen on %s" % precious in helper.log
    assert precious.read_text() == "not a socket"


def test_page_reads_the_dump_from_the_helper(start, start_helper):
    direct = start("--node-name", "node-a", name="direct").get_json("/status")
    helper = start_helper()
    server = start("--node-name", "node-a", "--wg-dump-socket", str(helper.path), name="page",
                   env={"PATH": "/nonexistent"})  # it runs no wg of its own
    status, doc = server.get_json("/status")
    assert status == 200
    assert direct[0] == 200
    ignore = {"time", "max_last_handshake_sec", "disk_free_gb"}
    peers = [{k: v for k, v in p.items() if k != "last_handshake_sec"} for p in doc["peers"]]
    assert peers == [{k: v for k, v in p.items() if k != "last_handshake_sec"} for p in direct[1]["peers"]]
    assert {k: v for k, v in doc.items() if k not in ignore | {"peers"}} == \
        {k: v for k, v in direct[1].items() if k not in ignore | {"peers"}}
    assert server.get_json("/health") == (200, {"ok": True})
    assert server.calls() == [] and len(helper.calls()) == 1
    texts = [server.request(p)[2].decode() for p in ("/status", "/metrics", "/health")] + [server.log]
    for secret in SECRETS:
        assert not [t for t in texts if secret in t]
    # wg failing in the helper: the page says why, as if it had run wg itself
    helper.set_mode("fail")
    time.sleep(STALE)
    status, doc = server.get_json("/status")
    assert status == 503
    assert doc["reason"] == "`wg show wg0 dump` exited 1: Unable to access interface: Operation not permitted"


def test_page_without_its_helper_says_so_and_recovers(start, start_helper, tmp_path):
    path = tmp_path / "helper" / "run" / "wg-dump.sock"
    server = start("--wg-dump-socket", str(path))
    status, doc = server.get_json("/health")
    assert status == 503
    assert doc["reason"] == "cannot reach the dump helper at %s: No such file or directory" % path
    start_helper()
    time.sleep(STALE)
    assert server.get_json("/health") == (200, {"ok": True})
    assert "Traceback" not in server.log


def test_page_does_not_wait_forever_for_a_hung_helper(start, tmp_path):
    path = tmp_path / "hung.sock"
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(path))
    hung.listen(5)  # accepts (in the kernel) and never answers
    try:
        server = start("--wg-dump-socket", str(path), "--wg-timeout", "1")
        started = time.monotonic()
        status, doc = server.get_json("/health")
        assert time.monotonic() - started < 4
        assert status == 503 and doc["reason"] == "the dump helper at %s did not answer within 2 s" % path
    finally:
        hung.close()


# ---------------------------------------------------------------- caps on connections


def connect_from(server, source: str, timeout=10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout, source_address=(source, 0))


def get_from(server, source: str, path="/health", timeout=10) -> "tuple[int, bytes, float]":
    started = time.monotonic()
    with connect_from(server, source, timeout) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path.encode())
        raw = read_until_closed(sock)
    return status_of(raw), raw, time.monotonic() - started


def closed_at_once(sock, within=1.0) -> bytes:
    """What the server said before closing `sock`, which must happen within `within` s."""
    sock.settimeout(within)
    try:
        return read_until_closed(sock)
    except ConnectionResetError:
        return b"(reset)"


def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def log_lines(server, word: str) -> list:
    return [line for line in server.log.splitlines() if word in line]


def test_connections_over_the_per_source_cap_are_closed_at_once(start):
    server = start("--max-connections-per-source", "4")
    held = [connect_from(server, "127.0.0.2") for _ in range(4)]
    try:
        wait_for(lambda: fd_count(server.proc.pid) >= 4 + 6, what="the server to hold 4 connections")
        for _ in range(100):
            with connect_from(server, "127.0.0.2") as extra:
                started = time.monotonic()
                raw = closed_at_once(extra)
                assert time.monotonic() - started < 1
                assert status_of(raw) == 503 and body_of(raw) == {"error": "too many connections from your address"}
        # another address is not held back by that one
        assert get_from(server, "127.0.0.3")[0] == 200
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: get_from(server, "127.0.0.2")[0] == 200, what="the address's slots to be given back")
    # a hundred refusals: one line in the log, no traceback
    assert len(log_lines(server, "refusing connections")) == 1, server.log
    assert "127.0.0.2 holds 4 connections (the limit per address)" in server.log
    assert "Traceback" not in server.log


def test_a_new_address_gets_in_when_every_connection_is_taken(start):
    server = start("--max-connections", "6", "--max-connections-per-source", "4")
    heavy = [connect_from(server, "127.0.0.2") for _ in range(4)]
    light = [connect_from(server, "127.0.0.3") for _ in range(2)]
    newcomer = connect_from(server, "127.0.0.4")
    try:
        time.sleep(0.3)
        # all six taken: a third address gets in (and stays, keep-alive); the busiest
        # address's oldest connection made room
        newcomer.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status_of(newcomer.recv(65536)) == 200
        assert closed_at_once(heavy[0]) in (b"", b"(reset)")
        # the light address holds 2 and the busiest now 3: taking from it would not make them more even
        with connect_from(server, "127.0.0.3") as extra:
            raw = closed_at_once(extra)
        assert status_of(raw) == 503 and body_of(raw) == {"error": "too many connections"}
        for sock in heavy[1:] + light:
            sock.settimeout(0.2)
            with pytest.raises(socket.timeout):
                sock.recv(10)  # still open: not evicted
    finally:
        for sock in heavy + light + [newcomer]:
            sock.close()
    assert "Traceback" not in server.log


def raise_own_open_files(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.fail("this test opens %d sockets; the open-files hard limit is %d" % (n, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def test_1500_connections_against_1024_descriptors(start):
    """More connections than the process may have descriptors: it keeps accepting (and closing
    what is over its cap), holds a bounded number of descriptors, and still answers a new address."""
    need_tool("ss")
    raise_own_open_files(4096)
    server = start("--request-timeout", "60", preexec_fn=limit_open_files(1024))
    cap = int(re.search(r"at most (\d+) connections, 32 per address \(open files limit 1024\)", server.log).group(1))
    assert cap == 1024 - 64
    base = fd_count(server.proc.pid)
    clients = []
    try:
        for i in range(1500):  # 50 addresses, 30 each: under the per-address cap, over the total
            clients.append(connect_from(server, "127.0.1.%d" % (1 + i // 30)))
        time.sleep(1.0)
        # everything was accepted (nothing waits in the listen queue) ...
        queue = subprocess.run(["ss", "-Hltn", "sport = :%d" % server.port], capture_output=True, text=True).stdout
        assert queue.split()[1] == "0", queue
        # ... the server holds at most its cap ...
        assert fd_count(server.proc.pid) <= base + cap + 2
        # ... and a new address is answered at once
        status, _, seconds = get_from(server, "127.0.2.1")
        assert status == 200 and seconds < 2
        # those it let go, it closed: none is left hanging
        for sock in clients:
            sock.setblocking(False)
        closed = 0
        for sock in clients:
            try:
                closed += sock.recv(65536) is not None
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        open_ones = len(clients) - closed
        assert cap - 50 <= open_ones <= cap
    finally:
        for sock in clients:
            sock.close()
    assert server.proc.poll() is None
    assert "Traceback" not in server.log and not log_lines(server, "accept failed"), server.log
    assert len(server.log.splitlines()) <= 4, server.log  # listening, one refusal line, maybe a count
    # the descriptors are given back
    wait_for(lambda: fd_count(server.proc.pid) <= base + 2, what="the descriptors to be closed")


def test_slowloris_cannot_hold_down_health(start):
    raise_own_open_files(2048)
    server = start()  # the defaults: 5 s for a request head, 32 connections per address
    base = fd_count(server.proc.pid)
    attack = Slowloris(server.port, ["127.0.4.%d" % i for i in range(1, 21)], 1000)  # 50 per address
    attack.start()
    latencies, statuses, peak = [], [], 0
    try:
        time.sleep(1.0)
        deadline = time.monotonic() + 8  # past the 5 s a head may take: the cut ones come back
        while time.monotonic() < deadline:
            status, _, seconds = get_from(server, "127.0.5.1")
            statuses.append(status)
            latencies.append(seconds)
            peak = max(peak, fd_count(server.proc.pid))
            time.sleep(0.1)
    finally:
        attack.stop.set()
        attack.join(30)
    assert attack.opened > 1000 and attack.closed > 300  # the attack ran, and was cut and came back
    assert statuses == [200] * len(statuses) and len(statuses) > 20
    assert max(latencies) < 2.0, sorted(latencies)[-5:]
    assert peak <= base + 20 * 32 + 16  # 32 per address; a reading's pipes, the probe, one being cut
    assert "Traceback" not in server.log
    assert len(log_lines(server, "refusing connections")) <= 2, server.log

"""The monitor of the lab stack, for real: Prometheus and Alertmanager (Debian 13's) on node-c,
scraping every spoke's status service (node-d's in its dstack app too), the hub's, and Patroni and
the PostgreSQL exporter on a one-member cluster (node-a); alerts to a webhook receiver in the
operator's namespace, where the lab stack's receiver points.

The tests run in order on one lab network: every target is up (the scrape duration and
Prometheus' memory are printed), the hub's metrics and the exporter reach the monitor alone, the
page shows every node in headless Chromium (a screenshot is kept), a spoke powered off reaches the
receiver as DstackVpnSpokeDown and resolves once it is back (the times are printed), and no
receiver credential is anywhere but alertmanager.yml.

Then the stack's clients (people's devices), each a namespace of the lab's running wg-quick with
the program's output (lab/device.py): each reaches what its `allow` opens and nothing else (the
probe table is printed), nothing reaches a client, a rotated key's old config no longer gets a
handshake (its QR code is kept as a test artifact: a key no hub takes), and a client removed
leaves the other's traffic whole.

    CI=true .venv/bin/python -m pytest -q -s tests/e2e/test_lab_monitor.py
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import need_tool
from labnet import lab_network, wait_until
from probes import probe
from test_lab_network import CommandLines, journal_text, process_texts

MONITOR = "node-c"
OFF = "node-b"  # the spoke powered off (a plain spoke: nothing else of it answers the monitor)
RECEIVER_PORT = 9099
HOOK_TOKEN = "t0ken-" + os.urandom(12).hex()
MAIL_PASSWORD = "pw-" + os.urandom(12).hex()
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ALERT_BOUND = 180  # s from the power cut to the alert at the receiver
RESOLVE_BOUND = 240  # s from the spoke's SSH answering again to the resolution at the receiver
# The lab stack's client `laptop` (the status pages and the monitor's page by default; the
# database, listed in postgres.clients here) and one that may reach node-b alone.
PHONE = {"name": "phone", "kind": "client", "allow": ["node-b"]}

RECEIVER = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
out = open(sys.argv[2], "a", buffering=1)
class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        out.write(json.dumps({"at": time.time(), "path": self.path, "body": json.loads(body)}) + "\n")
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("198.51.100.100", int(sys.argv[1])), Hook).serve_forever()
"""


def _overrides(net) -> dict:
    """The lab stack with a one-member cluster (no backups) and two more receivers whose
    credentials are secrets: a webhook whose URL holds a token, and mail through a smarthost that
    is not there."""
    from lab.example import stack_settings
    stack = stack_settings(monitor=True, clients=True)
    monitor = dict(stack["monitor"])
    monitor["receivers"] = monitor["receivers"] + [
        {"name": "tokened", "webhook": {}},
        {"name": "mail", "email": {"to": "oncall@example.com", "from": "alerts@example.com",
                                   "smarthost": "198.51.100.250:587", "username": "alerts"}}]
    pg = {k: v for k, v in stack["postgres"].items() if k != "backup"}
    spokes = [s for s in stack["spokes"] if s["name"] != "node-e"] + [PHONE]
    return dict(spokes=spokes, postgres=dict(pg, members=["node-a"], clients=pg["clients"] + ["laptop"]),
                monitor=monitor, monitorSecrets={
                    "tokened": {"url": f"http://198.51.100.100:{RECEIVER_PORT}/tokened/{HOOK_TOKEN}"},
                    "mail": {"password": MAIL_PASSWORD}})


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    need_tool("ip")
    with lab_network("dvo", postgres=True, monitor=True, clients=True) as network:
        received = tmp_path_factory.mktemp("receiver") / "received.jsonl"
        network.lab._ensure_underlay()  # the operator's namespace, where the receiver listens
        receiver = subprocess.Popen(["ip", "netns", "exec", network.lab.op_ns, sys.executable, "-c", RECEIVER,
                                     str(RECEIVER_PORT), str(received)], start_new_session=True)
        try:
            t0 = time.monotonic()
            with CommandLines() as lines:
                network.first_up = network.up(**_overrides(network))
            network.command_lines = lines.seen
            network.last_secret_outputs = network.first_up.outputs
            network.received = received
            print(f"\n[monitor] up from nothing with the monitor: {time.monotonic() - t0:.0f} s, "
                  f"{len(network.first_up.actions)} actions")
            yield network
        finally:
            os.killpg(receiver.pid, signal.SIGTERM)
            receiver.wait(10)


def ssh(net, node, command, timeout=60):
    return net.lab.ssh(net.node_hosts()[node], command, timeout=timeout)


def prom(net, path: str):
    """Prometheus' HTTP API on the monitor's overlay address, asked on the monitor node."""
    address = net.nodes()[MONITOR]["address"]
    out = ssh(net, MONITOR, f"python3 -I -c 'import sys, urllib.request; "
                            f"sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "
                            f"{shlex.quote(f'http://{address}:9090{path}')}")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["data"]


def query(net, expr: str) -> list[dict]:
    from urllib.parse import quote
    return prom(net, f"/api/v1/query?query={quote(expr)}")["result"]


def received(net) -> list[dict]:
    if not net.received.exists():
        return []
    return [json.loads(line) for line in net.received.read_text().splitlines() if line.strip()]


def test_the_monitor_scrapes_every_target(net):
    expected = {("status", n) for n in ("node-a", "node-b", "node-c", "node-d")} | {
        ("hub", "hub"), ("patroni", "node-a"), ("postgres", "node-a"), ("prometheus", None), ("alertmanager", None)}

    def targets():
        active = prom(net, "/api/v1/targets?state=active")["activeTargets"]
        return {(t["labels"]["job"], t["labels"].get("node")): t["health"] for t in active}

    assert wait_until(lambda: set(targets()) == expected and all(h == "up" for h in targets().values()), 90, 3), \
        targets()
    time.sleep(20)  # a few scrapes each
    durations = {(r["metric"]["job"], r["metric"].get("node", "-")): float(r["value"][1])
                 for r in query(net, "scrape_duration_seconds")}
    rss = float(query(net, 'process_resident_memory_bytes{job="prometheus"}')[0]["value"][1])
    series = float(query(net, "prometheus_tsdb_head_series")[0]["value"][1])
    print(f"\n[monitor] {len(durations)} targets, all up; scrape duration: longest "
          f"{max(durations.values()) * 1000:.1f} ms ({max(durations, key=durations.get)}), all together "
          f"{sum(durations.values()) * 1000:.1f} ms per {15} s; Prometheus' memory (RSS) {rss / 2 ** 20:.0f} MiB "
          f"with {series:.0f} series")
    assert all(d < 5 for d in durations.values()), durations


def test_the_hubs_metrics_and_the_exporter_reach_the_monitor_alone(net):
    hosts, nodes = net.node_hosts(), net.nodes()
    table = {}
    for source in ("node-a", "node-b", MONITOR, "node-d"):
        table[source, "hub:8000"] = probe(hosts[source].netns, nodes["hub"]["address"], tcp=[8000], timeout=2)["tcp"][8000]
        if source != "node-a":
            table[source, "node-a:9187"] = probe(hosts[source].netns, nodes["node-a"]["address"], tcp=[9187],
                                                 timeout=2)["tcp"][9187]
        if source != MONITOR:
            table[source, "node-c:9090"] = probe(hosts[source].netns, nodes[MONITOR]["address"], tcp=[9090],
                                                 timeout=2)["tcp"][9090]
    print("\n[monitor] probe table (from -> to: state)")
    for (source, target), state in sorted(table.items()):
        print(f"  {source:>7} -> {target}: {state}")
    assert table[MONITOR, "hub:8000"] == "open" and table[MONITOR, "node-a:9187"] == "open", table
    others = {k: v for k, v in table.items() if k[0] != MONITOR}
    assert others and all(v == "filtered" for v in others.values()), table
    # the hub's own status page, as the monitor reads it: every spoke's handshake
    hub = query(net, 'dstack_vpn_peer_last_handshake_age_seconds{job="hub"}')
    assert sorted(r["metric"]["node"] for r in hub if r["metric"]["kind"] != "client") == [
        "node-a", "node-b", "node-c", "node-d"], hub
    # and the clients', named and marked (out of the handshake alert)
    assert sorted(r["metric"]["node"] for r in hub if r["metric"]["kind"] == "client") == ["laptop", "phone"], hub


def test_the_page_shows_every_node(net):
    """Through an SSH tunnel to the monitor node, as README shows, in headless Chromium."""
    chromium = need_tool("chromium")
    lab, host = net.lab, net.node_hosts()[MONITOR]
    address = net.nodes()[MONITOR]["address"]
    argv = lab.ssh_argv(host, "sleep 120")
    at = argv.index("ssh") + 1
    argv[at:at] = ["-L", f"127.0.0.1:19090:{address}:9090", "-o", "ExitOnForwardFailure=yes"]
    tunnel = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "monitor-page.png"
    try:
        url = "http://127.0.0.1:19090/consoles/dstack-vpn.html"
        assert wait_until(lambda: lab.op_exec(["python3", "-c", "import urllib.request,sys; "
                                               "urllib.request.urlopen(sys.argv[1], timeout=2)", url]).returncode == 0,
                          20), tunnel.stderr
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--window-size=1280,720"]
        profile = Path(f"/tmp/{lab.name}-chromium")
        dom = lab.op_exec([chromium, *flags, f"--user-data-dir={profile}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
        shot.unlink(missing_ok=True)
        lab.op_exec([chromium, *flags, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
                    capture_output=True, text=True, timeout=120)
        subprocess.run(["rm", "-rf", str(profile)], check=False)
    finally:
        os.killpg(tunnel.pid, signal.SIGTERM)
        tunnel.wait(10)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = [line for line in dom.stdout.split("<tr") if "data-node=" in line]
    shown = {row.split('data-node="')[1].split('"')[0]: row for row in rows}
    assert set(shown) == {"hub", "node-a", "node-b", "node-c", "node-d"}, dom.stdout[-3000:]
    assert all("<td class=\"state\">up</td>" in row for row in shown.values()), shown
    assert "postgres" in shown["node-a"] and "monitor" in shown[MONITOR] and "dstack" in shown["node-d"]
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"\n[monitor] the page shows {len(shown)} nodes; screenshot: {shot}")


def test_a_spoke_powered_off_reaches_the_receiver_and_resolves(net):
    host = net.node_hosts()[OFF]

    def notified(status):
        return [r for r in received(net) if r["path"] == "/alerts" and r["body"]["status"] == status
                and any(a["labels"]["alertname"] == "DstackVpnSpokeDown" and a["labels"].get("node") == OFF
                        for a in r["body"]["alerts"])]

    assert notified("firing") == []
    cut = time.time()
    host.power_cut()
    assert wait_until(lambda: notified("firing"), ALERT_BOUND + 30, 1), received(net)
    alert_after = notified("firing")[0]["at"] - cut
    host.boot()
    host.wait_ssh(timeout=120)
    back = time.time()
    assert wait_until(lambda: notified("resolved"), RESOLVE_BOUND + 30, 1), received(net)
    resolved_after = notified("resolved")[0]["at"] - back
    # the same alert, through the receiver whose URL is a secret
    assert [r for r in received(net) if r["path"] == f"/tokened/{HOOK_TOKEN}" and r["body"]["status"] == "firing"]
    print(f"\n[monitor] {OFF} powered off: DstackVpnSpokeDown at the receiver after {alert_after:.0f} s "
          f"(bound {ALERT_BOUND} s); resolved {resolved_after:.0f} s after its SSH answered again")
    assert alert_after <= ALERT_BOUND and resolved_after <= RESOLVE_BOUND


def test_no_receiver_credential_outside_its_file(net):
    secrets = {"mail password": MAIL_PASSWORD, "webhook token": HOOK_TOKEN}
    public = json.dumps(net.last_outputs())
    assert not [n for n, s in secrets.items() if s in public]
    assert not sorted({n for n, s in secrets.items() for line in net.command_lines if s.encode() in line})
    host = net.node_hosts()[MONITOR]
    found = sorted({(str(p.relative_to(host.upper)), n) for p in host.upper.rglob("*")
                    if p.is_file() and not p.is_symlink() for n, s in secrets.items() if s.encode() in p.read_bytes()})
    assert found == [("etc/dstack-vpn-monitor/alertmanager.yml", "mail password"),
                     ("etc/dstack-vpn-monitor/alertmanager.yml", "webhook token")], found
    mode = ssh(net, MONITOR, "stat -c '%a %U' /etc/dstack-vpn-monitor/alertmanager.yml").stdout.split()
    assert mode == ["600", "prometheus"], mode
    leaks = [(what, n) for what, data in process_texts(host) for n, s in secrets.items() if s.encode() in data]
    assert leaks == []
    journal = journal_text(host)
    assert journal and not [n for n, s in secrets.items() if s in journal]
    tried = [line for line in journal.splitlines() if 'integration=email' in line or "mail" in line.lower()]
    print(f"\n[monitor] the journal of {MONITOR}: {len(tried)} lines of Alertmanager trying the mail receiver "
          f"(its smarthost is not there), no credential in any")
    # its own API shows the configuration with the secrets hidden
    status = prom_alertmanager_config(net)
    assert MAIL_PASSWORD not in status and HOOK_TOKEN not in status and "<secret>" in status


def prom_alertmanager_config(net) -> str:
    out = ssh(net, MONITOR, "python3 -I -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                            "\"http://127.0.0.1:9093/api/v2/status\", timeout=10).read().decode())'")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["config"]["original"]


# -- clients: people's devices -----------------------------------------------------------------

def device_ok(device, argv, timeout=10) -> bool:
    return device.exec(argv, timeout=timeout + 5).returncode == 0


def fetch(device, url: str) -> str:
    out = device.exec(["python3", "-I", "-c", "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                       "sys.argv[1], timeout=5).read().decode())", url], timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def client_devices(net):
    names = sorted(net.last_secret_outputs["clients"])
    return {name: net.device(name, i) for i, name in enumerate(names)}


def wait_handshake(net, device):
    hub = net.nodes()["hub"]["address"]
    assert wait_until(lambda: device_ok(device, ["ping", "-c1", "-W1", hub]), 30, 0.5), device.name


# (client, node): port -> what the client's probe must see
CLIENT_PROBES = {
    ("laptop", "node-a"): {8000: "open", 5432: "open", 8008: "filtered", 9187: "filtered", 2379: "filtered",
                           22: "filtered"},
    ("laptop", "node-b"): {8000: "open", 22: "filtered", 5432: "filtered"},
    ("laptop", MONITOR): {8000: "open", 9090: "open", 9093: "filtered", 5432: "filtered", 22: "filtered"},
    ("laptop", "node-d"): {8000: "open", 22: "filtered"},
    ("laptop", "hub"): {8000: "filtered", 22: "filtered"},
    ("phone", "node-b"): {8000: "open", 22: "open"},
    ("phone", "node-a"): {8000: "filtered", 5432: "filtered"},
    ("phone", MONITOR): {8000: "filtered", 9090: "filtered"},
    ("phone", "node-d"): {8000: "filtered"},
}


def test_a_client_reaches_what_its_allow_opens_and_nothing_else(net):
    devices, nodes = client_devices(net), net.nodes()
    for device in devices.values():
        wait_handshake(net, device)
    seen = {}
    for (client, node), ports in CLIENT_PROBES.items():
        seen[client, node] = probe(devices[client].ns, nodes[node]["address"], tcp=sorted(ports), timeout=2)["tcp"]
    print("\n[clients] probe table (client -> node:port: seen / expected)")
    for (client, node), ports in CLIENT_PROBES.items():
        print(f"  {client:>6} -> {node}: " + ", ".join(
            f"{port} {seen[client, node][port]}" + ("" if seen[client, node][port] == want else f" (want {want})")
            for port, want in sorted(ports.items())))
    assert {k: seen[k] for k in CLIENT_PROBES} == CLIENT_PROBES
    # what it is for: a status page and the monitor's page, over the overlay, from the laptop
    status = json.loads(fetch(devices["laptop"], f"http://{nodes['node-a']['address']}:8000/status"))
    assert status["node"] == "node-a"
    page = fetch(devices["laptop"], f"http://{nodes[MONITOR]['address']}:9090/consoles/dstack-vpn.html")
    assert 'data-node="node-a"' in page and 'data-node="hub"' in page


def test_no_client_key_on_any_host_or_command_line(net):
    """A client's private key is in its config alone (the output): no host has it, no command
    line of `up` carried it; its preshared key is on the hub alone, in wg0.conf (0600)."""
    secrets = {}
    for name, out in net.first_up.outputs["clients"].items():
        fields = dict(line.split(" = ", 1) for line in out["config"].splitlines() if " = " in line)
        secrets[f"{name} private key"] = fields["PrivateKey"]
        secrets[f"{name} preshared key"] = fields["PresharedKey"]
    assert not [n for n, s in secrets.items() if s in json.dumps(net.last_outputs())]
    assert not sorted({n for n, s in secrets.items() for line in net.command_lines if s.encode() in line})
    found = sorted({(node, str(p.relative_to(host.upper)), n) for node, host in net.node_hosts().items()
                    for p in host.upper.rglob("*") if p.is_file() and not p.is_symlink()
                    for n, s in secrets.items() if s.encode() in p.read_bytes()})
    assert found == [("hub", "etc/wireguard/wg0.conf", "laptop preshared key"),
                     ("hub", "etc/wireguard/wg0.conf", "phone preshared key")], found


def test_nothing_reaches_a_client(net):
    devices, nodes, hosts = client_devices(net), net.nodes(), net.node_hosts()
    laptop = devices["laptop"]
    address = nodes["laptop"]["address"]
    listener = subprocess.Popen(["ip", "netns", "exec", laptop.ns, sys.executable, "-m", "http.server", "--bind",
                                 address, "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        assert wait_until(lambda: probe(laptop.ns, address, tcp=[8080], timeout=1)["tcp"][8080] == "open", 10), \
            "the laptop's own listener"
        seen = {source: probe(hosts[source].netns, address, tcp=[8080], timeout=2)["tcp"][8080]
                for source in ("hub", "node-a", "node-b", MONITOR, "node-d")}
        seen["phone"] = probe(devices["phone"].ns, address, tcp=[8080], timeout=2)["tcp"][8080]
        pings = {source: net.lab.ssh(hosts[source], f"ping -c1 -W2 {address}", timeout=20).returncode == 0
                 for source in ("hub", "node-b")}
    finally:
        os.killpg(listener.pid, signal.SIGTERM)
        listener.wait(10)
    print(f"\n[clients] to the laptop's :8080 (open from itself): {seen}; ping answered: {pings}")
    assert set(seen.values()) == {"filtered"} and not any(pings.values()), (seen, pings)


def test_a_rotated_clients_old_config_gets_no_handshake(net):
    from components.nodes import client
    devices, nodes = client_devices(net), net.nodes()
    phone = devices["phone"]
    old = net.first_up.outputs["clients"]["phone"]["config"]
    overrides = _overrides(net)
    overrides["spokes"] = [dict(s, keyRotation=1) if s["name"] == "phone" else s for s in overrides["spokes"]]
    t0 = time.monotonic()
    result = net.up(**overrides)  # the lab's devices take their new configs, as their people would
    net.last_secret_outputs = result.outputs
    took = time.monotonic() - t0
    new = result.outputs["clients"]["phone"]["config"]
    assert new != old and net.nodes()["phone"]["public_key"] != nodes["phone"]["public_key"]
    wait_handshake(net, phone)
    assert probe(phone.ns, nodes["node-b"]["address"], tcp=[8000], timeout=2)["tcp"][8000] == "open"
    phone.up(old)
    time.sleep(8)  # a handshake is tried at once, and again after 5 s
    blocked = probe(phone.ns, nodes["node-b"]["address"], tcp=[8000], timeout=2)["tcp"][8000]
    handshakes = phone.exec(["wg", "show", phone.interface, "latest-handshakes"]).stdout.split()
    phone.up(new)
    ARTIFACTS.mkdir(exist_ok=True)
    art = ARTIFACTS / "client-qr.png"  # the old config's code: a key no hub takes any more
    fd = os.open(art, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(client.qr_png(old))
    print(f"\n[clients] phone's key rotated in one `up` ({took:.0f} s); with the old config: node-b:8000 {blocked}, "
          f"latest handshake {handshakes[1:] or '-'}; its QR code: {art}")
    assert blocked == "filtered" and handshakes[1:] == ["0"], handshakes
    wait_handshake(net, phone)


def test_removing_a_client_leaves_the_others_traffic_whole(net):
    devices, nodes = client_devices(net), net.nodes()
    laptop, phone = devices["laptop"], devices["phone"]
    phone_key = nodes["phone"]["public_key"]
    url = f"http://{nodes['node-a']['address']}:8000/health"
    # the laptop asks node-a's status page twice a second while the phone is removed
    loop = subprocess.Popen(["ip", "netns", "exec", laptop.ns, sys.executable, "-I", "-c",
                             "import sys, time, urllib.request\nok = bad = 0\nend = time.time() + 600\n"
                             "while time.time() < end:\n"
                             "    try:\n        urllib.request.urlopen(sys.argv[1], timeout=3).read(); ok += 1\n"
                             "    except Exception:\n        bad += 1\n"
                             "    print(ok, bad, flush=True)\n    time.sleep(0.5)\n", url],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(2)
        overrides = _overrides(net)
        overrides["spokes"] = [s for s in overrides["spokes"] if s["name"] != "phone"]
        t0 = time.monotonic()
        result = net.up(**overrides)
        took = time.monotonic() - t0
        time.sleep(2)
    finally:
        os.killpg(loop.pid, signal.SIGTERM)
        out = loop.communicate(timeout=10)[0].split("\n")
    ok, bad = map(int, [line for line in out if line.strip()][-1].split())
    peers = net.lab.ssh(net.node_hosts()["hub"], "wg show wg0 peers", timeout=20).stdout.split()
    print(f"\n[clients] phone removed in one `up` ({took:.0f} s): the laptop's requests meanwhile {ok} answered, "
          f"{bad} not; the hub has {len(peers)} peers")
    assert "clients" in result.outputs and sorted(result.outputs["clients"]) == ["laptop"]
    assert phone_key not in peers and nodes["laptop"]["public_key"] in peers
    assert not Path(f"/run/netns/{phone.ns}").exists()
    assert ok > 10 and bad == 0, (ok, bad)

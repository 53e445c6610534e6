"""The example network converging for real in the lab: real hosts, SSH, WireGuard, nftables, packets.

One lab network for the module (hub and node-a as droplets, node-b and
node-c as `ssh` spokes, node-d a dstack spoke whose app runs on a lab host as a
container engine would run it); torn down at the end, on failure too.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from conftest import need_tool
from labnet import lab_network, wait_until
from probes import probe

UNDERLAY_TCP = [22, 80, 443, 5432, 8000, 8080, 9000, 51820]
UNDERLAY_UDP = [53, 123, 9000, 51821]


@pytest.fixture(scope="module")
def net():
    need_tool("ip")
    with lab_network("dve") as network:
        t0 = time.monotonic()
        with CommandLines() as lines:  # every process's arguments while the steps run
            network.first_up = network.up()
        network.first_up_seconds = time.monotonic() - t0
        network.command_lines = lines.seen
        yield network


class CommandLines:
    """Samples every process's command line on this machine (the lab's hosts' processes and the
    lab's own SSH clients alike) every few milliseconds, as a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.seen = interval, set()

    def _sample(self):
        while not self.stop.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        self.seen.add((entry / "cmdline").read_bytes())
                    except OSError:
                        pass
            time.sleep(self.interval)

    def __enter__(self):
        import threading
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
        return False


def ssh(net, node, command, **kw):
    return net.lab.ssh(net.node_hosts()[node], command, timeout=30, **kw)


SPOKES = ("node-a", "node-b", "node-c", "node-d")
DSTACK = "node-d"


def test_every_spoke_reaches_every_other_through_the_hub(net):
    assert set(net.nodes()) == {"hub", *SPOKES}
    reach = wait_until(lambda: (r := net.reachability()) and all(r.values()) and r)
    assert reach and all(reach.values()), reach
    assert len(reach) == 12
    # the path goes through the hub: the spoke's only peer is the hub
    for node in SPOKES:
        # (the dstack spoke's wireguard-go answers in its container only: its socket is there)
        where = net.apps.exec(net.node_hosts()[node], "wg show wg0 peers") if node == DSTACK else \
            ssh(net, node, "wg show wg0 peers")
        assert where.stdout.split() == [net.nodes()["hub"]["public_key"]], (node, where.stderr)


def test_hub_lists_every_spoke_with_a_recent_handshake(net):
    net.reachability()
    ages = net.handshakes()
    assert set(ages) == set(SPOKES)
    assert all(age is not None and age < 60 for age in ages.values()), ages


def listen(net, node, port):
    """A TCP listener and a UDP echo on `port` of a spoke, for the probes."""
    script = (f"import socket,threading\n"
              f"t=socket.socket();t.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);t.bind(('',{port}));t.listen()\n"
              f"u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.bind(('',{port}))\n"
              f"threading.Thread(target=lambda:[t.accept()[0].close() for _ in iter(int,1)],daemon=True).start()\n"
              f"while True:\n d,a=u.recvfrom(100);u.sendto(d,a)\n")
    ssh(net, node, f"nohup python3 -c {shlex.quote(script)} >/dev/null 2>&1 </dev/null & "
                   f"echo $! >/run/lab-listener-{port}")
    assert wait_until(lambda: ssh(net, node, f"ss -ltnH 'sport = :{port}' | grep -q .").returncode == 0, 10)


def unlisten(net, node, port):
    ssh(net, node, f"kill $(cat /run/lab-listener-{port}) 2>/dev/null; rm -f /run/lab-listener-{port}")


def overlay_connects(net, src, dst_address, port, proto):
    if proto == "icmp":
        return ssh(net, src, f"ping -c1 -W2 {dst_address}").returncode == 0
    if proto == "tcp":
        return ssh(net, src, f"timeout 3 bash -c '</dev/tcp/{dst_address}/{port}'").returncode == 0
    code = (f"import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2);"
            f"s.sendto(b'x',('{dst_address}',{port}));print(s.recv(10))")
    return ssh(net, src, f"python3 -c \"{code}\"").returncode == 0


def test_hub_cannot_open_connections_to_spokes_but_spokes_can(net):
    nodes = net.nodes()
    listen(net, "node-b", 9000)
    try:
        for proto in ("icmp", "tcp", "udp"):
            assert overlay_connects(net, "node-a", nodes["node-b"]["address"], 9000, proto), proto
            assert not overlay_connects(net, "hub", nodes["node-b"]["address"], 9000, proto), proto
            assert not overlay_connects(net, "hub", nodes["node-c"]["address"], 9000, proto), proto
    finally:
        unlisten(net, "node-b", 9000)
    # the dstack spoke too: other spokes reach a service on it, the hub reaches nothing
    listen(net, DSTACK, 9000)
    try:
        for proto in ("icmp", "tcp", "udp"):
            assert overlay_connects(net, "node-b", nodes[DSTACK]["address"], 9000, proto), proto
            assert not overlay_connects(net, "hub", nodes[DSTACK]["address"], 9000, proto), proto
            assert not overlay_connects(net, "hub", nodes[DSTACK]["address"], 8000, proto), proto
    finally:
        unlisten(net, DSTACK, 9000)


def test_underlay_exposure_of_the_hub(net):
    hub = net.node_hosts()["hub"]
    public_ip = net.last_outputs()["hubPublicIp"]
    # from an admin address (the operator namespace): SSH and nothing else over TCP
    seen = probe(net.lab.op_ns, public_ip, tcp=UNDERLAY_TCP, udp=UNDERLAY_UDP)
    assert {p for p, v in seen["tcp"].items() if v != "filtered"} == {22}, seen
    assert all(v == "silent" for v in seen["udp"].values()), seen  # dropped, not even ICMP
    # from a spoke's underlay address (not an admin): nothing at all, SSH included
    seen = probe(net.node_hosts()["node-b"].netns, hub.address, tcp=UNDERLAY_TCP)
    assert all(v == "filtered" for v in seen["tcp"].values()), seen
    # WireGuard's port is open: the spokes' handshakes go through it (see above); and
    # without the rule, a closed UDP port would answer ICMP: the firewall is what silences it
    assert hub.nft(["list", "table", "inet", "dstack_vpn"]).returncode == 0


def test_underlay_exposure_of_the_spokes(net):
    hosts = net.node_hosts()
    listen(net, "node-c", 9000)
    status_listener = ssh(net, "node-c", "ss -ltnH 'sport = :8000' | grep -q .").returncode != 0
    if status_listener:
        listen(net, "node-c", 8000)
    try:
        for src in (net.lab.op_ns, hosts["node-a"].netns, hosts["hub"].netns):
            seen = probe(src, hosts["node-c"].address, tcp=UNDERLAY_TCP, udp=UNDERLAY_UDP)
            expected = {8000, 22} if src == net.lab.op_ns else {8000}
            assert {p for p, v in seen["tcp"].items() if v != "filtered"} == expected, (src, seen)
            assert seen["tcp"][8000] == "open"
            assert all(v == "silent" for v in seen["udp"].values()), (src, seen)
    finally:
        unlisten(net, "node-c", 9000)
        if status_listener:
            unlisten(net, "node-c", 8000)


def secret_values(net) -> dict[str, str]:
    """Every private key the program holds: WireGuard, preshared, deploy SSH key."""
    out = {}
    for record in net.engine.state.records.values():
        if record.type == "pulumi-python:dynamic:Resource" and record.outputs.get("kind") in ("wireguard", "preshared"):
            out[record.urn.split("::")[-1]] = record.outputs["private_key"]
    # the deploy key's body lines, past the first (which every OpenSSH ed25519 key shares)
    for i, line in enumerate(net.deploy_key()[0].strip().splitlines()[2:-1]):
        out[f"deploy-key-{i}"] = line
    return out


def test_private_keys_only_in_the_wireguard_config(net):
    secrets = secret_values(net)
    assert len([k for k in secrets if k.endswith("-wg-key")]) == 5
    for node, host in net.node_hosts().items():
        if node == DSTACK:
            continue  # below
        # everything the host wrote to its disk since the image, checked from outside
        found = []
        for path in host.upper.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [(str(path.relative_to(host.upper)), name) for name, s in secrets.items()
                          if s.encode() in data]
        own = [f for f in found if f[0] == "etc/wireguard/wg0.conf"]
        assert found == own, (node, found)
        own_key = f"{node}-wg-key"
        assert ("etc/wireguard/wg0.conf", own_key) in own, (node, found)
        assert ssh(net, node, "stat -c '%a %U' /etc/wireguard/wg0.conf").stdout.split() == ["600", "root"]
        # nor in any process's arguments or environment, nor in the journal: read from
        # outside (the host's cgroup and root), so no secret travels to the host for the check
        leaks = [(what, name) for what, data in process_texts(host) for name, s in secrets.items()
                 if s.encode() in data]
        assert leaks == [], (node, leaks)
        journal = journal_text(host)
        assert journal and not [name for name, s in secrets.items() if s in journal], node
    # the dstack spoke: its keys never reach a disk (the CVM's, or the container's writable
    # layer); they sit in 0600 files of the container's own tmpfs, and (as docker keeps a
    # container's environment) in the engine's memory
    host = net.node_hosts()[DSTACK]
    disks = [host.upper, net.apps.upper_dir(host)]
    assert disks[1] is not None and disks[1].is_dir()
    found = [str(p) for disk in disks for p in disk.rglob("*") if p.is_file() and not p.is_symlink()
             and any(s.encode() in p.read_bytes() for s in secrets.values())]
    assert found == [], found
    root = Path(f"/proc/{net.apps.pid(host)}/root")
    keys = root / "run/dstack-vpn"
    assert oct(keys.stat().st_mode & 0o777) == "0o700" and keys.stat().st_uid == 0
    for name in ("private-key", "preshared-key"):
        assert oct((keys / name).stat().st_mode & 0o777) == "0o600"
    assert (keys / "private-key").read_text().strip() == secrets[f"{DSTACK}-wg-key"]
    texts = list(process_texts(host)) + list(pid_texts(net.apps.pids(host)))
    leaks = [(what, name) for what, data in texts for name, s in secrets.items() if s.encode() in data]
    assert leaks == [], leaks  # the entrypoint took the keys out of its environment and started again
    logs = net.apps.logs(host)
    assert "status page on port 8000" in logs and not [n for n, s in secrets.items() if s in logs]


def test_the_dstack_spoke_runs_the_spoke_image_by_digest_and_installs_nothing(net):
    """As dstack runs an app: docker-compose has the engine start the image the compose file
    names by digest; the tools are the image's own, so nothing is fetched at start."""
    host = net.node_hosts()[DSTACK]
    compose = net.last_outputs()["dstackCompose"][DSTACK]
    (reference,) = [line.split("image:", 1)[1].strip() for line in compose.splitlines() if "image:" in line]
    _, digest = reference.split("@")
    container = net.apps.inspect(host)
    assert container["State"]["Running"] and container["ImageDigest"] == digest, container["ImageDigest"]
    assert container["Config"]["Labels"]["com.docker.compose.project"] == DSTACK
    assert container["HostConfig"]["NetworkMode"] == "host"
    # the container's network is the CVM's, not the machine's
    assert os.stat(f"/proc/{net.apps.pid(host)}/ns/net").st_ino == os.stat(f"/run/netns/{host.netns}").st_ino
    # no package list was fetched and no package downloaded: the tools came with the image
    fetched = net.apps.exec(host, "find /var/lib/apt/lists /var/cache/apt/archives -type f; "
                                  "for t in wg nft; do command -v $t; done")
    assert fetched.stdout.split() == ["/usr/bin/wg", "/usr/sbin/nft"], fetched.stdout + fetched.stderr


def process_texts(host):
    pids = set()
    for cgroup in host.cgroups:
        for procs in cgroup.rglob("cgroup.procs"):
            pids |= {int(p) for p in procs.read_text().split()}
    assert len(pids) > 3, pids  # systemd, sshd, wireguard-go, ...
    for pid in sorted(pids):
        for field in ("cmdline", "environ"):
            try:
                yield f"{pid}/{field}", Path(f"/proc/{pid}/{field}").read_bytes()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass


def pid_texts(pids):
    for pid in pids:
        for field in ("cmdline", "environ"):
            try:
                yield f"{pid}/{field}", Path(f"/proc/{pid}/{field}").read_bytes()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass


def journal_text(host) -> str:
    root = Path(f"/proc/{host.guest_pid()}/root")
    dirs = [d for d in (root / "run/log/journal", root / "var/log/journal") if d.exists()]
    out = subprocess.run(["journalctl", "-q", "--no-pager", "-o", "cat", *[f"--directory={d}" for d in dirs]],
                         capture_output=True, text=True)
    return out.stdout


def test_second_up_with_nothing_changed_runs_nothing(net):
    assert len(net.first_up.actions) > 20
    result = net.up()
    assert result.actions == []


def fetch_status(netns_or_host, address, path="/status"):
    """GET from inside a lab namespace (a spoke's, the hub's or the operator's)."""
    code = ("import json,sys,urllib.request as u\n"
            f"r=u.urlopen('http://{address}:8000{path}',timeout=5)\n"
            "print(json.dumps({'code':r.status,'body':json.loads(r.read())}))")
    out = subprocess.run(["ip", "netns", "exec", netns_or_host, "python3", "-c", code],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout)


def test_status_page_of_every_spoke_over_the_overlay_and_the_underlay(net):
    nodes, hosts = net.nodes(), net.node_hosts()
    net.reachability()  # traffic, so every handshake is fresh
    for node in SPOKES:
        # underlay: from the operator's namespace
        got = fetch_status(net.lab.op_ns, hosts[node].address)
        assert got["code"] == 200
        status = got["body"]
        assert status["node"] == node and status["overlay_ip"] == nodes[node]["address"]
        assert status["interface"] == "wg0"
        assert status["peer_count"] == 1 and status["peers_up"] == 1
        assert 0 <= status["max_last_handshake_sec"] < 180
        (peer,) = status["peers"]
        assert peer["public_key"] == nodes["hub"]["public_key"]
        assert peer["allowed_ips"] == ["10.88.0.0/24"] and peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
        assert isinstance(status["disk_free_gb"], float) and status["time"].endswith("Z")
        assert "postgres" not in status
        # overlay: from another spoke, through the hub
        other = next(n for n in SPOKES if n != node)
        code = (f"import urllib.request as u;print(u.urlopen('http://{nodes[node]['address']}:8000/health',"
                f"timeout=5).read().decode())")
        health = ssh(net, other, f"python3 -c \"{code}\"")
        assert health.returncode == 0 and '"ok": true' in health.stdout.replace('"ok":true', '"ok": true')
        # the service runs unprivileged with no capability (test_lab_status_hardening.py proves more)
        if node == DSTACK:  # a plain process of the app, as nobody
            pages = [pid for pid in net.apps.pids(hosts[node])
                     if b"--node-name\0node-d" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            assert len(pages) == 1, pages
            assert Path(f"/proc/{pages[0]}/status").read_text().count("65534") >= 2
            continue
        unit = ssh(net, node, "systemctl show -p DynamicUser -p AmbientCapabilities -p CapabilityBoundingSet "
                              "dstack-vpn-status")
        assert "DynamicUser=yes" in unit.stdout and "cap_" not in unit.stdout.lower()
    secrets = secret_values(net)
    for node in SPOKES:
        text = subprocess.run(["ip", "netns", "exec", net.lab.op_ns, "python3", "-c",
                               f"import urllib.request as u;print(u.urlopen('http://{hosts[node].address}:8000/status')"
                               f".read().decode());print(u.urlopen('http://{hosts[node].address}:8000/metrics')"
                               f".read().decode())"], capture_output=True, text=True, timeout=30).stdout
        assert text and not [name for name, s in secrets.items() if s in text]


def test_no_secret_in_any_command_line_while_the_steps_ran(net):
    """Sampled during the first `up`, not only afterwards: a key in a step's command text would
    reach `bash -c` arguments on the host (and sudo's journal line) for a moment."""
    secrets = secret_values(net)
    for record in net.engine.state.records.values():  # the droplets' SSH host keys too
        if record.type == "pulumi-python:dynamic:Resource" and record.outputs.get("kind") == "ssh-ed25519":
            for i, line in enumerate(record.outputs["private_key"].strip().splitlines()[2:-1]):
                secrets[f"{record.urn.split('::')[-1]}-{i}"] = line
    lines = net.command_lines
    steps = [line for line in lines if b"dstack-vpn" in line and b"ssh" in line]
    assert len(lines) > 100 and len(steps) >= 16, (len(lines), len(steps))  # every remote step was seen
    leaks = sorted({name for name, value in secrets.items() for line in lines if value.encode() in line})
    assert leaks == [], leaks


def _rule_handle(net, node, chain, rule):
    listing = ssh(net, node, f"nft -a list chain inet dstack_vpn {chain}").stdout
    (line,) = [ln for ln in listing.splitlines() if ln.strip().startswith(rule)]
    return line.rsplit("# handle ", 1)[1].strip()


@pytest.mark.parametrize("lifted", ["spoke drops the hub", "hub drops its own"])
def test_each_layer_alone_keeps_the_hub_from_opening_connections(net, lifted):
    """The hub never originates: its own output rule and every spoke's input rule each hold it
    alone. The other layer is lifted for the probe and the ruleset reloaded after."""
    nodes = net.nodes()
    node, chain, rule = (("node-b", "input", f'iifname "wg0" ip saddr {nodes["hub"]["address"]} drop')
                         if lifted == "spoke drops the hub" else ("hub", "output", 'oifname "wg0" drop'))
    # the layer under test stays; the other one goes for the duration of the probe
    other = ("hub", "output", 'oifname "wg0" drop') if node == "node-b" else \
        ("node-b", "input", f'iifname "wg0" ip saddr {nodes["hub"]["address"]} drop')
    listen(net, "node-b", 9000)
    try:
        ssh(net, other[0], f"nft delete rule inet dstack_vpn {other[1]} handle {_rule_handle(net, *other)}")
        for proto in ("icmp", "tcp", "udp"):
            assert not overlay_connects(net, "hub", nodes["node-b"]["address"], 9000, proto), (lifted, proto)
        # the probe can tell: with both layers gone, the hub does reach node-b
        ssh(net, node, f"nft delete rule inet dstack_vpn {chain} handle {_rule_handle(net, node, chain, rule)}")
        assert overlay_connects(net, "hub", nodes["node-b"]["address"], 9000, "tcp")
    finally:
        unlisten(net, "node-b", 9000)
        for host in ("hub", "node-b"):
            assert ssh(net, host, "nft -f /etc/dstack-vpn/firewall.nft").returncode == 0
    assert not overlay_connects(net, "hub", nodes["node-b"]["address"], 8000, "tcp")


METADATA = "169.254.169.254"
METADATA_SERVER = f"""
ip addr add {METADATA}/32 dev lo 2>/dev/null || true
nohup python3 -m http.server --bind {METADATA} 80 >/dev/null 2>&1 </dev/null & echo $! >/run/lab-metadata.pid
for _ in $(seq 50); do ss -ltnH 'sport = :80' | grep -q . && break; sleep 0.1; done
"""
ASK = (f"python3 -c \"import socket; s=socket.create_connection(('{METADATA}', 80), timeout=2); "
       f"s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(12))\"")


@pytest.mark.parametrize("node,blocked", [("hub", True), ("node-a", True), ("node-b", False)])
def test_only_root_reaches_the_metadata_service_on_droplets(net, node, blocked):
    """DigitalOcean serves the user data (the droplet's SSH host private key) at 169.254.169.254 to
    any local process; on droplets our ruleset lets only root ask. A stand-in server answers there."""
    ssh(net, node, METADATA_SERVER)
    try:
        assert ssh(net, node, ASK).returncode == 0  # root
        as_nobody = ssh(net, node, f"setpriv --reuid=65534 --regid=65534 --clear-groups {ASK}")
        assert (as_nobody.returncode != 0) == blocked, (node, as_nobody.stdout, as_nobody.stderr)
    finally:
        ssh(net, node, f"kill $(cat /run/lab-metadata.pid); rm -f /run/lab-metadata.pid; "
                       f"ip addr del {METADATA}/32 dev lo")


def test_a_status_page_that_cannot_listen_fails_its_step(net):
    """The status step checks the page answers as its node: a port another program holds fails
    the step (it used to pass while the unit looped on its failure to bind)."""
    from lab.engine import EngineError

    listen(net, "node-b", 9000)
    try:
        with pytest.raises(EngineError) as err:
            net.engine.up(net.settings(statusPort=9000), continue_on_error=True)
        assert "node-b-status" in str(err.value) and "does not answer on port 9000" in str(err.value)
        assert "node-c-status" not in str(err.value)
    finally:
        unlisten(net, "node-b", 9000)
    # the failed step kept its state (8000): with the port free, the same change now converges,
    # and then everything goes back to 8000
    net.up(statusPort=9000)
    assert ssh(net, "node-b", "ss -ltnH 'sport = :9000' | grep -q .").returncode == 0
    net.up()
    assert wait_until(lambda: all(net.reachability().values()), 30)
    assert ssh(net, "node-b", "ss -ltnH 'sport = :8000' | grep -q .").returncode == 0

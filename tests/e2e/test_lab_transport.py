"""Spokes behind hostile networks, for real in the lab: a network that drops all UDP (a rule on
the lab's wan bridge, in its own namespace), and a path whose MTU is 1280 (a router namespace).

One lab network for the module (lab name dvx), the tests in order: node-a (a droplet) and node-d
(a dstack app) use transport tcp, node-c (Debian 13, a sudo user) auto; node-b and node-e stay on
UDP and carry the probes that must lose nothing. Measured figures are printed (-s shows them).
"""
from __future__ import annotations

import re
import time

import pytest

from labnet import lab_network, wait_until
from lab.probe import Probe
from probes import probe
from components.roles import transport

TCP_PORT = 443
RELAY = "127.0.0.1:51821"
NODE_E = {"name": "node-e", "kind": "ssh", "address": "10.88.0.15", "host": "198.51.100.24"}


def spokes(**changes):
    """The lab's spokes (without its dstack spoke's settings changed) plus node-e; changes:
    node name -> settings to add or remove (None)."""
    from lab.example import stack_settings
    out = [dict(s) for s in stack_settings(postgres=False)["spokes"]] + [dict(NODE_E)]
    for spoke in out:
        for key, value in changes.get(spoke["name"], {}).items():
            if value is None:
                spoke.pop(key, None)
            else:
                spoke[key] = value
    return out


START = {"node-a": {"transport": "tcp"}, "node-c": {"transport": "auto"}, "node-d": {"transport": "tcp"}}


@pytest.fixture(scope="module")
def net():
    with lab_network("dvx") as network:
        settings = network.settings(spokes=spokes(**START))  # boots the `ssh` spokes' hosts
        network.lab.block_udp(network.lab.hosts["node-c"])  # before its tunnel ever starts
        t0 = time.monotonic()
        network.engine.up(settings)
        network.save_outputs(network.engine.result.outputs)
        network.run_dstack_apps(network.engine.result.outputs)
        network.wait_converged(60)
        print(f"\n[transport] up with node-c's UDP blocked, converged in {time.monotonic() - t0:.1f} s")
        yield network


def ssh(net, node, command, **kwargs):
    return net.lab.ssh(net.node_hosts()[node], command, **kwargs)


def endpoint(net, node) -> str:
    if node == "node-d":
        out = net.apps.exec(net.lab.hosts["node-d"], "wg show wg0 endpoints").stdout
    else:
        out = ssh(net, node, "wg show wg0 endpoints").stdout
    return out.split()[-1] if out.split() else ""


def reaches(net, src, dst) -> bool:
    return ssh(net, src, f"ping -n -c 1 -W 2 {net.nodes()[dst]['address']}").returncode == 0


def status_answers(net, src, dst) -> bool:
    """The status page of dst, over the overlay, from src."""
    addr = net.nodes()[dst]["address"]
    out = ssh(net, src, f"python3 -c \"import urllib.request;print(urllib.request.urlopen("
                        f"'http://{addr}:8000/status',timeout=5).read().decode())\"")
    return out.returncode == 0 and f'"{dst}"' in out.stdout


def hub_port(net) -> str:
    return probe(net.lab.op_ns, net.last_outputs()["hubPublicIp"], tcp=[TCP_PORT])["tcp"][TCP_PORT]


def restart_tunnel(net, node) -> None:
    if node == "node-d":
        host = net.lab.hosts["node-d"]
        net.apps.stop(host)
        net.run_dstack_apps(net.engine.result.outputs)  # (with the app's environment: secret)
    else:
        assert ssh(net, node, "systemctl restart wg-quick@wg0 dstack-vpn-nudge").returncode == 0


def test_tcp_and_auto_spokes_join_with_all_their_udp_dropped(net):
    for node in ("node-a", "node-d"):
        net.lab.block_udp(net.lab.hosts[node] if node == "node-d" else net.node_hosts()[node])
        restart_tunnel(net, node)
    assert wait_until(lambda: all(reaches(net, "node-b", n) for n in ("node-a", "node-c", "node-d")), 60)
    # UDP is dropped: a UDP spoke's packets from that host would not arrive (the endpoint shows
    # the relay, and auto moved there by itself)
    assert {n: endpoint(net, n) for n in ("node-a", "node-c", "node-d")} == dict.fromkeys(
        ("node-a", "node-c", "node-d"), RELAY)
    others = ["node-a", "node-b", "node-c", "node-d", "node-e"]
    for src in ("node-a", "node-c"):
        for dst in others:
            if dst != src:
                assert reaches(net, src, dst), (src, dst)
    for dst in ("node-a", "node-c", "node-d"):
        assert status_answers(net, "node-b", dst), dst
        # the hub still cannot reach it, over the relay as over UDP
        assert ssh(net, "hub", f"ping -n -c 2 -W 1 {net.nodes()[dst]['address']}").returncode != 0, dst
    assert hub_port(net) == "open"
    assert "accepted udp:127.0.0.1:51820" in ssh(net, "hub", "journalctl -u dstack-vpn-tcp --no-pager").stdout
    # the package's own proxy never runs
    assert ssh(net, "hub", "systemctl is-enabled v2ray.service").stdout.strip() == "masked"


def test_auto_joins_a_udp_blocked_spoke_within_its_bound(net):
    """From a fresh tunnel with UDP dropped to its first answered ping from another spoke."""
    assert ssh(net, "node-c", "systemctl restart wg-quick@wg0 dstack-vpn-nudge").returncode == 0
    t0 = time.monotonic()
    assert wait_until(lambda: reaches(net, "node-b", "node-c"), 40, step=0.2)
    joined = time.monotonic() - t0
    print(f"\n[transport] auto: a UDP-blocked spoke joined {joined:.1f} s after its tunnel started "
          f"(bound: {transport.AUTO_BOUND} s of silence on UDP)")
    assert endpoint(net, "node-c") == RELAY
    assert joined < transport.AUTO_BOUND + 10
    log = ssh(net, "node-c", "journalctl -u dstack-vpn-nudge --no-pager -n 20").stdout
    assert f"transport tcp (no answer over udp for {transport.AUTO_BOUND} s;" in log


def test_auto_goes_back_to_udp_and_to_tcp_again_without_loss_elsewhere(net):
    hub_udp = f"{net.last_outputs()['hubPublicIp']}:51820"
    host = net.lab.hosts["node-c"]
    with Probe(net, "node-b", "node-e") as other:
        net.lab.unblock_udp(host)
        t0 = time.monotonic()
        assert wait_until(lambda: endpoint(net, "node-c") == hub_udp, transport.UDP_RETRY[0] + 20, step=1)
        back = time.monotonic() - t0
        assert wait_until(lambda: reaches(net, "node-b", "node-c"), 15)
        net.lab.block_udp(host)
        t1 = time.monotonic()
        assert wait_until(lambda: endpoint(net, "node-c") == RELAY, transport.AUTO_BOUND + 10, step=0.5)
        assert wait_until(lambda: reaches(net, "node-b", "node-c"), 15)
        moved = time.monotonic() - t1
    print(f"\n[transport] auto: UDP unblocked -> back on UDP after {back:.1f} s (retry every "
          f"{transport.UDP_RETRY[0]} s at first); blocked again -> on TCP and reachable after {moved:.1f} s")
    assert other.sent > 100 and other.lost == 0, (other.sent, other.lost)
    log = ssh(net, "node-c", "journalctl -u dstack-vpn-nudge --no-pager -n 30").stdout
    assert "transport udp (trying udp again after" in log and "transport tcp (no answer over udp" in log


def test_the_hubs_tcp_port_exists_only_while_a_spoke_uses_it(net):
    for node in ("node-a", "node-c"):
        net.lab.unblock_udp(net.node_hosts()[node])
    net.lab.unblock_udp(net.lab.hosts["node-d"])
    assert hub_port(net) == "open"
    hub = net.node_hosts()["hub"]
    with Probe(net, "node-b", "node-e") as udp_spokes:
        result = net.up(spokes=spokes(**{n: {"transport": None} for n in ("node-a", "node-c", "node-d")}))
    assert udp_spokes.lost == 0, udp_spokes.lost
    ops = sorted((a.op, a.name) for a in result.actions)
    assert ("update", "hub-transport") in ops and ("update", "hub-cloud-firewall") in ops, ops
    assert hub_port(net) == "filtered"
    assert "dport 443" not in hub.nft(["list", "table", "inet", "lab_cloud_firewall"]).stdout
    assert "dport 443" not in ssh(net, "hub", "nft list table inet dstack_vpn").stdout
    gone = ssh(net, "hub", "systemctl is-active dstack-vpn-tcp; ls /etc/systemd/system/dstack-vpn-tcp.service "
                           "/etc/dstack-vpn/tcp-transport.json 2>&1; systemctl is-enabled v2ray.service").stdout
    assert "masked" not in gone and "No such file" in gone and gone.startswith("inactive"), gone
    assert wait_until(lambda: all(reaches(net, "node-b", n) for n in ("node-a", "node-c", "node-d")), 30)

    # the first TCP spoke again: the port opens
    with Probe(net, "node-b", "node-e") as udp_spokes:
        result = net.up(spokes=spokes(**{"node-a": {"transport": "tcp"}}))
    assert udp_spokes.lost == 0, udp_spokes.lost
    assert ("update", "hub-transport") in sorted((a.op, a.name) for a in result.actions)
    assert hub_port(net) == "open"
    assert "tcp dport 443 accept" in hub.nft(["list", "table", "inet", "lab_cloud_firewall"]).stdout
    assert wait_until(lambda: endpoint(net, "node-a") == RELAY and reaches(net, "node-b", "node-a"), 30)


# -- a path whose MTU is 1280 ----------------------------------------------------------

SERVE = ("mkdir -p /tmp/mtu && cd /tmp/mtu && {{ [ -f blob ] || head -c 20000000 /dev/urandom >blob; }} && "
         "sha256sum blob | cut -c1-64 && (setsid python3 -m http.server 8080 --bind {addr} >/dev/null 2>&1 &) && "
         "sleep 0.5")
FETCH = ("timeout {timeout} python3 -c \"import urllib.request, hashlib, sys\n"
         "h = hashlib.sha256(); n = 0\n"
         "try:\n    r = urllib.request.urlopen('http://{addr}:8080/blob', timeout=10)\n"
         "    while True:\n        c = r.read(65536)\n        if not c: break\n        h.update(c); n += len(c)\n"
         "except Exception as e: print('error', e)\n"
         "print(n, h.hexdigest())\"")


def transfer(net, server, client, timeout=40) -> tuple[str, str]:
    """A 20 MB HTTP transfer over the overlay from server to client: (server's hash, what the
    client got: 'bytes hash', empty if it got nothing before the timeout)."""
    addr = net.nodes()[server]["address"]
    sent = ssh(net, server, SERVE.format(addr=addr)).stdout.strip()
    try:
        got = ssh(net, client, FETCH.format(addr=addr, timeout=timeout), timeout=timeout + 30).stdout.strip()
    finally:
        ssh(net, server, "pkill -f 'http.server 8080'")
    return sent, got


def test_a_spoke_behind_a_1280_byte_path_needs_its_mtu_and_then_moves_20_mb_both_ways(net):
    host = net.node_hosts()["node-b"]
    with net.lab.behind_router(host, 1280):
        # the path is the Internet's: DF set and too big -> "fragmentation needed" (ping errors)
        out = ssh(net, "node-b", "ping -n -M do -s 1300 -c 2 -W 2 198.51.100.24")
        assert "mtu = 1280" in out.stdout + out.stderr or "+2 errors" in out.stdout, out.stdout
        # without the setting: the hub's packets to node-b are too big for its path; nothing arrives
        sent, got = transfer(net, "node-e", "node-b", timeout=15)
        print(f"\n[transport] mtu: without the setting, node-e -> node-b 20 MB: got {got or 'nothing'} in 15 s")
        assert not got.endswith(sent), got

        # (node-a stays on tcp, as the test before left it)
        result = net.up(spokes=spokes(**{"node-a": {"transport": "tcp"}, "node-b": {"mtu": 1280}}))
        ops = sorted((a.op, a.name) for a in result.actions)
        assert ops == [("update", "hub-firewall"), ("update", "node-b-wireguard")], ops
        assert "mtu 1200 " in ssh(net, "node-b", "ip link show wg0").stdout
        clamp = "ip daddr 10.88.0.12 tcp flags & (syn | rst) == syn tcp option maxseg size > 1160"
        assert clamp in ssh(net, "hub", "nft list chain inet dstack_vpn forward").stdout
        # DF pings that fill the interface cross the path whole
        assert ssh(net, "node-b", "ping -n -M do -s 1172 -c 3 -W 2 10.88.0.15").returncode == 0
        for server, client in (("node-e", "node-b"), ("node-b", "node-e")):
            t0 = time.monotonic()
            sent, got = transfer(net, server, client)
            print(f"[transport] mtu 1280: {server} -> {client} 20 MB in {time.monotonic() - t0:.1f} s")
            assert got == f"20000000 {sent}", (server, client, got)
        # the hub set the MSS of node-e's handshake to node-b to what fits node-b's path
        chain = ssh(net, "hub", "nft list chain inet dstack_vpn forward").stdout
        (rule,) = [line for line in chain.splitlines() if "ip daddr 10.88.0.12" in line]
        assert int(re.search(r"counter packets (\d+)", rule).group(1)) > 0, rule

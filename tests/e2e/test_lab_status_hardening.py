"""The status page holds no privilege, proved on running spokes in the lab.

The page answers the network, so it holds no capability at all: with
CAP_NET_ADMIN it could read the WireGuard private key through netlink (`wg
show wg0 private-key`), re-point peers or delete the firewall table. A root
helper with CAP_NET_ADMIN alone hands it `wg show wg0 dump` with the keys
taken out (dstack-vpn-status-helper.socket/.service on hosts; the entrypoint's
second process on a dstack spoke).

How "it cannot" is shown: the page's own process has every capability set
empty (/proc/PID/status); then commands run in its context: its mount
namespace (nsenter -m: its read-only system, /etc/wireguard and
/run/wireguard made inaccessible), its user, group and supplementary groups,
no capability and no_new_privs (setpriv), which is everything the kernel
weighs for the page's own requests. They are refused; the same commands as
root in the same place succeed, so the refusals are the page's lack of
privilege and nothing else. The page's seccomp filter is not carried over:
the commands run with less confinement than the page itself has.

One lab network for the module, of its own (lab name "dvs"), torn down at the end.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import need_tool
from labnet import lab_network, wait_until

DROPLET, SSH_SPOKE, DSTACK = "node-a", "node-b", "node-d"
DUMP_SOCKET = "/run/dstack-vpn-status/wg-dump.sock"
NET_ADMIN = 1 << 12  # CAP_NET_ADMIN


@pytest.fixture(scope="module")
def net():
    need_tool("ip")
    with lab_network("dvs") as network:
        network.up()
        network.wait_converged(60)
        yield network


def ssh(net, node, command, **kw):
    return net.lab.ssh(net.node_hosts()[node], command, timeout=60, **kw)


def proc_status(net, node, pid: int) -> dict[str, str]:
    text = ssh(net, node, f"cat /proc/{pid}/status").stdout
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def caps(status: dict[str, str]) -> dict[str, int]:
    return {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def as_the_page(pid: int, status: dict[str, str], command: str, groups: bool = True, mount: bool = True) -> str:
    """`command` in the context of the page's process `pid` (see the module's docstring); with
    mount=False in the host's own mount namespace, where only the missing privilege stops it."""
    uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
    extra = status["Groups"].split()
    group_opt = f"--groups={','.join(extra)}" if extra and groups else "--clear-groups"
    enter = f"nsenter --target={pid} --mount -- " if mount else ""
    return (f"{enter}setpriv --reuid={uid} --regid={gid} {group_opt} "
            f"--inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs -- "
            f"sh -c {shlex.quote(command)}")


def ask_helper(path: str = DUMP_SOCKET) -> str:
    """A python3 command line that prints what the helper at `path` answers."""
    code = (f"import socket;s=socket.socket(socket.AF_UNIX);s.settimeout(10);s.connect({path!r});"
            "d=b''\nwhile True:\n c=s.recv(65536)\n if not c: break\n d+=c\nprint(d.decode())")
    return f"python3 -c {shlex.quote(code)}"


def secret_values(net) -> dict[str, str]:
    """The network's WireGuard private and preshared keys, as the program made them."""
    return {record.urn.split("::")[-1]: record.outputs["private_key"]
            for record in net.engine.state.records.values()
            if record.type == "pulumi-python:dynamic:Resource"
            and record.outputs.get("kind") in ("wireguard", "preshared")}


def fetch(net, node, path):
    address = net.node_hosts()[node].address
    code = f"import urllib.request as u;r=u.urlopen('http://{address}:8000{path}',timeout=10);print(r.read().decode())"
    out = net.lab.op_exec(["python3", "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("node", [DROPLET, SSH_SPOKE])
def test_the_page_on_a_host_holds_no_capability_and_cannot_touch_the_tunnel(net, node):
    net.reachability()  # fresh handshakes; and the page has asked its helper at least once
    fetch(net, node, "/health")
    pid = int(ssh(net, node, "systemctl show -P MainPID dstack-vpn-status").stdout)
    assert pid > 0
    status = proc_status(net, node, pid)
    assert caps(status) == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0), status
    assert status["NoNewPrivs"] == "1" and status["Uid"].split()[0] != "0"
    group = ssh(net, node, "getent group dstack-vpn-wg-dump").stdout.split(":")
    # its own group, and the one that may open the helper's socket
    assert set(status["Groups"].split()) == {status["Gid"].split()[0], group[2]}

    # The helper: root, CAP_NET_ADMIN and nothing else.
    helper = int(ssh(net, node, "systemctl show -P MainPID dstack-vpn-status-helper").stdout)
    assert helper > 0, "the helper was not started by its socket"
    hstatus = proc_status(net, node, helper)
    assert hstatus["Uid"].split()[0] == "0"
    assert caps(hstatus) == {"CapInh": 0, "CapPrm": NET_ADMIN, "CapEff": NET_ADMIN, "CapBnd": NET_ADMIN,
                             "CapAmb": 0}, hstatus
    assert ssh(net, node, f"stat -c '%a %U %G' {DUMP_SOCKET}").stdout.split() == ["660", "root", "dstack-vpn-wg-dump"]

    hub_key = net.nodes()["hub"]["public_key"]
    # In the page's context: its capability sets are what the kernel reports for the page ...
    seen = ssh(net, node, as_the_page(pid, status, "grep -E '^Cap(Eff|Prm|Bnd|Amb)' /proc/self/status"))
    assert seen.returncode == 0 and {line.split()[1] for line in seen.stdout.splitlines()} == {"0" * 16}, seen
    # ... it cannot read the private key, re-point the hub, nor read the configuration: neither
    # where it runs (its sandbox hides /etc/wireguard and /run/wireguard) nor, with the same
    # credentials, in the host's own mount namespace, where only the missing privilege stops it
    for mount in (True, False):
        for command in ("wg show wg0 private-key", f"wg set wg0 peer {hub_key} endpoint 192.0.2.1:9",
                        "cat /etc/wireguard/wg0.conf"):
            out = ssh(net, node, as_the_page(pid, status, command + " 2>&1", mount=mount))
            assert out.returncode != 0 and not re.search(r"[A-Za-z0-9+/]{43}=", out.stdout), (mount, command, out.stdout)
    # ... nor delete the firewall table, which is still there afterwards.
    out = ssh(net, node, as_the_page(pid, status, "nft delete table inet dstack_vpn 2>&1"))
    assert out.returncode != 0 and "Operation not permitted" in out.stdout, out.stdout
    assert ssh(net, node, "nft list table inet dstack_vpn >/dev/null").returncode == 0
    # As root these work: the refusals above are the page's lack of privilege.
    assert ssh(net, node, "wg show wg0 private-key >/dev/null && cat /etc/wireguard/wg0.conf >/dev/null").returncode == 0
    assert ssh(net, node, f"nsenter --target={pid} --mount -- nft list table inet dstack_vpn >/dev/null").returncode == 0
    assert "192.0.2.1" not in ssh(net, node, "wg show wg0 endpoints").stdout

    # Who may ask the helper: the page (its group) does; another local user does not.
    answer = ssh(net, node, as_the_page(pid, status, ask_helper()))
    assert answer.returncode == 0 and answer.stdout.startswith("ok\n(hidden)\t"), answer.stdout + answer.stderr
    stranger = ssh(net, node, as_the_page(pid, status, ask_helper() + " 2>&1", groups=False))
    assert stranger.returncode != 0 and "PermissionError" in stranger.stdout, stranger.stdout
    # What it hands on holds no key: the private key's and the preshared key's places say "(hidden)".
    lines = answer.stdout.strip().splitlines()[1:]
    assert lines[0].split("\t")[0] == "(hidden)"
    assert [line.split("\t")[:2] for line in lines[1:]] == [[hub_key, "(hidden)"]]
    secrets = secret_values(net)
    assert len(secrets) >= 5
    assert not [name for name, s in secrets.items() if s in answer.stdout]


@pytest.mark.parametrize("node", [DROPLET, SSH_SPOKE, DSTACK])
def test_the_page_still_shows_the_peers_and_no_key(net, node):
    net.reachability()
    status = json.loads(fetch(net, node, "/status"))
    assert status["node"] == node and status["peer_count"] == 1 and status["peers_up"] == 1
    (peer,) = status["peers"]
    assert peer["public_key"] == net.nodes()["hub"]["public_key"]
    assert 0 <= peer["last_handshake_sec"] < 180 and peer["rx_bytes"] > 0 and peer["endpoint"]
    assert json.loads(fetch(net, node, "/health")) == {"ok": True}
    texts = [fetch(net, node, p) for p in ("/status", "/metrics", "/health")]
    secrets = secret_values(net)
    assert not [(name, i) for name, s in secrets.items() for i, t in enumerate(texts) if s in t]


def test_the_page_on_a_dstack_spoke_holds_no_capability(net):
    """In the app's container: its processes read from this machine's /proc, commands run in
    the container's namespaces (as `docker exec` would), PIDs as the container numbers them."""
    host = net.node_hosts()[DSTACK]
    apps = net.apps

    def inside(command):
        return apps.exec(host, command)

    def local_pid(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[-1] for line in status.splitlines() if line.startswith("NSpid:")))

    def status_of(pid: int) -> dict[str, str]:
        text = Path(f"/proc/{pid}/status").read_text()
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    python = [pid for pid in apps.pids(host) if Path(f"/proc/{pid}/comm").read_text().strip() == "python3"]
    argv = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in python}
    pages = [pid for pid in python if b"--listen-port" in argv[pid]]
    helpers = [pid for pid in python if b"--dump-helper" in argv[pid]]
    assert len(pages) == 1 and len(helpers) == 1, argv
    (page,), (helper,) = pages, helpers
    status = status_of(page)
    assert caps(status) == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0), status
    assert status["Uid"].split()[0] == "65534" and status["NoNewPrivs"] == "1"
    hstatus = status_of(helper)
    assert hstatus["Uid"].split()[0] == "0"
    assert (caps(hstatus)["CapEff"], caps(hstatus)["CapBnd"]) == (NET_ADMIN, NET_ADMIN), hstatus
    # the same refusals as on a host, as the page's user
    page_in = local_pid(page)
    for command in ("wg show wg0 private-key", "nft delete table inet dstack_vpn"):
        out = inside(as_the_page(page_in, status, command + " 2>&1"))
        assert out.returncode != 0 and not re.search(r"[A-Za-z0-9+/]{43}=", out.stdout), (command, out.stdout)
    # the CVM still has the table (its namespace, seen from this machine)
    assert host.nft(["list", "table", "inet", "dstack_vpn"]).returncode == 0
    # as root in the container these work: the refusals above are the page's lack of privilege
    assert inside("wg show wg0 private-key >/dev/null && nft list table inet dstack_vpn >/dev/null").returncode == 0
    # the helper's folder lets in root and nobody's group only
    assert inside("stat -c '%a %U %g' /run/dstack-vpn-status").stdout.split() == ["710", "root", "65534"]
    answer = inside(as_the_page(page_in, status, ask_helper()))
    assert answer.stdout.startswith("ok\n(hidden)\t"), answer.stdout + answer.stderr
    assert not [name for name, s in secret_values(net).items() if s in answer.stdout]


def test_postgres_role_is_still_seen_by_the_page_without_privilege(net):
    """The page reads other users' processes in /proc (no capability needed): a stand-in
    postmaster (a process named postgres) with a standby's walreceiver child is a replica."""
    node = SSH_SPOKE
    script = ("#!/bin/bash\n(exec -a 'postgres: walreceiver streaming 0/3000148' sleep 600) &\nwait\n")
    # setsid: a process group of its own, ended below by its id
    started = ssh(net, node, f"mkdir -p /run/lab-pg && printf %s {shlex.quote(script)} >/run/lab-pg/postgres && "
                             "chmod 755 /run/lab-pg/postgres && "
                             "{ setsid /run/lab-pg/postgres </dev/null >/dev/null 2>&1 & echo $!; }")
    pgid = int(started.stdout.split()[-1])
    try:
        role = wait_until(lambda: json.loads(fetch(net, node, "/status")).get("postgres"), timeout=15)
        assert role == {"role": "replica"}
    finally:
        ssh(net, node, f"kill -- -{pgid} {pgid}; rm -rf /run/lab-pg")
    assert wait_until(lambda: "postgres" not in json.loads(fetch(net, node, "/status")), timeout=15)

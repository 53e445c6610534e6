"""The lab's hosts are real: systemd machines booted with systemd-nspawn, SSH
with checked host keys, apt from the local repository without network, an
underlay between them, reboots, power cycles, moving addresses, and a clean
machine afterwards.

Needs root. Outside CI a machine that cannot run it skips loudly; under
CI=true the same reasons fail the run instead.

The tests run in file order on one lab (booting is cheap, building the image
is not); each says what it leaves behind for the next.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import Lab, ensure_machine_packages

LAB_NAME = "dvlt"  # not the CLI's "dvl": running the tests leaves a developer's lab alone
EXTRA_IP = "198.51.100.200"


def _require(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"lab host tests cannot run: {reason} (CI=true: failing instead of skipping)")
    print(f"\n*** LAB HOST TESTS SKIPPED: {reason} ***", file=sys.stderr)
    pytest.skip(f"*** LAB HOST TESTS SKIPPED: {reason} ***")


def _root_netns() -> str:
    """The machine's own addresses, routes and links (lifetimes left out)."""
    out = "".join(subprocess.run(["ip", "-o", *what], capture_output=True, text=True, check=True).stdout
                  for what in (["addr"], ["route"], ["link"]))
    return re.sub(r"(valid|preferred)_lft \S+", "", out)


def _keygen(path: Path) -> tuple[str, str]:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", path], check=True)
    return path.read_text(), " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def root_netns_before() -> str:
    return _root_netns()


@pytest.fixture(scope="module")
def lab(root_netns_before):
    _require(os.geteuid() == 0, "they need root (network namespaces, systemd-nspawn)")
    _require(shutil.which("apt-get") is not None, "they need a Debian machine (apt-get)")
    _require(Path("/dev/net/tun").exists(), "they need /dev/net/tun")
    try:
        ensure_machine_packages()
    except Exception as e:  # no registry, no dpkg lock...
        _require(False, f"the machine packages could not be installed: {e}")
    lab = Lab(name=LAB_NAME)
    lab.cleanup_stale()  # a previous run that was killed
    with lab:
        lab.prepare_seconds = lab.prepare()
        yield lab


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("keys")
    host_private, host_public = _keygen(d / "host_b")
    _, user_public = _keygen(d / "user")
    return {"host_b_private": host_private, "host_b_public": host_public,
            "user": d / "user", "user_public": user_public, "dir": d}


@pytest.fixture(scope="module")
def hosts(lab, keys):
    a = lab.host("a")
    b = lab.host("b", "198.51.100.21", authorized_keys=[keys["user_public"]],
                 host_key_private_openssh=keys["host_b_private"], ssh_user="deploy")
    t0 = time.monotonic()
    a.boot()
    b.boot()
    a.wait_ssh(30)
    b.wait_ssh(30)
    lab.boot_seconds = time.monotonic() - t0
    return a, b


def test_hosts_boot_and_answer_ssh_with_a_checked_host_key(lab, hosts, keys, capsys):
    a, b = hosts
    with capsys.disabled():
        print(f"\n[lab] image + repository ready in {lab.prepare_seconds:.1f}s; "
              f"two hosts booted to SSH in {lab.boot_seconds:.2f}s")
    assert _ok(lab.ssh(a, "hostname")).strip() == "a"
    assert _ok(lab.ssh(b, "hostname")).strip() == "b"
    assert _ok(lab.ssh(a, "systemctl is-system-running --wait")).strip() == "running"
    assert _ok(lab.ssh(a, "ps -p 1 -o comm=")).strip() == "systemd"

    # The lab's client checks host keys: a wrong key, or none, is refused.
    wrong = keys["dir"] / "known_hosts_wrong"
    wrong.write_text(f"a {b.host_key_public}\n")
    refused = lab.ssh(a, "true", known_hosts=wrong)
    assert refused.returncode == 255 and "host key" in refused.stderr.lower(), refused.stderr
    empty = keys["dir"] / "known_hosts_empty"
    empty.write_text("")
    refused = lab.ssh(a, "true", known_hosts=empty)
    assert refused.returncode == 255 and "host key verification failed" in refused.stderr.lower()


def test_the_installed_host_key_is_the_given_one(lab, hosts, keys):
    a, b = hosts
    assert b.host_key_public == keys["host_b_public"]
    scanned = _ok(lab.op_exec(["ssh-keyscan", "-t", "ed25519", b.address], capture_output=True, text=True))
    assert keys["host_b_public"] in scanned
    assert _ok(lab.ssh(b, "cat /etc/ssh/ssh_host_ed25519_key")).strip() == keys["host_b_private"].strip()
    # no other key types next to it, as with cloud-init's ssh_keys
    assert _ok(lab.ssh(b, "ls /etc/ssh/ | grep ^ssh_host_")).split() == [
        "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    # the generated ones differ per host
    assert a.host_key_public.startswith("ssh-ed25519 ") and a.host_key_public != b.host_key_public


def test_given_authorized_keys_and_a_sudo_user(lab, hosts, keys):
    a, b = hosts
    assert _ok(lab.ssh(b, "id -un", key=keys["user"])).strip() == "root"
    assert _ok(lab.ssh(b, "id -un; sudo -n id -u", user="deploy", key=keys["user"])).split() == ["deploy", "0"]
    assert lab.ssh(a, "true", key=keys["user"]).returncode == 255  # a did not get that key
    assert lab.ssh(a, "true", user="deploy").returncode == 255  # nor that user


def test_apt_installs_from_the_local_repository_without_network(lab, hosts):
    a, _ = hosts
    routes = a.exec(["ip", "-o", "route"], capture_output=True, text=True).stdout
    assert "default" not in routes and routes.split()[0] == "198.51.100.0/24"
    sources = _ok(lab.ssh(a, "test ! -e /etc/apt/sources.list && cat /etc/apt/sources.list.d/*"))
    assert [line for line in sources.splitlines() if line.startswith("deb")] == [
        "deb [trusted=yes] file:/srv/lab-apt ./"]
    assert lab.ssh(a, "command -v wg || command -v nft || command -v wireguard-go").returncode == 1
    _ok(lab.ssh(a, "set -e; apt-get update -q; "
                   "DEBIAN_FRONTEND=noninteractive apt-get install -y -q wireguard-tools nftables wireguard-go",
                timeout=300))
    # and they work there: a userspace WireGuard interface needs /dev/net/tun
    # and CAP_NET_ADMIN, nft needs netbase and CAP_NET_ADMIN
    out = _ok(lab.ssh(a, "set -e; wireguard-go wg9 2>/dev/null; wg show wg9 listen-port; ip link del wg9; "
                         "nft add table inet labcheck; nft list tables; nft delete table inet labcheck"))
    assert "table inet labcheck" in out


def test_hosts_reach_each_other_over_the_underlay_only(lab, hosts, root_netns_before):
    a, b = hosts
    _ok(lab.ssh(a, f"ping -c1 -W2 {b.address}"))
    banner = _ok(lab.ssh(a, f"python3 -c \"import socket; print(socket.create_connection(('{b.address}', 22), 3)"
                            f".recv(64).decode())\""))
    assert banner.startswith("SSH-2.0-")
    assert _root_netns() == root_netns_before


def test_reboot_brings_ssh_back(lab, hosts, capsys):
    a, _ = hosts
    boot_id = _ok(lab.ssh(a, "cat /proc/sys/kernel/random/boot_id"))
    pid1 = a.guest_pid()
    seconds = a.reboot()
    assert a.guest_pid() not in (None, pid1)
    assert _ok(lab.ssh(a, "cat /proc/sys/kernel/random/boot_id")) != boot_id
    seconds_ssh = a.reboot(via_ssh=True)  # the way the program's steps would
    with capsys.disabled():
        print(f"\n[lab] reboot to SSH: {seconds:.2f}s (signal), {seconds_ssh:.2f}s (systemctl reboot)")
    assert _ok(lab.ssh(a, "systemctl is-system-running --wait")).strip() == "running"


def test_poweroff_then_start_keeps_the_disk(lab, hosts):
    a, _ = hosts
    token = secrets.token_hex(8)
    _ok(lab.ssh(a, f"echo {token} > /root/kept && sync"))
    a.poweroff()
    assert not a.running and a.guest_pid() is None
    assert lab.ssh(a, "true", timeout=30).returncode == 255
    a.start()
    a.wait_ssh(30)
    assert _ok(lab.ssh(a, "cat /root/kept")).strip() == token


def _op_pings(lab: Lab, ip: str) -> bool:
    result = lab.op_exec(["ping", "-c1", "-W1", ip], capture_output=True, text=True)
    assert result.returncode in (0, 1) and "exec of" not in result.stderr, result.stderr  # ping itself ran
    return result.returncode == 0


def test_an_extra_address_comes_and_goes_and_moves(lab, hosts):
    a, b = hosts
    assert _op_pings(lab, a.address)
    assert not _op_pings(lab, EXTRA_IP)
    a.add_address(EXTRA_IP)
    assert _op_pings(lab, EXTRA_IP)
    assert _ok(lab.ssh(a, "hostname", address=EXTRA_IP)).strip() == "a"
    a.remove_address(EXTRA_IP)
    assert not _op_pings(lab, EXTRA_IP)
    # like a reserved IP reassigned to another droplet
    b.add_address(EXTRA_IP)
    assert _ok(lab.ssh(b, "hostname", address=EXTRA_IP)).strip() == "b"
    with pytest.raises(ValueError):
        a.add_address(EXTRA_IP)  # already taken
    b.remove_address(EXTRA_IP)


def test_another_process_sees_the_running_hosts(lab, hosts):
    """What a later `lab status` invocation relies on."""
    code = f"import json; from lab import Lab; print(json.dumps(Lab({str(lab.dir)!r}, {lab.name!r}).status()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    status = {h["name"]: h for h in json.loads(out)["hosts"]}
    assert status["a"]["running"] and status["b"]["running"]
    assert status["b"]["address"] == "198.51.100.21" and status["b"]["ssh_user"] == "deploy"


def _repo_version(host, package: str) -> str:
    """The version of package in the apt repository the host sees (read on this machine)."""
    for stanza in (host.repo / "Packages").read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
        if fields.get("Package") == package:
            return fields["Version"]
    raise AssertionError(f"{package} is not in {host.repo}")


def test_each_suite_runs_its_release_and_installs_from_its_own_repository(lab, capsys):
    """Debian 12 and 13 bracket Ubuntu 24.04: a host runs the release it was made with,
    across a power cycle and as another process sees it, and apt installs that release's
    packages from that release's local repository, offline. Leaves no host behind."""
    releases = {"bookworm": "12", "trixie": "13"}
    made = {suite: lab.host(f"s-{suite}", suite=suite) for suite in releases}
    try:
        for host in made.values():
            host.boot()
        for host in made.values():
            host.wait_ssh(30)
        made["trixie"].poweroff()  # the suite is the host's for life: the same image again
        made["trixie"].start()
        made["trixie"].wait_ssh(30)
        code = f"from lab import Lab; print(Lab({str(lab.dir)!r}, {lab.name!r}).hosts['s-trixie'].suite)"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip() == "trixie"
        installed = {}
        for suite, host in made.items():
            codename, version_id, debian_version = _ok(lab.ssh(
                host, ". /etc/os-release; echo $VERSION_CODENAME $VERSION_ID; cat /etc/debian_version")).split()
            assert (codename, version_id) == (suite, releases[suite])
            assert debian_version.split(".")[0] == releases[suite], debian_version
            assert "default" not in host.exec(["ip", "-o", "route"], capture_output=True, text=True).stdout
            _ok(lab.ssh(host, "set -e; apt-get update -q; "
                              "DEBIAN_FRONTEND=noninteractive apt-get install -y -q wireguard-tools nftables",
                        timeout=300))
            for package in ("wireguard-tools", "nftables"):
                installed[suite, package] = _ok(lab.ssh(host, f"dpkg-query -W -f '${{Version}}' {package}"))
                assert installed[suite, package] == _repo_version(host, package), (suite, package)
            versions = _ok(lab.ssh(host, "systemctl --version | head -n 1; nft --version; ssh -V 2>&1; "
                                         "python3 --version; wg --version"))
            with capsys.disabled():
                print(f"\n[lab] {suite}: " + "; ".join(versions.splitlines()))
        # each from its own suite, not both from one
        assert installed["bookworm", "nftables"] != installed["trixie", "nftables"], installed
    finally:
        for host in made.values():
            host.destroy()
    assert not {"s-bookworm", "s-trixie"} & set(lab.hosts)


def _assert_nothing_left(lab: Lab, launcher_pids: list[int]) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in netns.split() if n.startswith(lab.prefix)], netns
    assert not list(Path("/run/netns").glob(f"{lab.prefix}*"))
    for pid in launcher_pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    mine = [p for p in Path("/proc").glob("[0-9]*/cmdline")
            if b"lab.machine import _launch" in p.read_bytes() and str(lab.state_dir).encode() in p.read_bytes()]
    assert not mine
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{lab.prefix}*"))
    assert not list(Path("/sys/fs/cgroup").glob(f"{lab.prefix}*"))
    assert str(lab.dir) not in Path("/proc/self/mountinfo").read_text()
    assert not lab.state_dir.exists()


def test_close_leaves_nothing_behind(lab, hosts, root_netns_before):
    launchers = [h._launcher()[0] for h in hosts]
    lab.close()
    _assert_nothing_left(lab, launchers)
    assert _root_netns() == root_netns_before


def test_cleanup_stale_removes_what_a_crashed_run_left(lab, root_netns_before):
    """A process boots a host and dies without tearing down; a new one cleans up."""
    code = (f"import os; from lab import Lab; lab = Lab({str(lab.dir)!r}, {lab.name!r}); "
            f"h = lab.host('c'); h.boot(); h.wait_ssh(30); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[2])
    later = Lab(lab.dir, lab.name)
    assert later.hosts["c"].running
    launcher = later.hosts["c"]._launcher()[0]
    later.cleanup_stale()
    _assert_nothing_left(later, [launcher])
    assert _root_netns() == root_netns_before

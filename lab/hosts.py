"""Real Linux hosts for the lab: systemd machines on a private underlay.

Each host is a systemd-nspawn machine booted from a shared read-only Debian
image of its suite (bookworm or trixie, see packages.py) with an overlay of its
own, in a network namespace of its own whose eth0 hangs on a bridge in the
lab's "wan" namespace. The lab's SSH client runs in an operator namespace on
the same bridge. Nothing is ever added to the machine's own network namespace.

Everything the lab creates is recorded under its state directory before it
is created, so a later process (the next CLI invocation) can find running
hosts, and cleanup_stale() can remove what a crashed run left, and only that:

  <lab dir>/cache/                 base images and apt repositories (shared)
  <lab dir>/<lab name>/lab.json    namespaces of the underlay
  <lab dir>/<lab name>/operator_key, known_hosts
  <lab dir>/<lab name>/hosts/<host>/host.json     settings, namespace, cgroups
  <lab dir>/<lab name>/hosts/<host>/launcher.pid  "<pid> <start time>"
  <lab dir>/<lab name>/hosts/<host>/upper/        the host's disk (overlay)
  <lab dir>/<lab name>/hosts/<host>/console.log

A host's launcher is a small detached Python process (hosts._launch)
that runs systemd-nspawn in a loop, again after a guest reboot (exit code
133), from a cgroup named after the host: that cgroup is how the lab finds
the guest's PID 1 and, as a last resort, kills whatever is left.
"""
from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from . import cvm, packages
from .packages import REPO_MOUNT, remove_tree, run

DEFAULT_LAB_DIR = "/var/lib/dstack-vpn-lab"
LAB_DIR_ENV = "DSTACK_VPN_LAB_DIR"
UNDERLAY = ipaddress.ip_network("198.51.100.0/24")
OPERATOR_ADDRESS = "198.51.100.100"
FIRST_HOST_ADDRESS = 10
_HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_RESERVED_NAMES = {"wan", "op"}  # the underlay's own namespaces
_REBOOT_EXIT_CODE = 133  # systemd-nspawn's exit code when the guest reboots


def default_lab_dir() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or DEFAULT_LAB_DIR)


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.rename(path)


def _start_time(pid: int) -> str | None:
    """A process's start time, which tells a recorded PID from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # zombies count as gone


def _alive(pid: int, start_time: str) -> bool:
    try:  # reap it if it is our child, so it does not linger as a zombie
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return _start_time(pid) == start_time


def _cgroup_roots() -> list[Path]:
    """The hierarchies a launcher joins: the unified one alone, or on a hybrid
    machine without systemd as PID 1 the name=systemd and unified ones, as
    systemd-nspawn expects."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [root]
    return [root / sub for sub in ("systemd", "unified") if (root / sub).is_dir()]


def _cgroup_pids(cgroup: Path) -> list[int]:
    """Every process in the cgroup tree; sub-cgroups come and go while a guest boots or stops."""
    pids = []
    try:
        for procs in cgroup.rglob("cgroup.procs") if cgroup.is_dir() else ():
            try:
                pids += [int(p) for p in procs.read_text().split()]
            except (FileNotFoundError, ProcessLookupError, OSError):
                continue
    except FileNotFoundError:
        pass
    return pids


def _remove_cgroup(cgroup: Path) -> None:
    if cgroup.is_dir():
        for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        cgroup.rmdir()


class Host:
    """One lab host. Made by Lab.host(); state lives in host.json."""

    def __init__(self, lab: Lab, state: dict):
        self.lab = lab
        self.name: str = state["name"]
        self.address: str = state["address"]
        self.extra_addresses: list[str] = list(state.get("extra_addresses", []))
        self.ssh_user: str | None = state.get("ssh_user")
        self.host_key_public: str = state.get("host_key_public", "")
        self.suite: str = state.get("suite", packages.DEFAULT_SUITE)
        self.image = Path(state["image"])
        self.repo = Path(state["repo"])
        self.netns: str = state["netns"]
        self.veth: str = state["veth"]
        self.cgroups = [Path(c) for c in state["cgroups"]]
        self.dir = lab.state_dir / "hosts" / self.name
        self.upper = self.dir / "upper"

    def _save(self) -> None:
        _write_json(self.dir / "host.json", {
            "name": self.name, "address": self.address, "extra_addresses": self.extra_addresses,
            "ssh_user": self.ssh_user, "host_key_public": self.host_key_public,
            "suite": self.suite, "image": str(self.image), "repo": str(self.repo), "netns": self.netns,
            "veth": self.veth, "cgroups": [str(c) for c in self.cgroups]})

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} {'running' if self.running else 'stopped'}>"

    # -- disk, before first boot -------------------------------------------------

    def _mkdirs(self, rel: str) -> Path:
        """Create upper/rel with each directory's mode and owner copied from the
        image: overlayfs shows the upper directory's, so /root must stay 0700."""
        path, base = self.upper, self.image
        for part in Path(rel).parts:
            path, base = path / part, base / part
            if not path.exists():
                path.mkdir()
                if base.is_dir():
                    st = base.stat()
                    os.chown(path, st.st_uid, st.st_gid)
                    os.chmod(path, st.st_mode & 0o7777)
        return path

    def _write(self, rel: str, text: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        path = self._mkdirs(str(Path(rel).parent)) / Path(rel).name
        path.write_text(text)
        os.chown(path, uid, gid)
        os.chmod(path, mode)

    def _prepare_disk(self, authorized_keys: list[str], host_key_private_openssh: str | None) -> None:
        self.upper.mkdir(mode=0o755)
        self._write("etc/hostname", f"{self.name}\n")
        hosts = (self.image / "etc/hosts").read_text()
        self._write("etc/hosts", f"127.0.1.1\t{self.name}\n" + hosts)
        self._write("etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
        # Host key: as the program hands it over through cloud-init, or new.
        key = self.upper / "etc/ssh/ssh_host_ed25519_key"
        self._mkdirs("etc/ssh")
        if host_key_private_openssh is not None:
            self._write("etc/ssh/ssh_host_ed25519_key", host_key_private_openssh.strip() + "\n", 0o600)
            public = run(["ssh-keygen", "-y", "-f", key], check=False).stdout.strip()
            if not public.startswith("ssh-ed25519 "):
                raise ValueError(f"host {self.name}: host_key_private_openssh is not an "
                                 "unencrypted OpenSSH ed25519 private key")
            self._write("etc/ssh/ssh_host_ed25519_key.pub", f"{public} root@{self.name}\n")
        else:
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.name}", "-f", key])
        self.host_key_public = " ".join((self.upper / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])
        keys = "".join(k.strip() + "\n" for k in authorized_keys)
        self._write("root/.ssh/authorized_keys", keys, 0o600)
        if self.ssh_user:
            self._add_sudo_user(self.ssh_user, keys)

    def _add_sudo_user(self, user: str, keys: str) -> None:
        """What cloud-init's users: does: a user with our keys and passwordless sudo."""
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", user) or user == "root":
            raise ValueError(f"ssh_user {user!r}: want a plain lower-case user name other than root")
        taken = [int(line.split(":")[2]) for line in (self.image / "etc/passwd").read_text().splitlines()]
        uid = max([999, *(u for u in taken if u < 60000)]) + 1
        days = int(time.time() // 86400)
        for rel, line, mode in (
                ("etc/passwd", f"{user}:x:{uid}:{uid}::/home/{user}:/bin/bash", 0o644),
                ("etc/group", f"{user}:x:{uid}:", 0o644),
                ("etc/shadow", f"{user}:*:{days}:0:99999:7:::", 0o640),
                ("etc/gshadow", f"{user}:!::", 0o640)):
            shadow_gid = (self.image / rel).stat().st_gid
            self._write(rel, (self.image / rel).read_text() + line + "\n", mode, 0, shadow_gid)
        home = f"home/{user}"
        self._mkdirs("home")
        (self.upper / home).mkdir(mode=0o750)
        os.chown(self.upper / home, uid, uid)
        for skel in (self.image / "etc/skel").iterdir():
            self._write(f"{home}/{skel.name}", skel.read_text(), 0o644, uid, uid)
        (self.upper / home / ".ssh").mkdir(mode=0o700)
        os.chown(self.upper / home / ".ssh", uid, uid)
        self._write(f"{home}/.ssh/authorized_keys", keys, 0o600, uid, uid)
        self._write(f"etc/sudoers.d/90-lab-{user}", f"{user} ALL=(ALL) NOPASSWD:ALL\n", 0o440)

    # -- network -----------------------------------------------------------------

    def exec(self, argv, **kwargs) -> subprocess.CompletedProcess:
        """Run argv on this machine inside the host's network namespace (a probe
        from outside: the guest's file system and processes are not involved)."""
        return run(["ip", "netns", "exec", self.netns, *argv], **{"check": False, **kwargs})

    def nft(self, args, **kwargs) -> subprocess.CompletedProcess:
        """Run nft on the host's network namespace from this machine (the lab's cloud
        firewall, probes), with the host's own nft once it has one.

        nft reads the kernel's tables back before it changes them, and an older nft
        cannot read a newer one's: this machine's nft 1.0.6 (Debian 12) dies of SIGSEGV
        on any set a Debian 13 host's nft 1.1.3 made. Before the host installs nftables
        its kernel holds nothing but what this machine's nft wrote. A stopped host's
        tables stay in its namespace: there this machine's nft is all there is.
        """
        pid = self.guest_pid()
        if pid is not None and Path(f"/proc/{pid}/root/usr/sbin/nft").exists():
            argv = ["nsenter", f"--target={pid}", "--mount", "--net", "/usr/sbin/nft", *args]
        else:
            argv = ["ip", "netns", "exec", self.netns, "nft", *args]
        return run(argv, **{"check": False, **kwargs})

    def _ensure_network(self) -> None:
        """Create the host's namespace and eth0, or create them again when the
        machine rebooted (/run/netns is gone, the host's disk is not) or the
        wan namespace went (and with it the other end of eth0)."""
        with self.lab._lock:
            self.lab._ensure_underlay()
            self.lab._add_netns(self.netns)
            if run(["ip", "-n", self.netns, "link", "show", "eth0"], check=False).returncode == 0:
                return
            self.lab._plug(self.netns, self.veth, self.address)
            for ip in self.extra_addresses:
                run(["ip", "-n", self.netns, "addr", "add", f"{ip}/32", "dev", "eth0"])

    def add_address(self, ip: str) -> None:
        """Add an extra address (say a reserved IP moving here) to eth0.

        A /32: the underlay's /24 route is already there, and the host
        answers ARP for it all the same.
        """
        with self.lab._lock:
            ip = self.lab._check_free_address(ip)
            self.extra_addresses.append(ip)
            self._save()
        run(["ip", "-n", self.netns, "addr", "add", f"{ip}/32", "dev", "eth0"])
        self.lab._forget_neighbour(ip)

    def remove_address(self, ip: str) -> None:
        ip = str(ipaddress.ip_address(ip))
        with self.lab._lock:
            if ip not in self.extra_addresses:
                raise ValueError(f"{ip} is not an extra address of host {self.name}")
            run(["ip", "-n", self.netns, "addr", "del", f"{ip}/32", "dev", "eth0"], check=False)
            self.extra_addresses.remove(ip)
            self._save()
        self.lab._forget_neighbour(ip)

    # -- lifecycle ---------------------------------------------------------------

    def _launcher(self) -> tuple[int, str] | None:
        try:
            pid, start = (self.dir / "launcher.pid").read_text().split()
        except (FileNotFoundError, ValueError):
            return None
        return int(pid), start

    @property
    def running(self) -> bool:
        launcher = self._launcher()
        return launcher is not None and _alive(*launcher)

    def guest_pid(self) -> int | None:
        """The guest's PID 1 as this machine numbers it (None while not booted)."""
        for pid in _cgroup_pids(self.cgroups[0]) if self.cgroups else ():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) > 1 and nspid[-1] == "1":
                return pid
        return None

    def boot(self) -> None:
        """Start the machine (a no-op when running). Its disk is kept from before."""
        if self.running:
            return
        self._ensure_network()
        argv = ["systemd-nspawn", "--quiet", "--boot", f"--directory={self.image}", "--read-only",
                f"--overlay={self.image}:{self.upper}:/",
                # machine names are global on this machine (/run/systemd/nspawn/):
                # prefix them so that two labs may both have a host "hub"
                f"--machine={self.lab.prefix}{self.name}", f"--hostname={self.name}",
                # no systemd on this machine to register with or get a unit from
                "--register=no", "--keep-unit",
                f"--network-namespace-path=/run/netns/{self.netns}",
                # wireguard-go needs the tun device and CAP_NET_ADMIN, which
                # joining a network namespace does not give
                "--capability=CAP_NET_ADMIN", "--bind=/dev/net/tun",
                f"--bind-ro={self.repo}:{REPO_MOUNT}",
                "--console=passive", "--resolv-conf=off", "--timezone=off", "--link-journal=no"]
        _write_json(self.dir / "launch.json", {"argv": argv, "cgroups": [str(c) for c in self.cgroups]})
        (self.dir / "launcher.pid").unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               # /proc/sys/net writable in the guest, as on a droplet: the hub's
               # forwarding step sets net.ipv4.ip_forward itself
               "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
        with open(self.dir / "console.log", "ab") as console:
            # The launcher forks and its first process exits at once: the
            # launcher is nobody's child and outlives this process.
            run([sys.executable, "-c", _LAUNCHER, self.dir], env=env, cwd="/", check=False,
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True, capture_output=False)
        if not self.running:
            raise RuntimeError(f"host {self.name}: launcher did not start:\n{self.console_tail()}")

    start = boot

    def wait_ssh(self, timeout: float = 60, user: str = "root") -> float:
        """Wait until sshd answers with the known host key; return seconds waited."""
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < timeout:
            if not self.running:
                raise RuntimeError(f"host {self.name} is not running:\n{self.console_tail()}")
            try:
                last = self.lab.ssh(self, "true", user=user, timeout=15)
                if last.returncode == 0:
                    return time.monotonic() - t0
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"host {self.name}: no SSH after {timeout}s ({last.stderr.strip() if last else ''})\n"
                           f"{self.console_tail()}")

    def reboot(self, timeout: float = 60, via_ssh: bool = False) -> float:
        """Reboot and wait for SSH; return seconds from the request to SSH.

        By default the way ctrl-alt-del would (SIGINT to the guest's PID 1);
        via_ssh=True runs `systemctl reboot` in the guest instead.
        """
        old = self.guest_pid()
        if old is None:
            raise RuntimeError(f"host {self.name} is not booted")
        t0 = time.monotonic()
        if via_ssh:
            self.lab.ssh(self, "systemctl reboot", timeout=15)
        else:
            os.kill(old, signal.SIGINT)
        while self.guest_pid() in (None, old):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"host {self.name} did not reboot:\n{self.console_tail()}")
            if not self.running:
                raise RuntimeError(f"host {self.name} stopped instead of rebooting:\n{self.console_tail()}")
            time.sleep(0.1)
        self.wait_ssh(timeout - (time.monotonic() - t0))
        return time.monotonic() - t0

    def _request_poweroff(self) -> None:
        launcher = self._launcher()
        if launcher and _alive(*launcher):
            os.kill(launcher[0], signal.SIGTERM)  # forwarded to nspawn: a clean guest poweroff

    def poweroff(self, timeout: float = 30) -> None:
        """Shut the guest down cleanly; kill what is left after timeout."""
        self._request_poweroff()
        deadline = time.monotonic() + timeout
        while (self.running or self.guest_pid()) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._kill_remains()

    stop = poweroff

    def power_cut(self) -> None:
        """A hard power-off, as DigitalOcean's power_off action: no clean shutdown."""
        self._kill_remains()

    def _kill_remains(self) -> None:
        """SIGKILL whatever still runs in the host's cgroups, then remove them.

        The cgroups are named after the host and created by its launcher, so
        every process in them is this host's.
        """
        for _ in range(100):
            pids = {pid for cg in self.cgroups for pid in _cgroup_pids(cg)}
            launcher = self._launcher()
            if launcher and _alive(*launcher):
                pids.add(launcher[0])
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for cg in self.cgroups:
            _remove_cgroup(cg)
        (self.dir / "launcher.pid").unlink(missing_ok=True)

    def destroy(self) -> None:
        """Power off and remove everything of this host: disk, namespace, records."""
        self.poweroff()
        if Path(f"/run/netns/{self.netns}").exists():
            run(["ip", "netns", "del", self.netns])
        remove_tree(self.dir)
        self.lab._forget_host(self)

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = (self.dir / "console.log").read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def ssh(self, command: str, **kwargs) -> subprocess.CompletedProcess:
        return self.lab.ssh(self, command, **kwargs)

    def status(self) -> dict:
        return {"name": self.name, "address": self.address, "extra_addresses": list(self.extra_addresses),
                "suite": self.suite, "running": self.running, "guest_pid": self.guest_pid(),
                "ssh_user": self.ssh_user, "host_key": self.host_key_public}


class Lab:
    """The lab's hosts, underlay and SSH client.

    As a context manager it tears everything down on exit, on errors,
    SIGTERM/SIGHUP and at interpreter exit. Used without one (a CLI's `up`),
    the lab persists in its directory until close() from any later process.
    """

    def __init__(self, dir: str | Path | None = None, name: str = "dvl"):
        if not _HOST_NAME.fullmatch(name) or len(name) > 10:
            raise ValueError(f"lab name {name!r}: want up to 10 of a-z, 0-9 and '-'")
        self.dir = Path(dir) if dir else default_lab_dir()
        self.name = name
        self.prefix = f"{name}-"  # namespaces and cgroups; unique to this lab
        self.cache_dir = self.dir / "cache"
        self.state_dir = self.dir / name
        self.wan_ns = f"{self.prefix}wan"
        self.op_ns = f"{self.prefix}op"
        self.operator_key = self.state_dir / "operator_key"
        self.known_hosts = self.state_dir / "known_hosts"
        # suite -> its base image (rootfs) and its apt repository, once prepared
        self.images: dict[str, Path] = {}
        self.repos: dict[str, Path] = {}
        self._lock = threading.RLock()
        self._saved_handlers: dict = {}
        self.hosts: dict[str, Host] = {}
        self._load_hosts()

    def _load_hosts(self) -> None:
        """Pick up hosts recorded on disk, also by other processes."""
        for state in sorted((self.state_dir / "hosts").glob("*/host.json")):
            data = json.loads(state.read_text())
            if data["name"] not in self.hosts:
                self.hosts[data["name"]] = Host(self, data)

    # -- setup -------------------------------------------------------------------

    def prepare(self) -> float:
        """Install machine packages, build or reuse every suite's image and apt
        repository; return seconds taken. A cold build prints how long it took."""
        with self._lock:
            t0 = time.monotonic()
            if os.geteuid() != 0:
                raise PermissionError("the lab needs root (namespaces, systemd-nspawn)")
            if not self.images:
                packages.ensure_machine_packages()
            wanted = packages.host_packages() if len(self.images) < len(packages.SUITES) else []
            for suite in packages.SUITES:
                if suite in self.images:
                    continue
                t_suite = time.monotonic()
                image = packages.base_image(self.cache_dir, suite)
                self.repos[suite] = packages.local_repo(self.cache_dir, image, wanted, suite=suite)
                self.images[suite] = image
                seconds = time.monotonic() - t_suite
                if seconds > 1:  # not simply found in the cache: built (here or by another lab process)
                    print(f"[lab] {suite} image and apt repository ready in {seconds:.1f}s",
                          file=sys.stderr, flush=True)
            return time.monotonic() - t0

    def _record(self) -> dict:
        path = self.state_dir / "lab.json"
        return json.loads(path.read_text()) if path.exists() else {"namespaces": []}

    def _ensure_underlay(self) -> None:
        """The wan bridge and the operator namespace, plus the operator's key."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.state_dir / "hosts").mkdir(exist_ok=True)
        if not self.operator_key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.name}-operator",
                 "-f", self.operator_key])
        self.known_hosts.touch()
        if not (self.state_dir / "lab.json").exists():
            _write_json(self.state_dir / "lab.json", {"namespaces": [self.wan_ns, self.op_ns]})
        if not Path(f"/run/netns/{self.wan_ns}").exists():
            self._add_netns(self.wan_ns)
            run(["ip", "-n", self.wan_ns, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", self.wan_ns, "link", "set", "br0", "up"])
        if not Path(f"/run/netns/{self.op_ns}").exists():
            self._add_netns(self.op_ns)
            self._plug(self.op_ns, "v-op", OPERATOR_ADDRESS)

    @staticmethod
    def _add_netns(ns: str) -> None:
        if not Path(f"/run/netns/{ns}").exists():
            run(["ip", "netns", "add", ns])

    def _plug(self, ns: str, veth: str, address: str) -> None:
        """A veth from the wan bridge to eth0 in ns. Both ends are created in
        lab namespaces (ip -n), never in the machine's own."""
        run(["ip", "-n", self.wan_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "-n", self.wan_ns, "link", "set", veth, "master", "br0", "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{address}/{UNDERLAY.prefixlen}", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def _used_addresses(self) -> set[str]:
        used = {OPERATOR_ADDRESS}
        for host in self.hosts.values():
            used |= {host.address, *host.extra_addresses}
        return used

    def _check_free_address(self, ip: str) -> str:
        ip = str(ipaddress.ip_address(ip))
        if ipaddress.ip_address(ip) not in UNDERLAY or ip in (str(UNDERLAY[0]), str(UNDERLAY[-1])):
            raise ValueError(f"address {ip}: want a host address in the underlay {UNDERLAY}")
        if ip in self._used_addresses():
            raise ValueError(f"address {ip} is already used in lab {self.name}")
        return ip

    def _forget_neighbour(self, ip: str) -> None:
        """An address moved: drop stale ARP entries for it in every lab namespace,
        as a cloud's network would, instead of waiting for them to expire."""
        for ns in [self.op_ns, *(h.netns for h in self.hosts.values())]:
            run(["ip", "-n", ns, "neigh", "flush", "to", ip], check=False)

    def host(self, name: str, address: str | None = None, *, authorized_keys=(),
             host_key_private_openssh: str | None = None, ssh_user: str | None = None,
             suite: str = packages.DEFAULT_SUITE) -> Host:
        """Create a host (not yet booted): its disk, namespace and known host key.

        authorized_keys: public keys for root (and ssh_user), besides the lab's
        operator key. host_key_private_openssh: an ed25519 private key in
        OpenSSH format to install as the host key; a new one when omitted.
        ssh_user: also create this user, with passwordless sudo. suite: the
        Debian release it runs (packages.SUITES), kept for its whole life.
        """
        if not _HOST_NAME.fullmatch(name) or name in _RESERVED_NAMES:
            raise ValueError(f"host name {name!r}: want 1-31 of a-z, 0-9 and '-', not wan or op")
        if suite not in packages.SUITES:
            raise ValueError(f"host {name}: suite {suite!r}, want one of {', '.join(packages.SUITES)}")
        self.prepare()
        with self._lock:
            if name in self.hosts:
                raise ValueError(f"lab {self.name} already has a host {name}")
            if address is None:
                free = (str(UNDERLAY[i]) for i in range(FIRST_HOST_ADDRESS, UNDERLAY.num_addresses - 1))
                address = next(ip for ip in free if ip not in self._used_addresses())
            address = self._check_free_address(address)
            veth = f"v-{name}" if len(name) <= 13 else f"v-{uuid.uuid5(uuid.NAMESPACE_DNS, name).hex[:13]}"
            host = Host(self, {"name": name, "address": address, "ssh_user": ssh_user, "suite": suite,
                               "image": str(self.images[suite]), "repo": str(self.repos[suite]),
                               "netns": self.prefix + name, "veth": veth,
                               "cgroups": [str(root / (self.prefix + name)) for root in _cgroup_roots()]})
            # Record first, then create: a crash in between leaves nothing unrecorded.
            host.dir.mkdir(parents=True)
            self.hosts[name] = host
            host._save()
        try:
            host._ensure_network()
            operator = self.operator_key.with_suffix(".pub").read_text().strip()
            host._prepare_disk([operator, *authorized_keys], host_key_private_openssh)
            host._save()
            with self._lock:
                self._write_known_hosts()
        except BaseException:
            host.destroy()
            raise
        return host

    def _forget_host(self, host: Host) -> None:
        with self._lock:
            self.hosts.pop(host.name, None)
            if self.known_hosts.exists():
                self._write_known_hosts()

    def _write_known_hosts(self) -> None:
        # Keyed by host name (HostKeyAlias), so any of a host's addresses checks
        # against that host's key.
        lines = "".join(f"{h.name} {h.host_key_public}\n" for h in self.hosts.values() if h.host_key_public)
        tmp = self.known_hosts.with_suffix(".tmp")
        tmp.write_text(lines)
        tmp.rename(self.known_hosts)

    # -- using it ----------------------------------------------------------------

    def _get(self, host: Host | str) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    def ssh_argv(self, host: Host | str, command: str, *, user: str = "root", key: str | Path | None = None,
                 address: str | None = None, known_hosts: str | Path | None = None) -> list[str]:
        """The ssh command line, run in the operator namespace, that lab.ssh uses."""
        host = self._get(host)
        return ["ip", "netns", "exec", self.op_ns, "ssh", "-F", "/dev/null",
                "-i", str(key or self.operator_key), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", f"HostKeyAlias={host.name}", "-o", "CheckHostIP=no", "-o", "UpdateHostKeys=no",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                f"{user}@{address or host.address}", command]

    def ssh(self, host: Host | str, command: str, stdin: str | bytes | None = None, *, user: str = "root",
            key: str | Path | None = None, address: str | None = None, known_hosts: str | Path | None = None,
            timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        """Run command on host over SSH from the operator namespace, host key checked.

        stdin is fed to the command (text, or bytes for binary output too).
        """
        argv = self.ssh_argv(host, command, user=user, key=key, address=address, known_hosts=known_hosts)
        return run(argv, input=stdin if stdin is not None else "", timeout=timeout, check=check,
                   capture_output=True, text=not isinstance(stdin, bytes))

    def op_exec(self, argv, **kwargs) -> subprocess.CompletedProcess:
        """Run argv in the operator namespace (a probe from the lab's 'internet')."""
        return run(["ip", "netns", "exec", self.op_ns, *argv], **{"check": False, **kwargs})

    def status(self) -> dict:
        return {"lab": self.name, "dir": str(self.state_dir),
                "underlay": Path(f"/run/netns/{self.op_ns}").exists(),
                "hosts": [h.status() for h in self.hosts.values()]}

    # -- teardown ----------------------------------------------------------------

    def close(self) -> None:
        """Tear down every host, namespace, cgroup and file the lab recorded.

        Works from any process (it reads the records), so it is also how a
        crashed run's leftovers go: see cleanup_stale().
        """
        with self._lock:
            self._load_hosts()
            hosts = list(self.hosts.values())
            errors = []
            try:  # the dstack apps first: their containers live in the hosts' namespaces
                cvm.Engine(self).close()
            except Exception as e:
                errors.append(f"container engine: {e}")
            for host in hosts:  # all guests shut down in parallel
                host._request_poweroff()
            for host in hosts:
                try:
                    host.destroy()
                except Exception as e:  # keep going: tear down the rest
                    errors.append(f"{host.name}: {e}")
            for ns in reversed(self._record()["namespaces"]):
                if ns.startswith(self.prefix) and Path(f"/run/netns/{ns}").exists():
                    run(["ip", "netns", "del", ns], check=False)
            try:
                if not errors:
                    remove_tree(self.state_dir)
            except Exception as e:
                errors.append(str(e))
            if errors:
                raise RuntimeError("lab teardown incomplete: " + "; ".join(errors))

    def cleanup_stale(self) -> None:
        """Remove what an earlier run of this lab left behind (it is all
        recorded under the state directory); the same as close()."""
        self.close()

    def __enter__(self) -> Lab:
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._saved_handlers[sig] = signal.signal(sig, _exit_on_signal)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            atexit.unregister(self.close)
            for sig, handler in self._saved_handlers.items():
                signal.signal(sig, handler)
            self._saved_handlers.clear()


def _exit_on_signal(signum, frame):
    # Treated as Ctrl-C: it unwinds through __exit__ and finally blocks, and
    # pytest stops the run on it (a SystemExit would only fail one test).
    raise KeyboardInterrupt(f"signal {signum}")


# How Host.boot starts a launcher (not `python -m`, which would import this
# module twice when the package imports it too).
_LAUNCHER = "import sys; from lab.hosts import _launch; _launch(sys.argv[1])"


def _launch(host_dir: str) -> None:
    """The detached launcher of one host; see Host.boot."""
    host_dir = Path(host_dir)
    spec = json.loads((host_dir / "launch.json").read_text())
    pid = os.fork()
    if pid:  # the first process records the launcher and returns to Host.boot
        (host_dir / "launcher.pid").write_text(f"{pid} {_start_time(pid)}\n")
        os._exit(0)
    # systemd-nspawn wants a cgroup of its own when no systemd manages it
    for cgroup in map(Path, spec["cgroups"]):
        cgroup.mkdir(exist_ok=True)
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        if child and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # nspawn powers the guest off

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rc = 0
    while not stopping:
        child = subprocess.Popen(spec["argv"])
        if stopping:
            child.send_signal(signal.SIGTERM)
        rc = child.wait()
        print(f"[lab launcher] systemd-nspawn exited with {rc}", flush=True)
        if rc != _REBOOT_EXIT_CODE:
            break
    sys.exit(rc)


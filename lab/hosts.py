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

A host's launcher is a small detached Python process (machine._launch)
that runs systemd-nspawn in a loop, again after a guest reboot (exit code
133), from a cgroup named after the host: that cgroup is how the lab finds
the guest's PID 1 and, as a last resort, kills whatever is left.
"""
from __future__ import annotations

import atexit
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

from . import cvm, device, packages
from .disk import Disk
from .machine import Machine, _cgroup_roots, _write_json
from .objectstore import ObjectStore
from .packages import remove_tree, run
from .ssh import ssh_argv
from .underlay import UNDERLAY, HostilePaths, HostNetwork, Underlay

DEFAULT_LAB_DIR = "/var/lib/dstack-vpn-lab"
LAB_DIR_ENV = "DSTACK_VPN_LAB_DIR"
FIRST_HOST_ADDRESS = 10
_HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_RESERVED_NAMES = {"wan", "op", "router"}  # the underlay's own namespaces


def default_lab_dir() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or DEFAULT_LAB_DIR)


class Host(Disk, HostNetwork, Machine):
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


class Lab(Underlay, HostilePaths):
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
        return ssh_argv(self.op_ns, key or self.operator_key, f"{user}@{address or host.address}", command,
                        known_hosts=known_hosts or self.known_hosts, options={
                            "HostKeyAlias": host.name, "CheckHostIP": "no", "UpdateHostKeys": "no",
                            "ConnectTimeout": "3", "LogLevel": "ERROR", "ServerAliveInterval": "5",
                            "ServerAliveCountMax": "3"})

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
            try:
                ObjectStore(self).stop()
            except Exception as e:
                errors.append(f"object store: {e}")
            try:  # people's devices: their wireguard-go, by PID
                device.close_all(self)
            except Exception as e:
                errors.append(f"devices: {e}")
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

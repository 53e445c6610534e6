"""A lab host's machine: systemd-nspawn run by a small detached launcher (_launch), again after
a guest reboot (exit code 133), from cgroups named after the host, through which the lab finds
the guest's PID 1 and, as a last resort, kills whatever is left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .packages import REPO_MOUNT, remove_tree, run

_REBOOT_EXIT_CODE = 133  # systemd-nspawn's exit code when the guest reboots


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


class Machine:
    """Host's lifecycle: boot, reboot, power off or cut, destroy (a part of lab.hosts.Host)."""

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


# How Machine.boot starts a launcher (not `python -m`, which would import this
# module twice when the package imports it too).
_LAUNCHER = "import sys; from lab.machine import _launch; _launch(sys.argv[1])"


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

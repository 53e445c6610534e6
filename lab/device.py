"""A person's device in the lab (a laptop, a phone): a plain network namespace on the underlay,
running wg-quick with the config the program outputs for a `client` spoke, as a laptop would.

It is no lab host (no OS of its own, no SSH): commands run in its namespace on this machine. Where
the kernel has no WireGuard, wg-quick starts wireguard-go (Debian's) for the interface, which the
device names after the lab so that its control socket (/var/run/wireguard/NAME.sock, shared by
every namespace) is its own. Its namespace is recorded with the lab's, so Lab.close() removes it;
close() here stops the interface and its wireguard-go by PID first.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import zlib
from pathlib import Path

from .packages import remove_tree, run


class Device:
    def __init__(self, lab, name: str, address: str):
        self.lab = lab
        self.name = name
        self.address = address
        """its address on the underlay (where its WireGuard dials the hub from)"""
        self.ns = f"{lab.prefix}dev-{name}"
        tag = zlib.crc32(f"{lab.prefix}/{name}".encode()) % 10**8
        self.veth = f"v-d{tag % 10**6}"
        # the interface, and so the config file's name (wg-quick takes it from there): unique per lab
        self.interface = f"wgc{tag}"
        self.dir = lab.state_dir / "devices" / name
        self.record = self.dir / "device.json"

    @property
    def conf_path(self) -> Path:
        return self.dir / f"{self.interface}.conf"

    def exec(self, argv, **kwargs) -> subprocess.CompletedProcess:
        """A command in the device's namespace (this machine's files; the device's network)."""
        return run(["ip", "netns", "exec", self.ns, *argv], **{"check": False, **kwargs})

    def plug(self) -> None:
        """Its namespace, on the underlay (once)."""
        with self.lab._lock:
            self.lab._ensure_underlay()
            record = self.lab.state_dir / "lab.json"
            data = json.loads(record.read_text())
            if self.ns not in data["namespaces"]:
                data["namespaces"].append(self.ns)
                record.write_text(json.dumps(data, indent=1) + "\n")
            if not Path(f"/run/netns/{self.ns}").exists():
                self.lab._add_netns(self.ns)
                self.lab._plug(self.ns, self.veth, self.address)

    def up(self, config: str) -> None:
        """wg-quick up with `config` (the program's output), replacing what ran before; the same
        config as the one running leaves the interface alone (a person does not re-import it)."""
        self.plug()
        if (self.conf_path.exists() and self.conf_path.read_text() == config
                and self.exec(["ip", "link", "show", self.interface]).returncode == 0):
            return
        self.down()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(config)
        out = self.exec(["wg-quick", "up", str(self.conf_path)])
        if out.returncode != 0:
            raise RuntimeError(f"wg-quick up on device {self.name}: {out.stderr}")
        pid = self._userspace_pid()
        self.dir.joinpath("device.json").write_text(json.dumps({"pid": pid, "start": _start_time(pid) if pid else None}))

    def _userspace_pid(self) -> int | None:
        """wireguard-go's PID for this device's interface (None: the kernel's WireGuard)."""
        found = subprocess.run(["pgrep", "-x", "-f", f"wireguard-go {self.interface}"], capture_output=True, text=True)
        pids = [int(p) for p in found.stdout.split()]
        return pids[0] if pids else None

    def down(self) -> None:
        """The interface gone, and its wireguard-go (by the PID recorded, if it still is that process)."""
        if self.conf_path.exists() and Path(f"/run/netns/{self.ns}").exists():
            self.exec(["wg-quick", "down", str(self.conf_path)])
        if self.record.exists():
            data = json.loads(self.record.read_text())
            pid = data.get("pid")
            if pid and _start_time(pid) == data.get("start"):
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass
                end = time.monotonic() + 10
                while _start_time(pid) == data.get("start") and time.monotonic() < end:
                    time.sleep(0.1)
            self.record.unlink()
        sock = Path(f"/var/run/wireguard/{self.interface}.sock")
        if sock.exists() and self._userspace_pid() is None:
            sock.unlink()

    def close(self) -> None:
        """Down, its namespace removed, its files gone (the config holds its keys)."""
        self.down()
        if Path(f"/run/netns/{self.ns}").exists():
            run(["ip", "netns", "del", self.ns], check=False)
        if self.dir.exists():
            remove_tree(self.dir)


def _start_time(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/PID/stat): a PID reused is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def close_all(lab) -> None:
    """Every device of the lab down and gone (Lab.close, before the namespaces go)."""
    root = lab.state_dir / "devices"
    if root.exists():
        for path in sorted(root.iterdir()):
            Device(lab, path.name, "").close()

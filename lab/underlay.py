"""The lab's underlay: a bridge in the "wan" namespace, one namespace per host with its eth0 on
it, the operator's namespace where SSH and probes start. Nothing in the machine's own namespace."""
from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from .machine import _write_json
from .packages import run

UNDERLAY = ipaddress.ip_network("198.51.100.0/24")
OPERATOR_ADDRESS = "198.51.100.100"


class HostNetwork:
    """A part of lab.hosts.Host: its namespace, eth0 and addresses."""

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


class Underlay:
    """A part of lab.hosts.Lab: the bridge, the namespaces, who has which address."""

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

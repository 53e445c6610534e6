"""The lab's underlay: a bridge in the "wan" namespace, one namespace per host with its eth0 on
it, the operator's namespace where SSH and probes start. Nothing in the machine's own namespace.

Hostile paths, for the tests: a host's UDP dropped on the bridge (block_udp), and a host behind a
router whose path to the rest has a smaller MTU (behind_router)."""
from __future__ import annotations

import contextlib
import ipaddress
import subprocess
from pathlib import Path

from .machine import _write_json
from .packages import run

UNDERLAY = ipaddress.ip_network("198.51.100.0/24")
OPERATOR_ADDRESS = "198.51.100.100"
ROUTER_ADDRESS = "198.51.100.250"


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
        from .objectstore import OBJECT_STORE_ADDRESS
        used = {OPERATOR_ADDRESS, ROUTER_ADDRESS, OBJECT_STORE_ADDRESS}
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


class HostilePaths:
    """A part of lab.hosts.Lab: a host's path made the way some networks are."""

    def _block_table(self, host) -> str:
        return "dstack_vpn_lab_block_" + host.veth.replace("-", "_")

    def block_udp(self, host) -> None:
        """Drop every UDP packet to and from host on the wan bridge (a network that lets only
        TCP out), in the lab's wan namespace. Idempotent; unblock_udp() undoes it."""
        table = self._block_table(host)
        rules = (f"table bridge {table}\ndelete table bridge {table}\n"
                 f"table bridge {table} {{\n\tchain forward {{\n"
                 "\t\ttype filter hook forward priority filter; policy accept;\n"
                 f'\t\tiifname "{host.veth}" meta l4proto udp drop\n'
                 f'\t\toifname "{host.veth}" meta l4proto udp drop\n\t}}\n}}\n')
        run(["ip", "netns", "exec", self.wan_ns, "nft", "-f", "-"], input=rules)

    def unblock_udp(self, host) -> None:
        run(["ip", "netns", "exec", self.wan_ns, "nft", "delete", "table", "bridge", self._block_table(host)],
            check=False)

    @contextlib.contextmanager
    def behind_router(self, host, mtu: int):
        """Put host behind a router namespace whose path to the rest of the underlay carries at most
        `mtu` bytes, as the Internet's do: larger packets with DF set get ICMP "fragmentation
        needed", others are fragmented (route MTUs on the router; every link stays 1500). The host
        keeps its address (the router answers ARP for it and for the rest: proxy ARP). The host's
        bridge port moves into the router's namespace and back at the end."""
        router = f"{self.prefix}router"
        with self._lock:
            self._add_netns(router)
            record = self._record()
            if router not in record["namespaces"]:
                record["namespaces"].append(router)
                _write_json(self.state_dir / "lab.json", record)
        wan, port = self.wan_ns, host.veth
        try:
            run(["ip", "-n", wan, "link", "set", port, "nomaster"])
            run(["ip", "-n", wan, "link", "set", port, "netns", router])
            run(["ip", "-n", wan, "link", "add", "v-router", "type", "veth", "peer", "name", "r-wan", "netns", router])
            run(["ip", "-n", wan, "link", "set", "v-router", "master", "br0", "up"])
            for argv in (["link", "set", "lo", "up"], ["link", "set", "r-wan", "up"], ["link", "set", port, "up"],
                         ["addr", "add", f"{ROUTER_ADDRESS}/{UNDERLAY.prefixlen}", "dev", "r-wan"],
                         ["route", "replace", str(UNDERLAY), "dev", "r-wan", "mtu", "lock", str(mtu)],
                         ["route", "add", f"{host.address}/32", "dev", port, "mtu", "lock", str(mtu)]):
                run(["ip", "-n", router, *argv])
            for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.proxy_arp=1",
                        "net.ipv4.conf.r-wan.proxy_arp=1", f"net.ipv4.conf.{port}.proxy_arp=1"):
                run(["ip", "netns", "exec", router, "sysctl", "-q", "-w", key])
            self._forget_neighbour(host.address)
            run(["ip", "-n", host.netns, "neigh", "flush", "all"], check=False)
            yield router
        finally:
            if Path(f"/run/netns/{router}").exists():
                run(["ip", "-n", router, "link", "set", port, "netns", wan], check=False)
                run(["ip", "netns", "del", router], check=False)
            run(["ip", "-n", wan, "link", "set", port, "master", "br0", "up"], check=False)
            self._forget_neighbour(host.address)
            run(["ip", "-n", host.netns, "neigh", "flush", "all"], check=False)

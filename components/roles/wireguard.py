"""Roles `wireguard-hub` and `wireguard-spoke`: the tunnel. The hub listens and knows every spoke
as a peer; a spoke dials the hub, its only peer, and reaches every other spoke through it.

On a host: /etc/wireguard/wg0.conf (0600, on the step's stdin) and wg-quick@wg0, a running
interface changed peer by peer; on spokes also dstack-vpn-nudge (the tunnel's watchdog: a
silent hub gets a fresh handshake within seconds). The hub answers its spokes' echo requests
on the overlay. In a dstack app: the config in the compose file, the keys in files of its own tmpfs.
"""
from __future__ import annotations

import pulumi

from .. import render, topology
from ..steps import Step
from . import Node, Role, transport

# Installed where the kernel has no WireGuard (the install step checks; the spoke image has it).
USERSPACE = ("wireguard-go",)
# A spoke's watchdog (templates/wireguard/watchdog.sh): the program, and how many seconds of a
# silent hub make it set the hub's peer again (a fresh handshake).
WATCHDOG = "/usr/local/lib/dstack-vpn/watchdog.sh"
WATCHDOG_MISSES = 3
# A path's MTU where none is set (Ethernet's), and what WireGuard takes of it (wg-quick's
# reckoning: its header over IPv6): the interface gets the difference.
PATH_MTU = 1500
WIREGUARD_OVERHEAD = 80
# An IPv4 TCP segment's headers: a TCP MSS is the interface's MTU less these.
TCP_IP_HEADERS = 40


def interface_values(node: Node) -> dict:
    """The wireguard step's values; a spoke's also name the hub's overlay address, which its
    watchdog asks once a second (templates/systemd/dstack-vpn-nudge.service), and under
    transport `auto` its two endpoints."""
    cfg = node.cfg
    return dict(interface=cfg.interface, address=node.address, prefixlen=cfg.prefixlen,
                nudge_address=None if node.is_hub else cfg.hub.address, **watchdog_values(node))


def watchdog_values(node: Node | None = None) -> dict:
    """The watchdog's settings (the same in every node's program and the spoke image's); with a
    spoke whose transport is auto, `auto`: the two endpoints its unit passes it (from
    node.hub_endpoint: an output on hosts)."""
    values: dict = dict(watchdog=WATCHDOG, misses=WATCHDOG_MISSES, auto_bound=transport.AUTO_BOUND,
                        udp_retry=transport.UDP_RETRY, auto=None)
    if node is not None and not node.is_hub and node.spoke.transport == "auto":
        values["auto"] = pulumi.Output.from_input(node.hub_endpoint).apply(
            lambda ep: " ".join(transport.endpoints(node, ep).values()))
    return values


def mtu(node: Node) -> int | None:
    """The node's WireGuard MTU, from its path's (its own setting, the network's); a tcp spoke's
    from Ethernet's (wg-quick would reckon it from its endpoint, 127.0.0.1: loopback's); None:
    wg-quick reckons it."""
    path = node.cfg.mtu if node.is_hub else (node.spoke.mtu or node.cfg.mtu)
    if path is None and not node.is_hub and node.spoke.transport == "tcp":
        path = PATH_MTU
    return None if path is None else path - WIREGUARD_OVERHEAD


def mss_clamps(node: Node) -> list[dict]:
    """The hub's: spokes whose path MTU is below its own, with the TCP MSS that fits them. The hub
    sets it in every TCP handshake it forwards to or from such a spoke: the other end then never
    sends it a segment its path cannot carry, whatever that end's own MTU."""
    cfg = node.cfg
    hub_path = cfg.mtu or PATH_MTU
    return [dict(address=s.address, mss=path - WIREGUARD_OVERHEAD - TCP_IP_HEADERS) for s in cfg.spokes
            if (path := s.mtu or cfg.mtu) is not None and path < hub_path]


def hub_conf(node: Node, private_key: str, peers: list[dict]) -> str:
    """The hub's wg-quick config: its key and one peer per spoke."""
    cfg = node.cfg
    return render.render("wireguard/hub.conf", private_key=private_key, peers=topology.hub_peers(peers),
                         listen_port=cfg.listen_port, address=cfg.hub.address, prefixlen=cfg.prefixlen,
                         mtu=mtu(node))


def spoke_conf(node: Node, private_key: str | None, preshared_key: str | bool | None, hub_public_key: str,
               hub_endpoint: str) -> str:
    """A spoke's wg-quick config: with its keys in it (a host), or, where the node keeps its keys
    in files (node.key_dir: a dstack app), naming those files (preshared_key: whether it has one)."""
    cfg = node.cfg
    keys = dict(key_dir=node.key_dir) if node.key_dir else dict(private_key=private_key)
    ways = transport.endpoints(node, hub_endpoint)
    endpoint = ways["tcp"] if node.spoke.transport == "tcp" else ways["udp"]
    return render.render("wireguard/spoke.conf", preshared_key=preshared_key, hub_public_key=hub_public_key,
                         endpoint=endpoint, overlay=cfg.overlay, address=node.address, prefixlen=cfg.prefixlen,
                         mtu=mtu(node), **keys)


class WireguardHub(Role):
    name = "wireguard-hub"
    config_keys = frozenset({"listenPort", "interface", "mtu"})
    packages = ("wireguard-tools",)
    userspace = USERSPACE

    def openings(self, node: Node) -> list[topology.Opening]:
        return [topology.Opening("udp", node.cfg.listen_port, topology.PUBLIC)]

    def steps(self, node: Node) -> list[Step]:
        # The peer step: the only hub step a new spoke changes.
        conf = pulumi.Output.all(node.private_key, node.peers).apply(lambda v: hub_conf(node, *v))
        return [Step("wireguard", interface_values(node), pulumi.Output.secret(conf), secret=True,
                     after=("firewall", "forwarding"))]


class WireguardSpoke(Role):
    name = "wireguard-spoke"
    config_keys = WireguardHub.config_keys
    packages = ("wireguard-tools", "iputils-ping")  # ping: the watchdog
    userspace = USERSPACE

    def steps(self, node: Node) -> list[Step]:
        # A new spoke's tunnel comes up once the hub knows it.
        conf = pulumi.Output.all(node.private_key, node.preshared_key, node.hub_public_key,
                                 node.hub_endpoint).apply(lambda v: spoke_conf(node, *v))
        return [Step("wireguard", interface_values(node), pulumi.Output.secret(conf), secret=True,
                     after=("firewall", "transport", "hub/wireguard"))]

    def compose(self, node: Node) -> dict:
        cfg = node.cfg
        # (no key in the text: the config reads both keys from files under node.key_dir)
        text = spoke_conf(node, None, node.preshared_key, node.hub_public_key, node.hub_endpoint)
        env = {"DSTACK_VPN_INTERFACE": cfg.interface, "DSTACK_VPN_PUBLIC_KEY": node.public_key,
               "DSTACK_VPN_HUB_PUBLIC_KEY": node.hub_public_key, "DSTACK_VPN_HUB_ADDRESS": cfg.hub.address,
               "DSTACK_VPN_HUB_ENDPOINT": f"{node.hub_endpoint}:{cfg.listen_port}",
               "DSTACK_VPN_WIREGUARD": text.rstrip("\n")}
        if node.spoke.transport == "auto":  # the watchdog's two ways to the hub
            env["DSTACK_VPN_AUTO"] = " ".join(transport.endpoints(node, node.hub_endpoint).values())
        return env


HUB = WireguardHub()
SPOKE = WireguardSpoke()

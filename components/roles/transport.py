"""Roles `tcp-hub` and `tcp-spoke`: WireGuard's UDP carried over one TCP connection per spoke, for
spokes whose networks drop UDP (spokes[].transport: tcp, or auto: UDP first).

The carrier is v2ray (Debian 12 and 13, Ubuntu 22.04 and 24.04 package it; README "TCP
transport" says why it and not udptunnel or socat): on a spoke, a VLESS client that takes
WireGuard's datagrams on 127.0.0.1 and sends each, framed, over TCP to the hub's tcpPort; on the
hub, the server, which hands every datagram to the hub's own WireGuard port on 127.0.0.1 and
nowhere else (freedom's redirect: it can carry nothing but WireGuard). WireGuard authenticates
every packet itself, so the VLESS user id is not a secret: it admits to nothing but the port UDP
already reaches. The hub's service and its opening (host ruleset and cloud firewall) exist only
while some spoke's transport is tcp or auto; on a spoke, only where its own is. The package is
installed where a node first uses TCP and stays (its own proxy disabled) until destroy purges it.

On a host: /etc/dstack-vpn/tcp-transport.json and dstack-vpn-tcp.service (a dynamic user, no
capability but binding the hub's port). Every host has the step: it sets the service up where the
node uses TCP and removes it where it no longer does (a droplet's steps undo nothing when deleted:
see steps.Target.undo). In a dstack app: the spoke image's entrypoint runs the
same client from the compose file's DSTACK_VPN_TCP_* variables. Under `auto`, the spoke's
watchdog (wireguard.py) moves the hub's endpoint between the two.
"""
from __future__ import annotations

import json

import pulumi

from .. import topology
from ..steps import Step
from . import Node, Role

PACKAGE = "v2ray"
CONFIG_PATH = "/etc/dstack-vpn/tcp-transport.json"
# The VLESS user id of every hub and spoke: public by design (the module's docstring).
VLESS_ID = "7f3b0d2e-5c1a-4f8e-9d6b-2a4c8e1f0b37"
# Under `auto`: how many seconds without an answer from the hub on one transport before the
# watchdog tries the other, and how long it stays on TCP before trying UDP again (doubling up
# to the last figure while UDP stays silent).
AUTO_BOUND = 5
UDP_RETRY = (60, 960)


def relay_port(listen_port: int) -> int:
    """The spoke's local UDP port (127.0.0.1) where WireGuard hands its packets to the client."""
    return listen_port + 1 if listen_port < 65535 else listen_port - 1


def uses_tcp(node: Node) -> bool:
    """Whether the node runs the carrier: a spoke whose transport is tcp or auto; the hub while
    any spoke's is."""
    return bool(node.cfg.tcp_spokes) if node.is_hub else node.spoke.transport != "udp"


def endpoints(node: Node, hub_endpoint: str) -> dict:
    """A spoke's two ways to the hub: WireGuard's own (udp) and the local relay (tcp)."""
    cfg = node.cfg
    return dict(udp=f"{hub_endpoint}:{cfg.listen_port}", tcp=f"127.0.0.1:{relay_port(cfg.listen_port)}")


def hub_config(node: Node) -> str:
    """The hub's v2ray: VLESS on tcpPort, every datagram to its WireGuard port on 127.0.0.1."""
    cfg = node.cfg
    return _json({
        "log": {"loglevel": "warning"},
        "inbounds": [{"listen": "0.0.0.0", "port": cfg.tcp_port, "protocol": "vless",
                      "settings": {"clients": [{"id": VLESS_ID}], "decryption": "none"},
                      "streamSettings": {"network": "tcp"}}],
        "outbounds": [{"protocol": "freedom", "settings": {"redirect": f"127.0.0.1:{cfg.listen_port}"}}],
    })


def spoke_config(node: Node, hub_endpoint: str) -> str:
    """A spoke's v2ray: WireGuard's datagrams on 127.0.0.1:relay_port, over TCP to the hub."""
    cfg = node.cfg
    return _json({
        "log": {"loglevel": "warning"},
        "inbounds": [{"listen": "127.0.0.1", "port": relay_port(cfg.listen_port), "protocol": "dokodemo-door",
                      "settings": {"address": "127.0.0.1", "port": cfg.listen_port, "network": "udp"}}],
        "outbounds": [{"protocol": "vless", "settings": {"vnext": [{
            "address": hub_endpoint, "port": cfg.tcp_port, "users": [{"id": VLESS_ID, "encryption": "none"}]}]}}],
    })


def _json(value: dict) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def step_values(node: Node, **more) -> dict:
    return dict(config_path=CONFIG_PATH, hub=node.is_hub, tcp_port=node.cfg.tcp_port, enabled=uses_tcp(node),
                **more)


class TcpHub(Role):
    name = "tcp-hub"
    config_keys = frozenset({"tcpPort"})
    packages = (PACKAGE,)

    def node_packages(self, node: Node) -> tuple[str, ...]:
        return self.packages if uses_tcp(node) else ()

    def openings(self, node: Node) -> list[topology.Opening]:
        return [topology.Opening("tcp", node.cfg.tcp_port, topology.PUBLIC)] if uses_tcp(node) else []

    def steps(self, node: Node) -> list[Step]:
        config = hub_config(node) if uses_tcp(node) else None
        return [Step("transport", step_values(node, allow=None), config, after=("firewall",))]


class TcpSpoke(Role):
    name = "tcp-spoke"
    config_keys = TcpHub.config_keys
    packages = (PACKAGE,)

    def node_packages(self, node: Node) -> tuple[str, ...]:
        return self.packages if uses_tcp(node) else ()

    def steps(self, node: Node) -> list[Step]:
        if not uses_tcp(node):
            return [Step("transport", step_values(node, allow=None), after=("firewall",))]
        # the hub's service is there first; the spoke's tunnel (wireguard) follows this step
        config = pulumi.Output.from_input(node.hub_endpoint).apply(lambda ep: spoke_config(node, ep))
        return [Step("transport", step_values(node, allow=node.hub_endpoint), config,
                     after=("firewall", "hub/transport"))]

    def compose(self, node: Node) -> dict:
        if not uses_tcp(node):
            return {}
        return {"DSTACK_VPN_TCP_TRANSPORT": spoke_config(node, node.hub_endpoint).rstrip("\n")}


HUB = TcpHub()
SPOKE = TcpSpoke()

"""The network's shape, pure: the hub's peers, who may reach a node's ports, the cloud firewall
that mirrors a host's ruleset. Every role reads it; nothing here knows Pulumi, SSH or compose."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .config import NetworkConfig

ANYWHERE = ("0.0.0.0/0", "::/0")

# Who an opening is for (Opening.source).
PUBLIC = "public"     # the whole Internet, over the underlay
ADMIN = "admin"       # adminCidrs, over the underlay
STATUS = "status"     # statusCidrs, over the underlay
SOURCES = (PUBLIC, ADMIN, STATUS)


@dataclass(frozen=True)
class Opening:
    """A port a node opens over the underlay, and to whom. The host ruleset and the DigitalOcean
    firewall are both built from a node's openings. (Over the overlay, a spoke accepts other spokes
    on every port and never the hub: that is the spoke ruleset's own rule, not an opening.)"""
    proto: str
    port: int
    source: str

    def __post_init__(self):
        assert self.proto in ("tcp", "udp") and self.source in SOURCES, self


@dataclass(frozen=True)
class OverlayLimit:
    """A port on a spoke's overlay address that only some other spokes may reach (a role's: the
    PostgreSQL cluster's ports, for its members and clients). Other overlay ports stay open to
    every spoke; the hub reaches none."""
    proto: str
    port: int
    addresses: tuple[str, ...]

    def __post_init__(self):
        assert self.proto in ("tcp", "udp"), self


@dataclass(frozen=True)
class ClientFlow:
    """What a client (a person's device, kind `client`) may open on a node over the overlay: one
    port, or (proto and port None) every port the node's overlay limits keep to no one else. The
    hub forwards a client's new connections that match a flow and drops the rest, and forwards no
    new connection to a client; each spoke's own ruleset says the same for its address."""
    client: str
    """the client's overlay address"""
    node: str
    """the node's overlay address, or EVERY_HOST (a role every spoke runs: the status page), so
    that a new spoke changes no ruleset but its own and the hub's peers"""
    proto: str | None = None
    port: int | None = None

    def to(self, node_address: str) -> bool:
        return self.node in (node_address, EVERY_HOST)


# ClientFlow.node (and a role's client_ports key) for every spoke that runs roles.
EVERY_HOST = "*"


def client_flows(cfg: NetworkConfig, role_ports: Mapping[str, Mapping[str, Sequence[tuple[str, int]]]]
                 ) -> list[ClientFlow]:
    """Every client's flows, from its `allow`: a node's name gives the whole node, a role's name
    the ports the role serves clients on each of its nodes (role_ports: role -> node -> ports)."""
    address = {s.name: s.address for s in cfg.hosts} | {EVERY_HOST: EVERY_HOST}
    flows: list[ClientFlow] = []
    for client in cfg.clients:
        for target in client.allow:
            if target in address and target != EVERY_HOST:
                flows.append(ClientFlow(client.address, address[target]))
            for node, ports in role_ports.get(target, {}).items():
                flows += [ClientFlow(client.address, address[node], proto, port) for proto, port in ports]
    return list(dict.fromkeys(flows))


def admit_clients(limits: Sequence[OverlayLimit], flows: Sequence[ClientFlow], node_address: str
                  ) -> list[OverlayLimit]:
    """A node's overlay limits with the clients a flow of the very port lets in added (a whole-node
    flow opens no limited port: the database, say, only for clients postgres.clients lists)."""
    out = []
    for limit in limits:
        extra = tuple(f.client for f in flows if f.to(node_address) and (f.proto, f.port) == (limit.proto, limit.port)
                      and f.client not in limit.addresses)
        out.append(OverlayLimit(limit.proto, limit.port, limit.addresses + tuple(dict.fromkeys(extra))))
    return out


def split_cidrs(cidrs: Iterable[str]) -> tuple[list[str], list[str]]:
    """CIDRs by family, for the nftables sets."""
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return ([str(n) for n in nets if n.version == 4], [str(n) for n in nets if n.version == 6])


def source_cidrs(cfg: NetworkConfig, source: str) -> list[str]:
    return list({PUBLIC: ANYWHERE, ADMIN: cfg.admin_cidrs, STATUS: cfg.status_cidrs}[source])


def hub_peers(peers: Sequence[Mapping[str, str | None]]) -> list[dict]:
    """The hub's peer list, one entry per spoke, in address order (stable output)."""
    return sorted((dict(p) for p in peers), key=lambda p: ipaddress.ip_address(p["address"]))


def firewall_sets(cfg: NetworkConfig, openings: Sequence[Opening]) -> dict:
    """The ruleset's values from a node's openings: the port (and sets) of each source."""
    values: dict = {}
    for source in (ADMIN, STATUS):
        ports = [o.port for o in openings if o.source == source and o.proto == "tcp"]
        if ports:
            values[f"{source}_port"] = ports[0]
            values[f"{source}_v4"], values[f"{source}_v6"] = split_cidrs(source_cidrs(cfg, source))
    values["public"] = [o for o in openings if o.source == PUBLIC]
    return values


def cloud_firewall_inbound(cfg: NetworkConfig, openings: Sequence[Opening]) -> list[dict]:
    """DigitalOcean cloud firewall: the provider-side twin of the host ruleset, opening for opening.
    DigitalOcean takes no rule without a source: an opening to an empty list is left out."""
    return [dict(protocol=o.proto, port_range=str(o.port), source_addresses=source_cidrs(cfg, o.source))
            for o in openings if source_cidrs(cfg, o.source)]


def cloud_firewall_outbound() -> list[dict]:
    """Outbound is open (a DigitalOcean firewall without outbound rules blocks it all)."""
    return [dict(protocol=p, port_range="1-65535" if p != "icmp" else None, destination_addresses=list(ANYWHERE))
            for p in ("tcp", "udp", "icmp")]

"""Roles: what runs on a node. One module each; a role knows nothing of SSH, droplets or compose.

A role declares, in its module:
- `config_keys`: the stack settings it reads (components/config.py validates them with the rest);
- `packages`: the Debian packages it may need (the spoke image, the lab's repository), and
  `node_packages(node)` those a node's install step installs (by default all of them);
- `openings(node)`: the ports it opens over the underlay, and to whom (topology.Opening);
- `steps(node)`: its remote steps on a host reached over SSH (components/steps.Step), each
  naming what it waits for on another node (`after`);
- `compose(node)`: its part of a dstack spoke's app (variables of the compose file);
- `overlay_limits(node)`: ports on the overlay only some spokes may reach (topology.OverlayLimit);
- `client_ports(cfg)`: the ports it serves clients (people's devices) on, by node: what a client
  whose `allow` names the role may open there (topology.ClientFlow);
- `preinstall(node)`: files the install step writes before apt runs (a package's own settings);
- `on_dstack`: whether a dstack spoke runs it (a role without a compose part says no).

A node kind (components/nodes/) runs a node's roles its own way: as remote steps after the
install step, each after the steps it names (steps.ordered), or as one compose app. Adding a role is a module here, its
templates and its tests, and its name in the role lists below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pulumi

from ..config import NetworkConfig, SpokeConfig
from ..steps import Step
from .. import topology
from ..topology import ClientFlow, Opening, OverlayLimit


@dataclass
class Node:
    """What a role sees of its node: the settings, its place in the topology, its keys (outputs)."""
    cfg: NetworkConfig
    name: str
    address: str
    kind: str
    """droplet, ssh or dstack (the hub is a droplet)"""
    spoke: Optional[SpokeConfig]
    """None on the hub"""
    private_key: pulumi.Input[str] = None
    public_key: pulumi.Input[str] = None
    preshared_key: Optional[pulumi.Input[str]] = None
    hub_public_key: pulumi.Input[str] = None
    hub_endpoint: pulumi.Input[str] = None
    peers: pulumi.Input[Sequence[dict]] = None
    """the hub's: one entry per spoke (name, address, public_key, preshared_key)"""
    openings: list[Opening] = field(default_factory=list)
    """every opening of the node's roles and kind (the firewall builds its ruleset from them)"""
    key_dir: Optional[str] = None
    """a dstack app's: where its entrypoint keeps the keys (the config reads them from there)"""
    metadata_service: bool = False
    """a cloud metadata service serves this node's secrets to local processes (a droplet's)"""
    overlay_limits: list[OverlayLimit] = field(default_factory=list)
    """every overlay limit of the node's roles (the spoke firewall drops other spokes there)"""
    secrets: dict[str, Any] = field(default_factory=dict)
    """secrets the program made for a role, by role name (outputs): postgres.Secrets, backup.Secrets"""

    @property
    def is_hub(self) -> bool:
        return self.spoke is None


class Role:
    name: str = ""
    config_keys: frozenset[str] = frozenset()
    packages: tuple[str, ...] = ()
    """installed by the install step on hosts, and in the spoke image"""
    userspace: tuple[str, ...] = ()
    """installed where the kernel has no WireGuard (and in the spoke image)"""
    image_packages: tuple[str, ...] = ()
    """only in the spoke image: what every host OS already has"""
    on_dstack: bool = True
    """a dstack spoke runs the role (its compose part); False: hosts reached over SSH only"""

    def node_packages(self, node: Node) -> tuple[str, ...]:
        """What the install step of this node installs for the role."""
        return self.packages

    def openings(self, node: Node) -> list[Opening]:
        return []

    def steps(self, node: Node) -> list[Step]:
        return []

    def overlay_limits(self, node: Node) -> list[OverlayLimit]:
        return []

    def client_ports(self, cfg: NetworkConfig) -> dict[str, list[tuple[str, int]]]:
        """node name (topology.EVERY_HOST: every spoke) -> (proto, port) a client allowed this
        role may open there (config's CLIENT_TARGET_ROLES are the roles that have any)."""
        return {}

    def preinstall(self, node: Node) -> dict[str, str]:
        """path -> content, written by the install step before apt installs anything (and removed
        by its undo)."""
        return {}

    def compose(self, node: Node) -> dict[str, Any]:
        """Variables of the dstack app's compose file (public only), from a node whose values are
        known (no outputs: the kind resolves them first)."""
        return {}


# A node's roles. The order is that of their packages; their steps are ordered by what each
# waits for (Step.after).
def hub_roles() -> list[Role]:
    from . import firewall, forwarding, status, transport, wireguard
    return [wireguard.HUB, firewall.ROLE, forwarding.ROLE, transport.HUB, status.ROLE]


def spoke_roles() -> list[Role]:
    from . import backup, firewall, monitor, postgres, status, transport, wireguard
    return [wireguard.SPOKE, firewall.ROLE, status.ROLE, transport.SPOKE, postgres.ROLE, backup.ROLE, monitor.ROLE]


def all_roles() -> list[Role]:
    return list({id(r): r for r in hub_roles() + spoke_roles()}.values())


def client_flows(cfg: NetworkConfig) -> list[ClientFlow]:
    """Every client's flows (topology.client_flows), from the ports the spoke roles serve clients on."""
    return topology.client_flows(cfg, {r.name: r.client_ports(cfg) for r in spoke_roles()})


def declared(roles: Sequence[Role], what: str = "packages") -> list[str]:
    """The roles' `packages` (or `userspace`, `image_packages`), each once, in the roles' order."""
    return list(dict.fromkeys(p for role in roles for p in getattr(role, what)))


def node_packages(node: Node, roles: Sequence[Role]) -> list[str]:
    """What a node's install step installs: each role's node_packages, each once, in order."""
    return list(dict.fromkeys(p for role in roles for p in role.node_packages(node)))

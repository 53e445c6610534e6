"""What a node reached over SSH (a droplet, an `ssh` host) does with its roles: the install step
(the packages every role declares), then each role's steps, as remote commands."""
from __future__ import annotations

from typing import MutableMapping, Sequence

from pulumi_command import remote

from .. import topology
from ..config import HUB_NAME, NetworkConfig, SpokeConfig
from ..roles import Node, Role, client_flows, declared, hub_roles, node_packages, spoke_roles
from ..steps import Step, Target, run_steps


def openings(node: Node, roles: Sequence[Role], ssh_port: int) -> list[topology.Opening]:
    """SSH from adminCidrs (the kind's own: the program logs in), then the roles' openings."""
    return [topology.Opening("tcp", ssh_port, topology.ADMIN)] + [o for r in roles for o in r.openings(node)]


def hub_node(cfg: NetworkConfig, **keys) -> Node:
    """The hub as its roles see it (keys: private_key, peers; outputs or plain), openings included."""
    node = Node(cfg, HUB_NAME, cfg.hub.address, "droplet", None, metadata_service=True, **keys)
    node.openings = openings(node, hub_roles(), ssh_port=22)
    return node


def spoke_node(cfg: NetworkConfig, spoke: SpokeConfig, secrets=None, **keys) -> Node:
    """An `ssh` or `droplet` spoke as its roles see it (keys: private_key, preshared_key,
    hub_public_key, hub_endpoint; secrets: the roles' own), openings and overlay limits included."""
    node = Node(cfg, spoke.name, spoke.address, spoke.kind, spoke, metadata_service=spoke.kind == "droplet",
                secrets=dict(secrets or {}), **keys)
    node.openings = openings(node, spoke_roles(), ssh_port=spoke.port)
    limits = [limit for role in spoke_roles() for limit in role.overlay_limits(node)]
    node.overlay_limits = topology.admit_clients(limits, client_flows(cfg), spoke.address) if cfg.clients else limits
    return node


def install_step(node: Node, roles: Sequence[Role]) -> Step:
    """What apt installs (and destroy purges again, where it did install it); first, the files
    some packages read as they install (Role.preinstall)."""
    values = {"packages": node_packages(node, roles), "userspace": declared(roles, "userspace")}
    preinstall = {path: text for role in roles for path, text in role.preinstall(node).items()}
    if preinstall:  # only where a role has some: every other install step's command stays as it was
        values["preinstall"] = preinstall
    return Step("install", values)


def run_roles(target: Target, node: Node, roles: Sequence[Role], parent, done: MutableMapping[str, remote.Command]
              ) -> dict[str, remote.Command]:
    steps = [install_step(node, roles)] + [step for role in roles for step in role.steps(node)]
    return run_steps(target, steps, parent, done)

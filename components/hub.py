"""The hub: a droplet with a reserved IP, running the roles wireguard-hub, firewall and forwarding."""
from __future__ import annotations

from typing import MutableMapping, Sequence, TypedDict

import pulumi
import pulumi_digitalocean as do
from pulumi_command import remote

from .config import NetworkConfig
from .nodes import droplet
from .nodes.remote import hub_node, run_roles
from .roles import hub_roles


class HubArgs(TypedDict):
    config: NetworkConfig
    """The validated network config (hub settings, overlay, ports, admin CIDRs)."""
    private_key: pulumi.Input[str]
    """The hub's WireGuard private key (secret)."""
    peers: pulumi.Input[Sequence[dict]]
    """One entry per spoke: name, address, public_key, preshared_key (secret or None)."""
    deploy_key: pulumi.Input[str]
    """SSH private key the steps log in with (secret)."""
    ssh_key_id: pulumi.Input[str]
    """DigitalOcean SSH key id of the deploy key."""
    tags: Sequence[pulumi.Input[str]]
    """DigitalOcean tags for the droplet."""
    steps: MutableMapping[str, remote.Command]
    """Every node's steps so far, as "node/step" (the hub's are added)."""


class Hub(pulumi.ComponentResource):
    public_ip: pulumi.Output[str]
    """The reserved IP spokes dial; it survives a replaced droplet."""

    def __init__(self, name: str, args: HubArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-vpn:index:Hub", name, None, opts)
        cfg = args["config"]
        child = pulumi.ResourceOptions(parent=self)

        # The reserved IP exists apart from any droplet, so spokes keep their endpoint.
        self.reserved_ip = do.ReservedIp(f"{name}-ip", region=cfg.hub.region, opts=child)
        self.public_ip = self.reserved_ip.ip_address
        node = hub_node(cfg, private_key=args["private_key"], peers=args["peers"])
        machine = droplet.create(name, cfg, node.openings, cfg.hub.region, cfg.hub.size, cfg.hub.image,
                                 pulumi.Output.secret(args["deploy_key"]), args["ssh_key_id"], args["tags"], self)
        self.droplet = machine.droplet
        self.assignment = do.ReservedIpAssignment(
            f"{name}-ip-assignment", ip_address=self.reserved_ip.ip_address,
            droplet_id=machine.droplet.id.apply(int), opts=child)
        self.commands = run_roles(machine.target, node, hub_roles(), self, args["steps"])
        self.register_outputs({"public_ip": self.public_ip})

"""A spoke reached over SSH: an existing host (`ssh`) or a droplet the program makes, running the
roles wireguard-spoke, firewall and status."""
from __future__ import annotations

from typing import Any, MutableMapping, NotRequired, Optional, Sequence, TypedDict

import pulumi
from pulumi_command import remote

from .config import NetworkConfig, SpokeConfig
from .nodes import droplet, ssh
from .nodes.remote import run_roles, spoke_node
from .roles import spoke_roles


class SpokeArgs(TypedDict):
    config: NetworkConfig
    """The validated network config."""
    spoke: SpokeConfig
    """This spoke's settings."""
    private_key: pulumi.Input[str]
    """The spoke's WireGuard private key (secret)."""
    preshared_key: Optional[pulumi.Input[str]]
    """The key shared with the hub (secret), or None."""
    hub_public_key: pulumi.Input[str]
    hub_endpoint: pulumi.Input[str]
    """The hub's reserved IP."""
    deploy_key: pulumi.Input[str]
    """SSH private key for the connection (secret)."""
    ssh_key_id: Optional[pulumi.Input[str]]
    """DigitalOcean SSH key id (droplet spokes)."""
    tags: Sequence[pulumi.Input[str]]
    steps: MutableMapping[str, remote.Command]
    """Every node's steps so far, as "node/step" (the spoke's wait for "hub/wireguard")."""
    secrets: NotRequired[dict[str, Any]]
    """Secrets the program made for roles, by role name (the PostgreSQL cluster's)."""


class Spoke(pulumi.ComponentResource):
    def __init__(self, name: str, args: SpokeArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-vpn:index:Spoke", name, None, opts)
        cfg, spoke = args["config"], args["spoke"]
        deploy_key = pulumi.Output.secret(args["deploy_key"])
        node = spoke_node(cfg, spoke, private_key=args["private_key"], preshared_key=args["preshared_key"],
                          hub_public_key=args["hub_public_key"], hub_endpoint=args["hub_endpoint"],
                          secrets=args.get("secrets"))
        if spoke.kind == "droplet":
            machine = droplet.create(name, cfg, node.openings, spoke.region, spoke.size, spoke.image,
                                     deploy_key, args["ssh_key_id"], args["tags"], self)
            self.droplet = machine.droplet
            target = machine.target
        else:
            target = ssh.target(spoke, deploy_key, self)
        self.commands = run_roles(target, node, spoke_roles(), self, args["steps"])
        self.register_outputs({})

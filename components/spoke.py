"""A spoke: an existing host reached over SSH, or a droplet the program makes."""
from __future__ import annotations

from typing import Optional, Sequence, TypedDict

import pulumi
from pulumi_command import remote

from . import droplet, plan, render
from .config import NetworkConfig, SpokeConfig
from .steps import Host, Step, run_steps


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
    hub_ready: Sequence[pulumi.Resource]
    """The hub's peer step: a new spoke's tunnel comes up after the hub knows it."""
    deploy_key: pulumi.Input[str]
    """SSH private key for the connection (secret)."""
    ssh_key_id: Optional[pulumi.Input[str]]
    """DigitalOcean SSH key id (droplet spokes)."""
    tags: Sequence[pulumi.Input[str]]


class Spoke(pulumi.ComponentResource):
    def __init__(self, name: str, args: SpokeArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-vpn:index:Spoke", name, None, opts)
        cfg, spoke = args["config"], args["spoke"]
        deploy_key = pulumi.Output.secret(args["deploy_key"])

        if spoke.kind == "droplet":
            machine = droplet.create(name, cfg, "spoke", spoke.region, spoke.size, spoke.image,
                                     deploy_key, args["ssh_key_id"], args["tags"], self)
            self.droplet = machine.droplet
            host = machine.host
        else:
            if spoke.host_key is None:
                pulumi.log.warn(
                    f"spoke {spoke.name}: allowUnknownHostKey is set, so {spoke.host} is not checked "
                    "against a known host key: whoever answers at that address gets the deploy key's login and "
                    "the node's WireGuard private and preshared keys, which are sent over that unchecked "
                    "connection; set spokes[].hostKey (ssh-keyscan -t ed25519 HOST) to close this gap",
                    resource=self)
            host = Host(name, remote.ConnectionArgs(
                host=spoke.host, port=spoke.port, user=spoke.user, private_key=deploy_key,
                host_key=spoke.host_key), spoke.user)

        wg_conf = pulumi.Output.all(args["private_key"], args["preshared_key"], args["hub_public_key"],
                                    args["hub_endpoint"]).apply(
            lambda v: render.render("wireguard/spoke.conf", private_key=v[0], preshared_key=v[1],
                                    hub_public_key=v[2], hub_endpoint=v[3], listen_port=cfg.listen_port,
                                    overlay=cfg.overlay, address=spoke.address, prefixlen=cfg.prefixlen))
        steps = [
            Step("install", {}),
            Step("firewall", {"rules_dir": plan.RULES_DIR, "rules_path": plan.RULES_PATH},
                 render.render("nftables/spoke.nft", **plan.spoke_firewall(cfg, spoke))),
            Step("wireguard", plan.interface_values(cfg, spoke.address, cfg.hub.address),
                 pulumi.Output.secret(wg_conf), secret=True, after=args["hub_ready"]),
            Step("status", plan.status_values(cfg, spoke, pulumi.Output.from_input(args["hub_public_key"])),
                 render.status_program()),
        ]
        self.commands = run_steps(host, steps, parent=self)
        self.register_outputs({})

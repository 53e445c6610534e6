"""The hub: a DigitalOcean droplet with a reserved IP that routes spoke to spoke."""
from __future__ import annotations

from typing import Sequence, TypedDict

import pulumi
import pulumi_digitalocean as do

from . import droplet, plan, render
from .config import NetworkConfig
from .steps import Step, run_steps


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
        machine = droplet.create(name, cfg, "hub", cfg.hub.region, cfg.hub.size, cfg.hub.image,
                                 pulumi.Output.secret(args["deploy_key"]), args["ssh_key_id"], args["tags"], self)
        self.droplet = machine.droplet
        self.assignment = do.ReservedIpAssignment(
            f"{name}-ip-assignment", ip_address=self.reserved_ip.ip_address,
            droplet_id=machine.droplet.id.apply(int), opts=child)

        wg_conf = pulumi.Output.all(args["private_key"], args["peers"]).apply(
            lambda v: render.render("wireguard/hub.conf", private_key=v[0], peers=plan.hub_peers(v[1]),
                                    listen_port=cfg.listen_port, address=cfg.hub.address, prefixlen=cfg.prefixlen))
        steps = [
            Step("install", {}),
            Step("firewall", {"rules_dir": plan.RULES_DIR, "rules_path": plan.RULES_PATH},
                 render.render("nftables/hub.nft", **plan.hub_firewall(cfg))),
            # Forwarding after the ruleset: at deploy time (this order) and at boot (a drop-in of
            # the firewall unit), so the hub never routes without its firewall.
            Step("forwarding", plan.forwarding_values(), render.render("systemd/dstack-vpn-firewall-forwarding.conf")),
            # The peer step: the only hub step a new spoke changes.
            Step("wireguard", plan.interface_values(cfg, cfg.hub.address),
                 pulumi.Output.secret(wg_conf), secret=True),
        ]
        self.commands = run_steps(machine.host, steps, parent=self)
        self.register_outputs({"public_ip": self.public_ip})

"""Node kind `droplet`: a DigitalOcean droplet with a host key made by the program.

Shared by the hub and `droplet` spokes: the droplet, its cloud firewall (the node's openings),
and the SSH connection that checks the host key from the very first dial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pulumi
import pulumi_digitalocean as do
from pulumi_command import remote

from .. import render, topology
from ..config import NetworkConfig
from ..keys import Key
from ..steps import Target

# A new droplet needs a minute or two before sshd answers: keep dialling.
DIAL_ERROR_LIMIT = 60
PER_DIAL_TIMEOUT = 10


@dataclass
class Droplet:
    droplet: do.Droplet
    firewall: do.Firewall
    target: Target


def host_key_line(public_line: str) -> str:
    """'ssh-ed25519 AAAA... comment' -> 'ssh-ed25519 AAAA...' (what a host key check compares)."""
    return " ".join(public_line.split()[:2])


def create(name: str, cfg: NetworkConfig, openings: Sequence[topology.Opening], region: str, size: str, image: str,
           deploy_key: pulumi.Output[str], ssh_key_id: pulumi.Input[str], tags: Sequence[pulumi.Input[str]],
           parent: pulumi.Resource) -> Droplet:
    child = pulumi.ResourceOptions(parent=parent)
    host_key = Key(f"{name}-host-key", "ssh-ed25519", comment=f"{name} host key", opts=child)
    user_data = pulumi.Output.all(host_key.private_key, host_key.public_key).apply(
        lambda keys: render.render("cloud-init/droplet.yaml", host_private_key=keys[0],
                                   host_public_key=host_key_line(keys[1]),
                                   admin_ssh_keys=list(cfg.admin_ssh_keys)))
    droplet = do.Droplet(
        name, name=name, image=image, region=region, size=size,
        ssh_keys=[ssh_key_id], user_data=pulumi.Output.secret(user_data),
        tags=list(tags), monitoring=True,
        # A new size keeps the disk, so it can be undone; the provider still powers the droplet off
        # for the resize (DEPLOYMENT.md, "Resizing a droplet").
        resize_disk=False, opts=child)
    droplet_id = droplet.id.apply(int)
    firewall = do.Firewall(
        f"{name}-cloud-firewall", name=f"{name}-cloud-firewall", droplet_ids=[droplet_id],
        inbound_rules=[do.FirewallInboundRuleArgs(**r) for r in topology.cloud_firewall_inbound(cfg, openings)],
        outbound_rules=[do.FirewallOutboundRuleArgs(**r) for r in topology.cloud_firewall_outbound()],
        opts=child)
    connection = remote.ConnectionArgs(
        host=droplet.ipv4_address, port=22, user="root", private_key=deploy_key,
        host_key=host_key.public_key.apply(host_key_line),
        dial_error_limit=DIAL_ERROR_LIMIT, per_dial_timeout=PER_DIAL_TIMEOUT)
    # A replaced droplet gets every step again, from the start; nothing on the old one is undone.
    return Droplet(droplet, firewall, Target(name, connection, "root", triggers=[droplet.id], undo=False))

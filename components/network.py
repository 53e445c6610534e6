"""The whole network: keys, the hub, and every spoke; nodes x roles, and the order across nodes
(the steps' `after` names, resolved in `steps`: "node/step" -> its command)."""
from __future__ import annotations

import re

import pulumi
import pulumi_digitalocean as do

from .config import HUB_NAME, NetworkConfig
from .hub import Hub
from .keys import Key, NodeKey, ssh_public_key
from .nodes import client
from .nodes.dstack import DstackSpoke
from . import spaces
from .roles import backup, monitor, postgres
from .spoke import Spoke


class Network(pulumi.ComponentResource):
    hub_public_ip: pulumi.Output[str]
    nodes: dict[str, dict]
    """Per node: overlay address (plain) and WireGuard public key (plain)."""

    def __init__(self, name: str, config: NetworkConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-vpn:index:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        # The deploy key: configured, or made here; the droplets authorise it.
        if config.ssh_private_key is not None:
            deploy_private = pulumi.Output.secret(config.ssh_private_key)
            deploy_public = pulumi.Output.from_input(ssh_public_key(config.ssh_private_key, f"{name}-deploy"))
        else:
            deploy = Key(f"{name}-deploy-key", "ssh-ed25519", comment=f"{name}-deploy", opts=child)
            deploy_private, deploy_public = pulumi.Output.secret(deploy.private_key), deploy.public_key
        # The hub is always a droplet, so DigitalOcean always needs the key: uploaded here, or named
        # where it is already on the account (DigitalOcean refuses the same public key twice).
        if config.digitalocean_ssh_key is not None:
            ssh_key_id = pulumi.Output.from_input(config.digitalocean_ssh_key)
        else:
            ssh_key_id = do.SshKey(f"{name}-deploy-key", name=f"{name}-deploy", public_key=deploy_public,
                                   opts=child).id
        # One tag per stack: two stacks on one account never share (or delete) each other's tag.
        tag_name = re.sub(r"[^A-Za-z0-9_:-]", "-", f"{name}-{pulumi.get_stack()}")[:255]
        tags = [do.Tag(f"{name}-tag", name=tag_name, opts=child).name]

        # Keys first: the hub's peer list needs every spoke's public key.
        hub_key = NodeKey(HUB_NAME, config.hub.wireguard_private_key, 0, self)
        spoke_keys = {s.name: NodeKey(s.name, s.wireguard_private_key, s.key_rotation, self) for s in config.spokes}
        psks = {s.name: Key(f"{s.name}-psk", "preshared", rotation=s.key_rotation, opts=child)
                for s in config.spokes if s.preshared_key}
        peers = [
            pulumi.Output.all(spoke_keys[s.name].public_key,
                              psks[s.name].private_key if s.name in psks else None).apply(
                lambda v, s=s: {"name": s.name, "address": s.address, "public_key": v[0], "preshared_key": v[1]})
            for s in config.spokes
        ]

        # Secrets the roles need (made once, kept in the stack): the PostgreSQL cluster's, its backups'.
        self.postgres_secrets = postgres.make_secrets(config, self)
        backups = config.postgres.backup if config.postgres else None
        spaces_bucket = spaces.bucket(backups.repository, self) if backups and backups.repository.type == "spaces" else None
        self.backup_secrets = backup.make_secrets(config, self.postgres_secrets, self, spaces_bucket)
        monitor_keys = monitor.peer_keys(config, {s.name: spoke_keys[s.name].public_key for s in config.spokes})
        role_secrets = {k: v for k, v in (("postgres", self.postgres_secrets), ("backup", self.backup_secrets),
                                          ("monitor", monitor_keys)) if v is not None}

        steps: dict = {}
        self.hub = Hub(HUB_NAME, {
            "config": config, "private_key": hub_key.private_key, "peers": pulumi.Output.all(*peers),
            "deploy_key": deploy_private, "ssh_key_id": ssh_key_id, "tags": tags, "steps": steps,
        }, opts=child)
        self.hub_public_ip = self.hub.public_ip

        over_ssh = [s for s in config.hosts if s.kind != "dstack"]  # `ssh` and `droplet` spokes
        self.dstack_spokes = {
            s.name: DstackSpoke(s.name, {
                "config": config, "spoke": s, "private_key": spoke_keys[s.name].private_key,
                "public_key": spoke_keys[s.name].public_key,
                "preshared_key": psks[s.name].private_key if s.name in psks else None,
                "hub_public_key": hub_key.public_key, "hub_endpoint": self.hub.public_ip,
                "hub_ready": [steps[f"{HUB_NAME}/wireguard"]],
            }, opts=child)
            for s in config.spokes if s.kind == "dstack"
        }
        self.spokes = {
            s.name: Spoke(s.name, {
                "config": config, "spoke": s, "private_key": spoke_keys[s.name].private_key,
                "preshared_key": psks[s.name].private_key if s.name in psks else None,
                "hub_public_key": hub_key.public_key, "hub_endpoint": self.hub.public_ip,
                "deploy_key": pulumi.Output.secret(s.ssh_private_key) if s.ssh_private_key else deploy_private,
                "ssh_key_id": ssh_key_id, "tags": tags, "steps": steps, "secrets": role_secrets,
            }, opts=child)
            for s in over_ssh
        }
        # People's devices: nothing to run, a config each (secret), which the hub's peer step serves.
        self.clients = {
            s.name: client.outputs(config, s, spoke_keys[s.name].private_key,
                                   psks[s.name].private_key if s.name in psks else None, hub_key.public_key,
                                   self.hub.public_ip)
            for s in config.clients
        }
        self.nodes = {HUB_NAME: {"address": config.hub.address, "public_key": hub_key.public_key}}
        for s in config.spokes:
            self.nodes[s.name] = {"address": s.address, "public_key": spoke_keys[s.name].public_key}
        self.deploy_public_key = deploy_public
        self.register_outputs({"hub_public_ip": self.hub_public_ip, "nodes": self.nodes})

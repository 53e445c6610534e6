"""Node kind `dstack`: a CVM the program cannot log in to. Its roles become one dstack app: a
compose file (public, no secret) that runs the spoke image by digest with each role's part in
its environment, and the app's encrypted environment (its keys; a secret output). Where Phala
Cloud credentials are configured, the program deploys the app with Phala's CLI."""
from __future__ import annotations

from typing import Optional, Sequence, TypedDict

import pulumi
from pulumi_command import local

from .. import render
from ..config import NetworkConfig, SpokeConfig
from ..roles import Node, Role, declared, spoke_roles
from ..roles.status import STATUS_DIR

# A tmpfs of the container, where the keys and the rendered files live.
KEY_DIR = "/run/dstack-vpn"
# The spoke image's status program, and the version of what its entrypoint reads from the
# compose file (DSTACK_VPN_*): bumped when that changes, so an image and a compose file of
# different dstack-vpn versions refuse each other by name. An image reads every bundle up to its
# own; a compose file says the lowest that has what it needs: BUNDLE_TCP where the spoke's
# transport is tcp or auto (an image of bundle 2 has no v2ray), BUNDLE otherwise (any image).
STATUS_PROGRAM = STATUS_DIR + "/dstack_vpn_status.py"
BUNDLE = 2
BUNDLE_TCP = 3
IMAGE_BUNDLES = (BUNDLE, BUNDLE_TCP)
# What the kind itself needs in the image, beside the roles' packages: `ip` for the entrypoint.
IMAGE_PACKAGES = ("iproute2",)
# The app's encrypted environment: its only secrets.
ENV_PRIVATE_KEY = "DSTACK_VPN_PRIVATE_KEY"
ENV_PRESHARED_KEY = "DSTACK_VPN_PRESHARED_KEY"
# Phala's CLI (npm `phala`), pinned: the version the deploy workflow installs and the scripts name.
PHALA_CLI_VERSION = "1.1.18"


def roles() -> list[Role]:
    """The spoke roles a dstack app runs (not those for hosts reached over SSH only)."""
    return [r for r in spoke_roles() if r.on_dstack]


def image_packages() -> list[str]:
    """The spoke image's Debian packages: every package the roles of a dstack spoke declare."""
    rs = roles()
    return list(dict.fromkeys(declared(rs) + declared(rs, "userspace") + declared(rs, "image_packages")
                              + list(IMAGE_PACKAGES)))


def dstack_node(cfg: NetworkConfig, spoke: SpokeConfig, public_key: str, hub_public_key: str,
                hub_endpoint: str) -> Node:
    """A dstack spoke as its roles see it: public values only (its keys are in the environment)."""
    return Node(cfg, spoke.name, spoke.address, "dstack", spoke, public_key=public_key,
                preshared_key=True if spoke.preshared_key else None, hub_public_key=hub_public_key,
                hub_endpoint=hub_endpoint, key_dir=KEY_DIR)


def environment(node: Node) -> dict[str, str]:
    """The compose file's variables (public): the kind's own, then each role's part."""
    bundle = BUNDLE if node.spoke.transport == "udp" else BUNDLE_TCP
    env = {"DSTACK_VPN_BUNDLE": str(bundle), "DSTACK_VPN_NODE": node.name, "DSTACK_VPN_ADDRESS": node.address}
    for role in roles():
        env.update(role.compose(node))
    return env


def compose(node: Node) -> str:
    """The app's docker-compose file."""
    return render.render("dstack/docker-compose.yaml", environment=environment(node),
                         container_image=node.spoke.container_image, key_dir=KEY_DIR,
                         preshared_key=node.preshared_key is not None, name=node.name, address=node.address)


def env_file(private_key: str, preshared_key: str | None) -> str:
    """The app's environment file (KEY=VALUE lines, as Phala's CLI and docker compose read them)."""
    lines = [f"{ENV_PRIVATE_KEY}={private_key}"]
    if preshared_key:
        lines.append(f"{ENV_PRESHARED_KEY}={preshared_key}")
    return "\n".join(lines) + "\n"


def phala_flags(spoke: SpokeConfig) -> list[tuple[str, str]]:
    """The `phala deploy` flags for a new CVM, from spokes[].phala (only those set)."""
    p = spoke.phala
    if p is None:
        return []
    flags = [("--instance-type", p.instance_type), ("--region", p.region), ("--image", p.os_image),
             ("--disk-size", None if p.disk_size is None else f"{p.disk_size}G")]
    return [(flag, value) for flag, value in flags if value is not None]


class DstackSpokeArgs(TypedDict):
    config: NetworkConfig
    spoke: SpokeConfig
    private_key: pulumi.Input[str]
    """The spoke's WireGuard private key (secret)."""
    public_key: pulumi.Input[str]
    preshared_key: Optional[pulumi.Input[str]]
    hub_public_key: pulumi.Input[str]
    hub_endpoint: pulumi.Input[str]
    hub_ready: Sequence[pulumi.Resource]
    """The hub's peer step: the app is deployed once the hub knows it."""


class DstackSpoke(pulumi.ComponentResource):
    compose: pulumi.Output[str]
    """The app's docker-compose file: public, no secret in it."""
    env: pulumi.Output[str]
    """The app's environment file (its keys): secret."""
    deployment: Optional[local.Command]
    """The Phala Cloud deployment, where spokes[].phala is set."""

    def __init__(self, name: str, args: DstackSpokeArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-vpn:index:DstackSpoke", name, None, opts)
        cfg, spoke = args["config"], args["spoke"]
        self.compose = pulumi.Output.all(args["public_key"], args["hub_public_key"], args["hub_endpoint"]).apply(
            lambda v: compose(dstack_node(cfg, spoke, *v)))
        self.env = pulumi.Output.secret(pulumi.Output.all(args["private_key"], args["preshared_key"]).apply(
            lambda v: env_file(v[0], v[1])))
        self.deployment = None
        if spoke.phala is not None:
            values = dict(node=spoke.name, cvm_name=spoke.phala.name, flags=phala_flags(spoke),
                          phala_cli_version=PHALA_CLI_VERSION)
            self.deployment = local.Command(
                f"{name}-phala-app",
                create=render.phala_script("deploy", **values),
                update=render.phala_script("deploy", **values),
                delete=render.phala_script("delete", **values),
                interpreter=["/bin/bash", "-c"],
                # the compose (public) in the environment; the secrets on stdin: not in any
                # process's environment but the CLI's own, which gets the API key alone
                environment={"DSTACK_VPN_COMPOSE": self.compose},
                stdin=pulumi.Output.secret(self.env.apply(lambda env: f"{cfg.phala_api_key}\n{env}")),
                # a new name is a new CVM; two CVMs with one key must never dial in at once
                triggers=[spoke.phala.name],
                add_previous_output_in_env=True,
                logging=local.Logging.STDOUT_AND_STDERR,
                opts=pulumi.ResourceOptions(parent=self, depends_on=list(args["hub_ready"]),
                                            delete_before_replace=True))
        self.register_outputs({"compose": self.compose, "env": self.env})

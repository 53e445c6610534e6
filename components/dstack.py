"""A dstack spoke: a node the program cannot log in to. It gets its part of the network as a
dstack app: a compose file (public, no secret) and an environment (its keys; a secret output).
Where Phala Cloud credentials are configured, the program deploys the app with Phala's CLI."""
from __future__ import annotations

from typing import Optional, Sequence, TypedDict

import pulumi
from pulumi_command import local

from . import plan, render
from .config import NetworkConfig, SpokeConfig


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
            lambda v: render.dstack_compose(plan.dstack_values(cfg, spoke, v[0], v[1], v[2])))
        self.env = pulumi.Output.secret(pulumi.Output.all(args["private_key"], args["preshared_key"]).apply(
            lambda v: plan.dstack_env(v[0], v[1])))
        self.deployment = None
        if spoke.phala is not None:
            values = dict(node=spoke.name, cvm_name=spoke.phala.name, flags=plan.phala_flags(spoke),
                          phala_cli_version=plan.PHALA_CLI_VERSION)
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

"""An `ssh` spoke: an existing host the program logs in to with the host key its config pins."""
from __future__ import annotations

import pulumi
from pulumi_command import remote

from ..config import SpokeConfig
from ..steps import Target


def target(spoke: SpokeConfig, deploy_key: pulumi.Output[str], resource: pulumi.Resource) -> Target:
    if spoke.host_key is None:
        pulumi.log.warn(
            f"spoke {spoke.name}: allowUnknownHostKey is set, so {spoke.host} is not checked "
            "against a known host key: whoever answers at that address gets the deploy key's login and "
            "the node's WireGuard private and preshared keys, which are sent over that unchecked "
            "connection; set spokes[].hostKey (ssh-keyscan -t ed25519 HOST) to close this gap",
            resource=resource)
    return Target(spoke.name, remote.ConnectionArgs(
        host=spoke.host, port=spoke.port, user=spoke.user, private_key=deploy_key,
        host_key=spoke.host_key), spoke.user)

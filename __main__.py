"""dstack-vpn: config -> Network -> exports."""
import os

import pulumi

from components import config, preflight
from components.network import Network
from components.roles import postgres

try:
    settings = config.from_pulumi()  # bad config stops here, before any resource exists
except config.ConfigError as err:
    raise pulumi.RunError(f"invalid stack config: {err}") from None
agent_problem = preflight.ssh_agent_problem(os.environ)
if agent_problem and pulumi.runtime.is_dry_run():
    pulumi.log.warn(agent_problem.replace("Nothing was changed.", "`pulumi up` will refuse to start."))
elif agent_problem:
    raise pulumi.RunError(agent_problem)

network = Network(pulumi.get_project(), settings)

pulumi.export("hubPublicIp", network.hub_public_ip)
pulumi.export("nodes", network.nodes)
pulumi.export("deployPublicKey", network.deploy_public_key)
if network.postgres_secrets:  # connection strings and the CA (plain), the passwords (secret)
    plain, passwords = postgres.outputs(settings, network.postgres_secrets)
    pulumi.export("postgres", plain)
    pulumi.export("postgresPasswords", passwords)
if network.clients:  # each client's wg-quick config and QR code (secret: its keys)
    pulumi.export("clients", pulumi.Output.secret(network.clients))
if network.dstack_spokes:  # each dstack spoke's app: the compose file, and its environment (secret)
    pulumi.export("dstackCompose", {n: s.compose for n, s in network.dstack_spokes.items()})
    pulumi.export("dstackEnv", pulumi.Output.secret({n: s.env for n, s in network.dstack_spokes.items()}))

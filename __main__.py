"""dstack-vpn: config -> Network -> exports."""
import pulumi

from components import config
from components.network import Network

try:
    settings = config.from_pulumi()  # bad config stops here, before any resource exists
except config.ConfigError as err:
    raise pulumi.RunError(f"invalid stack config: {err}") from None

network = Network(pulumi.get_project(), settings)

pulumi.export("hubPublicIp", network.hub_public_ip)
pulumi.export("nodes", network.nodes)
pulumi.export("deployPublicKey", network.deploy_public_key)
if network.dstack_spokes:  # each dstack spoke's app: the compose file, and its environment (secret)
    pulumi.export("dstackCompose", {n: s.compose for n, s in network.dstack_spokes.items()})
    pulumi.export("dstackEnv", pulumi.Output.secret({n: s.env for n, s in network.dstack_spokes.items()}))

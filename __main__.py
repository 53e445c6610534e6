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

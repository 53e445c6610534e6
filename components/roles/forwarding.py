"""Role `forwarding` (the hub): IPv4 forwarding, switched on only after the ruleset is loaded, at
deploy time (this step follows the firewall's) and at boot (a drop-in of the firewall unit)."""
from __future__ import annotations

from .. import render
from ..steps import Step
from . import Node, Role

# Where forwarding was switched on before it moved behind the firewall unit (removed if found).
SYSCTL_PATH = "/etc/sysctl.d/90-dstack-vpn.conf"
FIREWALL_DROPIN_DIR = "/etc/systemd/system/dstack-vpn-firewall.service.d"


def values() -> dict:
    return dict(sysctl_path=SYSCTL_PATH, dropin_dir=FIREWALL_DROPIN_DIR)


class Forwarding(Role):
    name = "forwarding"

    def steps(self, node: Node) -> list[Step]:
        return [Step("forwarding", values(), render.render("systemd/dstack-vpn-firewall-forwarding.conf"),
                     after=("firewall",))]


ROLE = Forwarding()

"""Role `status`: the read-only status page on every spoke (status/dstack_vpn_status.py).

On the hub only with `monitor.hubMetrics`: the same service, which the hub's ruleset lets the
monitor's overlay address alone reach (the hub's view: every spoke's handshake age).

On a host: dstack-vpn-status.service (no capability at all) and its root helper, socket-activated,
which hands it the peer dump without keys. In a dstack app: the same two processes, started by the
spoke image's entrypoint. Open over the underlay to statusCidrs, over the overlay to other spokes.
"""
from __future__ import annotations

from .. import render, topology
from ..steps import Step
from . import Node, Role

STATUS_DIR = "/usr/local/lib/dstack-vpn"


def values(node: Node) -> dict:
    """The status service's settings (it listens on every address; the firewall decides); on a
    PostgreSQL member, where Patroni's API is."""
    from . import backup, postgres
    cfg = node.cfg
    return dict(install_dir=STATUS_DIR, node_name=node.name, overlay_ip=node.address, interface=cfg.interface,
                listen_address="0.0.0.0", listen_port=cfg.status_port, hub_public_key=node.hub_public_key or "",
                **postgres.status_values(node), **backup.status_values(node))


class Status(Role):
    name = "status"
    config_keys = frozenset({"statusPort", "statusCidrs"})
    image_packages = ("python3",)  # hosts have it; the spoke image needs it

    def openings(self, node: Node) -> list[topology.Opening]:
        if node.is_hub:  # the hub's is for the monitor, over the overlay (its own rule)
            return []
        return [topology.Opening("tcp", node.cfg.status_port, topology.STATUS)]

    def steps(self, node: Node) -> list[Step]:
        from . import monitor
        if node.is_hub and not monitor.hub_metrics(node.cfg):
            return []
        return [Step("status", values(node), render.status_program(), after=("wireguard",))]

    def client_ports(self, cfg) -> dict[str, list[tuple[str, int]]]:
        return {topology.EVERY_HOST: [("tcp", cfg.status_port)]}

    def compose(self, node: Node) -> dict:
        return {"DSTACK_VPN_STATUS_PORT": str(node.cfg.status_port)}


ROLE = Status()

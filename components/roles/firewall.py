"""Role `firewall`: one nftables table of our own on every node, built from the node's openings.

On a host: /etc/dstack-vpn/firewall.nft, checked and swapped in atomically by a remote step and
reloaded at boot by dstack-vpn-firewall.service. The hub routes spoke to spoke and originates
nothing on the overlay; a spoke accepts other spokes over the overlay and never the hub. Clients
(people's devices) open only their flows (topology.ClientFlow), which the hub and the spoke both
check, and nothing opens a connection to a client. On a dstack spoke the table governs the
overlay only (the rest of a CVM is dstack's), and knows no client: its compose file is the app's
measured configuration, which a laptop joining must not change; the hub checks clients' flows to it.
"""
from __future__ import annotations

from .. import render, topology
from ..steps import Step
from . import Node, Role, client_flows, wireguard

RULES_DIR = "/etc/dstack-vpn"
RULES_PATH = RULES_DIR + "/firewall.nft"


def client_values(node: Node) -> dict:
    """Where there are clients: their addresses, and the flows they may open (the hub's: all of
    them; a spoke's: those to its own address). Absent otherwise: a ruleset deployed before
    clients existed sees no change."""
    cfg = node.cfg
    if not cfg.clients:
        return {}
    flows = client_flows(cfg)
    return dict(clients=[c.address for c in cfg.clients],
                client_flows=flows if node.is_hub else [f for f in flows if f.to(node.address)])


def values(node: Node) -> dict:
    """The ruleset's values (hub or spoke), from the node's openings and the topology."""
    cfg = node.cfg
    sets = topology.firewall_sets(cfg, node.openings)
    common = dict(admin_v4=sets["admin_v4"], admin_v6=sets["admin_v6"], ssh_port=sets["admin_port"],
                  interface=cfg.interface, block_metadata=node.metadata_service, public=sets["public"])
    if node.is_hub:
        from . import monitor
        hub = dict(common, listen_port=cfg.listen_port, overlay=cfg.overlay, mss_clamps=wireguard.mss_clamps(node),
                   **client_values(node))
        if monitor.hub_metrics(cfg):  # (absent otherwise: a hub deployed before the monitor sees no change)
            hub.update(monitor_address=monitor.monitor_address(cfg), status_port=cfg.status_port)
        return hub
    status = {k: sets[k] for k in ("status_port", "status_v4", "status_v6") if k in sets}
    return dict(common, hub_address=cfg.hub.address, overlay=cfg.overlay, overlay_limits=node.overlay_limits,
                **status, **client_values(node))


def step_values() -> dict:
    """The firewall step's script values (its ruleset goes on stdin)."""
    return {"rules_dir": RULES_DIR, "rules_path": RULES_PATH}


def dstack_values(node: Node) -> dict:
    cfg = node.cfg
    return dict(interface=cfg.interface, hub_address=cfg.hub.address, overlay=cfg.overlay)


class Firewall(Role):
    name = "firewall"
    config_keys = frozenset({"adminCidrs"})
    packages = ("nftables",)

    def steps(self, node: Node) -> list[Step]:
        ruleset = render.render("nftables/hub.nft" if node.is_hub else "nftables/spoke.nft", **values(node))
        return [Step("firewall", step_values(), ruleset, after=("install",))]

    def compose(self, node: Node) -> dict:
        return {"DSTACK_VPN_FIREWALL": render.render("nftables/dstack.nft", **dstack_values(node)).rstrip("\n")}


ROLE = Firewall()

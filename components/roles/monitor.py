"""Role `monitor`: Prometheus and Alertmanager (the distribution's) on the spoke `monitor.node`
names, scraping over the overlay; its page is a Prometheus console of ours.

- step `monitor` on the monitor node: dstack-vpn-prometheus.service on the node's overlay address
  (9090: the page, /consoles/dstack-vpn.html) and dstack-vpn-alertmanager.service on 127.0.0.1
  (9093, no cluster port). It scrapes every spoke's status service, the hub's where
  `monitor.hubMetrics` is on, and on PostgreSQL members Patroni's /metrics (TLS, the cluster's
  CA) and the packaged PostgreSQL exporter. Its alert rules (templates/monitor/rules.yml) go to
  the receivers of `monitor.receivers`; their credentials (monitorSecrets) are only in
  alertmanager.yml, 0600 prometheus.
- step `postgres-exporter` on each PostgreSQL member: dstack-vpn-postgres-exporter.service on the
  member's overlay address (9187), as the postgres user over the local socket.
- the hub, with `monitor.hubMetrics`: the status role's service, which the hub's ruleset lets the
  monitor's address alone reach (the hub serves nothing else on the overlay).

The spoke firewall lets the monitor alone reach the exporter (9187) and the page's port (9090):
admins reach the page through an SSH tunnel to the monitor node (README "Monitoring").
"""
from __future__ import annotations

import re
from typing import Optional

import pulumi

from .. import render, topology
from ..config import HUB_NAME, NetworkConfig
from ..monconfig import MonitorConfig
from ..steps import Step
from . import Node, Role, postgres

PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
EXPORTER_PORT = 9187
CONF_DIR = "/etc/dstack-vpn-monitor"
DATA_DIR = "/var/lib/prometheus/dstack-vpn"
ALERTMANAGER_DATA = "/var/lib/prometheus/dstack-vpn-alertmanager"
PAGE = "/consoles/dstack-vpn.html"
# The packages' own services, kept from starting when apt installs them (ours run instead).
NOT_THEIRS = "[Unit]\n# dstack-vpn runs its own (dstack-vpn-*.service); this one stays off\n" \
             "ConditionPathExists=/nonexistent/dstack-vpn\n"


def mon(cfg: NetworkConfig) -> Optional[MonitorConfig]:
    return cfg.monitor


def is_monitor(node: Node) -> bool:
    return mon(node.cfg) is not None and node.name == mon(node.cfg).node


def monitor_address(cfg: NetworkConfig) -> Optional[str]:
    m = mon(cfg)
    return None if m is None else next(s.address for s in cfg.spokes if s.name == m.node)


def hub_metrics(cfg: NetworkConfig) -> bool:
    return mon(cfg) is not None and mon(cfg).hub_metrics


def exporter_on(node: Node) -> bool:
    return mon(node.cfg) is not None and postgres.is_member(node)


def node_roles(cfg: NetworkConfig, name: str) -> list[str]:
    """The roles a node's page row shows (what it is for, not the plumbing every node has)."""
    roles = []
    if cfg.postgres is not None:
        if name in cfg.postgres.members:
            roles.append("postgres")
            if cfg.postgres.backup is not None:
                roles.append("backup")
        elif name in cfg.postgres.clients:
            roles.append("postgres-client")
    if mon(cfg) is not None and name == mon(cfg).node:
        roles.append("monitor")
    return roles


def targets(cfg: NetworkConfig) -> dict[str, list[dict]]:
    """Scrape targets by job: every spoke's status service (clients have none), the hub's
    (hubMetrics), Patroni and the exporter on the members; each labelled with its node, kind and roles."""
    spokes = [dict(node=s.name, address=s.address, kind=s.kind, roles=",".join(node_roles(cfg, s.name)))
              for s in cfg.hosts]
    out = {"status": [dict(t, target=f"{t['address']}:{cfg.status_port}") for t in spokes]}
    if hub_metrics(cfg):
        out["hub"] = [dict(node=HUB_NAME, address=cfg.hub.address, kind="hub", roles="",
                           target=f"{cfg.hub.address}:{cfg.status_port}")]
    if cfg.postgres is not None:
        members = [t for t in spokes if t["node"] in cfg.postgres.members]
        out["patroni"] = [dict(t, target=f"{t['address']}:{postgres.PATRONI_PORT}") for t in members]
        out["postgres"] = [dict(t, target=f"{t['address']}:{EXPORTER_PORT}") for t in members]
    return out


def peer_keys(cfg: NetworkConfig, public_keys: dict) -> Optional[pulumi.Output]:
    """What the monitor step needs made by the program: each spoke's name and WireGuard public key
    (the hub's metrics name a peer by its key), and whether it is a client (kind="client": out of
    the handshake alert, a laptop is often away); None without a monitor."""
    if mon(cfg) is None:
        return None
    return pulumi.Output.all(*[pulumi.Output.from_input(public_keys[s.name]).apply(
        lambda k, s=s: {"name": s.name, "public_key": k, "client": s.kind == "client"}) for s in cfg.spokes])


def prometheus_config(cfg: NetworkConfig, peers: list[dict]) -> str:
    """prometheus.yml; peers: each spoke's name and public key, to name the hub's view of it."""
    m = mon(cfg)
    return render.render("monitor/prometheus.yml", interval=m.scrape_interval, targets=targets(cfg),
                         address=monitor_address(cfg), prometheus_port=PROMETHEUS_PORT,
                         alertmanager_port=ALERTMANAGER_PORT,
                         peers=[dict(name=p["name"], regex=re.escape(p["public_key"]), client=p.get("client", False))
                                for p in peers])


def rules(cfg: NetworkConfig) -> str:
    m = mon(cfg)
    p = cfg.postgres
    return render.render("monitor/rules.yml", alerts=m.alerts, hub_metrics=m.hub_metrics,
                         postgres=p is not None, backup=p is not None and p.backup is not None,
                         interval=m.scrape_interval)


def alertmanager_config(cfg: NetworkConfig) -> str:
    """alertmanager.yml: every alert to every receiver (none: the page alone shows them)."""
    return render.render("monitor/alertmanager.yml", receivers=list(mon(cfg).receivers))


def console() -> str:
    return render.render("monitor/dstack-vpn.html")


def monitor_values(node: Node) -> dict:
    return dict(conf_dir=CONF_DIR, data_dir=DATA_DIR, alertmanager_data=ALERTMANAGER_DATA, address=node.address,
                prometheus_port=PROMETHEUS_PORT, alertmanager_port=ALERTMANAGER_PORT, interface=node.cfg.interface,
                page=PAGE)


def exporter_values(node: Node) -> dict:
    return dict(address=node.address, port=EXPORTER_PORT, interface=node.cfg.interface,
                socket_dir=postgres.SOCKET_DIR)


class Monitor(Role):
    name = "monitor"
    config_keys = frozenset({"monitor", "monitorSecrets"})
    packages = ("prometheus", "prometheus-alertmanager", "prometheus-postgres-exporter")
    on_dstack = False

    def node_packages(self, node: Node) -> tuple[str, ...]:
        if node.is_hub:
            return ()
        return (("prometheus", "prometheus-alertmanager") if is_monitor(node) else ()) + (
            ("prometheus-postgres-exporter",) if exporter_on(node) else ())

    def preinstall(self, node: Node) -> dict[str, str]:
        units = (["prometheus", "prometheus-alertmanager"] if is_monitor(node) else []) + (
            ["prometheus-postgres-exporter"] if exporter_on(node) else [])
        return {f"/etc/systemd/system/{u}.service.d/dstack-vpn.conf": NOT_THEIRS for u in units}

    def overlay_limits(self, node: Node) -> list[topology.OverlayLimit]:
        if node.is_hub or mon(node.cfg) is None:
            return []
        limits = []
        if is_monitor(node):  # the page: the monitor itself (an admin's SSH tunnel) and no other spoke
            limits.append(topology.OverlayLimit("tcp", PROMETHEUS_PORT, (node.address,)))
        if exporter_on(node):
            limits.append(topology.OverlayLimit("tcp", EXPORTER_PORT, (monitor_address(node.cfg),)))
        return limits

    def client_ports(self, cfg: NetworkConfig) -> dict[str, list[tuple[str, int]]]:
        return {} if mon(cfg) is None else {mon(cfg).node: [("tcp", PROMETHEUS_PORT)]}

    def steps(self, node: Node) -> list[Step]:
        if node.is_hub:
            return []
        out = []
        if exporter_on(node):
            out.append(Step("postgres-exporter", exporter_values(node), after=("postgres",)))
        if is_monitor(node):
            cfg = node.cfg
            ca = node.secrets["postgres"].ca.public_key if cfg.postgres is not None else ""
            files = pulumi.Output.all(node.secrets["monitor"], ca).apply(lambda v: render.bundle({
                "prometheus.yml": prometheus_config(cfg, v[0]), "rules.yml": rules(cfg),
                "alertmanager.yml": alertmanager_config(cfg), "dstack-vpn.html": console(),
                "postgres-ca.crt": v[1]}))
            out.append(Step("monitor", monitor_values(node), pulumi.Output.secret(files), secret=True,
                            after=("firewall", "wireguard")))
        return out


ROLE = Monitor()

"""Pure planning: what each host gets, as plain values for the templates."""
from __future__ import annotations

import ipaddress
from typing import Iterable, Mapping, Sequence

from .config import NetworkConfig, SpokeConfig

RULES_DIR = "/etc/dstack-vpn"
RULES_PATH = RULES_DIR + "/firewall.nft"
# Where forwarding was switched on before it moved behind the firewall unit (removed if found).
SYSCTL_PATH = "/etc/sysctl.d/90-dstack-vpn.conf"
FIREWALL_DROPIN_DIR = "/etc/systemd/system/dstack-vpn-firewall.service.d"
STATUS_DIR = "/usr/local/lib/dstack-vpn"
# dstack spokes: a tmpfs of the container, where the keys and the rendered files live.
DSTACK_KEY_DIR = "/run/dstack-vpn"
# The spoke image's status program, and the version of what its entrypoint reads from the
# compose file (DSTACK_VPN_*): bumped when that changes, so an image and a compose file of
# different dstack-vpn versions refuse each other by name.
DSTACK_STATUS_PROGRAM = STATUS_DIR + "/dstack_vpn_status.py"
DSTACK_BUNDLE = 2
# Phala's CLI (npm `phala`), pinned: the version the deploy workflow installs and the scripts name.
PHALA_CLI_VERSION = "1.1.18"
# The app's encrypted environment: its only secrets.
DSTACK_ENV_PRIVATE_KEY = "DSTACK_VPN_PRIVATE_KEY"
DSTACK_ENV_PRESHARED_KEY = "DSTACK_VPN_PRESHARED_KEY"


def split_cidrs(cidrs: Iterable[str]) -> tuple[list[str], list[str]]:
    """Admin CIDRs by family, for the nftables sets."""
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return ([str(n) for n in nets if n.version == 4], [str(n) for n in nets if n.version == 6])


def hub_firewall(cfg: NetworkConfig) -> dict:
    v4, v6 = split_cidrs(cfg.admin_cidrs)
    return dict(admin_v4=v4, admin_v6=v6, ssh_port=22, listen_port=cfg.listen_port, interface=cfg.interface,
                block_metadata=True)


def spoke_firewall(cfg: NetworkConfig, spoke: SpokeConfig) -> dict:
    """block_metadata: on a droplet, only root may ask DigitalOcean's metadata service, which
    serves the user data (the droplet's SSH host private key) to any local process."""
    v4, v6 = split_cidrs(cfg.admin_cidrs)
    status_v4, status_v6 = split_cidrs(cfg.status_cidrs)
    return dict(admin_v4=v4, admin_v6=v6, ssh_port=spoke.port, status_port=cfg.status_port,
                status_v4=status_v4, status_v6=status_v6,
                interface=cfg.interface, hub_address=cfg.hub.address, overlay=cfg.overlay,
                block_metadata=spoke.kind == "droplet")


def forwarding_values() -> dict:
    return dict(sysctl_path=SYSCTL_PATH, dropin_dir=FIREWALL_DROPIN_DIR)


def hub_peers(peers: Sequence[Mapping[str, str | None]]) -> list[dict]:
    """The hub's peer list, one entry per spoke, in address order (stable output)."""
    return sorted((dict(p) for p in peers), key=lambda p: ipaddress.ip_address(p["address"]))


def interface_values(cfg: NetworkConfig, address: str, nudge_address: str | None = None) -> dict:
    """The wireguard step's values; a spoke's also name the hub's overlay address, which it
    sends a packet to every 10 s (templates/systemd/dstack-vpn-nudge.service)."""
    return dict(interface=cfg.interface, address=address, prefixlen=cfg.prefixlen, nudge_address=nudge_address)


def cloud_firewall_inbound(cfg: NetworkConfig, role: str) -> list[dict]:
    """DigitalOcean cloud firewall: the provider-side twin of the host ruleset."""
    anywhere = ["0.0.0.0/0", "::/0"]
    rules = [dict(protocol="tcp", port_range="22", source_addresses=list(cfg.admin_cidrs))]
    if role == "hub":
        rules.append(dict(protocol="udp", port_range=str(cfg.listen_port), source_addresses=anywhere))
    elif cfg.status_cidrs:  # DigitalOcean takes no rule without a source
        rules.append(dict(protocol="tcp", port_range=str(cfg.status_port), source_addresses=list(cfg.status_cidrs)))
    return rules


def cloud_firewall_outbound() -> list[dict]:
    """Outbound is open (a DigitalOcean firewall without outbound rules blocks it all)."""
    anywhere = ["0.0.0.0/0", "::/0"]
    return [dict(protocol=p, port_range="1-65535" if p != "icmp" else None, destination_addresses=anywhere)
            for p in ("tcp", "udp", "icmp")]


def status_values(cfg: NetworkConfig, spoke: SpokeConfig, hub_public_key) -> dict:
    """The status service's settings on a spoke (it listens on every address; the firewall decides)."""
    return dict(install_dir=STATUS_DIR, node_name=spoke.name, overlay_ip=spoke.address, interface=cfg.interface,
                listen_address="0.0.0.0", listen_port=cfg.status_port, hub_public_key=hub_public_key)


def dstack_values(cfg: NetworkConfig, spoke: SpokeConfig, public_key: str, hub_public_key: str,
                  hub_endpoint: str) -> dict:
    """Everything a dstack spoke's bundle is rendered from; public values only (its keys are
    in the environment)."""
    return dict(name=spoke.name, address=spoke.address, prefixlen=cfg.prefixlen, overlay=cfg.overlay,
                interface=cfg.interface, listen_port=cfg.listen_port, status_port=cfg.status_port,
                hub_address=cfg.hub.address, hub_public_key=hub_public_key, hub_endpoint=hub_endpoint,
                public_key=public_key, preshared_key=spoke.preshared_key, key_dir=DSTACK_KEY_DIR,
                container_image=spoke.container_image, bundle=DSTACK_BUNDLE)


def dstack_env(private_key: str, preshared_key: str | None) -> str:
    """The app's environment file (KEY=VALUE lines, as Phala's CLI and docker compose read them)."""
    lines = [f"{DSTACK_ENV_PRIVATE_KEY}={private_key}"]
    if preshared_key:
        lines.append(f"{DSTACK_ENV_PRESHARED_KEY}={preshared_key}")
    return "\n".join(lines) + "\n"


def phala_flags(spoke: SpokeConfig) -> list[tuple[str, str]]:
    """The `phala deploy` flags for a new CVM, from spokes[].phala (only those set)."""
    p = spoke.phala
    if p is None:
        return []
    flags = [("--instance-type", p.instance_type), ("--region", p.region), ("--image", p.os_image),
             ("--disk-size", None if p.disk_size is None else f"{p.disk_size}G")]
    return [(flag, value) for flag, value in flags if value is not None]

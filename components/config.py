"""Stack config -> typed, validated values.

Everything here is pure: `parse()` takes the raw stack config (key -> text, as
Pulumi hands it to the program) and returns a `NetworkConfig` or raises
`ConfigError` naming the setting and what is allowed.  Nothing is registered
with Pulumi before this has passed, so bad input never touches a host or the
cloud.  Error messages never quote a secret value.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import keys

PROJECT = "dstack-vpn"

# dstack CVMs use these for their own networking (dstack-wg0 and the VM net).
DSTACK_RESERVED = (ipaddress.ip_network("10.0.2.0/24"), ipaddress.ip_network("10.0.0.0/24"))
DSTACK_WG_PORT = 9182
DSTACK_INTERFACE = "dstack-wg0"

HUB_NAME = "hub"
SPOKE_KINDS = ("ssh", "droplet", "dstack", "client")
# The roles whose ports a client (a person's device) may be allowed (spokes[].allow), and what it
# may reach when its setting says nothing: the status pages, and the monitor's page where there is one.
CLIENT_TARGET_ROLES = ("status", "monitor", "postgres")
CLIENT_ALLOW_DEFAULT = ("status", "monitor")
# First spoke address is .11 (hub .1), as in the spec's example plan.
FIRST_SPOKE_HOST = 11

# Every pattern is used with fullmatch (re.match with `$` would take "wg0\n": `$` matches
# before a trailing newline, and nft would then read "wg0\n" as another interface).
# A name becomes part of resource names, droplet hostnames and file names.
NAME_RE = re.compile(r"[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?")
# Linux interface names: at most 15 bytes, no slash or whitespace.
INTERFACE_RE = re.compile(r"[A-Za-z0-9_.=+-]{1,15}")
SLUG_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# A public key line: type, base64 blob, an optional comment of printable ASCII.
SSH_PUBLIC_KEY_RE = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,2}( [ -~]*)?")
# Host key types the program's SSH client can check against OpenSSH 8.8+ (see _host_key).
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# A container image reference: [registry[:port]/]path[:tag][@sha256:digest].
IMAGE_RE = re.compile(r"(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
                      r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?")
# Phala Cloud's CVM names (its CLI's rule) and its slugs (instance types, regions, OS images).
PHALA_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]{4,62}")
PHALA_SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# What a dstack spoke's containerImage looks like (README: "The spoke image").
IMAGE_EXAMPLE = "ghcr.io/OWNER/dstack-vpn-spoke@sha256:<64 hex digits>"

# The stack settings of the network itself; each role adds the ones it reads (Role.config_keys).
NETWORK_KEYS = {
    "overlayCidr", "hubRegion", "hubSize", "hubImage", "adminSshKeys",
    "spokes", "nodeSecrets", "sshPrivateKey", "phalaApiKey", "digitaloceanSshKey",
}
# Who may read a spoke's status page over the underlay, unless statusCidrs says otherwise.
STATUS_CIDRS_DEFAULT = ["0.0.0.0/0", "::/0"]
# The settings of a spoke, by kind: one table (a key of another kind is refused, naming it).
COMMON_SPOKE_KEYS = {"name", "kind", "address", "presharedKey", "keyRotation", "transport", "mtu"}
KIND_KEYS = {
    "ssh": COMMON_SPOKE_KEYS | {"host", "port", "user", "hostKey", "allowUnknownHostKey"},
    "droplet": COMMON_SPOKE_KEYS | {"region", "size", "image"},
    "dstack": COMMON_SPOKE_KEYS | {"containerImage", "phala"},
    # a device: dials the hub itself, over UDP, with the config the program outputs
    "client": {"name", "kind", "address", "presharedKey", "keyRotation", "mtu", "allow"},
}
# Why a kind has no such setting: (kind, the kind that has it; "*" any).
KIND_HINTS = {
    ("droplet", "ssh"): "a droplet's connection is made by the program",
    ("dstack", "*"): "the node runs the rendered app (spokes[].phala holds where Phala Cloud runs it)",
    ("client", "*"): "a client is a person's device (a laptop, a phone) that the program never logs in to: it "
                     "imports the config the program outputs (README: Clients)",
}
SPOKE_KEYS = set().union(*KIND_KEYS.values())
PHALA_KEYS = {"name", "instanceType", "region", "diskSize", "osImage"}
NODE_SECRET_KEYS = {"sshPrivateKey", "wireguardPrivateKey"}
SECRET_TOP_LEVEL = {"nodeSecrets", "sshPrivateKey", "phalaApiKey", "backupAccessKeyId", "backupSecretAccessKey",
                    "monitorSecrets"}
# How a spoke reaches the hub (spokes[].transport): WireGuard's UDP, UDP carried over a TCP
# connection to the hub's tcpPort, or UDP first and TCP when UDP gets no answer.
TRANSPORTS = ("udp", "tcp", "auto")
TCP_PORT_DEFAULT = 443
# The underlay path's MTU (mtu, spokes[].mtu): IPv6's minimum up to jumbo frames. WireGuard's
# interface gets 80 bytes less (its own header over IPv6, as wg-quick reckons).
MTU_RANGE = (1280, 9000)


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says what is allowed."""


@dataclass(frozen=True)
class HubConfig:
    region: str
    size: str
    image: str
    address: str
    wireguard_private_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PhalaConfig:
    """Where the program deploys a dstack spoke on Phala Cloud (its CLI's flags)."""
    name: str
    instance_type: str | None = None
    region: str | None = None
    disk_size: int | None = None
    """GB"""
    os_image: str | None = None


@dataclass(frozen=True)
class SpokeConfig:
    name: str
    kind: str
    address: str
    host: str | None = None
    port: int = 22
    user: str = "root"
    host_key: str | None = None
    allow_unknown_host_key: bool = False
    preshared_key: bool = True
    key_rotation: int = 0
    region: str | None = None
    size: str | None = None
    image: str | None = None
    container_image: str | None = None
    """dstack: the image the WireGuard container runs."""
    phala: PhalaConfig | None = None
    """dstack: deploy on Phala Cloud; None: the bundle is an output, deployed by hand."""
    ssh_private_key: str | None = field(default=None, repr=False)
    wireguard_private_key: str | None = field(default=None, repr=False)
    transport: str = "udp"
    """udp, tcp or auto (TRANSPORTS)"""
    mtu: int | None = None
    """The MTU of the spoke's path to the hub; None: the network's (or wg-quick's own reckoning)."""
    allow: tuple[str, ...] = ()
    """client: what it may reach: node names (every port of theirs no role keeps to some) and roles
    (CLIENT_TARGET_ROLES: their ports, wherever they run)"""


@dataclass(frozen=True)
class NetworkConfig:
    overlay: str
    listen_port: int
    interface: str
    status_port: int
    admin_cidrs: tuple[str, ...]
    admin_ssh_keys: tuple[str, ...]
    hub: HubConfig
    spokes: tuple[SpokeConfig, ...]
    ssh_private_key: str | None = field(default=None, repr=False)
    phala_api_key: str | None = field(default=None, repr=False)
    status_cidrs: tuple[str, ...] = tuple(STATUS_CIDRS_DEFAULT)
    """Who may read the status pages over the underlay (the overlay's spokes always may)."""
    digitalocean_ssh_key: str | None = None
    """The deploy key as it is already on the DigitalOcean account (id or fingerprint); None: uploaded."""
    tcp_port: int = TCP_PORT_DEFAULT
    """The hub's TCP port for spokes whose transport is tcp or auto (open only while there are such)."""
    mtu: int | None = None
    """The underlay path MTU of the hub and of every spoke without its own; None: wg-quick reckons
    each interface's from its route to the other end."""
    postgres: Any = None
    """pgconfig.PostgresConfig: the PostgreSQL cluster, or None"""
    monitor: Any = None
    """monconfig.MonitorConfig: Prometheus and Alertmanager on a spoke, or None"""

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.overlay).prefixlen

    @property
    def hosts(self) -> tuple[SpokeConfig, ...]:
        """The spokes that run roles (ssh, droplet, dstack): every spoke but the clients."""
        return tuple(s for s in self.spokes if s.kind != "client")

    @property
    def clients(self) -> tuple[SpokeConfig, ...]:
        """The spokes that are people's devices (kind client): a config each, no roles."""
        return tuple(s for s in self.spokes if s.kind == "client")

    @property
    def tcp_spokes(self) -> tuple[SpokeConfig, ...]:
        """The spokes that may reach the hub over TCP (transport tcp or auto)."""
        return tuple(s for s in self.spokes if s.transport != "udp")


def top_level_keys() -> set[str]:
    """Every stack setting: the network's own and those the roles read."""
    from .roles import all_roles
    return NETWORK_KEYS.union(*(role.config_keys for role in all_roles()))


def _kind_keys(i: int, item: Mapping[str, Any], kind: str) -> None:
    for key in item:
        if key not in KIND_KEYS[kind]:
            owner = next(k for k, keys in KIND_KEYS.items() if key in keys)
            owners = " or ".join(f"'{k}'" for k, keys in KIND_KEYS.items() if key in keys)
            hint = KIND_HINTS.get((kind, owner)) or KIND_HINTS.get((kind, "*"))
            raise ConfigError(f"spokes[{i}].{key}: not for kind '{kind}'; only for kind {owners}"
                              + (f" ({hint})" if hint else ""))


def _decode(key: str, text: str | None, default: Any) -> Any:
    """Config values arrive as text; structured ones as JSON text."""
    if text is None:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _want(setting: str, value: Any, kind: type | tuple, what: str) -> Any:
    if isinstance(value, bool) and kind in (int, (int,)):
        raise ConfigError(f"{setting}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{setting}: expected {what}, got {type(value).__name__}")
    return value


def _port(setting: str, value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,5}", value):  # not str.isdigit: it takes "２２"
        value = int(value)
    _want(setting, value, int, "a port number 1-65535")
    if not 1 <= value <= 65535:
        raise ConfigError(f"{setting}: port {value} is out of range; allowed 1-65535")
    return value


def _mtu(setting: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,5}", value):
        value = int(value)
    _want(setting, value, int, f"an MTU in bytes, {MTU_RANGE[0]}-{MTU_RANGE[1]}")
    if not MTU_RANGE[0] <= value <= MTU_RANGE[1]:
        raise ConfigError(f"{setting}: {value} is out of range; allowed {MTU_RANGE[0]}-{MTU_RANGE[1]} (the MTU of "
                          "the path to the hub, e.g. 1500 for Ethernet, 1280 for the smallest IPv6 path; WireGuard's "
                          "interface gets 80 less)")
    return value


def _name(setting: str, value: Any) -> str:
    _want(setting, value, str, "a name")
    if not NAME_RE.fullmatch(value):
        raise ConfigError(
            f"{setting}: {value!r} cannot be used in resource names and hostnames; "
            "use 1-32 lowercase letters, digits and '-', starting with a letter, not ending with '-'")
    return value


def _unknown(setting: str, given: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(given) - allowed)
    if extra:
        raise ConfigError(
            f"{setting}: unknown setting {', '.join(repr(e) for e in extra)}; "
            f"allowed: {', '.join(sorted(allowed))}")


def wireguard_key(setting: str, value: Any) -> str:
    """A WireGuard key is base64 of exactly 32 bytes. The value is never quoted."""
    _want(setting, value, str, "a base64 WireGuard key")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{setting}: not a valid WireGuard key (base64 of 32 bytes, as `wg genkey` prints)")
    return value.strip()


def _ssh_private_key(setting: str, value: Any) -> str:
    """Any unencrypted form pulumi-command reads (OpenSSH; PEM RSA, ECDSA, ed25519); the key is never quoted."""
    _want(setting, value, str, "an SSH private key")
    try:
        keys.load_ssh_private_key(value)
    except keys.SshKeyError as err:
        raise ConfigError(f"{setting}: {err}") from None
    return value.strip() + "\n"


def _host_key(setting: str, value: Any) -> str:
    """A pinned host key. pulumi-command offers the server only this key's own algorithm, so an
    `ssh-rsa` key would mean SHA-1 RSA signatures, which OpenSSH 8.8 and later refuse."""
    _want(setting, value, str, "an SSH public key")
    parts = value.strip().split()
    if len(parts) >= 1 and parts[0] == "ssh-rsa":
        raise ConfigError(
            f"{setting}: an ssh-rsa host key cannot be used: the program's SSH client (pulumi-command) then offers "
            "only SHA-1 RSA signatures, which OpenSSH 8.8 and later refuse; give the host's ed25519 (or ECDSA) key "
            "instead: `ssh-keyscan -t ed25519 HOST` (or read /etc/ssh/ssh_host_ed25519_key.pub on the host)")
    if (len(parts) < 2 or parts[0] not in HOST_KEY_TYPES or not _blob_of_type(parts[1], parts[0])
            or not SSH_PUBLIC_KEY_RE.fullmatch(value.strip())):
        raise ConfigError(f"{setting}: not an SSH host public key; want 'ssh-ed25519 AAAA...' or "
                          "'ecdsa-sha2-nistp256 AAAA...' as `ssh-keyscan -t ed25519 HOST` prints it (without the host)")
    return value.strip()


def _blob_of_type(blob: str, key_type: str) -> bool:
    """The base64 blob decodes and names the same key type inside (an SSH string: length, then the name)."""
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return False
    n = int.from_bytes(raw[:4], "big")
    return raw[4:4 + n] == key_type.encode()


def _digitalocean_ssh_key(value: Any, deploy_key: str | None) -> str | None:
    """The deploy key's id or fingerprint on the DigitalOcean account, for a key that is already there
    (DigitalOcean refuses to take the same public key twice: 422 "SSH Key is already in use")."""
    if value is None:
        return None
    if deploy_key is None:
        raise ConfigError("digitaloceanSshKey: names a key already on the DigitalOcean account, so the program needs "
                          "its private half to log in: set sshPrivateKey (pulumi config set --secret sshPrivateKey "
                          "< KEY); without both, the program makes a deploy key of its own per stack")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    if isinstance(value, str) and re.fullmatch(r"[1-9][0-9]{0,18}", value):
        return value
    if isinstance(value, str) and re.fullmatch(r"(?:md5:)?[0-9a-f]{2}(?::[0-9a-f]{2}){15}", value.strip().lower()):
        fingerprint = value.strip().lower().removeprefix("md5:")
        own = keys.ssh_fingerprint_md5(keys.ssh_public_key(deploy_key, ""))
        if fingerprint != own:
            raise ConfigError(f"digitaloceanSshKey: {fingerprint} is not the fingerprint of sshPrivateKey's public key "
                              f"({own}); give the fingerprint DigitalOcean shows for that key (Settings > Security, "
                              "or `doctl compute ssh-key list`)")
        return fingerprint
    raise ConfigError(f"digitaloceanSshKey: {value!r} is neither a DigitalOcean SSH key id (digits) nor a fingerprint "
                      "(aa:bb:...:ff, 16 pairs, as `ssh-keygen -E md5 -lf KEY.pub` prints it after MD5:)")


def _overlay(value: Any) -> ipaddress.IPv4Network:
    _want("overlayCidr", value, str, "an IPv4 CIDR such as 10.88.0.0/24")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        raise ConfigError(f"overlayCidr: {value!r} is not a network in CIDR form ({err})") from None
    if net.version != 4 or not net.is_private or net.is_loopback or net.is_link_local:
        raise ConfigError(f"overlayCidr: {value!r} must be a private IPv4 network (10/8, 172.16/12, 192.168/16)")
    for reserved in DSTACK_RESERVED:
        if net.overlaps(reserved):
            raise ConfigError(f"overlayCidr: {value!r} overlaps dstack's own {reserved}; choose e.g. 10.88.0.0/24")
    if net.prefixlen > 29:
        raise ConfigError(f"overlayCidr: {value!r} is too small; use /29 or larger")
    return net


def _cidrs(setting: str, value: Any) -> tuple[str, ...]:
    _want(setting, value, list, "a list of CIDRs")
    out = []
    for i, item in enumerate(value):
        _want(f"{setting}[{i}]", item, str, "a CIDR")
        try:
            out.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError as err:
            raise ConfigError(f"{setting}[{i}]: {item!r} is not a valid CIDR ({err})") from None
    return tuple(out)


def _ssh_public_keys(setting: str, value: Any) -> tuple[str, ...]:
    _want(setting, value, list, "a list of SSH public keys")
    for i, item in enumerate(value):
        _want(f"{setting}[{i}]", item, str, "an SSH public key")
        if not SSH_PUBLIC_KEY_RE.fullmatch(item.strip()):
            raise ConfigError(f"{setting}[{i}]: not an SSH public key ('ssh-ed25519 AAAA...')")
    return tuple(v.strip() for v in value)


def parse(raw: Mapping[str, str]) -> NetworkConfig:
    """Validate the raw stack config of this project (keys without namespace)."""
    _unknown("config", raw, top_level_keys())
    overlay = _overlay(_decode("overlayCidr", raw.get("overlayCidr"), "10.88.0.0/24"))
    listen_port = _port("listenPort", _decode("listenPort", raw.get("listenPort"), 51820))
    if listen_port == DSTACK_WG_PORT:
        raise ConfigError(f"listenPort: {DSTACK_WG_PORT} is dstack's own WireGuard port; choose another (51820)")
    status_port = _port("statusPort", _decode("statusPort", raw.get("statusPort"), 8000))
    tcp_port = _port("tcpPort", _decode("tcpPort", raw.get("tcpPort"), TCP_PORT_DEFAULT))
    mtu = _mtu("mtu", _decode("mtu", raw.get("mtu"), None))
    interface = raw.get("interface", "wg0")
    if not isinstance(interface, str) or not INTERFACE_RE.fullmatch(interface) or interface == DSTACK_INTERFACE:
        raise ConfigError(
            f"interface: {interface!r} is not usable; 1-15 letters, digits or _.=+- and not {DSTACK_INTERFACE}")

    hub_region = _decode("hubRegion", raw.get("hubRegion"), "nyc3")
    hub_size = _decode("hubSize", raw.get("hubSize"), "s-1vcpu-1gb")
    hub_image = _decode("hubImage", raw.get("hubImage"), "ubuntu-24-04-x64")
    for setting, slug in (("hubRegion", hub_region), ("hubSize", hub_size), ("hubImage", hub_image)):
        if not isinstance(slug, str) or not SLUG_RE.fullmatch(slug):
            raise ConfigError(f"{setting}: {slug!r} is not a DigitalOcean slug (lowercase letters, digits, '-')")

    if "adminCidrs" not in raw:
        raise ConfigError("adminCidrs: required; the addresses allowed to SSH to the hub, e.g. [\"203.0.113.7/32\"]")
    admin_cidrs = _cidrs("adminCidrs", _decode("adminCidrs", raw["adminCidrs"], []))
    if not admin_cidrs:
        raise ConfigError("adminCidrs: empty; at least the address this program deploys from is needed")
    admin_keys = _ssh_public_keys("adminSshKeys", _decode("adminSshKeys", raw.get("adminSshKeys"), []))
    status_cidrs = _cidrs("statusCidrs", _decode("statusCidrs", raw.get("statusCidrs"), STATUS_CIDRS_DEFAULT))

    deploy_key = raw.get("sshPrivateKey")
    if deploy_key is not None:
        deploy_key = _ssh_private_key("sshPrivateKey", deploy_key)
    do_key = _digitalocean_ssh_key(_decode("digitaloceanSshKey", raw.get("digitaloceanSshKey"), None), deploy_key)

    spokes_raw = _decode("spokes", raw.get("spokes"), [])
    _want("spokes", spokes_raw, list, "a list of spokes")
    secrets = _decode("nodeSecrets", raw.get("nodeSecrets"), {})
    _want("nodeSecrets", secrets, dict, "an object of node name -> secrets")

    hub_address = overlay.network_address + 1
    names = [HUB_NAME]
    for i, item in enumerate(spokes_raw):
        _want(f"spokes[{i}]", item, dict, "an object")
        name = _name(f"spokes[{i}].name", item.get("name"))
        if name in names:
            raise ConfigError(f"spokes[{i}].name: {name!r} is used twice" +
                              (" (the hub is called 'hub')" if name == HUB_NAME else "") + "; names must be unique")
        names.append(name)
    for node, entry in secrets.items():
        if node not in names:
            raise ConfigError(f"nodeSecrets: {node!r} is not a node; known: {', '.join(names)}")
        _want(f"nodeSecrets.{node}", entry, dict, "an object")
        _unknown(f"nodeSecrets.{node}", entry, NODE_SECRET_KEYS)
        if node == HUB_NAME and "sshPrivateKey" in entry:
            raise ConfigError("nodeSecrets.hub.sshPrivateKey: the hub is a droplet; set sshPrivateKey instead")

    def pinned(node: str) -> str | None:
        value = secrets.get(node, {}).get("wireguardPrivateKey")
        return None if value is None else wireguard_key(f"nodeSecrets.{node}.wireguardPrivateKey", value)

    phala_api_key = raw.get("phalaApiKey")
    if phala_api_key is not None and (not isinstance(phala_api_key, str)
                                      or not re.fullmatch(r"[!-~]+", phala_api_key.strip())):
        raise ConfigError("phalaApiKey: not a Phala Cloud API key (one word, as the dashboard shows it)")

    spokes = _spokes(spokes_raw, secrets, overlay, hub_address, deploy_key, pinned,
                     defaults={"region": hub_region, "size": hub_size, "image": hub_image})
    _check_ports(status_port, listen_port, spokes)
    _check_tcp_port(tcp_port, status_port, listen_port)
    _check_admin_cidrs(admin_cidrs, overlay)
    _check_pinned_keys({HUB_NAME: pinned(HUB_NAME), **{s.name: s.wireguard_private_key for s in spokes}})
    deployed = [s.name for s in spokes if s.phala is not None]
    if deployed and phala_api_key is None:
        raise ConfigError(
            f"phalaApiKey: required to deploy {', '.join(deployed)} on Phala Cloud "
            "(pulumi config set --secret phalaApiKey ...); or remove their `phala` settings and deploy the "
            "bundle by hand")
    hub = HubConfig(region=hub_region, size=hub_size, image=hub_image, address=str(hub_address),
                    wireguard_private_key=pinned(HUB_NAME))
    from . import pgconfig
    postgres = pgconfig.parse(_decode("postgres", raw.get("postgres"), None), {s.name: s for s in spokes},
                              {k: raw.get(k) for k in (pgconfig.ACCESS_KEY_ID, pgconfig.SECRET_ACCESS_KEY)})
    if postgres is None:
        for key in (pgconfig.ACCESS_KEY_ID, pgconfig.SECRET_ACCESS_KEY):
            if raw.get(key) is not None:
                raise ConfigError(f"{key}: set, but there is no postgres.backup to use it; remove it")
    from . import monconfig
    monitor = monconfig.parse(_decode("monitor", raw.get("monitor"), None), {s.name: s for s in spokes},
                              _decode(monconfig.SECRETS, raw.get(monconfig.SECRETS), None))
    spokes = _client_allow(spokes_raw, spokes, postgres, monitor)
    return NetworkConfig(
        overlay=str(overlay), listen_port=listen_port, interface=interface, status_port=status_port,
        admin_cidrs=admin_cidrs, admin_ssh_keys=admin_keys, hub=hub, spokes=tuple(spokes),
        ssh_private_key=deploy_key, phala_api_key=None if phala_api_key is None else phala_api_key.strip(),
        digitalocean_ssh_key=do_key, status_cidrs=status_cidrs, tcp_port=tcp_port, mtu=mtu,
        postgres=postgres, monitor=monitor)


def _spokes(spokes_raw, secrets, overlay, hub_address, deploy_key, pinned, defaults) -> list[SpokeConfig]:
    taken: dict[ipaddress.IPv4Address, str] = {hub_address: "the hub"}
    explicit: dict[int, ipaddress.IPv4Address] = {}
    for i, item in enumerate(spokes_raw):
        _unknown(f"spokes[{i}]", item, SPOKE_KEYS)
        if "address" in item:
            setting = f"spokes[{i}].address"
            try:
                addr = ipaddress.ip_address(_want(setting, item["address"], str, "an IPv4 address"))
            except ValueError:
                raise ConfigError(f"{setting}: {item['address']!r} is not an IPv4 address") from None
            if addr not in overlay:
                raise ConfigError(f"{setting}: {addr} is outside the overlay {overlay}")
            if addr in (overlay.network_address, overlay.broadcast_address):
                raise ConfigError(f"{setting}: {addr} is the overlay's network or broadcast address")
            if addr in taken:
                raise ConfigError(f"{setting}: {addr} is already used by {taken[addr]}")
            taken[addr] = f"spokes[{i}]"
            explicit[i] = addr

    # Free addresses from .11 upwards for spokes that did not pick one.
    pool = (a for a in overlay.hosts() if int(a) - int(overlay.network_address) >= FIRST_SPOKE_HOST
            and a not in taken)
    out = []
    for i, item in enumerate(spokes_raw):
        name = item["name"]
        if i in explicit:
            addr = explicit[i]
        else:
            addr = next(pool, None)
            if addr is None:
                raise ConfigError(
                    f"overlayCidr: {overlay} is too small for {len(spokes_raw)} spokes "
                    f"(spokes start at .{FIRST_SPOKE_HOST}); use a larger network")
            taken[addr] = name
        kind = item.get("kind")
        if kind not in SPOKE_KINDS:
            raise ConfigError(f"spokes[{i}].kind: {kind!r} is not a spoke kind; allowed: {', '.join(SPOKE_KINDS)}")
        node_secrets = secrets.get(name, {})
        ssh_key = node_secrets.get("sshPrivateKey")
        if ssh_key is not None:
            ssh_key = _ssh_private_key(f"nodeSecrets.{name}.sshPrivateKey", ssh_key)
        values: dict[str, Any] = dict(
            name=name, kind=kind, address=str(addr),
            preshared_key=_want(f"spokes[{i}].presharedKey", item.get("presharedKey", True), bool, "true or false"),
            key_rotation=_want(f"spokes[{i}].keyRotation", item.get("keyRotation", 0), int, "an integer"),
            wireguard_private_key=pinned(name), ssh_private_key=ssh_key)
        if isinstance(values["key_rotation"], bool):
            raise ConfigError(f"spokes[{i}].keyRotation: expected an integer")
        transport = item.get("transport", "udp")
        if transport not in TRANSPORTS:
            raise ConfigError(f"spokes[{i}].transport: {transport!r} is not a transport; allowed: udp (WireGuard's "
                              "own), tcp (over a TCP connection to the hub's tcpPort), auto (udp, and tcp while "
                              "udp gets no answer)")
        values.update(transport=transport, mtu=_mtu(f"spokes[{i}].mtu", item.get("mtu")))
        _kind_keys(i, item, kind)
        if kind == "ssh":
            values.update(_ssh_spoke(i, item, ssh_key or deploy_key))
        elif kind == "dstack":
            if ssh_key is not None:
                raise ConfigError(f"nodeSecrets.{name}.sshPrivateKey: a dstack spoke is not reached over SSH")
            values.update(_dstack_spoke(i, item))
        elif kind == "client":
            if ssh_key is not None:
                raise ConfigError(f"nodeSecrets.{name}.sshPrivateKey: a client is a device the program never logs "
                                  "in to; remove it")
        else:
            for key in ("region", "size", "image"):
                slug = item.get(key, defaults[key])
                if not isinstance(slug, str) or not SLUG_RE.fullmatch(slug):
                    raise ConfigError(f"spokes[{i}].{key}: {slug!r} is not a DigitalOcean slug")
                values[key] = slug
        out.append(SpokeConfig(**values))
    return out


def _client_allow(spokes_raw, spokes: list[SpokeConfig], postgres, monitor) -> list[SpokeConfig]:
    """Each client's `allow`, checked against the nodes and roles there are (so after postgres and
    monitor): a node's name (not the hub's, nor another client's) or a role in CLIENT_TARGET_ROLES.
    Without the setting: CLIENT_ALLOW_DEFAULT (monitor where there is one), plus postgres for a
    client postgres.clients lists; `postgres` itself only for those."""
    import dataclasses
    hosts = {s.name: s for s in spokes if s.kind != "client"}
    clients = {s.name for s in spokes if s.kind == "client"}
    out = []
    for i, (item, spoke) in enumerate(zip(spokes_raw, spokes)):
        if spoke.kind != "client":
            out.append(spoke)
            continue
        pg_client = postgres is not None and spoke.name in postgres.clients
        if "allow" not in item:
            allow = [r for r in CLIENT_ALLOW_DEFAULT if r != "monitor" or monitor is not None]
        else:
            allow = _want(f"spokes[{i}].allow", item["allow"], list, "a list of node names and roles")
        seen: list[str] = []
        for j, target in enumerate(allow):
            setting = f"spokes[{i}].allow[{j}]"
            _want(setting, target, str, "a node's name or a role")
            if target == HUB_NAME:
                raise ConfigError(f"{setting}: the hub serves nothing on the overlay; name spokes or roles")
            if target in clients:
                raise ConfigError(f"{setting}: {target!r} is a client; clients never reach one another")
            if target not in hosts and target not in CLIENT_TARGET_ROLES:
                raise ConfigError(f"{setting}: {target!r} is neither a node nor a role; nodes: "
                                  f"{', '.join(hosts) or 'none'}; roles: {', '.join(CLIENT_TARGET_ROLES)}")
            if target == "monitor" and monitor is None:
                raise ConfigError(f"{setting}: there is no monitor in this stack (the `monitor` setting)")
            if target == "postgres" and not pg_client:
                raise ConfigError(f"{setting}: {spoke.name!r} may reach the database only as a PostgreSQL client: "
                                  "add it to postgres.clients (its password and the CA are outputs then)")
            if target in seen:
                raise ConfigError(f"{setting}: {target!r} is listed twice")
            seen.append(target)
        if pg_client and "postgres" not in seen:
            seen.append("postgres")
        out.append(dataclasses.replace(spoke, allow=tuple(seen)))
    return out


def _ssh_spoke(i: int, item: Mapping[str, Any], key: str | None) -> dict[str, Any]:
    host = item.get("host")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"spokes[{i}].host: required for kind 'ssh' (the address or name to SSH to)")
    host = _hostname_or_address(f"spokes[{i}].host", host.strip())
    if key is None:
        raise ConfigError(
            f"spokes[{i}]: an 'ssh' spoke needs an SSH private key: set nodeSecrets.{item['name']}.sshPrivateKey "
            "or sshPrivateKey (pulumi config set --secret ...)")
    user = item.get("user", "root")
    if not isinstance(user, str) or not USER_RE.fullmatch(user):
        raise ConfigError(f"spokes[{i}].user: {user!r} is not a valid user name")
    host_key = item.get("hostKey")
    allow_unknown = _want(f"spokes[{i}].allowUnknownHostKey", item.get("allowUnknownHostKey", False),
                          bool, "true or false")
    if host_key is None and not allow_unknown:
        raise ConfigError(
            f"spokes[{i}].hostKey: required (the host's public key, e.g. `ssh-keyscan -t ed25519 HOST`); "
            "to connect without checking it, set allowUnknownHostKey: true")
    if host_key is not None:
        host_key = _host_key(f"spokes[{i}].hostKey", host_key)
    return dict(host=host, port=_port(f"spokes[{i}].port", item.get("port", 22)), user=user,
                host_key=host_key, allow_unknown_host_key=allow_unknown)


def _check_ports(status_port: int, listen_port: int, spokes) -> None:
    """The status port is open to everyone (spoke ruleset, cloud firewall): on an SSH port it would
    open SSH to the whole Internet."""
    ssh_ports = {22: "SSH on droplets"} | {s.port: f"SSH on {s.name}" for s in spokes if s.kind == "ssh"}
    if status_port in ssh_ports:
        raise ConfigError(f"statusPort: {status_port} is {ssh_ports[status_port]}; the status port is opened to "
                          "everyone, so it must not be an SSH port (default 8000)")
    if status_port == listen_port:
        raise ConfigError(f"statusPort: {status_port} is the WireGuard port (listenPort); choose another (8000)")


def _check_tcp_port(tcp_port: int, status_port: int, listen_port: int) -> None:
    """The hub's TCP port for tcp/auto spokes: not its SSH port, and not a port of ours (one port
    number, one job: its cloud firewall rule and the hosts' rulesets are per port)."""
    taken = {22: "SSH on the hub", status_port: "the status port (statusPort)",
             listen_port: "WireGuard's port (listenPort)"}
    if tcp_port in taken:
        raise ConfigError(f"tcpPort: {tcp_port} is {taken[tcp_port]}; choose another (default {TCP_PORT_DEFAULT})")


def _check_admin_cidrs(admin_cidrs: tuple[str, ...], overlay: ipaddress.IPv4Network) -> None:
    """SSH is open to adminCidrs on every node: an overlay range there opens sshd to every spoke."""
    for i, cidr in enumerate(admin_cidrs):
        net = ipaddress.ip_network(cidr)
        if net.version == overlay.version and net.overlaps(overlay):
            raise ConfigError(f"adminCidrs[{i}]: {cidr} overlaps the overlay {overlay}, which would open SSH on every "
                              "node to the spokes; list the addresses you run `pulumi up` and SSH from instead")


def _check_pinned_keys(pinned: Mapping[str, str | None]) -> None:
    """Two nodes with one key: the hub would route both addresses to whichever peer came last."""
    seen: dict[str, str] = {}
    for node, key in pinned.items():
        if key is None:
            continue
        if key in seen:
            raise ConfigError(f"nodeSecrets.{node}.wireguardPrivateKey: the same key as nodeSecrets.{seen[key]}"
                              ".wireguardPrivateKey; every node needs a key of its own")
        seen[key] = node


def _hostname_or_address(setting: str, value: str) -> str:
    """An IP address, or a DNS name (RFC 1123 labels): nothing a shell or ssh could read as more."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if len(value) <= 253 and re.fullmatch(rf"{label}(?:\.{label})*\.?", value) and not value.replace(".", "").isdigit():
        return value
    raise ConfigError(f"{setting}: {value!r} is neither an IP address nor a host name "
                      "(letters, digits, '-' and '.', e.g. db1.example.com or 198.51.100.21)")


def _dstack_spoke(i: int, item: Mapping[str, Any]) -> dict[str, Any]:
    image = item.get("containerImage")
    if image is None:
        raise ConfigError(f"spokes[{i}].containerImage: required for a dstack spoke: the dstack-vpn spoke image "
                          f"by digest, e.g. {IMAGE_EXAMPLE} (README: 'The spoke image' says how to build "
                          "and push it, or where the published one is)")
    if not isinstance(image, str) or not IMAGE_RE.fullmatch(image):
        raise ConfigError(f"spokes[{i}].containerImage: {image!r} is not an image reference (e.g. {IMAGE_EXAMPLE})")
    if "@sha256:" not in image:
        raise ConfigError(f"spokes[{i}].containerImage: {image!r} is not pinned by digest: a tag can be moved to "
                          "other code after the app is measured; name it as REGISTRY/NAME@sha256:<digest> "
                          "(image/build.py prints it)")
    phala = item.get("phala")
    if phala is None:
        return dict(container_image=image)
    setting = f"spokes[{i}].phala"
    _want(setting, phala, dict, "an object (name, instanceType, region, diskSize, osImage)")
    _unknown(setting, phala, PHALA_KEYS)
    name = phala.get("name", f"dstack-vpn-{item['name']}")
    if not isinstance(name, str) or not PHALA_NAME_RE.fullmatch(name):
        raise ConfigError(f"{setting}.name: {name!r} is not a Phala Cloud CVM name "
                          "(5-63 letters, digits and '-', starting with a letter)")
    slugs = {}
    for key in ("instanceType", "region", "osImage"):
        value = phala.get(key)
        if value is not None and (not isinstance(value, str) or not PHALA_SLUG_RE.fullmatch(value)):
            raise ConfigError(f"{setting}.{key}: {value!r} is not a Phala Cloud slug (e.g. tdx.small, dstack-0.5.8)")
        slugs[key] = value
    disk = phala.get("diskSize")
    if disk is not None:
        _want(f"{setting}.diskSize", disk, int, "a size in GB")
        if not 10 <= disk <= 2000:
            raise ConfigError(f"{setting}.diskSize: {disk} GB is out of range; allowed 10-2000")
    return dict(container_image=image, phala=PhalaConfig(
        name=name, instance_type=slugs["instanceType"], region=slugs["region"], disk_size=disk,
        os_image=slugs["osImage"]))


def from_pulumi() -> NetworkConfig:
    """Read this project's stack config from the Pulumi runtime and parse it."""
    from pulumi.runtime import config as runtime_config

    prefix = PROJECT + ":"
    # The language host hands config over either way, depending on its version.
    everything = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    raw = {k[len(prefix):]: v for k, v in everything.items() if k.startswith(prefix)}
    return parse(raw)

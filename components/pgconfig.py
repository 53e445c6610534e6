"""The `postgres` setting -> PostgresConfig (pure, like config.py, which calls it last).

    postgres:
      members: [node-a, node-b, node-e]   # one, or an odd number from three (etcd's quorum)
      version: 16                         # the distribution's PostgreSQL (VERSIONS)
      synchronous: true                   # an acknowledged commit is on two members
      users: [app]
      databases: [{name: app, owner: app}]
      clients: [node-c]                   # other spokes that may connect (port 5432 only)
      keepData: true                      # destroy leaves the data directories
      parameters: {work_mem: 8MB}         # postgresql.conf, applied by Patroni (rolling)
      passwordRotation: {app: 1}          # a new password for a user (postgres, replicator too)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config import HUB_NAME, ConfigError, SpokeConfig, _unknown, _want

KEYS = {"members", "version", "synchronous", "users", "databases", "clients", "keepData", "parameters",
        "passwordRotation"}
# The PostgreSQL major versions the distributions package: Debian 12 (15), Ubuntu 24.04 (16),
# Debian 13 (17).
VERSIONS = (15, 16, 17)
# What a droplet image's distribution packages (a droplet member's version must be its own).
IMAGE_VERSIONS = {"debian-12": 15, "ubuntu-24-04": 16, "debian-13": 17, "ubuntu-22-04": 14, "debian-11": 13}
# Roles of the cluster itself: Patroni's superuser and replication user.
SUPERUSER = "postgres"
REPLICATOR = "replicator"
RESERVED_USERS = {SUPERUSER, REPLICATOR, "public", "none", "current_user", "session_user"}
RESERVED_DATABASES = {"postgres", "template0", "template1"}
IDENT_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
PARAMETER_RE = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?")
VALUE_RE = re.compile(r"[A-Za-z0-9_.:/ ,+-]{0,200}")
# What Patroni and the role set themselves: the overlay address, TLS, the files, replication.
OWN_PARAMETERS = {
    "listen_addresses", "port", "ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file", "ssl_min_protocol_version",
    "hba_file", "ident_file", "data_directory", "config_file", "unix_socket_directories", "password_encryption",
    "synchronous_standby_names", "synchronous_commit", "hot_standby", "wal_level", "max_wal_senders",
    "max_replication_slots", "wal_log_hints", "primary_conninfo", "primary_slot_name", "recovery_target",
    "archive_mode", "archive_command", "restore_command", "cluster_name", "shared_preload_libraries",
}


@dataclass(frozen=True)
class Database:
    name: str
    owner: str


@dataclass(frozen=True)
class PostgresConfig:
    members: tuple[str, ...]
    version: int
    synchronous: bool = True
    users: tuple[str, ...] = ()
    databases: tuple[Database, ...] = ()
    clients: tuple[str, ...] = ()
    keep_data: bool = True
    parameters: Mapping[str, str] = field(default_factory=dict)
    password_rotation: Mapping[str, int] = field(default_factory=dict)
    """user -> rotation counter; changing it makes that user's password anew"""

    @property
    def all_users(self) -> tuple[str, ...]:
        """Every role with a password: the superuser, the replication user, then the users."""
        return (SUPERUSER, REPLICATOR) + self.users


def _names(setting: str, value: Any, spokes: Mapping[str, SpokeConfig], what: str) -> tuple[str, ...]:
    _want(setting, value, list, f"a list of {what}")
    seen: list[str] = []
    for i, name in enumerate(value):
        _want(f"{setting}[{i}]", name, str, "a node's name")
        if name == HUB_NAME:
            raise ConfigError(f"{setting}[{i}]: the hub is a plain router: it serves nothing on the overlay and "
                              "holds no data; name spokes")
        if name not in spokes:
            raise ConfigError(f"{setting}[{i}]: {name!r} is not a node; spokes: {', '.join(spokes) or 'none'}")
        if name in seen:
            raise ConfigError(f"{setting}[{i}]: {name!r} is listed twice")
        seen.append(name)
    return tuple(seen)


def _bool(setting: str, value: Any) -> bool:
    return _want(setting, value, bool, "true or false")


def _ident(setting: str, value: Any, reserved: set[str]) -> str:
    _want(setting, value, str, "a name")
    if not IDENT_RE.fullmatch(value):
        raise ConfigError(f"{setting}: {value!r} is not a plain SQL name (lowercase letters, digits and '_', "
                          "starting with a letter or '_', at most 63)")
    if value in reserved or value.startswith("pg_"):
        raise ConfigError(f"{setting}: {value!r} is the cluster's own; choose another name")
    return value


def parse(raw: Any, spokes: Mapping[str, SpokeConfig]) -> PostgresConfig | None:
    """The `postgres` setting (decoded JSON), checked against the spokes; None when absent."""
    if raw is None:
        return None
    _want("postgres", raw, dict, "an object (members, version, ...)")
    _unknown("postgres", raw, KEYS)
    if "members" not in raw:
        raise ConfigError("postgres.members: required; the spokes that hold the cluster (three for high "
                          "availability, or one)")
    members = _names("postgres.members", raw["members"], spokes, "spokes")
    if len(members) != 1 and (len(members) < 3 or len(members) % 2 == 0):
        raise ConfigError(f"postgres.members: {len(members)} members; etcd needs a majority to elect a leader, so "
                          "give one member (no failover) or an odd number from three (3 survives the loss of one, "
                          "5 of two)")
    for i, name in enumerate(members):
        if spokes[name].kind == "dstack":
            raise ConfigError(f"postgres.members[{i}]: {name!r} is a dstack spoke; the cluster's members are "
                              "`ssh` and `droplet` spokes for now (a dstack spoke can be a client)")
    version = raw.get("version")
    if version is None:
        raise ConfigError(f"postgres.version: required; one of {', '.join(map(str, VERSIONS))} (Debian 12 packages "
                          "15, Ubuntu 24.04 16, Debian 13 17)")
    if isinstance(version, str) and version.isascii() and version.isdigit():
        version = int(version)
    if version not in VERSIONS or isinstance(version, bool):
        raise ConfigError(f"postgres.version: {version!r} is not a version this program installs; one of "
                          f"{', '.join(map(str, VERSIONS))}")
    for i, name in enumerate(members):
        spoke = spokes[name]
        if spoke.kind == "droplet" and spoke.image:
            packaged = next((v for prefix, v in IMAGE_VERSIONS.items() if spoke.image.startswith(prefix)), None)
            if packaged is not None and packaged != version:
                raise ConfigError(f"postgres.members[{i}]: {name!r} runs {spoke.image}, whose PostgreSQL is "
                                  f"{packaged}, not {version}; every member runs one version")
    clients = _names("postgres.clients", raw.get("clients", []), spokes, "spokes")
    for i, name in enumerate(clients):
        if name in members:
            raise ConfigError(f"postgres.clients[{i}]: {name!r} is a member (members reach the cluster anyway)")
    users_raw = raw.get("users", [])
    _want("postgres.users", users_raw, list, "a list of names")
    users: list[str] = []
    for i, user in enumerate(users_raw):
        user = _ident(f"postgres.users[{i}]", user, RESERVED_USERS)
        if user in users:
            raise ConfigError(f"postgres.users[{i}]: {user!r} is listed twice")
        users.append(user)
    dbs_raw = raw.get("databases", [])
    _want("postgres.databases", dbs_raw, list, "a list of {name, owner}")
    databases: list[Database] = []
    for i, db in enumerate(dbs_raw):
        setting = f"postgres.databases[{i}]"
        _want(setting, db, dict, "an object {name, owner}")
        _unknown(setting, db, {"name", "owner"})
        name = _ident(f"{setting}.name", db.get("name"), RESERVED_DATABASES)
        if name in (d.name for d in databases):
            raise ConfigError(f"{setting}.name: {name!r} is listed twice")
        owner = db.get("owner", SUPERUSER)
        if owner != SUPERUSER and owner not in users:
            raise ConfigError(f"{setting}.owner: {owner!r} is not in postgres.users (nor {SUPERUSER})")
        databases.append(Database(name, owner))
    parameters = _parameters(raw.get("parameters", {}))
    rotation_raw = raw.get("passwordRotation", {})
    _want("postgres.passwordRotation", rotation_raw, dict, "an object of user -> number")
    rotation: dict[str, int] = {}
    for user, n in rotation_raw.items():
        setting = f"postgres.passwordRotation.{user}"
        if user not in (SUPERUSER, REPLICATOR, *users):
            raise ConfigError(f"{setting}: {user!r} is not a user of the cluster ({', '.join((SUPERUSER, REPLICATOR, *users))})")
        _want(setting, n, int, "a number (raise it to make a new password)")
        if n < 0:
            raise ConfigError(f"{setting}: {n} is negative; raise it by one to make a new password")
        rotation[user] = n
    return PostgresConfig(
        members=members, version=version, synchronous=_bool("postgres.synchronous", raw.get("synchronous", True)),
        users=tuple(users), databases=tuple(databases), clients=clients,
        keep_data=_bool("postgres.keepData", raw.get("keepData", True)), parameters=parameters,
        password_rotation=rotation)


def _parameters(raw: Any) -> dict[str, str]:
    _want("postgres.parameters", raw, dict, "an object of parameter -> value")
    out: dict[str, str] = {}
    for name, value in raw.items():
        setting = f"postgres.parameters.{name}"
        if not PARAMETER_RE.fullmatch(name):
            raise ConfigError(f"{setting}: not a PostgreSQL parameter name")
        if name in OWN_PARAMETERS:
            raise ConfigError(f"{setting}: set by the program (listening on the overlay, TLS, replication); "
                              "README, PostgreSQL, lists these")
        if isinstance(value, bool):
            value = "on" if value else "off"
        _want(setting, value, (str, int, float), "a value (text or number)")
        value = str(value)
        if not VALUE_RE.fullmatch(value):
            raise ConfigError(f"{setting}: {value!r} has characters a parameter value here cannot hold "
                              "(letters, digits, space and _.:/,+- only)")
        out[name] = value
    return out

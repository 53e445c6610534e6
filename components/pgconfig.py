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
      backup:                             # pgBackRest to an S3 bucket (BackupConfig)
        repository: {type: s3, endpoint: https://fra1.digitaloceanspaces.com, bucket: my-backups,
                     region: fra1}        # keys: backupAccessKeyId, backupSecretAccessKey (secret)
        retention: {full: 2, diff: 6}
        schedule: {full: "Sun *-*-* 03:00:00", diff: "Mon..Sat *-*-* 03:00:00"}
      restore: {generation: 1, target: "2026-12-03 12:00:00+00"}   # or target: latest
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config import HUB_NAME, ConfigError, SpokeConfig, _unknown, _want

KEYS = {"members", "version", "synchronous", "users", "databases", "clients", "keepData", "parameters",
        "passwordRotation", "backup", "restore"}
BACKUP_KEYS = {"repository", "retention", "schedule", "archiveTimeout"}
REPOSITORY_KEYS = {"s3": {"type", "endpoint", "bucket", "region", "path", "uriStyle", "caCertificate"},
                   "spaces": {"type", "region", "bucket", "path"}}
# The top-level secrets an `s3` repository's access key comes in (pulumi config set --secret ...).
ACCESS_KEY_ID, SECRET_ACCESS_KEY = "backupAccessKeyId", "backupSecretAccessKey"
# DigitalOcean's Spaces regions (the program makes the bucket there: repository.type spaces).
SPACES_REGIONS = ("nyc3", "sfo2", "sfo3", "ams3", "sgp1", "fra1", "syd1", "blr1", "lon1", "tor1", "atl1")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
PATH_RE = re.compile(r"(/[A-Za-z0-9._-]+)+")
HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?")
# systemd OnCalendar: what a schedule may hold (systemd-analyze calendar checks it on the host)
CALENDAR_RE = re.compile(r"[A-Za-z0-9*:,./ ~-]{1,100}")
# recovery_target_time: a timestamp with its zone, as PostgreSQL reads it
TARGET_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
                       r"( ?(Z|UTC|[+-][0-9]{2}(:?[0-9]{2})?))")
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
    "archive_timeout",
}


@dataclass(frozen=True)
class Repository:
    """Where pgBackRest keeps the backups and the WAL archive: an S3 bucket."""
    type: str
    """s3 (any S3 endpoint, with the user's access key) or spaces (the program makes the bucket
    and its key on DigitalOcean)"""
    bucket: str
    region: str
    endpoint: str
    """host[:port], https always"""
    path: str = "/dstack-vpn"
    uri_style: str = "host"
    ca_certificate: str | None = None
    """PEM: the CA of a private endpoint; None: the system's CAs"""
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BackupConfig:
    repository: Repository
    retention_full: int = 2
    """full backups kept (older ones and the WAL only they need expire)"""
    retention_diff: int = 6
    """differential backups kept"""
    schedule_full: str = "Sun *-*-* 03:00:00"
    schedule_diff: str = "Mon..Sat *-*-* 03:00:00"
    archive_timeout: int = 60
    """seconds: a quiet primary switches to a new WAL segment (and archives it) at least this often"""


@dataclass(frozen=True)
class Restore:
    generation: int
    """raised by one for each restore: a new cluster (its own data directories) made from the repository"""
    target: str
    """"latest" (every archived WAL segment) or a timestamp with its zone"""


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
    backup: BackupConfig | None = None
    restore: Restore | None = None

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


def parse(raw: Any, spokes: Mapping[str, SpokeConfig], secrets: Mapping[str, Any] | None = None
          ) -> PostgresConfig | None:
    """The `postgres` setting (decoded JSON), checked against the spokes; None when absent.
    secrets: the top-level settings an `s3` repository's access key comes in."""
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
        if spokes[name].kind == "client":
            raise ConfigError(f"postgres.members[{i}]: {name!r} is a client (a person's device); the cluster's "
                              "members are `ssh` and `droplet` spokes (list it in postgres.clients to connect)")
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
    backup = _backup(raw.get("backup"), secrets or {})
    restore = _restore(raw.get("restore"), backup)
    return PostgresConfig(
        members=members, version=version, synchronous=_bool("postgres.synchronous", raw.get("synchronous", True)),
        users=tuple(users), databases=tuple(databases), clients=clients,
        keep_data=_bool("postgres.keepData", raw.get("keepData", True)), parameters=parameters,
        password_rotation=rotation, backup=backup, restore=restore)


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


def _count(setting: str, value: Any, default: int, low: int, high: int, what: str) -> int:
    if value is None:
        return default
    _want(setting, value, int, f"a whole number of {what}")
    if not low <= value <= high:
        raise ConfigError(f"{setting}: {value} {what}; from {low} to {high}"
                          + (" (zero would keep nothing: every backup would expire)" if value < low else ""))
    return value


def _repository(raw: Any, secrets: Mapping[str, Any]) -> Repository:
    setting = "postgres.backup.repository"
    if raw is None:
        raise ConfigError(f"{setting}: required; where the backups go: {{type: s3, endpoint, bucket, region}} "
                          "or {type: spaces, region}")
    _want(setting, raw, dict, "an object {type, ...}")
    kind = raw.get("type")
    if kind not in REPOSITORY_KEYS:
        raise ConfigError(f"{setting}.type: {kind!r} is not a repository type; one of "
                          f"{', '.join(REPOSITORY_KEYS)} (s3: any S3 endpoint with your access key; spaces: a "
                          "DigitalOcean Spaces bucket the program makes)")
    _unknown(setting, raw, REPOSITORY_KEYS[kind])
    path = raw.get("path", "/dstack-vpn")
    _want(f"{setting}.path", path, str, "a path")
    if not PATH_RE.fullmatch(path):
        raise ConfigError(f"{setting}.path: {path!r} is not an absolute path of plain names (/dstack-vpn)")
    bucket = raw.get("bucket")
    if bucket is not None or kind == "s3":
        if bucket is None:
            raise ConfigError(f"{setting}.bucket: required; the bucket the backups go to (it must exist)")
        _want(f"{setting}.bucket", bucket, str, "a bucket name")
        if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(f"{setting}.bucket: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, "
                              "'.' and '-')")
    region = raw.get("region")
    if kind == "spaces":
        if region not in SPACES_REGIONS:
            raise ConfigError(f"{setting}.region: {region!r} is not a Spaces region; one of {', '.join(SPACES_REGIONS)}")
        for key in (ACCESS_KEY_ID, SECRET_ACCESS_KEY):
            if secrets.get(key) is not None:
                raise ConfigError(f"{key}: a `spaces` repository's key is made by the program; remove {key}, or "
                                  "use type s3 with the Spaces endpoint and your own key")
        return Repository("spaces", bucket or "", region, f"{region}.digitaloceanspaces.com", path)
    _want(f"{setting}.region", region, str, "the bucket's region (us-east-1, fra1, ...)")
    if not re.fullmatch(r"[a-z0-9-]{1,40}", region):
        raise ConfigError(f"{setting}.region: {region!r} is not a region name")
    endpoint = raw.get("endpoint")
    _want(f"{setting}.endpoint", endpoint, str, "an https URL (https://s3.example.com)")
    if not endpoint.startswith("https://"):
        raise ConfigError(f"{setting}.endpoint: {endpoint!r}: backups travel over TLS only; give an https:// URL")
    host = endpoint[len("https://"):].rstrip("/")
    if not HOST_RE.fullmatch(host):
        raise ConfigError(f"{setting}.endpoint: {endpoint!r} is not https://HOST[:PORT]")
    style = raw.get("uriStyle", "host")
    if style not in ("host", "path"):
        raise ConfigError(f"{setting}.uriStyle: {style!r}; host (bucket.endpoint, the default) or path "
                          "(endpoint/bucket, for an endpoint without bucket names in DNS)")
    ca = raw.get("caCertificate")
    if ca is not None:
        _want(f"{setting}.caCertificate", ca, str, "a PEM certificate")
        if "-----BEGIN CERTIFICATE-----" not in ca or "PRIVATE KEY" in ca:
            raise ConfigError(f"{setting}.caCertificate: not a PEM certificate (-----BEGIN CERTIFICATE-----)")
    keys = {}
    for key in (ACCESS_KEY_ID, SECRET_ACCESS_KEY):
        value = secrets.get(key)
        if value is None:
            raise ConfigError(f"{key}: required for an `s3` repository (pulumi config set --secret {key} ...)")
        if not isinstance(value, str) or not re.fullmatch(r"[!-~]{8,256}", value.strip()):
            raise ConfigError(f"{key}: not an access key (8 to 256 printable characters, no spaces)")
        keys[key] = value.strip()
    return Repository("s3", bucket, region, host, path, style, ca, keys[ACCESS_KEY_ID], keys[SECRET_ACCESS_KEY])


def _backup(raw: Any, secrets: Mapping[str, Any]) -> BackupConfig | None:
    if raw is None:
        for key in (ACCESS_KEY_ID, SECRET_ACCESS_KEY):
            if secrets.get(key) is not None:
                raise ConfigError(f"{key}: set, but postgres.backup is not; remove it or add postgres.backup")
        return None
    _want("postgres.backup", raw, dict, "an object (repository, retention, schedule)")
    _unknown("postgres.backup", raw, BACKUP_KEYS)
    repository = _repository(raw.get("repository"), secrets)
    retention = raw.get("retention", {})
    _want("postgres.backup.retention", retention, dict, "an object {full, diff}")
    _unknown("postgres.backup.retention", retention, {"full", "diff"})
    full = _count("postgres.backup.retention.full", retention.get("full"), 2, 1, 100, "full backups")
    diff = _count("postgres.backup.retention.diff", retention.get("diff"), 6, 1, 1000, "differential backups")
    schedule = raw.get("schedule", {})
    _want("postgres.backup.schedule", schedule, dict, "an object {full, diff} of systemd calendar times")
    _unknown("postgres.backup.schedule", schedule, {"full", "diff"})
    times = {}
    for kind, default in (("full", BackupConfig.schedule_full), ("diff", BackupConfig.schedule_diff)):
        value = schedule.get(kind, default)
        _want(f"postgres.backup.schedule.{kind}", value, str, "a systemd calendar time (Sun *-*-* 03:00:00)")
        if not CALENDAR_RE.fullmatch(value):
            raise ConfigError(f"postgres.backup.schedule.{kind}: {value!r} is not a systemd calendar time "
                              "(man systemd.time: \"Sun *-*-* 03:00:00\", \"daily\")")
        times[kind] = value
    timeout = _count("postgres.backup.archiveTimeout", raw.get("archiveTimeout"), 60, 10, 3600, "seconds")
    return BackupConfig(repository, full, diff, times["full"], times["diff"], timeout)


def _restore(raw: Any, backup: BackupConfig | None) -> Restore | None:
    if raw is None:
        return None
    _want("postgres.restore", raw, dict, "an object {generation, target}")
    _unknown("postgres.restore", raw, {"generation", "target"})
    if backup is None:
        raise ConfigError("postgres.restore: there is nothing to restore from without postgres.backup (its "
                          "repository)")
    generation = raw.get("generation")
    _want("postgres.restore.generation", generation, int, "a number (1 for the first restore, raised by one for "
          "each next)")
    if generation < 1:
        raise ConfigError(f"postgres.restore.generation: {generation}; 1 for the first restore, raised by one for each next")
    target = raw.get("target")
    _want("postgres.restore.target", target, str, "latest, or a time with its zone (2026-12-03 12:00:00+00)")
    if target != "latest" and not TARGET_RE.fullmatch(target):
        raise ConfigError(f"postgres.restore.target: {target!r}; latest (every archived change), or a time with its "
                          "zone, as PostgreSQL reads it (2026-12-03 12:00:00+00)")
    return Restore(generation, target)

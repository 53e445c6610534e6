"""Role `backup`: pgBackRest on the PostgreSQL members (postgres.backup), to an S3 bucket.

Every piece is the distribution's pgbackrest. On each member:
- step `pgbackrest` (before the member's `postgres` step): /etc/dstack-vpn-postgres/pgbackrest.conf
  (0600, the postgres user's: the repository's access key and cipher passphrase), pgBackRest's TLS
  server on the overlay address (port 8432, members only, client certificates from the cluster's
  CA: a backup taken on a replica asks the primary to start and stop it), and systemd timers: full
  and differential backups on the schedule, a status file every minute. Each timer fires on every
  member; only one takes the backup: the first replica (by name) that is streaming, or the
  primary when no replica is.
- Patroni archives every WAL segment with `pgbackrest archive-push` (archive_timeout bounds how
  long a quiet primary holds one). Replicas stream from the primary (each has a slot there) and
  never wait on the repository; only a restore reads WAL back from it (`archive-get`).
On the member that sets the cluster up: step `backup`, after the cluster: the stanza, a check that
archiving works, and a first full backup (again after a restore).

Everything leaves the member encrypted by pgBackRest (aes-256-cbc, repo1-cipher-pass: a passphrase
the program makes and keeps as a stack secret), over TLS. A restore (postgres.restore) makes a new
cluster from the repository: Patroni's custom bootstrap runs restore.sh (templates/postgres/).
See README "Backups" and DEPLOYMENT.md "Restore".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pulumi

from .. import render, topology
from ..config import NetworkConfig
from ..pgconfig import BackupConfig, PostgresConfig
from ..steps import Step
from . import Node, Role

STANZA = "dstack-vpn"
TLS_PORT = 8432
CONF = "/etc/dstack-vpn-postgres/pgbackrest.conf"
STATE_DIR = "/var/lib/dstack-vpn-backup"
STATUS_FILE = f"{STATE_DIR}/status.json"
LIB_DIR = "/usr/local/lib/dstack-vpn"
# pgBackRest, as the postgres user, with our settings (never Debian's /etc/pgbackrest.conf)
PGBACKREST = f"pgbackrest --config={CONF} --stanza={STANZA}"


@dataclass
class Secrets:
    """The repository's secrets, as outputs: the cipher passphrase and the access key; and each
    member's certificate for pgBackRest's TLS (Key, by member)."""
    cipher_pass: pulumi.Output
    access_key_id: pulumi.Output
    secret_access_key: pulumi.Output
    bucket: pulumi.Output
    certs: dict = field(default_factory=dict)


def make_secrets(cfg: NetworkConfig, cluster, parent: pulumi.Resource, spaces_bucket=None) -> Optional[Secrets]:
    """The cipher passphrase (a key kept in the stack), the repository's access key (the user's,
    type s3, or spaces_bucket's: components/spaces.py makes it), and a certificate per member from
    the cluster's CA (postgres.Secrets) for pgBackRest's TLS (cert_names)."""
    from ..keys import Key
    from . import postgres
    p = cfg.postgres
    if p is None or p.backup is None:
        return None
    child = pulumi.ResourceOptions(parent=parent)
    cipher = Key("postgres-backup-cipher", "password", opts=child)
    certs = {name: Key(f"{name}-pgbackrest-cert", "tls-cert", comment=address, names=cert_names(address),
                       issuer=cluster.ca, opts=child)
             for name, address in zip(p.members, postgres.addresses(cfg, p.members))}
    repo = p.backup.repository
    if repo.type == "spaces":
        bucket, key_id, secret = spaces_bucket
    else:
        bucket = pulumi.Output.from_input(repo.bucket)
        key_id, secret = pulumi.Output.secret(repo.access_key_id), pulumi.Output.secret(repo.secret_access_key)
    return Secrets(pulumi.Output.secret(cipher.private_key), key_id, secret, bucket, certs)


def cert_names(address: str) -> list[str]:
    """A member's names in its pgBackRest certificate: its overlay address, also as a DNS name.
    pgBackRest (2.45) matches the host it dials against the DNS names alone (an IP address entry
    does not count), so the members' own certificates (for Patroni and etcd) would not do."""
    return [address, f"dns:{address}"]


def backup(node: Node) -> Optional[BackupConfig]:
    p = node.cfg.postgres
    return None if p is None or node.name not in p.members else p.backup


def patroni_values(p: PostgresConfig) -> Optional[dict[str, Any]]:
    """What Patroni's settings say of archiving and of a restore (None without backups)."""
    if p.backup is None:
        return None
    values: dict[str, Any] = dict(command=f'{PGBACKREST} archive-push "%p"',
                                  restore_command=f'{PGBACKREST} archive-get %f "%p"',
                                  timeout=p.backup.archive_timeout, restore=None)
    if p.restore is not None:
        values["restore"] = dict(command=f"{LIB_DIR}/restore.sh", target=p.restore.target)
    return values


def pgbackrest_conf(node: Node, access_key_id: str, secret_access_key: str, cipher_pass: str, bucket: str) -> str:
    from . import postgres
    p = node.cfg.postgres
    repo = p.backup.repository
    host, _, port = repo.endpoint.partition(":")
    others = [(n, a) for n, a in zip(p.members, postgres.addresses(node.cfg, p.members)) if n != node.name]
    return render.render(
        "postgres/pgbackrest.conf", repo=repo, host=host, port=port or "443", bucket=bucket,
        member_addresses=postgres.addresses(node.cfg, p.members),
        access_key_id=access_key_id, secret_access_key=secret_access_key, cipher_pass=cipher_pass,
        backup=p.backup, stanza=STANZA, conf_dir=postgres.CONF_DIR, address=node.address, tls_port=TLS_PORT,
        members=list(p.members), others=others, data_dir=postgres.data_dir(p), pg_port=postgres.PG_PORT,
        state_dir=STATE_DIR, ca_file=f"{postgres.CONF_DIR}/repository-ca.crt" if repo.ca_certificate else None)


def step_values(node: Node) -> dict[str, Any]:
    from . import postgres
    p = node.cfg.postgres
    b = p.backup
    return dict(conf=CONF, conf_dir=postgres.CONF_DIR, state_dir=STATE_DIR, status_file=STATUS_FILE, lib_dir=LIB_DIR,
                stanza=STANZA, pgbackrest=PGBACKREST, address=node.address, tls_port=TLS_PORT, name=node.name,
                schedule_full=b.schedule_full, schedule_diff=b.schedule_diff, version=p.version,
                scope=postgres.scope(p), data_dir=postgres.data_dir(p), etcd_port=postgres.ETCD_CLIENT_PORT,
                socket_dir="/run/postgresql/dstack-vpn", pg_port=postgres.PG_PORT,
                repository_ca=bool(b.repository.ca_certificate), interface=node.cfg.interface,
                restore_generation=p.restore.generation if p.restore else 0,
                target=p.restore.target if p.restore else "")


class Backup(Role):
    name = "backup"
    config_keys = frozenset({"backupAccessKeyId", "backupSecretAccessKey"})  # (postgres.backup: the postgres role's)
    packages = ("pgbackrest",)
    on_dstack = False

    def node_packages(self, node: Node) -> tuple[str, ...]:
        return self.packages if backup(node) else ()

    def overlay_limits(self, node: Node) -> list[topology.OverlayLimit]:
        """pgBackRest's TLS server: for the other members (a backup on a replica asks the primary)."""
        if not backup(node):
            return []
        from . import postgres
        return [topology.OverlayLimit("tcp", TLS_PORT, tuple(postgres.addresses(node.cfg, node.cfg.postgres.members)))]

    def steps(self, node: Node) -> list[Step]:
        if not backup(node):
            return []
        from . import postgres
        cfg, p = node.cfg, node.cfg.postgres
        secrets: Secrets = node.secrets["backup"]
        repo_ca = p.backup.repository.ca_certificate
        cluster = node.secrets["postgres"]
        cert = secrets.certs[node.name]
        files = pulumi.Output.all(secrets.access_key_id, secrets.secret_access_key, secrets.cipher_pass,
                                  secrets.bucket, cluster.ca.public_key, cert.public_key, cert.private_key).apply(
            lambda v: render.bundle({
                "pgbackrest.conf": pgbackrest_conf(node, *v[:4]),
                "ca.crt": v[4], "pgbackrest.crt": v[5], "pgbackrest.key": v[6],
                **({"repository-ca.crt": repo_ca} if repo_ca else {})}))
        values = step_values(node)
        steps = [Step("pgbackrest", values, pulumi.Output.secret(files), secret=True, after=("wireguard",))]
        if node.name == postgres.converging_member(cfg):
            steps.append(Step("backup", values, None, after=("postgres",)))
        return steps


ROLE = Backup()


def status_values(node: Node) -> dict[str, Any]:
    """The status page's backup figures: the file the status timer writes (members with backups)."""
    return dict(backup_status=STATUS_FILE if backup(node) else "")

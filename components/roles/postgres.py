"""Role `postgres`: a PostgreSQL cluster on the spokes `postgres.members` names, run by Patroni
(leader election, failover, replication) with etcd as its store; all of it over the overlay only.

Every piece is the distribution's: postgresql-<version>, patroni, etcd-server. On each member:
- step `etcd`: dstack-vpn-etcd.service, one etcd member on the overlay address (2379 clients,
  2380 peers), TLS both ways with the cluster's CA, client certificates required;
- step `postgres`: dstack-vpn-patroni.service, which runs PostgreSQL (5432) and Patroni's REST API
  (8008) on the overlay address, TLS only. The last member's step (in spokes order) waits for the
  others, for one leader, then creates the users and databases (setup.sql) on the primary.
On each client: step `postgres-client`, the CA certificate where the connection strings expect it.

Secrets (make_secrets): the superuser's, the replication user's and each user's password (SCRAM
verifiers are what reach the database), and a CA with a certificate per member; all kept in the
stack, sent to a host only on a step's stdin, into files only the postgres (or etcd) user reads.
The spoke firewall lets members reach every port of the cluster, clients 5432 alone, and no one
else (the hub never: it only routes). See README "PostgreSQL".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pulumi

from .. import render, topology
from ..config import NetworkConfig
from ..keys import Key, scram_sha256
from ..pgconfig import REPLICATOR, SUPERUSER, PostgresConfig
from ..steps import Step
from . import Node, Role

PG_PORT = 5432
PATRONI_PORT = 8008
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
SCOPE = "dstack-vpn"
CONF_DIR = "/etc/dstack-vpn-postgres"
ETCD_DIR = "/etc/dstack-vpn-etcd"
ETCD_DATA = "/var/lib/etcd/dstack-vpn"
CA_PATH = "/usr/local/share/dstack-vpn/postgres-ca.crt"
SOCKET_DIR = "/var/run/postgresql/dstack-vpn"
# Debian's postgresql-common makes a cluster "main" when a server package is installed: none here.
NO_MAIN_CLUSTER = "/etc/postgresql-common/createcluster.d/dstack-vpn.conf"
# A member whose host is gone answers nothing (no reset): without these, libpq would wait for the
# kernel's TCP timeouts (minutes) before trying the next host, or on a connection to the old
# primary. 5 s to connect to each host; an unanswered write or an idle connection fails in 15 s.
DEAD_HOST = ("connect_timeout=5&tcp_user_timeout=15000&keepalives_idle=10&keepalives_interval=5"
             "&keepalives_count=1")
# How long the last member's step waits for the cluster to have a leader and every member running;
# after a restore, which copies the backups and replays the archived WAL first, longer.
CONVERGE_TIMEOUT = 300
RESTORE_TIMEOUT = 3600


def scope(p: PostgresConfig) -> str:
    """Patroni's name for the cluster; a restore (postgres.restore) makes a new cluster with a name,
    and data directories, of its own: the old ones are left as they were."""
    return SCOPE if p.restore is None else f"{SCOPE}-r{p.restore.generation}"


def data_dir(p: PostgresConfig) -> str:
    return f"/var/lib/postgresql/{p.version}/{scope(p)}"


def pg(node: Node) -> Optional[PostgresConfig]:
    return node.cfg.postgres


def addresses(cfg: NetworkConfig, names) -> list[str]:
    by_name = {s.name: s.address for s in cfg.spokes}
    return [by_name[n] for n in names]


def is_member(node: Node) -> bool:
    return pg(node) is not None and node.name in pg(node).members


def is_client(node: Node) -> bool:
    return pg(node) is not None and node.name in pg(node).clients


def converging_member(cfg: NetworkConfig) -> str:
    """The member whose step waits for the others and then sets the users and databases up: the
    last of the members in spokes order (its step is the last one Pulumi can run)."""
    order = [s.name for s in cfg.spokes]
    return max(cfg.postgres.members, key=order.index)


@dataclass
class Secrets:
    """The cluster's secrets, as outputs: passwords by user, the CA, and a certificate per member."""
    passwords: dict[str, pulumi.Output] = field(default_factory=dict)
    ca: Optional[Key] = None
    certs: dict[str, Key] = field(default_factory=dict)


def make_secrets(cfg: NetworkConfig, parent: pulumi.Resource) -> Optional[Secrets]:
    """Passwords, the CA and the members' certificates, as keys kept in the stack (none without a
    cluster)."""
    p = cfg.postgres
    if p is None:
        return None
    child = pulumi.ResourceOptions(parent=parent)
    out = Secrets()
    for user in p.all_users:
        key = Key(f"postgres-{user}-password", "password", rotation=p.password_rotation.get(user, 0), opts=child)
        out.passwords[user] = pulumi.Output.secret(key.private_key)
    out.ca = Key("postgres-ca", "tls-ca", comment=f"{SCOPE} postgres CA", opts=child)
    for name, address in zip(p.members, addresses(cfg, p.members)):
        out.certs[name] = Key(f"{name}-postgres-cert", "tls-cert", comment=name, names=[address, name],
                              issuer=out.ca, opts=child)
    return out


def uris(cfg: NetworkConfig) -> dict[str, dict[str, str]]:
    """libpq connection strings, one per database (as its owner): `primary` reaches whichever
    member is the primary now (target_session_attrs=read-write tries each host in turn, giving up
    on a silent one after DEAD_HOST's timeouts);
    `replicas` a standby, or the primary when no standby answers. The password is not in them
    (postgresPasswords; or a ~/.pgpass)."""
    p = cfg.postgres
    hosts = ",".join(f"{a}:{PG_PORT}" for a in addresses(cfg, p.members))
    tls = f"sslmode=verify-full&sslrootcert={CA_PATH}&{DEAD_HOST}"
    out: dict[str, dict[str, str]] = {"primary": {}, "replicas": {}}
    for db in p.databases or ():
        base = f"postgresql://{db.owner}@{hosts}/{db.name}?{tls}"
        out["primary"][db.name] = f"{base}&target_session_attrs=read-write"
        out["replicas"][db.name] = f"{base}&target_session_attrs=prefer-standby"
    return out


def outputs(cfg: NetworkConfig, secrets: Secrets) -> tuple[dict, pulumi.Output]:
    """The stack outputs: `postgres` (plain: connection strings, members, the CA certificate) and
    `postgresPasswords` (secret)."""
    p = cfg.postgres
    plain = dict(uris(cfg), members=dict(zip(p.members, addresses(cfg, p.members))), caPath=CA_PATH,
                 caCertificate=secrets.ca.public_key, synchronous=p.synchronous, version=p.version)
    return plain, pulumi.Output.secret(pulumi.Output.all(**secrets.passwords))


# -- what lands on the hosts (pure: plain values in, text out) ---------------------------------
def pg_hba(cfg: NetworkConfig) -> list[str]:
    """Who may connect: the local superuser by peer; over TLS with SCRAM, replication from the
    members and every database from members and clients. Nothing without TLS."""
    p = cfg.postgres
    rules = ["local all postgres peer"]
    rules += [f"hostssl replication {REPLICATOR} {a}/32 scram-sha-256" for a in addresses(cfg, p.members)]
    rules += [f"hostssl all all {a}/32 scram-sha-256" for a in addresses(cfg, p.members + p.clients)]
    return rules


def patroni_config(cfg: NetworkConfig, name: str, address: str, passwords: dict[str, str]) -> str:
    from . import backup
    p = cfg.postgres
    return render.render(
        "postgres/patroni.yml", scope=scope(p), name=name, address=address, conf_dir=CONF_DIR,
        etcd_hosts=[f"{a}:{ETCD_CLIENT_PORT}" for a in addresses(cfg, p.members)],
        archive=backup.patroni_values(p), data_dir=data_dir(p), bin_dir=f"/usr/lib/postgresql/{p.version}/bin",
        pg_port=PG_PORT, patroni_port=PATRONI_PORT, synchronous=p.synchronous, pg_hba=pg_hba(cfg),
        parameters=dict(p.parameters), superuser=SUPERUSER, replicator=REPLICATOR,
        superuser_password=passwords[SUPERUSER], replicator_password=passwords[REPLICATOR])


def etcd_env(cfg: NetworkConfig, name: str, address: str) -> str:
    p = cfg.postgres
    cluster = ",".join(f"{n}=https://{a}:{ETCD_PEER_PORT}" for n, a in zip(p.members, addresses(cfg, p.members)))
    return render.render("postgres/etcd.env", name=name, address=address, cluster=cluster, data=ETCD_DATA,
                         conf_dir=ETCD_DIR, client_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT,
                         token=f"{SCOPE}-{p.members[0]}")


def setup_sql(cfg: NetworkConfig, passwords: dict[str, str]) -> str:
    p = cfg.postgres
    return render.render("postgres/setup.sql", users=list(p.users), databases=list(p.databases),
                         verifiers={u: scram_sha256(u, passwords[u]) for u in p.all_users})


def pgpass(cfg: NetworkConfig, passwords: dict[str, str]) -> str:
    """The superuser's line for every member (the setup's psql; 0600, removed after)."""
    return "".join(f"{a}:{PG_PORT}:*:{SUPERUSER}:{passwords[SUPERUSER]}\n" for a in addresses(cfg, cfg.postgres.members))


def peer_names(cfg: NetworkConfig) -> dict[str, str]:
    """Each member's etcd peer URL -> its name."""
    p = cfg.postgres
    return {f"https://{a}:{ETCD_PEER_PORT}": n for n, a in zip(p.members, addresses(cfg, p.members))}


def etcd_values(node: Node) -> dict:
    """The etcd step's values (only what its scripts use: a change elsewhere leaves etcd alone)."""
    others = [a for a in addresses(node.cfg, pg(node).members) if a != node.address]
    return dict(etcd_dir=ETCD_DIR, etcd_data=ETCD_DATA, address=node.address, name=node.name,
                etcd_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT, keep_data=pg(node).keep_data,
                interface=node.cfg.interface, other_addresses=others, peer_names=peer_names(node.cfg))


def member_values(node: Node) -> dict:
    """The postgres step's values."""
    p = pg(node)
    values = dict(conf_dir=CONF_DIR, data_dir=data_dir(p), ca_path=CA_PATH, address=node.address,
                name=node.name, version=p.version, keep_data=p.keep_data, pg_port=PG_PORT,
                patroni_port=PATRONI_PORT, etcd_port=ETCD_CLIENT_PORT, scope=scope(p), members=list(p.members),
                converging=node.name == converging_member(node.cfg), member_addresses=addresses(node.cfg, p.members),
                timeout=CONVERGE_TIMEOUT if p.restore is None else RESTORE_TIMEOUT, interface=node.cfg.interface,
                peer_names=peer_names(node.cfg))
    if p.restore is not None:  # (absent otherwise: a cluster deployed before restores existed sees no change)
        values["restore_generation"] = p.restore.generation
    return values


class Postgres(Role):
    name = "postgres"
    config_keys = frozenset({"postgres"})
    packages = ("postgresql", "postgresql-client", "patroni", "etcd-server", "etcd-client")
    on_dstack = False

    def node_packages(self, node: Node) -> tuple[str, ...]:
        if is_member(node):
            return (f"postgresql-{pg(node).version}", "patroni", "etcd-server", "etcd-client")
        return ("postgresql-client",) if is_client(node) else ()

    def preinstall(self, node: Node) -> dict[str, str]:
        if not is_member(node):
            return {}
        return {NO_MAIN_CLUSTER: "# dstack-vpn: Patroni makes this host's cluster; no 'main' cluster\n"
                                 "create_main_cluster = false\n"}

    def client_ports(self, cfg: NetworkConfig) -> dict[str, list[tuple[str, int]]]:
        """5432 on every member, for the clients postgres.clients lists (config keeps `postgres`
        out of any other client's allow)."""
        return {} if cfg.postgres is None else {m: [("tcp", PG_PORT)] for m in cfg.postgres.members}

    def overlay_limits(self, node: Node) -> list[topology.OverlayLimit]:
        """On a member: the cluster's ports for members alone, 5432 for clients too."""
        if not is_member(node):
            return []
        p = pg(node)
        members = addresses(node.cfg, p.members)
        monitor = node.cfg.monitor  # scrapes Patroni's /metrics
        watcher = addresses(node.cfg, [monitor.node]) if monitor and monitor.node not in p.members else []
        return [topology.OverlayLimit("tcp", PG_PORT, tuple(members + addresses(node.cfg, p.clients)))] + [
            topology.OverlayLimit("tcp", PATRONI_PORT, tuple(members + watcher))] + [
            topology.OverlayLimit("tcp", port, tuple(members)) for port in (ETCD_CLIENT_PORT, ETCD_PEER_PORT)]

    def steps(self, node: Node) -> list[Step]:
        if is_client(node):
            return [Step("postgres-client", dict(ca_path=CA_PATH), node.secrets["postgres"].ca.public_key,
                         after=("wireguard",))]
        if not is_member(node):
            return []
        cfg, secrets = node.cfg, node.secrets["postgres"]
        cert = secrets.certs[node.name]
        values = member_values(node)
        etcd_files = pulumi.Output.all(secrets.ca.public_key, cert.public_key, cert.private_key).apply(
            lambda v: render.bundle({"ca.crt": v[0], "member.crt": v[1], "member.key": v[2],
                                     "etcd.env": etcd_env(cfg, node.name, node.address)}))
        pg_files = pulumi.Output.all(secrets.ca.public_key, cert.public_key, cert.private_key,
                                     pulumi.Output.all(**secrets.passwords)).apply(
            lambda v: render.bundle({
                "ca.crt": v[0], "member.crt": v[1], "member.key": v[2],
                "patroni.yml": patroni_config(cfg, node.name, node.address, v[3]),
                **({"setup.sql": setup_sql(cfg, v[3]), "pgpass": pgpass(cfg, v[3])}
                   if values["converging"] else {})}))
        after: tuple[str, ...] = ("etcd",) + (("pgbackrest",) if pg(node).backup else ())
        if values["converging"]:  # every other member's Patroni first
            after += tuple(f"{m}/postgres" for m in pg(node).members if m != node.name)
        return [Step("etcd", etcd_values(node), pulumi.Output.secret(etcd_files), secret=True, after=("firewall", "wireguard")),
                Step("postgres", values, pulumi.Output.secret(pg_files), secret=True, after=after)]


ROLE = Postgres()


def status_values(node: Node) -> dict[str, Any]:
    """What the status page asks Patroni (members only): its REST API on the overlay, over TLS."""
    if not is_member(node):
        return dict(patroni_url="", patroni_ca="")
    return dict(patroni_url=f"https://{node.address}:{PATRONI_PORT}", patroni_ca=CA_PATH)


"""Backups of the lab stack's PostgreSQL cluster, for real: pgBackRest from Debian 12 on the three
members, to the lab's S3 endpoint over TLS on the underlay (lab/objectstore.py).

In order on one lab network: the first `up` leaves a full backup and WAL archiving; the status
pages say how old the backup is; nothing in the repository is readable (every object downloaded
and searched for a row, the passwords and the keys); a point-in-time restore through
postgres.restore brings back exactly the rows written before the target; and after a power cut of
every member and their data directories wiped, a restore to the latest archived WAL brings back
every acknowledged write up to the last archived segment (the loss is printed).

    CI=true .venv/bin/python -m pytest -q -s tests/e2e/test_lab_backup.py
"""
from __future__ import annotations

import json
import secrets as random
import tempfile
import time
from pathlib import Path

import pytest

from conftest import need_tool
from labnet import lab_network, wait_until
from test_lab_postgres import (CLIENT, MEMBERS, _secrets, acked_writes, cluster, local_sql, primary, psql, ssh,
                               start_writer)

BUCKET = "dstack-vpn-lab"
SEGMENT = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def net():
    need_tool("ip")
    with lab_network("dvk", postgres=True) as network:
        t0 = time.monotonic()
        network.first_up = network.up()
        print(f"\n[backup] up from nothing to a cluster with its first full backup: {time.monotonic() - t0:.0f} s")
        network.passwords = network.first_up.outputs["postgresPasswords"]
        from lab.example import stack_settings
        from lab.objectstore import ObjectStore
        network.pg = stack_settings()["postgres"]
        network.store = ObjectStore(network.lab)
        yield network


def pgbackrest_info(net, member) -> dict:
    out = ssh(net, member, "runuser -u postgres -- pgbackrest --config=/etc/dstack-vpn-postgres/pgbackrest.conf "
                           "--stanza=dstack-vpn info --output=json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


def archive_wal(net) -> str:
    """Switch the primary to a new WAL segment and wait until the one it left is in the repository;
    that segment's name."""
    lead = primary(net)
    segment = local_sql(net, lead, "SELECT pg_walfile_name(pg_switch_wal())").stdout.strip()
    assert wait_until(lambda: local_sql(net, lead, "SELECT last_archived_wal FROM pg_stat_archiver")
                      .stdout.strip() >= segment, 60), segment
    return segment


def test_the_first_up_leaves_a_full_backup_and_archives_wal(net):
    info = pgbackrest_info(net, "node-b")
    assert info["status"]["code"] == 0, info["status"]
    assert [b["type"] for b in info["backup"]] == ["full"], info["backup"]
    assert info["cipher"] == "aes-256-cbc"
    assert archive_wal(net)
    # every member's timers, and pgBackRest's TLS server on each overlay address
    for member in MEMBERS:
        timers = ssh(net, member, "systemctl is-active dstack-vpn-backup-full.timer dstack-vpn-backup-diff.timer "
                                  "dstack-vpn-backup-status.timer dstack-vpn-pgbackrest.service").stdout.split()
        assert timers == ["active"] * 4, (member, timers)


def test_a_scheduled_backup_runs_on_a_replica(net):
    """The timer's service on every member: the first streaming replica by name takes it."""
    view = cluster(net, "node-b")
    replicas = sorted(m for m, (role, state) in view.items() if role in ("Replica", "Sync Standby"))
    before = len(pgbackrest_info(net, "node-b")["backup"])
    t0 = time.monotonic()
    for member in MEMBERS:
        out = ssh(net, member, "systemctl start dstack-vpn-backup@diff.service && "
                               "journalctl -u dstack-vpn-backup@diff.service -n 5 --no-pager -o cat", timeout=600)
        assert out.returncode == 0, (member, out.stdout, out.stderr)
        if member == replicas[0]:
            assert "taking a diff backup (from the standby)" in out.stdout, out.stdout
        else:
            assert f"taken by {replicas[0]}, not here" in out.stdout, out.stdout
    backups = pgbackrest_info(net, "node-b")["backup"]
    assert len(backups) == before + 1 and backups[-1]["type"] == "diff", backups
    print(f"\n[backup] a differential backup from {replicas[0]}: {time.monotonic() - t0:.0f} s")


def test_status_pages_and_metrics_say_how_old_the_backup_is(net):
    from test_lab_network import fetch_status

    hosts, nodes = net.node_hosts(), net.nodes()
    for member in MEMBERS:
        ssh(net, member, "systemctl start dstack-vpn-backup-status.service")
        doc = fetch_status(hosts[CLIENT].netns, nodes[member]["address"])["body"]
        backup = doc["backup"]
        assert backup["error"] is None, (member, backup)
        assert backup["last_backup_type"] in ("full", "diff") and 0 <= backup["last_backup_age_sec"] < 3600, backup
        assert isinstance(backup["archive_lag_bytes"], int) and backup["archive_lag_bytes"] < 64 * SEGMENT, backup
        assert backup["checked_age_sec"] < 120, backup
        metrics = ssh(net, member, "python3 -c \"import urllib.request as u; "
                                   "print(u.urlopen('http://127.0.0.1:8000/metrics', timeout=5).read().decode())\"").stdout
        assert "dstack_vpn_backup_last_age_seconds " in metrics and "dstack_vpn_backup_archive_lag_bytes " in metrics
    assert "backup" not in fetch_status(hosts[CLIENT].netns, nodes[CLIENT]["address"])["body"]


def test_the_repository_holds_no_plaintext(net):
    marker = "plaintext-" + random.token_hex(16)
    assert psql(net, CLIENT, "primary", "CREATE TABLE IF NOT EXISTS marker (note text); "
                                        f"INSERT INTO marker VALUES (repeat('{marker} ', 50))").returncode == 0
    archive_wal(net)
    out = ssh(net, "node-b", "runuser -u postgres -- pgbackrest --config=/etc/dstack-vpn-postgres/pgbackrest.conf "
                             "--stanza=dstack-vpn --type=incr backup", timeout=600)
    assert out.returncode == 0, out.stderr
    secrets = _secrets(net)
    assert "postgres-backup-cipher" in secrets and "password-app" in secrets
    with tempfile.TemporaryDirectory() as tmp:
        n = net.store.download_all(BUCKET, Path(tmp))
        files = sorted(Path(tmp).iterdir())
        names = [f.name for f in files]
        assert n == len(files) and [x for x in names if "__archive__" in x] and [x for x in names if "__backup__" in x]
        found = sorted({(f.name, what) for f in files for what, s in
                        [("marker", marker), *secrets.items()] if s.encode() in f.read_bytes()})
        total = sum(f.stat().st_size for f in files)
    print(f"\n[backup] {n} objects ({total / 1e6:.1f} MB) downloaded from the repository: no row, password or key "
          f"found in any ({len(secrets) + 1} searched for)")
    assert found == [], found
    # and the same row is in the database, in the clear, to be found where it is
    assert marker in psql(net, CLIENT, "primary", "SELECT note FROM marker").stdout


def _content_hash(net) -> tuple[str, str]:
    out = psql(net, CLIENT, "primary", "SELECT count(*), md5(string_agg(id || ':' || payload, ',' ORDER BY id)) "
                                       "FROM pitr").stdout.strip()
    count, digest = out.split("|")
    return count, digest


def test_a_point_in_time_restore_brings_back_exactly_the_rows_before_the_target(net):
    assert psql(net, CLIENT, "primary", "CREATE TABLE pitr (id int PRIMARY KEY, payload text)").returncode == 0
    assert psql(net, CLIENT, "primary", "INSERT INTO pitr SELECT i, md5(random()::text) "
                                        "FROM generate_series(1, 500) i").returncode == 0
    before = _content_hash(net)
    target = psql(net, CLIENT, "primary", "SELECT now()").stdout.strip()
    time.sleep(2)
    assert psql(net, CLIENT, "primary", "INSERT INTO pitr SELECT i, md5(random()::text) "
                                        "FROM generate_series(501, 800) i").returncode == 0
    after = _content_hash(net)
    assert after[0] == "800" and before[0] == "500"
    archive_wal(net)
    net.pg = pg = dict(net.pg, restore={"generation": 1, "target": target})
    t0 = time.monotonic()
    result = net.up(postgres=pg)
    took = time.monotonic() - t0
    ops = sorted((a.op, a.name) for a in result.actions)
    assert not [o for o in ops if o[0] in ("replace", "delete")], ops
    restored = _content_hash(net)
    print(f"\n[backup] point-in-time restore to {target}: {took:.0f} s for the `up`; rows {restored[0]} "
          f"(before the target {before[0]}, after {after[0]}); content hash {'equal' if restored == before else 'DIFFERENT'}")
    assert restored == before
    view = cluster(net, "node-b")
    assert sorted(view) == sorted(MEMBERS) and all(s in ("running", "streaming") for _, s in view.values()), view
    for member in MEMBERS:  # the cluster before the restore is left where it was
        assert ssh(net, member, "test -f /var/lib/postgresql/15/dstack-vpn/PG_VERSION && echo kept").stdout.strip() \
            == "kept", member
    # the restored cluster archives and is backed up again
    assert archive_wal(net)
    assert psql(net, CLIENT, "primary", "INSERT INTO pitr VALUES (1000, 'after the restore')").returncode == 0
    assert net.up(postgres=pg).actions == []


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def test_every_member_wiped_and_restored_from_the_repository(net):
    """A power cut of all three members, their data directories gone; `up` with a restore to the
    latest archived WAL. Every write acknowledged before the end of the last archived segment
    comes back; what came later is the loss, printed."""
    start_writer(net)
    assert wait_until(lambda: len(acked_writes(net)) > 50, 60), "the writer never got going"
    time.sleep(25)  # more than archiveTimeout (10 s): segments reach the repository as the writes go on
    hosts = net.node_hosts()
    for member in MEMBERS:
        hosts[member].power_cut()
    time.sleep(2)
    ssh(net, CLIENT, "touch /run/lab-writer.stop")
    time.sleep(6)
    writes = {i: _lsn(lsn) for i, lsn in acked_writes(net).items()}
    tried = int(ssh(net, CLIENT, "cat /run/lab-writer.tried").stdout.strip())
    # the newest WAL segment in the repository, and where it ends
    segments = sorted(k.rsplit("/", 1)[-1].split("-")[0] for k in net.store.keys(BUCKET)
                      if "/archive/" in k and len(k.rsplit("/", 1)[-1].split("-")[0]) == 24)
    last = segments[-1]
    archived_end = (int(last[8:16], 16) << 32) + (int(last[16:24], 16) + 1) * SEGMENT
    covered = {i for i, lsn in writes.items() if lsn <= archived_end}
    for member in MEMBERS:  # the disks' PostgreSQL data, every cluster's, gone
        data = hosts[member].upper / "var/lib/postgresql/15"
        for child in data.iterdir():
            ssh_free_remove(child)
        hosts[member].boot()
    for member in MEMBERS:
        hosts[member].wait_ssh(timeout=120)
    net.pg = pg = dict(net.pg, restore={"generation": 2, "target": "latest"})
    t0 = time.monotonic()
    net.up(postgres=pg)
    took = time.monotonic() - t0
    stored = {int(x) for x in psql(net, CLIENT, "primary", "SELECT id FROM acked").stdout.split()}
    lost = sorted(set(writes) - stored)
    print(f"\n[backup] all three members wiped, restored to the latest archived WAL in {took:.0f} s: "
          f"{len(writes)} acknowledged writes, {len(covered)} of them before the end of the last archived segment "
          f"({last}); {len(stored & set(writes))} back, {len(lost)} lost (all after it: "
          f"{all(i not in covered for i in lost)})")
    assert covered and covered <= stored, sorted(covered - stored)[:20]
    assert stored <= set(range(1, tried + 1)), sorted(stored - set(range(1, tried + 1)))[:20]
    view = cluster(net, "node-b")
    assert sorted(view) == sorted(MEMBERS) and all(s in ("running", "streaming") for _, s in view.values()), view


def ssh_free_remove(path: Path) -> None:
    """Remove a tree of a powered-off host's disk from this machine."""
    import shutil
    shutil.rmtree(path)

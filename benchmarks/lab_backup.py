"""Backups of the lab's PostgreSQL cluster, measured (issue 16's figures), in one run:

- a database of --scale pgbench scale (70: about 1.05 GB on disk), loaded through the primary
  from a replica's host (pgbench comes with the server package);
- a full backup of it, taken by the timer's service on the member whose turn it is (a replica):
  the seconds, and the database's size divided by them (MB/s), with what the repository holds;
- WAL archive lag under pgbench's read-write load (4 clients, over the overlay from a replica's
  host):
  bytes of WAL the primary has written past the newest archived segment, sampled every second
  (archiveTimeout 10 s in the lab stack; 16 MB segments);
- a restore of the whole cluster to the latest archived WAL (postgres.restore, one `up`): its
  seconds, until every member runs again; and the rows checked.

Run as root: .venv/bin/python benchmarks/lab_backup.py [--scale 70] [--seconds 30]
Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.example import LabNetwork, stack_settings  # noqa: E402

LAB = "dvq"
CONF = "/etc/dstack-vpn-postgres/patroni.yml"
PGBACKREST = "runuser -u postgres -- pgbackrest --config=/etc/dstack-vpn-postgres/pgbackrest.conf --stanza=dstack-vpn"
MEMBERS = ("node-a", "node-b", "node-e")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=70)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    LabNetwork(name=LAB, log=lambda *_: None).lab.cleanup_stale()
    net = LabNetwork(name=LAB, log=lambda *_: None)
    try:
        net.lab.prepare()
        first = net.up()
        passwords = first.outputs["postgresPasswords"]
        hosts = net.node_hosts()

        def ssh(node, command, stdin=None, timeout=3600):
            return net.lab.ssh(hosts[node], command, stdin=stdin, timeout=timeout)

        def leader():
            rows = json.loads(ssh("node-b", f"patronictl -c {CONF} list -f json", timeout=30).stdout)
            return next(r["Member"] for r in rows if r["Role"] == "Leader" and r["State"] == "running")

        def local_sql(member, sql):
            return ssh(member, f"runuser -u postgres -- psql -X -qAt -h /run/postgresql/dstack-vpn -d app "
                               f"-c {shlex.quote(sql)}").stdout.strip()

        out = net.last_outputs()["postgres"]
        uri = out["primary"]["app"]
        pw = passwords["app"] + "\n"
        lead = leader()
        # pgbench comes with the server package: it runs on a replica's host, through the overlay
        runner = next(m for m in MEMBERS if m != lead)
        t0 = time.monotonic()
        init = ssh(runner, f"read -r PGPASSWORD; export PGPASSWORD; pgbench -i -q -s {args.scale} "
                             f"{shlex.quote(uri)}", stdin=pw)
        assert init.returncode == 0, init.stderr[-2000:]
        load_seconds = time.monotonic() - t0
        db_bytes = int(local_sql(lead, "SELECT pg_database_size('app')"))
        # the full backup, by the timer's own service (the first streaming replica takes it)
        before = len(json.loads(ssh("node-b", f"{PGBACKREST} info --output=json").stdout)[0]["backup"])
        t0 = time.monotonic()
        for member in MEMBERS:
            done = ssh(member, "systemctl start dstack-vpn-backup@full.service")
            assert done.returncode == 0, done.stderr
        backup_seconds = time.monotonic() - t0
        info = json.loads(ssh("node-b", f"{PGBACKREST} info --output=json").stdout)[0]
        assert len(info["backup"]) == before + 1, info["backup"]
        newest = info["backup"][-1]
        # WAL archive lag under load: the primary's position past the newest archived segment
        samples: list[int] = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                row = local_sql(lead, "SELECT pg_current_wal_lsn()::text || ' ' || coalesce(last_archived_wal, '') "
                                      "FROM pg_stat_archiver")
                lsn, _, wal = row.partition(" ")
                if "/" in lsn and len(wal) == 24:
                    hi, lo = lsn.split("/")
                    position = (int(hi, 16) << 32) | int(lo, 16)
                    end = (int(wal[8:16], 16) << 32) + (int(wal[16:24], 16) + 1) * 16 * 1024 * 1024
                    samples.append(max(0, position - end))
                time.sleep(1)
        sampler = threading.Thread(target=sample)
        sampler.start()
        bench = ssh(runner, f"read -r PGPASSWORD; export PGPASSWORD; pgbench -c 4 -j 2 -T {args.seconds} -n "
                              f"{shlex.quote(uri)}", stdin=pw)
        stop.set()
        sampler.join()
        tps = next((line.split("=")[1].split()[0] for line in bench.stdout.splitlines() if line.startswith("tps")), None)
        count = local_sql(leader(), "SELECT count(*) FROM pgbench_accounts")
        # everything archived, then the cluster restored from the repository
        segment = local_sql(leader(), "SELECT pg_walfile_name(pg_switch_wal())")
        end = time.monotonic() + 120
        while local_sql(leader(), "SELECT last_archived_wal FROM pg_stat_archiver") < segment and time.monotonic() < end:
            time.sleep(1)
        pg = dict(stack_settings()["postgres"], restore={"generation": 1, "target": "latest"})
        t0 = time.monotonic()
        net.up(postgres=pg)
        restore_seconds = time.monotonic() - t0
        restored = local_sql(leader(), "SELECT count(*) FROM pgbench_accounts")
        result = {
            "database_bytes": db_bytes, "pgbench_scale": args.scale, "load_seconds": round(load_seconds, 1),
            "full_backup_seconds": round(backup_seconds, 1),
            "full_backup_mb_per_s": round(db_bytes / 1e6 / backup_seconds, 1),
            "backup_reported_by_pgbackrest": {"size": newest["info"]["size"],
                                              "repository_bytes": newest["info"]["repository"]["delta"],
                                              "seconds": newest["timestamp"]["stop"] - newest["timestamp"]["start"]},
            "pgbench_tps_during_lag_sampling": tps,
            "archive_lag_bytes": {"samples": len(samples), "max": max(samples, default=None),
                                  "median": statistics.median(samples) if samples else None},
            "restore_seconds": round(restore_seconds, 1),
            "rows": {"before": count, "after_restore": restored},
        }
        print(json.dumps(result, indent=1))
        return 0 if restored == count else 1
    finally:
        net.down()


if __name__ == "__main__":
    sys.exit(main())

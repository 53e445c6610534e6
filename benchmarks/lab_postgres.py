"""The lab's PostgreSQL cluster, measured (issue 15's figures), in one run:

- `up` from nothing to a writable cluster (the lab stack: three members, a client);
- pgbench TPS, read-write (TPC-B-like) and read-only (-S), over the overlay (from a replica's host
  to the primary's overlay address, through the hub) against the same pgbench on the primary's
  own host (to its own overlay address: loopback, the same TLS and authentication), alternated,
  as a ratio;
- replication lag (bytes of WAL not yet replayed, and replay_lag) on the primary, sampled every
  second while the read-write load runs over the overlay;
- failover: the primary's host powered off, seconds until a client's write through the
  `primary` connection string succeeds again.

Run as root: .venv/bin/python benchmarks/lab_postgres.py [--seconds 20] [--scale 10] [--rounds 2]
Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.example import LabNetwork  # noqa: E402

LAB = "dvg"
CONF = "/etc/dstack-vpn-postgres/patroni.yml"


class Cluster:
    def __init__(self, net: LabNetwork, passwords: dict):
        self.net, self.passwords = net, passwords
        self.out = net.last_outputs()["postgres"]

    def ssh(self, node, command, stdin=None, timeout=600):
        return self.net.lab.ssh(self.net.node_hosts()[node], command, stdin=stdin, timeout=timeout)

    def leader(self, via) -> str | None:
        out = self.ssh(via, f"patronictl -c {CONF} list -f json", timeout=30)
        if out.returncode != 0:
            return None
        rows = json.loads(out.stdout)
        return next((r["Member"] for r in rows if r["Role"] == "Leader" and r["State"] == "running"), None)

    def conninfo(self, address: str) -> str:
        return (f"host={address} port=5432 dbname=app user=app sslmode=verify-full "
                f"sslrootcert={self.out['caPath']}")

    def pgbench(self, node, address, args: str) -> float | None:
        """pgbench on `node` against `address`; its TPS (the password on stdin, never argv), None
        for an initialisation (-i)."""
        command = (f"read -r PGPASSWORD; export PGPASSWORD; pgbench {args} {shlex.quote(self.conninfo(address))}")
        out = self.ssh(node, command, stdin=self.passwords["app"] + "\n")
        assert out.returncode == 0, out.stderr[-2000:]
        if args.startswith("-i"):
            return None
        match = re.search(r"tps = ([0-9.]+) \((?:without initial connection time|excluding connections)", out.stdout)
        assert match, out.stdout
        return float(match.group(1))

    def lag(self, primary) -> tuple[int, float]:
        """Bytes of WAL the replicas have not replayed (the most of them) and the longest replay_lag (s)."""
        sql = ("SELECT coalesce(max(pg_current_wal_lsn() - replay_lsn), 0)::bigint, "
               "coalesce(extract(epoch from max(replay_lag)), 0) FROM pg_stat_replication")
        out = self.ssh(primary, f"runuser -u postgres -- psql -X -qAt -F ' ' -h /run/postgresql/dstack-vpn "
                                f"-c {shlex.quote(sql)}", timeout=30)
        parts = out.stdout.split()
        return (int(parts[0]), float(parts[1])) if len(parts) == 2 else (0, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20, help="each pgbench run (default 20)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10: 1M accounts)")
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds of each pair (default 2)")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    LabNetwork(name=LAB, log=lambda *_: None).lab.cleanup_stale()
    net = LabNetwork(name=LAB, log=lambda *_: None)
    figures: dict = {"seconds": args.seconds, "scale": args.scale, "clients": args.clients, "rounds": args.rounds}
    try:
        net.lab.prepare()
        net.settings()  # the `ssh` hosts exist before `up`, as they would for real
        t0 = time.monotonic()
        result = net.up()
        figures["up_to_writable_cluster_s"] = round(time.monotonic() - t0, 1)
        figures["up_actions"] = len(result.actions)
        c = Cluster(net, result.outputs["postgresPasswords"])
        members = list(c.out["members"])
        primary = c.leader(members[0]) or c.leader(members[1])
        replica = next(m for m in members if m != primary)
        address = c.out["members"][primary]
        figures.update(primary=primary, overlay_client=replica)
        c.pgbench(primary, address, f"-i -q -s {args.scale}")
        runs: dict[str, list[float]] = {"rw_loopback": [], "rw_overlay": [], "ro_loopback": [], "ro_overlay": []}
        lag_bytes, lag_seconds = [], []
        common = f"-n -c {args.clients} -j 2 -T {args.seconds}"
        for _ in range(args.rounds):
            for mode, extra in (("rw", ""), ("ro", " -S")):
                runs[f"{mode}_loopback"].append(c.pgbench(primary, address, common + extra))
                stop = threading.Event()

                def sample():
                    while not stop.is_set():
                        b, s = c.lag(primary)
                        lag_bytes.append(b)
                        lag_seconds.append(s)
                        time.sleep(1)
                sampler = threading.Thread(target=sample, daemon=True)
                if mode == "rw":
                    sampler.start()
                runs[f"{mode}_overlay"].append(c.pgbench(replica, address, common + extra))
                stop.set()
                if mode == "rw":
                    sampler.join(10)
        for name, values in runs.items():
            figures[f"tps_{name}"] = round(statistics.median(values), 1)
            figures[f"tps_{name}_runs"] = [round(v, 1) for v in values]
        for mode in ("rw", "ro"):
            figures[f"ratio_{mode}_overlay_to_loopback"] = round(
                figures[f"tps_{mode}_overlay"] / figures[f"tps_{mode}_loopback"], 3)
        figures["replication_lag_bytes_max"] = max(lag_bytes or [0])
        figures["replication_lag_bytes_median"] = int(statistics.median(lag_bytes or [0]))
        figures["replay_lag_s_max"] = round(max(lag_seconds or [0]), 3)
        # failover: the primary's host loses power; a client's write through the primary URI
        uri = c.out["primary"]["app"]
        write = (f"read -r PGPASSWORD; export PGPASSWORD PGCONNECT_TIMEOUT=2; "
                 f"psql -X -qAt {shlex.quote(uri)} -c 'CREATE TABLE IF NOT EXISTS beat (t timestamptz); "
                 f"INSERT INTO beat VALUES (now())'")
        assert c.ssh("node-c", write, stdin=c.passwords["app"] + "\n").returncode == 0
        t0 = time.monotonic()
        net.node_hosts()[primary].power_cut()
        while time.monotonic() - t0 < 180:
            if c.ssh("node-c", write, stdin=c.passwords["app"] + "\n", timeout=30).returncode == 0:
                break
            time.sleep(0.5)
        figures["failover_to_writable_s"] = round(time.monotonic() - t0, 1)
        figures["new_primary"] = c.leader(replica)
        print(json.dumps(figures, indent=1), flush=True)
        host = net.node_hosts()[primary]  # back on, so that destroy reaches it
        host.boot()
        host.wait_ssh(timeout=120)
    finally:
        net.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The PostgreSQL cluster of the lab stack, for real: node-a (a droplet), node-b and node-e (`ssh`
hosts), all Debian 12 with PostgreSQL 15, Patroni and etcd from the distribution; node-c (Debian 13)
a client; node-d (the dstack spoke) and the hub outsiders.

The tests run in order on one lab network: it converges and replicates, the ports are reachable
by exactly whom they should be, nothing secret leaks, a parameter changes in place, a switchover
moves the primary, a power cut fails it over without losing an acknowledged write and the old
primary comes back as a replica, and destroy leaves the data directories. Figures are printed.

    CI=true .venv/bin/python -m pytest -q -s tests/e2e/test_lab_postgres.py
"""
from __future__ import annotations

import json
import shlex
import time

import pytest

from conftest import need_tool
from labnet import lab_network, wait_until
from probes import probe
from test_lab_network import CommandLines, journal_text, process_texts

MEMBERS = ("node-a", "node-b", "node-e")
CLIENT = "node-c"
OUTSIDER = "node-d"
PORTS = [5432, 8008, 2379, 2380]
CONF = "/etc/dstack-vpn-postgres/patroni.yml"
DATA = "/var/lib/postgresql/15/dstack-vpn"
# The bound the failover must meet: Patroni's leader key lives ttl = 30 s; the sync standby takes
# it at its next loop (loop_wait 10 s) at the latest, then promotes; measured here 31-47 s (the
# closing note of issue 15), so 70 s leaves room for a busier machine.
FAILOVER_BOUND = 70
# The old primary back as a replica after its power cut (pg_rewind, then replay): within 180 s in
# every run until one clean-clone CI run took 183 s (2026-12-03, after the monitor's lab module);
# 300 s, until it is understood (the closing note of issue 17 says so).
REJOIN_BOUND = 300


@pytest.fixture(scope="module")
def net():
    need_tool("ip")
    with lab_network("dvp", postgres=True) as network:
        t0 = time.monotonic()
        with CommandLines() as lines:
            network.first_up = network.up()
        network.first_up_seconds = time.monotonic() - t0
        network.command_lines = lines.seen
        network.passwords = network.first_up.outputs["postgresPasswords"]
        from lab.example import stack_settings
        network.pg = stack_settings()["postgres"]  # the cluster's setting as the tests change it
        print(f"\n[postgres] up from nothing to a writable cluster: {network.first_up_seconds:.0f} s, "
              f"{len(network.first_up.actions)} actions")
        yield network


def ssh(net, node, command, stdin=None, timeout=60):
    return net.lab.ssh(net.node_hosts()[node], command, stdin=stdin, timeout=timeout)


def psql(net, node, target, sql, user="app", timeout=60):
    """psql on a node as a client does: TLS checked against the cluster's CA, the password on
    stdin (into the environment of this one psql, never its arguments). target: a connection
    string or "primary"/"replicas" (the stack outputs) or a member's address."""
    out = net.last_outputs()["postgres"]
    if target in ("primary", "replicas"):
        uri = out[target]["app"].replace("postgresql://app@", f"postgresql://{user}@")
        if user == "postgres":
            uri = uri.replace("/app?", "/postgres?")
    elif "=" in target:
        uri = target
    else:
        uri = (f"host={target} port=5432 dbname={'app' if user == 'app' else 'postgres'} user={user} "
               f"sslmode=verify-full sslrootcert={out['caPath']}")
    command = (f"read -r PGPASSWORD; export PGPASSWORD PGCONNECT_TIMEOUT=5; "
               f"psql -X -qAt -v ON_ERROR_STOP=1 {shlex.quote(uri)} -c {shlex.quote(sql)}")
    return ssh(net, node, command, stdin=net.passwords[user] + "\n", timeout=timeout)


def local_sql(net, member, sql):
    """As the postgres user on a member, over its own socket (peer authentication)."""
    return ssh(net, member, f"runuser -u postgres -- psql -X -qAt -h /run/postgresql/dstack-vpn "
                            f"-c {shlex.quote(sql)}")


def cluster(net, via):
    """Patroni's view: member -> (role, state), from patronictl on a member."""
    out = ssh(net, via, f"patronictl -c {CONF} list -f json")
    if out.returncode != 0:
        return {}
    return {r["Member"]: (r["Role"], r["State"]) for r in json.loads(out.stdout)}


def primary(net, via=None) -> str | None:
    vias = [via] if via else [m for m in MEMBERS if net.node_hosts()[m].running]
    for v in vias:
        leaders = [m for m, (role, state) in cluster(net, v).items() if role == "Leader" and state == "running"]
        if leaders:
            return leaders[0]
    return None


def test_three_members_converge_and_replicate(net):
    view = cluster(net, "node-b")
    assert sorted(view) == sorted(MEMBERS), view
    assert [m for m, (role, _) in view.items() if role == "Leader"] and \
        all(state in ("running", "streaming") for _, state in view.values()), view
    made = psql(net, CLIENT, "primary", "CREATE TABLE IF NOT EXISTS hello (id int PRIMARY KEY, note text); "
                                        "INSERT INTO hello VALUES (1, 'over the overlay') ON CONFLICT DO NOTHING")
    assert made.returncode == 0, made.stderr
    lead = primary(net)
    for member in MEMBERS:
        if member == lead:
            continue
        address = net.nodes()[member]["address"]
        assert wait_until(lambda: psql(net, CLIENT, address, "SELECT note FROM hello WHERE id = 1").stdout.strip()
                          == "over the overlay", 30), member
        assert psql(net, CLIENT, address, "SELECT pg_is_in_recovery()").stdout.strip() == "t"
    # both replicas stream from the primary; with synchronous replication, one of them in sync
    states = lambda: local_sql(net, lead, "SELECT state || ' ' || sync_state FROM pg_stat_replication").stdout.split("\n")  # noqa: E731
    assert wait_until(lambda: sorted(s.strip() for s in states() if s.strip()) == ["streaming async", "streaming sync"],
                      60), states()
    print(f"\n[postgres] primary {lead}; pg_stat_replication: {sorted(s for s in states() if s)}")


def test_status_pages_say_each_members_role_from_patroni(net):
    from test_lab_network import fetch_status

    hosts, nodes = net.node_hosts(), net.nodes()
    view = cluster(net, "node-b")
    expected = {m: "primary" if view[m][0] == "Leader" else "replica" for m in MEMBERS}
    seen = {}
    for member in MEMBERS:
        doc = fetch_status(hosts[CLIENT].netns, nodes[member]["address"])["body"]
        seen[member] = doc.get("postgres", {}).get("role")
        assert doc["postgres"]["source"] == "patroni", doc
    assert seen == expected
    # a spoke outside the cluster reports no PostgreSQL at all
    assert "postgres" not in fetch_status(hosts[CLIENT].netns, nodes[CLIENT]["address"])["body"]


def test_second_up_changes_nothing(net):
    result = net.up()
    assert result.actions == [], [(a.op, a.name) for a in result.actions]


def test_only_members_and_clients_reach_the_cluster_and_only_over_tls(net):
    hosts, nodes = net.node_hosts(), net.nodes()
    table = {}
    for source in ("hub", OUTSIDER, CLIENT, "node-b"):
        for member in ("node-a", "node-e"):
            seen = probe(hosts[source].netns, nodes[member]["address"], tcp=PORTS, timeout=2)["tcp"]
            table[(source, member)] = {p: v for p, v in seen.items()}
    print("\n[postgres] probe table (from -> member: port state)")
    for (source, member), seen in table.items():
        print(f"  {source:>7} -> {member}: " + ", ".join(f"{p} {v}" for p, v in sorted(seen.items())))
    for member in ("node-a", "node-e"):
        assert all(v == "filtered" for v in table[("hub", member)].values()), table
        assert all(v == "filtered" for v in table[(OUTSIDER, member)].values()), table
        assert table[(CLIENT, member)] == {5432: "open", 8008: "filtered", 2379: "filtered", 2380: "filtered"}
        assert all(v == "open" for v in table[("node-b", member)].values()), table  # the probe can see open
    address = nodes["node-a"]["address"]
    plain = psql(net, CLIENT, f"host={address} dbname=app user=app sslmode=disable", "SELECT 1")
    assert plain.returncode != 0 and "no encryption" in plain.stderr, plain.stderr
    made = ssh(net, CLIENT, "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 "
                            "-subj /CN=other -keyout /run/other.key -out /run/other.crt 2>/dev/null")
    assert made.returncode == 0
    wrong = psql(net, CLIENT, f"host={address} dbname=app user=app sslmode=verify-full sslrootcert=/run/other.crt",
                 "SELECT 1")
    assert wrong.returncode != 0 and "certificate verify failed" in wrong.stderr, wrong.stderr
    right = psql(net, CLIENT, address, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert right.returncode == 0 and right.stdout.strip() == "t", right.stderr
    ssh(net, CLIENT, "rm -f /run/other.key /run/other.crt")


def _secrets(net) -> dict[str, str]:
    """Every password and private key of the cluster (and the WireGuard keys, the backups' cipher
    passphrase and the repository's secret key), from the state and the lab's object store."""
    from lab.objectstore import ObjectStore
    out = {f"password-{u}": p for u, p in net.passwords.items()}
    out["repository-secret"] = ObjectStore(net.lab).credentials()[1]
    for record in net.engine.state.records.values():
        if record.type != "pulumi-python:dynamic:Resource":
            continue
        name, kind, private = record.urn.split("::")[-1], record.outputs.get("kind"), record.outputs["private_key"]
        if kind in ("wireguard", "preshared", "password"):
            out[name] = private
        elif kind in ("tls-ca", "tls-cert"):
            # the PEM's body lines that carry the private scalar (the last holds the public point)
            for i, line in enumerate(private.strip().splitlines()[1:-2]):
                out[f"{name}-{i}"] = line
    return out


def test_no_password_or_private_key_outside_its_file(net):
    secrets = _secrets(net)
    assert len([k for k in secrets if k.startswith("password-")]) == 3
    assert "postgres-backup-cipher" in secrets and [k for k in secrets if k.startswith("node-a-pgbackrest-cert")]
    assert len([k for k in secrets if k.startswith("postgres-ca")]) >= 1
    # the outputs kept in the clear, and the command lines of every process while `up` ran
    public = json.dumps(net.last_outputs())
    assert not [n for n, s in secrets.items() if s in public]
    assert not sorted({n for n, s in secrets.items() for line in net.command_lines if s.encode() in line})
    allowed = {"etc/wireguard/wg0.conf", "etc/dstack-vpn-postgres/patroni.yml", "etc/dstack-vpn-postgres/member.key",
               "etc/dstack-vpn-etcd/member.key", "var/lib/postgresql/.pgpass-dstack-vpn",
               "etc/dstack-vpn-postgres/pgbackrest.conf", "etc/dstack-vpn-postgres/pgbackrest.key"}
    for node in MEMBERS + (CLIENT,):
        host = net.node_hosts()[node]
        found = sorted({(str(p.relative_to(host.upper)), n) for p in host.upper.rglob("*")
                        if p.is_file() and not p.is_symlink() and not str(p.relative_to(host.upper)).startswith(
                            "var/lib/postgresql/15/dstack-vpn/")
                        for n, s in secrets.items() if s.encode() in p.read_bytes()})
        assert [f for f in found if f[0] not in allowed] == [], (node, found)
        for path in allowed - {"etc/wireguard/wg0.conf"}:
            if (host.upper / path).exists():
                mode = ssh(net, node, f"stat -c '%a %U' /{path}").stdout.split()
                assert mode[0] == "600" and mode[1] in ("postgres", "etcd"), (node, path, mode)
        leaks = [(what, n) for what, data in process_texts(host) for n, s in secrets.items() if s.encode() in data]
        assert leaks == [], (node, leaks)
        journal = journal_text(host)
        assert journal and not [n for n, s in secrets.items() if s in journal], node
    # the data directory holds SCRAM verifiers, not passwords
    for member in MEMBERS:
        found = ssh(net, member, f"grep -rlaF -f /dev/stdin {DATA} || true",
                    stdin="\n".join(net.passwords.values()) + "\n").stdout.split()
        assert found == [], (member, found)


def test_a_parameter_changes_in_place_on_every_member(net):
    net.pg = pg = dict(net.pg, parameters={"work_mem": "8MB"})
    result = net.up(postgres=pg)
    assert sorted((a.op, a.name) for a in result.actions) == [("update", f"{m}-postgres") for m in MEMBERS]
    for member in MEMBERS:
        assert wait_until(lambda: local_sql(net, member, "SHOW work_mem").stdout.strip() == "8MB", 30), member
    assert net.up(postgres=pg).actions == []


def test_a_password_rotation_takes_the_old_one_away(net):
    before = dict(net.passwords)
    old = before["app"]
    net.pg = dict(net.pg, passwordRotation={"app": 1})
    result = net.up(postgres=net.pg)
    net.passwords = result.outputs["postgresPasswords"]
    assert net.passwords["app"] != old and net.passwords["postgres"] == before["postgres"]
    # a new key (replaced: the engine reports the replacement and the old key's deletion), and the
    # step that sets the users' verifiers on the primary; nothing else
    assert sorted((a.op, a.name) for a in result.actions) == [
        ("delete", "postgres-app-password"), ("replace", "postgres-app-password"), ("update", "node-e-postgres")]
    assert psql(net, CLIENT, "primary", "SELECT count(*) FROM hello").returncode == 0
    stale = dict(net.passwords, app=old)
    kept, net.passwords = net.passwords, stale
    try:
        refused = psql(net, CLIENT, "primary", "SELECT 1")
    finally:
        net.passwords = kept
    assert refused.returncode != 0 and "password authentication failed" in refused.stderr, refused.stderr


def test_a_switchover_moves_the_primary(net):
    before = primary(net)
    candidate = next(m for m in MEMBERS if m != before and cluster(net, "node-b")[m][0] == "Sync Standby") \
        if any(r == "Sync Standby" for r, _ in cluster(net, "node-b").values()) else next(m for m in MEMBERS if m != before)
    t0 = time.monotonic()
    out = ssh(net, "node-b", f"patronictl -c {CONF} switchover dstack-vpn --leader {before} --candidate {candidate} --force",
              timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait_until(lambda: primary(net) == candidate, 60)
    assert wait_until(lambda: psql(net, CLIENT, "primary", "INSERT INTO hello VALUES (2, 'after switchover') "
                                                        "ON CONFLICT DO NOTHING").returncode == 0, 60)
    print(f"\n[postgres] switchover {before} -> {candidate}: writable through the primary URI after "
          f"{time.monotonic() - t0:.1f} s")
    # the old primary follows the new one
    assert wait_until(lambda: cluster(net, "node-b").get(before, ("", ""))[1] in ("running", "streaming")
                      and cluster(net, "node-b")[before][0] != "Leader", 60)


WRITER = r"""
set -u
read -r pw
umask 077
printf '*:*:*:app:%s\n' "$pw" >/run/lab-writer.pgpass
export PGPASSFILE=/run/lab-writer.pgpass
: >/run/lab-writer.acked
i=0
while [ ! -e /run/lab-writer.stop ]; do
	i=$((i + 1))
	echo "$i" >/run/lab-writer.tried
	# the second command runs after the first one's commit: its WAL position is past the commit
	if lsn=$(psql -X -qAt "$1" -c "INSERT INTO acked VALUES ($i)" -c "SELECT pg_current_wal_lsn()" 2>/dev/null); then
		echo "$i $lsn" >>/run/lab-writer.acked
	fi
done
"""


def start_writer(net) -> None:
    """A writer on the client: one row at a time into `acked` through the `primary` connection
    string, each acknowledged id (and the primary's WAL position after its commit) appended to
    /run/lab-writer.acked. The password reaches it on its stdin, through a 0600 file on a tmpfs
    removed at once."""
    uri = net.last_outputs()["postgres"]["primary"]["app"]
    assert psql(net, CLIENT, "primary", "CREATE TABLE IF NOT EXISTS acked (id int PRIMARY KEY)").returncode == 0
    ssh(net, CLIENT, "rm -f /run/lab-writer.stop /run/lab-writer.acked")
    ssh(net, CLIENT, "umask 077; cat >/run/lab-writer.pw", stdin=net.passwords["app"] + "\n")
    started = ssh(net, CLIENT, f"nohup bash -c {shlex.quote(WRITER)} writer {shlex.quote(uri)} </run/lab-writer.pw "
                               f">/dev/null 2>&1 & sleep 1; rm -f /run/lab-writer.pw; echo started")
    assert "started" in started.stdout


def acked_writes(net) -> dict[int, str]:
    """The writer's acknowledged ids so far, each with the WAL position after its commit."""
    rows = (line.split() for line in ssh(net, CLIENT, "cat /run/lab-writer.acked").stdout.splitlines())
    return {int(r[0]): r[1] for r in rows if len(r) == 2}


def test_a_power_cut_fails_over_without_losing_an_acknowledged_write(net):
    old = primary(net)
    hosts = net.node_hosts()
    start_writer(net)
    acked = lambda: len(acked_writes(net))  # noqa: E731
    assert wait_until(lambda: acked() > 100, 60), "the writer never got going"
    before_cut = acked()
    t0 = time.monotonic()
    hosts[old].power_cut()
    survivor = next(m for m in MEMBERS if m != old)
    new = wait_until(lambda: (primary(net, survivor) not in (None, old)) and primary(net, survivor), FAILOVER_BOUND + 30,
                     step=0.5)
    elected = time.monotonic() - t0
    grown = acked()
    writable = wait_until(lambda: acked() > grown, 60, step=0.5)
    writes_back = time.monotonic() - t0
    ssh(net, CLIENT, "touch /run/lab-writer.stop")
    time.sleep(3)
    ids = sorted(acked_writes(net))
    stored = {int(x) for x in psql(net, CLIENT, "primary", "SELECT id FROM acked").stdout.split()}
    lost = sorted(set(ids) - stored)
    print(f"\n[postgres] failover: {old} powered off; {new} primary after {elected:.1f} s (bound {FAILOVER_BOUND} s); "
          f"writes acknowledged again after {writes_back:.1f} s; {len(ids)} acknowledged ids "
          f"({before_cut} before the cut), {len(lost)} lost")
    assert new, "no new primary"
    assert elected <= FAILOVER_BOUND, elected
    assert writable, "no write went through after the failover"
    assert lost == [], lost[:20]
    # the old primary comes back as a replica of the new one
    hosts[old].boot()
    hosts[old].wait_ssh(timeout=120)
    t1 = time.monotonic()
    back = wait_until(lambda: cluster(net, survivor).get(old, ("", ""))[0] in ("Replica", "Sync Standby")
                      and cluster(net, survivor)[old][1] in ("running", "streaming"), REJOIN_BOUND, step=2)
    print(f"[postgres] {old} back as a replica {time.monotonic() - t1:.0f} s after it booted")
    assert back, cluster(net, survivor)
    old_address = net.nodes()[old]["address"]
    assert wait_until(lambda: psql(net, CLIENT, old_address, f"SELECT count(*) FROM acked WHERE id <= {max(ids)}")
                      .stdout.strip() == str(len(stored & set(range(max(ids) + 1)))), 60)


NODE_F = {"name": "node-f", "kind": "ssh", "address": "10.88.0.16", "host": "198.51.100.24", "user": "root"}


def etcd_members(net, via) -> list[str]:
    flags = ("--cacert=/etc/dstack-vpn-etcd/ca.crt --cert=/etc/dstack-vpn-etcd/member.crt "
             "--key=/etc/dstack-vpn-etcd/member.key")
    address = net.nodes()[via]["address"]
    out = ssh(net, via, f"ETCDCTL_API=3 etcdctl --endpoints=https://{address}:2379 {flags} member list -w json")
    return sorted(m.get("name", "") for m in json.loads(out.stdout)["members"])


def test_a_member_is_replaced_by_a_new_one(net):
    """node-e leaves the cluster and node-f (a new `ssh` spoke) joins it, in one `up`: node-f's etcd
    joins the running store, its PostgreSQL copies the primary's; node-e stays a spoke."""
    from lab.example import stack_settings

    net.pg = pg = dict(net.pg, members=["node-a", "node-b", "node-f"])
    if primary(net) == "node-e":  # DEPLOYMENT.md: move the primary off a member before it leaves
        sync = next(m for m, (role, _) in cluster(net, "node-b").items() if role == "Sync Standby")
        out = ssh(net, "node-b", f"patronictl -c {CONF} switchover dstack-vpn --leader node-e --candidate {sync} --force",
                  timeout=120)
        assert out.returncode == 0 and wait_until(lambda: primary(net) == sync, 60), out.stdout + out.stderr
    rows = psql(net, CLIENT, "primary", "SELECT count(*) FROM acked").stdout.strip()
    t0 = time.monotonic()
    result = net.up(spokes=stack_settings()["spokes"] + [NODE_F], postgres=pg)
    took = time.monotonic() - t0
    ops = sorted((a.op, a.name) for a in result.actions if a.op in ("create", "delete", "replace"))
    assert ("delete", "node-e-postgres") in ops and ("delete", "node-e-etcd") in ops, ops
    assert ("create", "node-f-etcd") in ops and ("create", "node-f-postgres") in ops, ops
    assert not [o for o in ops if o[0] == "replace"], ops
    assert etcd_members(net, "node-a") == ["node-a", "node-b", "node-f"]
    # node-e's Patroni stopped: its member key lives out its ttl (30 s) in etcd, marked "stopped"
    assert wait_until(lambda: sorted(cluster(net, "node-f")) == ["node-a", "node-b", "node-f"], 60), \
        cluster(net, "node-f")
    view = cluster(net, "node-f")
    assert all(state in ("running", "streaming") for _, state in view.values()), view
    address = net.nodes()["node-f"]["address"]
    assert wait_until(lambda: psql(net, CLIENT, address, "SELECT count(*) FROM acked").stdout.strip() == rows, 60)
    assert psql(net, CLIENT, "primary", "INSERT INTO hello VALUES (3, 'after node-f joined') "
                                        "ON CONFLICT DO NOTHING").returncode == 0
    assert "10.88.0.16:5432" in net.last_outputs()["postgres"]["primary"]["app"]
    # node-e is a spoke outside the cluster now: its cluster ports closed to everyone, its data kept
    assert ssh(net, "node-e", "systemctl is-active dstack-vpn-patroni.service dstack-vpn-etcd.service").stdout.split() \
        == ["inactive", "inactive"]
    print(f"\n[postgres] node-e replaced by node-f in one up: {took:.0f} s, {len(result.actions)} actions")


def test_destroy_leaves_the_data_directories(net):
    net.engine.destroy()
    for member in ("node-b", "node-e"):  # `ssh` hosts stay; node-a's droplet goes with its disk
        assert ssh(net, member, f"test -f {DATA}/PG_VERSION && echo kept").stdout.strip() == "kept", member
        gone = ssh(net, member, "systemctl is-enabled dstack-vpn-patroni.service dstack-vpn-etcd.service; "
                                "ls /etc/dstack-vpn-postgres /etc/dstack-vpn-etcd 2>&1 | grep -c 'No such'")
        assert gone.stdout.split()[-1] == "2", gone.stdout

{% include "scripts/_lib.sh" %}
{% include "scripts/_bundle.sh" %}
# stdin (secret): Patroni's settings (with the superuser's and replication passwords), this
# member's certificate and key, the cluster's CA{% if converging %}; and, on this member, which sets
# the cluster up, the users' SCRAM verifiers (setup.sql) and the superuser's pgpass{% endif %}.
DIR={{ conf_dir }}
{% include "scripts/_restore_guard.sh" %}
UNIT=/etc/systemd/system/dstack-vpn-patroni.service
have_systemd || { say "Patroni runs as a systemd service; this host has no systemd" >&2; exit 1; }
[ -x /usr/lib/postgresql/{{ version }}/bin/postgres ] ||
	{ say "PostgreSQL {{ version }} is not installed (postgres.version: the install step installs postgresql-{{ version }})" >&2; exit 1; }
command -v patroni >/dev/null || { say "patroni is not installed" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive_bundle "$stage"
install -d -m 0700 -o postgres -g postgres "$DIR"
# the cluster this member ran until now: another one after a restore (postgres.restore)
old_scope=$(sed -n 's/^scope: //p' "$DIR/patroni.yml" 2>/dev/null || true)
changed=
for f in ca.crt member.crt member.key patroni.yml; do
	install_changed 0600 postgres "$stage/$f" "$DIR/$f" && changed=1
done
umask 022
install -D -m 0644 "$stage/ca.crt" {{ ca_path | shquote }}
cat >"$stage/unit" <<'UNIT'
{% include "systemd/dstack-vpn-patroni.service" %}
UNIT
install_changed 0644 root "$stage/unit" "$UNIT" && changed=1
systemctl daemon-reload
systemctl enable --quiet dstack-vpn-patroni.service

# etcd first: Patroni without its store would not start PostgreSQL
etcd_health() {
	ETCDCTL_API=3 etcdctl --endpoints=https://{{ address }}:{{ etcd_port }} --cacert="$DIR/ca.crt" \
		--cert="$DIR/member.crt" --key="$DIR/member.key" --command-timeout=3s endpoint health >/dev/null 2>&1
}
for _ in $(seq {{ timeout }}); do etcd_health && break; sleep 1; done
etcd_health || { journalctl -u dstack-vpn-etcd.service -n 20 --no-pager >&2 || true
	say "etcd on {{ address }} is not healthy (are the other members' etcd up?)" >&2; exit 1; }

if [ -n "$old_scope" ] && [ "$old_scope" != {{ scope | shquote }} ]; then
	# a restore: the old cluster's PostgreSQL stops here (its data directory stays as it is); the
	# new cluster, {{ scope }}, is made from the repository by whichever member starts first, once
	# every member of the old one has stopped (restore.sh)
	say "leaving cluster $old_scope for {{ scope }} (postgres.restore); $old_scope's data stays where it was"
	systemctl stop dstack-vpn-patroni.service
	systemctl start dstack-vpn-patroni.service
elif ! systemctl is-active --quiet dstack-vpn-patroni.service; then
	systemctl start dstack-vpn-patroni.service
elif [ -n "$changed" ]; then
	# Patroni reads its settings again and applies the parameters; those that need a restart wait
	# for one (the last member's step restarts them one at a time)
	systemctl reload dstack-vpn-patroni.service
fi

# members: JSON of Patroni's view of the cluster (root reads the client certificate)
members() { patronictl -c "$DIR/patroni.yml" list -f json 2>/dev/null; }
# Patroni's API on this member answers, over TLS, checked against the CA
api_up() {
	python3 -I - <<'PY'
import json, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile="{{ conf_dir }}/ca.crt")
try:
    urllib.request.urlopen("https://{{ address }}:{{ patroni_port }}/patroni", context=ctx, timeout=3)
except urllib.error.HTTPError:
    pass  # 503 on a replica: it answers
except Exception:
    sys.exit(1)
PY
}
for _ in $(seq {{ timeout }}); do api_up && break; sleep 1; done
api_up || { journalctl -u dstack-vpn-patroni.service -n 30 --no-pager >&2 || true
	say "Patroni's API does not answer on {{ address }}:{{ patroni_port }}" >&2; exit 1; }
{% if converging %}

# A leader that is leaving the cluster (no longer among the members: its settings are not updated
# any more, so a new member could not copy from it) hands over to a member first, the synchronous
# standby where there is one.
hand_over() {
	local handover old_leader candidate
	handover=$(members | python3 -I -c '
import json, sys
rows = json.load(sys.stdin)
want = {{ members | tojson }}
leader = [r["Member"] for r in rows if r.get("Role") == "Leader"]
ready = [r for r in rows if r["Member"] in want and r.get("State") in ("running", "streaming") and r.get("Role") != "Leader"]
ready.sort(key=lambda r: r.get("Role") != "Sync Standby")
if leader and leader[0] not in want and ready:
    print(leader[0], ready[0]["Member"])' || true)
	[ -n "$handover" ] || return 0
	read -r old_leader candidate <<<"$handover"
	say "the leader $old_leader is leaving the cluster: switching over to $candidate"
	patronictl -c "$DIR/patroni.yml" switchover {{ scope }} --leader "$old_leader" --candidate "$candidate" \
		--force >/dev/null || true
}

# The cluster: one of the members the leader (LEADER=1), or every member running too
# ({{ members | join(", ") }}). A member being removed may still be listed: its steps are undone
# after this one.
converged() {
	members | LEADER=${1:-} python3 -I -c '
import json, os, sys
rows = {r["Member"]: r for r in json.load(sys.stdin)}
want = {{ members | tojson }}
up = [n for n in want if rows.get(n, {}).get("State") in ("running", "streaming")]
leaders = [n for n in want if rows.get(n, {}).get("Role") == "Leader" and rows[n].get("State") == "running"]
sys.exit(0 if len(leaders) == 1 and (os.environ["LEADER"] or len(up) == len(want)) else 1)'
}
end=$((SECONDS + {{ timeout }}))
wait_for() { # wait_for [leader]: until converged, or fail
	while [ "$SECONDS" -lt "$end" ]; do
		converged "${1:-}" && return 0
		hand_over
		sleep 1
	done
	patronictl -c "$DIR/patroni.yml" list >&2 || true
	say "the cluster did not converge within {{ timeout }} s: ${1:+a leader among }{{ members | join(", ") }}${1:-" running, one leader"}" >&2
	exit 1
}
# users and databases, on the primary (libpq finds it among the members) as soon as there is
# one: a member made from an older copy (a restore) needs the replication user's password now
wait_for leader
export PGPASSFILE="$stage/pgpass" PGSSLMODE=verify-full PGSSLROOTCERT="$DIR/ca.crt" PGCONNECT_TIMEOUT=5
primary="host={{ member_addresses | join(",") }} port={{ pg_port }} user=postgres dbname=postgres target_session_attrs=read-write"
psql -X -q -v ON_ERROR_STOP=1 "$primary" -f "$stage/setup.sql" >/dev/null
wait_for
# etcd members that are no longer in the cluster (a removed droplet: its steps undo nothing) leave
# the store, or etcd would count them for its quorum
ETCDCTL_API=3 etcdctl --endpoints=https://{{ address }}:{{ etcd_port }} --cacert="$DIR/ca.crt" \
	--cert="$DIR/member.crt" --key="$DIR/member.key" --command-timeout=5s member list -w json |
	python3 -I -c '
import json, sys
names = {{ peer_names | tojson }}
for m in json.load(sys.stdin)["members"]:
    if not set(m.get("peerURLs", [])) & set(names):
        print("%x" % m["ID"])' | while read -r gone; do
	ETCDCTL_API=3 etcdctl --endpoints=https://{{ address }}:{{ etcd_port }} --cacert="$DIR/ca.crt" \
		--cert="$DIR/member.crt" --key="$DIR/member.key" --command-timeout=5s member remove "$gone" >/dev/null &&
		say "removed etcd member $gone (no longer a member of the cluster)"
done
# the users' settings on every member before the step ends: libpq does not try the next host after an
# authentication failure, so a replica that has not replayed a user's new password yet would
# turn the `primary` connection string away
lsn=$(psql -X -qAt "$primary" -c "SELECT pg_current_wal_lsn()")
for host in {{ member_addresses | join(" ") }}; do
	end=$((SECONDS + 60))
	until [ "$(psql -X -qAt "host=$host port={{ pg_port }} user=postgres dbname=postgres" \
		-c "SELECT NOT pg_is_in_recovery() OR pg_last_wal_replay_lsn() >= '$lsn'" 2>/dev/null)" = t ]; do
		[ "$SECONDS" -lt "$end" ] || { say "member $host has not replayed the users' settings within 60 s" >&2; exit 1; }
		sleep 1
	done
done
# parameters that only take effect after a restart: one member at a time
if members | python3 -I -c 'import json, sys; sys.exit(0 if any(r.get("Pending restart") for r in json.load(sys.stdin)) else 1)'; then
	say "restarting members with pending parameters, one at a time"
	patronictl -c "$DIR/patroni.yml" restart {{ scope }} --pending --force >/dev/null
fi
patronictl -c "$DIR/patroni.yml" list
{% endif %}
say "PostgreSQL {{ version }} member {{ name }} on {{ address }}:{{ pg_port }} (dstack-vpn-patroni.service)"

#!/bin/sh
# Managed by dstack-vpn: rendered from templates/backup/restore.sh. Patroni's custom bootstrap
# (postgres.restore, generation {{ restore_generation }}): this cluster, {{ scope }}, begins as a copy of
# the repository's backups, recovered by PostgreSQL to the target Patroni gives it. Runs as postgres.
set -eu
datadir={{ data_dir | shquote }}
for arg; do case $arg in --datadir=*) datadir=${arg#--datadir=} ;; esac; done
say() { echo "dstack-vpn restore: $*" >&2; }

# Every member of an older cluster must have stopped first: one still running would take writes
# that the new cluster never sees. Their steps stop them in the same `pulumi up`; a stopped
# member's key leaves Patroni's store within its TTL.
etcd() {
	ETCDCTL_API=3 etcdctl --endpoints=https://{{ address }}:{{ etcd_port }} --cacert={{ conf_dir }}/ca.crt \
		--cert={{ conf_dir }}/member.crt --key={{ conf_dir }}/member.key --command-timeout=5s "$@"
}
i=0
while others=$(etcd get --prefix /dstack-vpn/ --keys-only | grep '/members/' | grep -v '^/dstack-vpn/{{ scope }}/' || true)
	[ -n "$others" ]; do
	[ $((i % 30)) -eq 0 ] && say "waiting for the old cluster's members to stop: $(echo $others)"
	i=$((i + 1))
	[ "$i" -lt 600 ] || { say "the old cluster's members still run after 600 s: $(echo $others)"; exit 1; }
	sleep 1
done

mkdir -p "$datadir" && chmod 0700 "$datadir"
say "restoring {{ scope }} into $datadir from the repository (target {{ target }})"
{{ pgbackrest }} --pg1-path="$datadir" --log-level-console=info \
{% if target == "latest" %}
	--type=default restore
{% else %}
	--type=time --target={{ target | shquote }} --target-action=promote restore
{% endif %}
# Recovery runs on Patroni's settings (bootstrap.pgbackrest.recovery_conf), not pgBackRest's:
# postgresql.auto.conf is copied to every replica, and one that carried a target would stop
# replaying there.
sed -i -e '/^restore_command/d' -e '/^recovery_target/d' "$datadir/postgresql.auto.conf"
rm -f "$datadir/recovery.signal" "$datadir/standby.signal"
say "restored; PostgreSQL recovers from the archived WAL now"

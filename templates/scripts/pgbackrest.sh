{% include "scripts/_lib.sh" %}
{% include "scripts/_bundle.sh" %}
# stdin (secret): pgbackrest.conf (the repository's access key, the cipher passphrase), this
# member's certificate and key for pgBackRest's TLS and the cluster's CA{% if repository_ca %}, the
# repository's CA{% endif %}.
DIR={{ conf_dir }}
# A restore is for good: a member that runs a restored cluster never goes back to an older one
# (its data is older than what the applications wrote since) because a setting was removed.
installed_scope=$(sed -n 's/^scope: //p' {{ conf_dir | shquote }}/patroni.yml 2>/dev/null || true)
case $installed_scope in dstack-vpn-r*) installed_generation=${installed_scope##*-r} ;; *) installed_generation=0 ;; esac
if [ "$installed_generation" -gt {{ restore_generation | default(0) }} ] 2>/dev/null; then
	say "this member runs the restored cluster $installed_scope: postgres.restore.generation must stay $installed_generation or more (was the restore setting removed or lowered? put it back)" >&2
	exit 1
fi
have_systemd || { say "pgBackRest's timers and server are systemd units; this host has no systemd" >&2; exit 1; }
command -v pgbackrest >/dev/null || { say "pgbackrest is not installed" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive_bundle "$stage"
install -d -m 0700 -o postgres -g postgres "$DIR"
changed=
for f in pgbackrest.conf ca.crt pgbackrest.crt pgbackrest.key{% if repository_ca %} repository-ca.crt{% endif %}; do
	install_changed 0600 postgres "$stage/$f" "$DIR/$f" && changed=1
done
install -d -m 0755 -o postgres -g postgres {{ state_dir | shquote }}
install -d -m 0750 -o postgres -g postgres {{ state_dir | shquote }}/log {{ state_dir | shquote }}/lock
install -d -m 0755 {{ lib_dir | shquote }}
put() { # put MODE DEST: stdin to DEST where it differs
	cat >"$stage/put"
	install_changed "$1" root "$stage/put" "$2" && changed=1
	return 0
}
put 0755 {{ lib_dir }}/backup-run.sh <<'SCRIPT'
{% include "backup/backup-run.sh" %}
SCRIPT
put 0755 {{ lib_dir }}/backup-status.sh <<'SCRIPT'
{% include "backup/backup-status.sh" %}
SCRIPT
put 0755 {{ lib_dir }}/restore.sh <<'SCRIPT'
{% include "backup/restore.sh" %}
SCRIPT
U=/etc/systemd/system
put 0644 $U/dstack-vpn-pgbackrest.service <<'UNIT'
{% include "systemd/dstack-vpn-pgbackrest.service" %}
UNIT
put 0644 $U/dstack-vpn-backup@.service <<'UNIT'
{% include "systemd/dstack-vpn-backup@.service" %}
UNIT
put 0644 $U/dstack-vpn-backup-full.timer <<'UNIT'
{% include "systemd/dstack-vpn-backup-full.timer" %}
UNIT
put 0644 $U/dstack-vpn-backup-diff.timer <<'UNIT'
{% include "systemd/dstack-vpn-backup-diff.timer" %}
UNIT
put 0644 $U/dstack-vpn-backup-status.service <<'UNIT'
{% include "systemd/dstack-vpn-backup-status.service" %}
UNIT
put 0644 $U/dstack-vpn-backup-status.timer <<'UNIT'
{% include "systemd/dstack-vpn-backup-status.timer" %}
UNIT
for cal in {{ schedule_full | shquote }} {{ schedule_diff | shquote }}; do
	systemd-analyze calendar "$cal" >/dev/null 2>&1 ||
		{ say "postgres.backup.schedule: $cal is not a calendar time systemd reads (man systemd.time)" >&2; exit 1; }
done
systemctl daemon-reload
systemctl enable --quiet dstack-vpn-pgbackrest.service dstack-vpn-backup-full.timer dstack-vpn-backup-diff.timer \
	dstack-vpn-backup-status.timer
if [ -n "$changed" ]; then
	systemctl restart dstack-vpn-pgbackrest.service dstack-vpn-backup-full.timer dstack-vpn-backup-diff.timer \
		dstack-vpn-backup-status.timer
else
	systemctl start dstack-vpn-pgbackrest.service dstack-vpn-backup-full.timer dstack-vpn-backup-diff.timer \
		dstack-vpn-backup-status.timer
fi
say "pgBackRest on {{ name }}: stanza {{ stanza }}, TLS server on {{ address }}:{{ tls_port }}, backups on schedule"

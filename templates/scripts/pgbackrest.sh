{% include "scripts/_lib.sh" %}
{% include "scripts/_bundle.sh" %}
# stdin (secret): pgbackrest.conf (the repository's access key, the cipher passphrase), this
# member's certificate and key for pgBackRest's TLS and the cluster's CA{% if repository_ca %}, the
# repository's CA{% endif %}.
DIR={{ conf_dir }}
{% include "scripts/_restore_guard.sh" %}
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
{% for unit in ["dstack-vpn-pgbackrest.service", "dstack-vpn-backup@.service", "dstack-vpn-backup-full.timer",
                "dstack-vpn-backup-diff.timer", "dstack-vpn-backup-status.service", "dstack-vpn-backup-status.timer"] %}
put 0644 "$U/{{ unit }}" <<'UNIT'
{% include "systemd/" ~ unit %}
UNIT
{% endfor %}
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

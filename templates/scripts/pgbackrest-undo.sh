{% include "scripts/_lib.sh" %}
# The backups stay in the repository; this member stops taking them.
if have_systemd; then
	systemctl disable --now --quiet dstack-vpn-pgbackrest.service dstack-vpn-backup-full.timer \
		dstack-vpn-backup-diff.timer dstack-vpn-backup-status.timer 2>/dev/null || true
	rm -f /etc/systemd/system/dstack-vpn-pgbackrest.service /etc/systemd/system/dstack-vpn-backup@.service \
		/etc/systemd/system/dstack-vpn-backup-full.timer /etc/systemd/system/dstack-vpn-backup-diff.timer \
		/etc/systemd/system/dstack-vpn-backup-status.service /etc/systemd/system/dstack-vpn-backup-status.timer
	systemctl daemon-reload
fi
rm -f {{ conf | shquote }} {{ conf_dir | shquote }}/repository-ca.crt
rm -f {{ lib_dir | shquote }}/backup-run.sh {{ lib_dir | shquote }}/backup-status.sh {{ lib_dir | shquote }}/restore.sh
rm -rf {{ state_dir | shquote }}
say "pgBackRest removed from {{ name }} (the repository keeps the backups)"

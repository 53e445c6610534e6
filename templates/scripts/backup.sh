{% include "scripts/_lib.sh" %}
# The cluster's backups begin: the stanza in the repository, a check that WAL reaches it, and a
# full backup when this host has not seen one taken for this cluster{% if restore_generation %} (restored: generation {{ restore_generation }}){% endif %}.
as_postgres() { runuser -u postgres -- "$@"; }
as_postgres {{ pgbackrest }} stanza-create >/dev/null
as_postgres {{ pgbackrest }} check
marker={{ state_dir | shquote }}/first-backup
if [ "$(cat "$marker" 2>/dev/null)" != "{{ restore_generation }}" ]; then
	say "taking a full backup"
	as_postgres {{ pgbackrest }} --type=full backup
	echo "{{ restore_generation }}" >"$marker"
fi
systemctl start dstack-vpn-backup-status.service
as_postgres {{ pgbackrest }} info

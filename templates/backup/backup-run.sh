#!/bin/sh
# Managed by dstack-vpn: rendered from templates/backup/backup-run.sh. A scheduled backup
# (dstack-vpn-backup@TYPE.service, as postgres). Every member's timer fires; one member takes it:
# the first streaming replica by name, or the primary when none is.
set -eu
type=${1:?full or diff}
choice=$(patronictl -c {{ conf_dir }}/patroni.yml list -f json | python3 -I -c '
import json, sys
rows = json.load(sys.stdin)
replicas = sorted(r["Member"] for r in rows if r.get("Role") in ("Replica", "Sync Standby")
                  and r.get("State") in ("running", "streaming"))
leaders = [r["Member"] for r in rows if r.get("Role") == "Leader" and r.get("State") == "running"]
print((replicas + leaders + [""])[0], "standby" if replicas else "primary")')
set -- $choice "$type"
if [ "${1:-}" != {{ name | shquote }} ]; then
	echo "the $type backup is taken by ${1:-no member (no primary running)}, not here"
	exit 0
fi
standby=y
[ "$2" = standby ] || standby=n
echo "taking a $type backup (from the $2)"
{{ pgbackrest }} --backup-standby=$standby --type="$type" backup
{{ lib_dir }}/backup-status.sh

#!/bin/sh
# Managed by dstack-vpn: rendered from templates/backup/backup-status.sh. What the status page says
# of backups ({{ status_file }}, no secret in it): the newest backup, the newest archived WAL
# segment and how far this member's WAL is past it. As postgres, every minute.
set -eu
info=$({{ pgbackrest }} info --output=json 2>&1) || true
lsn=$(psql -X -qAt -h {{ socket_dir }} -p {{ pg_port }} -U postgres -d postgres -c \
	"SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END" 2>/dev/null || true)
INFO=$info LSN=$lsn python3 -I - {{ status_file | shquote }} <<'PY'
import json, os, sys, time
out = {"checked": time.time(), "error": None, "last_backup": None, "archive_max_wal": None,
       "archive_lag_bytes": None}
try:
    stanzas = json.loads(os.environ["INFO"])
    stanza = stanzas[0]
    status = stanza.get("status", {})
    if status.get("code", 0) != 0:
        out["error"] = status.get("message")
    backups = stanza.get("backup", [])
    if backups:
        last = max(backups, key=lambda b: b["timestamp"]["stop"])
        out["last_backup"] = {"type": last["type"], "label": last["label"], "stop": last["timestamp"]["stop"],
                              "size": last["info"]["size"], "repo_size": last["info"]["repository"]["delta"]}
    wal = max((a.get("max") or "" for a in stanza.get("archive", [])), default="") or None
    out["archive_max_wal"] = wal
    lsn = os.environ.get("LSN", "")
    if wal and "/" in lsn:
        hi, lo = lsn.split("/")
        position = (int(hi, 16) << 32) | int(lo, 16)
        segment_end = ((int(wal[8:16], 16) << 32) + (int(wal[16:24], 16) + 1) * 16 * 1024 * 1024)
        out["archive_lag_bytes"] = max(0, position - segment_end)
except (ValueError, KeyError, IndexError, TypeError) as e:
    out["error"] = out["error"] or "pgbackrest info: %s" % os.environ["INFO"].strip()[-300:]
path = sys.argv[1]
with open(path + ".new", "w") as f:
    json.dump(out, f)
os.chmod(path + ".new", 0o644)
os.replace(path + ".new", path)
PY

{% include "scripts/_lib.sh" %}
# stdin: the status service program (status/dstack_vpn_status.py).
DIR={{ install_dir }}
SYSTEMD=/etc/systemd/system
# Where the root helper hands the status page the peer dump without keys.
RUNDIR=/run/dstack-vpn-status
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive "$stage/dstack_vpn_status.py"
python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' "$stage/dstack_vpn_status.py"
umask 022
mkdir -p "$DIR"
install_stdin 0644 "$DIR/dstack_vpn_status.py" <"$stage/dstack_vpn_status.py"

if have_systemd; then
	# The group that may open the helper's socket: the status page's throwaway user joins it. Not
	# named dstack-vpn-status: DynamicUser= takes that name for the page's own user and group.
	getent group dstack-vpn-wg-dump >/dev/null || groupadd --system dstack-vpn-wg-dump
	install_stdin 0644 "$SYSTEMD/dstack-vpn-status.service" <<'UNIT'
{% include "systemd/dstack-vpn-status.service" %}
UNIT
	install_stdin 0644 "$SYSTEMD/dstack-vpn-status-helper.socket" <<'UNIT'
{% include "systemd/dstack-vpn-status-helper.socket" %}
UNIT
	install_stdin 0644 "$SYSTEMD/dstack-vpn-status-helper.service" <<'UNIT'
{% include "systemd/dstack-vpn-status-helper.service" %}
UNIT
	# Earlier versions gave the page itself CAP_DAC_OVERRIDE for wireguard-go in a drop-in.
	rm -rf "$SYSTEMD/dstack-vpn-status.service.d"
	systemctl daemon-reload
	systemctl enable --quiet dstack-vpn-status-helper.socket dstack-vpn-status.service
	# The helper runs the program just installed from its next start, on the socket as now rendered.
	systemctl stop dstack-vpn-status.service dstack-vpn-status-helper.service dstack-vpn-status-helper.socket
	systemctl start dstack-vpn-status-helper.socket dstack-vpn-status.service
	say "status service on port {{ listen_port }} (dstack-vpn-status.service; its helper: dstack-vpn-status-helper.socket)"
else
	# No systemd (a container): two plain processes, restarted with the new program. The
	# helper as root with CAP_NET_ADMIN alone; the page as nobody with no capability. The
	# helper's socket is in a folder only root and nobody's group may enter.
	command -v setpriv >/dev/null || { say "setpriv (util-linux) is needed to drop privileges" >&2; exit 1; }
	for pid in /run/dstack-vpn-status.pid /run/dstack-vpn-status-helper.pid; do
		if [ -f "$pid" ]; then kill "$(cat "$pid")" 2>/dev/null || true; fi
	done
	rm -rf "$RUNDIR"
	mkdir -m 0710 "$RUNDIR"
	chgrp 65534 "$RUNDIR"
	nohup setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all,+net_admin --no-new-privs \
		python3 -I "$DIR/dstack_vpn_status.py" --dump-helper --interface {{ interface | shquote }} \
		--wg-dump-socket "$RUNDIR/wg-dump.sock" </dev/null >/dev/null 2>&1 &
	echo $! >/run/dstack-vpn-status-helper.pid
	for _ in $(seq 50); do [ -S "$RUNDIR/wg-dump.sock" ] && break; sleep 0.1; done
	nohup setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs \
		--inh-caps=-all --ambient-caps=-all --bounding-set=-all \
		python3 -I "$DIR/dstack_vpn_status.py" --node-name {{ node_name | shquote }} \
		--overlay-ip {{ overlay_ip | shquote }} --interface {{ interface | shquote }} \
		--listen-address {{ listen_address | shquote }} --listen-port {{ listen_port }} \
		--hub-public-key {{ hub_public_key | shquote }} --wg-dump-socket "$RUNDIR/wg-dump.sock" \
		</dev/null >/dev/null 2>&1 &
	echo $! >/run/dstack-vpn-status.pid
	say "status service on port {{ listen_port }} (plain processes; no systemd here)"
fi

# The page must really answer as this node: a port already taken by another program, or a
# page that cannot start, fails the step instead of passing for a running service.
for _ in $(seq 60); do
	if python3 -I - {{ listen_port }} {{ node_name | shquote }} <<'PY'
import json, sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/status", timeout=2) as answer:
        sys.exit(0 if json.load(answer).get("node") == sys.argv[2] else 1)
except Exception:
    sys.exit(1)
PY
	then
		exit 0
	fi
	sleep 0.25
done
say "the status page does not answer on port {{ listen_port }} as {{ node_name }} (port taken by another program?)" >&2
if have_systemd; then journalctl -u dstack-vpn-status.service -n 5 --no-pager -o cat >&2 || true; fi
exit 1

{% include "scripts/_lib.sh" %}
# stdin: the status service program (status/dstack_vpn_status.py).
DIR={{ install_dir }}
UNIT=/etc/systemd/system/dstack-vpn-status.service
DROPIN=/etc/systemd/system/dstack-vpn-status.service.d
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive "$stage/dstack_vpn_status.py"
python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' "$stage/dstack_vpn_status.py"
umask 022
mkdir -p "$DIR"
install_stdin 0644 "$DIR/dstack_vpn_status.py" <"$stage/dstack_vpn_status.py"

if have_systemd; then
	install_stdin 0644 "$UNIT" <<'UNIT'
{% include "systemd/dstack-vpn-status.service" %}
UNIT
	# wireguard-go's control socket is root-only: reading it needs CAP_DAC_OVERRIDE too.
	if [ -S /run/wireguard/{{ interface }}.sock ]; then
		mkdir -p "$DROPIN"
		install_stdin 0644 "$DROPIN/userspace-wireguard.conf" <<'DROPIN'
{% include "systemd/dstack-vpn-status-userspace.conf" %}
DROPIN
	else
		rm -rf "$DROPIN"
	fi
	systemctl daemon-reload
	systemctl enable --quiet dstack-vpn-status.service
	systemctl restart dstack-vpn-status.service
	say "status service on port {{ listen_port }} (dstack-vpn-status.service)"
else
	# No systemd (a container): a plain process, restarted with the new program.
	if [ -f /run/dstack-vpn-status.pid ]; then kill "$(cat /run/dstack-vpn-status.pid)" 2>/dev/null || true; fi
	nohup python3 -I "$DIR/dstack_vpn_status.py" --node-name {{ node_name | shquote }} \
		--overlay-ip {{ overlay_ip | shquote }} --interface {{ interface | shquote }} \
		--listen-address {{ listen_address | shquote }} --listen-port {{ listen_port }} \
		--hub-public-key {{ hub_public_key | shquote }} </dev/null >/dev/null 2>&1 &
	echo $! >/run/dstack-vpn-status.pid
	say "status service on port {{ listen_port }} (plain process; no systemd here)"
fi

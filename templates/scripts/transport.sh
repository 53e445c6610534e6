{% include "scripts/_lib.sh" %}
{% if not enabled %}
{% include "scripts/_transport-off.sh" %}
{% else %}
# stdin: the v2ray configuration of this {{ "hub" if hub else "spoke" }}'s TCP transport (public: see components/roles/transport.py).
CONF={{ config_path }}
UNIT=/etc/systemd/system/dstack-vpn-tcp.service
if ! have_systemd; then
	say "the TCP transport runs as a systemd service; this host has no systemd" >&2
	exit 1
fi
command -v v2ray >/dev/null || { say "v2ray is not installed (the install step installs it)" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive "$stage/tcp-transport.json"
v2ray -test -config "$stage/tcp-transport.json" >"$stage/test.log" 2>&1 ||
	{ cat "$stage/test.log" >&2; say "v2ray refused the configuration; nothing changed" >&2; exit 1; }
# The package starts a proxy of its own (v2ray.service, /etc/v2ray/config.json): not ours, and
# never wanted here.
if systemctl cat v2ray.service >/dev/null 2>&1; then
	systemctl disable --now --quiet v2ray.service 2>/dev/null || true
	systemctl mask --quiet v2ray.service
fi
umask 022
mkdir -p "${CONF%/*}"
install_stdin 0600 "$CONF" <"$stage/tcp-transport.json"
install_stdin 0644 "$UNIT" <<'UNIT'
{% include "systemd/dstack-vpn-tcp.service" %}
UNIT
systemctl daemon-reload
systemctl enable --quiet dstack-vpn-tcp.service
systemctl restart dstack-vpn-tcp.service
# v2ray reads its configuration once started: wait for it to run (and on the hub, to listen)
for _ in $(seq 50); do
	if systemctl is-active --quiet dstack-vpn-tcp.service{% if hub %} && [ -n "$(ss -Htln "sport = :{{ tcp_port }}")" ]{% endif %}; then
		ok=1
		break
	fi
	sleep 0.1
done
if [ -z "${ok:-}" ]; then
	journalctl -u dstack-vpn-tcp.service -n 20 --no-pager >&2 || true
	say "dstack-vpn-tcp.service did not start" >&2
	exit 1
fi
{% if hub %}
say "WireGuard over TCP on port {{ tcp_port }} (dstack-vpn-tcp.service)"
{% else %}
say "WireGuard over TCP to the hub's port {{ tcp_port }} (dstack-vpn-tcp.service)"
{% endif %}
{% endif %}

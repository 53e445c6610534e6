# dstack-vpn: spoke {{ name }} as a dstack app; the container's main process.
# Rendered by dstack-vpn. This text is public (it is part of the app's compose file);
# the keys arrive in the environment, go to 0600 files under {{ key_dir }}, and are
# never printed. Stops cleanly on SIGTERM: no interface, rules or files of ours stay.
set -euo pipefail
umask 077
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
IF={{ interface }}
KEYS={{ key_dir }}
say() { printf 'dstack-vpn %s: %s\n' {{ name | shquote }} "$*"; }
fail() { say "$*" >&2; exit 1; }

if [ "${DSTACK_VPN_STAGE:-}" != run ]; then
	# The keys leave the environment first; then this script starts again without them,
	# so no process of ours keeps a key in its environment.
	mkdir -p "$KEYS"
	chmod 0700 "$KEYS"
	[ -n "${DSTACK_VPN_PRIVATE_KEY:-}" ] ||
		fail "DSTACK_VPN_PRIVATE_KEY is empty: set it in the app's encrypted environment (see the README)"
	printf '%s\n' "$DSTACK_VPN_PRIVATE_KEY" >"$KEYS/private-key"
{% if preshared_key %}
	[ -n "${DSTACK_VPN_PRESHARED_KEY:-}" ] ||
		fail "DSTACK_VPN_PRESHARED_KEY is empty: set it in the app's encrypted environment (see the README)"
	printf '%s\n' "$DSTACK_VPN_PRESHARED_KEY" >"$KEYS/preshared-key"
{% endif %}
	exec env -u DSTACK_VPN_PRIVATE_KEY -u DSTACK_VPN_PRESHARED_KEY DSTACK_VPN_STAGE=run \
		bash -c "$BASH_EXECUTION_STRING" "$0"
fi

# What the image lacks (a plain Debian image has none of it): installed once per container.
need=()
for tool in wg:wireguard-tools nft:nftables ip:iproute2 python3:python3 setpriv:util-linux; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
{% include "scripts/_kernel_wireguard.sh" %}
if kernel_wireguard; then
	say "kernel WireGuard"
else
	say "no WireGuard in this kernel: userspace wireguard-go"
	command -v wireguard-go >/dev/null 2>&1 || need+=(wireguard-go)
	if [ ! -c /dev/net/tun ]; then
		mkdir -p /dev/net
		mknod -m 0600 /dev/net/tun c 10 200
	fi
fi
if [ "${#need[@]}" -gt 0 ]; then
	say "installing ${need[*]}"
	apt-get -q update >/dev/null
	apt-get -q -y install --no-install-recommends "${need[@]}" >/dev/null
fi

# The environment is not part of the app's measured identity: the key must be the one
# this node was given, whose public half is pinned here.
[ "$(wg pubkey <"$KEYS/private-key" 2>/dev/null)" = {{ public_key | shquote }} ] ||
	fail "DSTACK_VPN_PRIVATE_KEY is not this node's key (its public key must be {{ public_key }})"

cat >"$KEYS/firewall.nft" <<'NFT'
{{ firewall }}
NFT
cat >"$KEYS/$IF.conf" <<'CONF'
{{ wireguard }}
CONF
cat >"$KEYS/dstack_vpn_status.py" <<'PY'
{{ status_program }}
PY

# The status page's helper hands it the peer dump here (see below).
DUMP_DIR=/run/dstack-vpn-status
DUMP_SOCKET=$DUMP_DIR/wg-dump.sock
status_pid=
helper_pid=
stop() {
	trap - TERM INT
	say "stopping"
	if [ -n "$status_pid" ]; then kill "$status_pid" 2>/dev/null || true; fi
	if [ -n "$helper_pid" ]; then kill "$helper_pid" 2>/dev/null || true; fi
	rm -rf "$DUMP_DIR"
	wg-quick down "$KEYS/$IF.conf" >/dev/null 2>&1 || ip link del dev "$IF" 2>/dev/null || true
	nft delete table inet dstack_vpn 2>/dev/null || true
	rm -rf "$KEYS"
	exit 0
}
trap stop TERM INT

nft -c -f "$KEYS/firewall.nft" || fail "this kernel refused the firewall (nftables needs dstack OS 0.5.8 or later)"
nft -f "$KEYS/firewall.nft"
say "firewall loaded (table inet dstack_vpn)"
# a container restarted after a crash finds its old interface still there
if ip link show dev "$IF" >/dev/null 2>&1; then ip link del dev "$IF"; fi
wg-quick up "$KEYS/$IF.conf" || fail "$IF did not come up"
say "$IF up: {{ address }} in {{ overlay }}, hub {{ hub_endpoint }}:{{ listen_port }}"

# The status page, in two processes. Its helper runs as root with CAP_NET_ADMIN alone (what
# `wg show` needs; wireguard-go's socket is root's own) and answers each connection to its
# socket with the peer dump, keys taken out; it reads nothing. The page itself answers the
# network as nobody with no capability at all, and reads the dump there: the folder lets in
# only root and nobody's group.
rm -rf "$DUMP_DIR"
mkdir -m 0710 "$DUMP_DIR"
chgrp 65534 "$DUMP_DIR"
start_helper() {
	setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all,+net_admin --no-new-privs \
		python3 -I - --dump-helper --interface "$IF" --wg-dump-socket "$DUMP_SOCKET" <"$KEYS/dstack_vpn_status.py" &
	helper_pid=$!
}
start_status() {
	setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs \
		--inh-caps=-all --ambient-caps=-all --bounding-set=-all \
		python3 -I - --node-name {{ name | shquote }} --overlay-ip {{ address }} --interface "$IF" \
		--listen-address 0.0.0.0 --listen-port {{ status_port }} --hub-public-key {{ hub_public_key | shquote }} \
		--wg-dump-socket "$DUMP_SOCKET" <"$KEYS/dstack_vpn_status.py" &
	status_pid=$!
}
start_helper
for _ in $(seq 50); do [ -S "$DUMP_SOCKET" ] && break; sleep 0.1; done
start_status
say "status page on port {{ status_port }}"

# Watch: the status page and its helper come back if they stop; without the interface the
# container ends, and its restart policy starts it again. Every 10 s one packet goes to the hub's
# overlay address (its firewall drops it): WireGuard starts a new handshake 15 s after
# data goes unanswered, not after keepalives, so an idle spoke finds a restarted hub
# within about 25 s instead of at its next rekey.
ticks=0
while :; do
	sleep 5 &
	wait $! || true
	ip link show dev "$IF" >/dev/null 2>&1 || fail "$IF is gone"
	if ! kill -0 "$helper_pid" 2>/dev/null; then
		say "status helper stopped; starting it again"
		start_helper
	fi
	if ! kill -0 "$status_pid" 2>/dev/null; then
		say "status page stopped; starting it again"
		start_status
	fi
	ticks=$((ticks + 1))
	if [ $((ticks % 2)) = 0 ]; then printf . 2>/dev/null >/dev/udp/{{ hub_address }}/9 || :; fi
done

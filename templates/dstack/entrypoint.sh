#!/bin/bash
# dstack-vpn: a dstack spoke's main process, in the spoke image (image/build.py).
# Rendered once, when the image is built: nothing here is a node's own. The node's part
# comes from the app's compose file (public, measured with the app) as DSTACK_VPN_*
# variables, its keys from the app's encrypted environment. The keys go to 0600 files
# under {{ key_dir }} and are never printed. Stops cleanly on SIGTERM: no interface, rules
# or files of ours stay.
set -euo pipefail
umask 077
export LC_ALL=C
KEYS={{ key_dir }}
STATUS_PROGRAM={{ status_program }}
say() { printf 'dstack-vpn %s: %s\n' "${DSTACK_VPN_NODE:-?}" "$*"; }
fail() { say "$*" >&2; exit 1; }

# The compose file needs a bundle this image reads (it reads every one up to its own): an older
# image refuses a compose file that needs what it lacks (bundle 3: the TCP transport's v2ray).
case "${DSTACK_VPN_BUNDLE:-}" in
{{ bundles | join(" | ") }}) ;;
*) fail "the compose file speaks bundle '${DSTACK_VPN_BUNDLE:-none}', this image bundles {{ bundles | join(", ") }}: use the image of the same dstack-vpn version (README: The spoke image)" ;;
esac
for var in DSTACK_VPN_NODE DSTACK_VPN_ADDRESS DSTACK_VPN_INTERFACE DSTACK_VPN_PUBLIC_KEY DSTACK_VPN_HUB_PUBLIC_KEY \
	DSTACK_VPN_HUB_ADDRESS DSTACK_VPN_STATUS_PORT DSTACK_VPN_WIREGUARD DSTACK_VPN_FIREWALL; do
	[ -n "${!var:-}" ] || fail "$var is not set: the compose file dstack-vpn rendered sets it"
done
IF=$DSTACK_VPN_INTERFACE

if [ "${DSTACK_VPN_STAGE:-}" != run ]; then
	# The keys leave the environment first; then this program starts again without them,
	# so no process of ours keeps a key in its environment.
	mkdir -p "$KEYS"
	chmod 0700 "$KEYS"
	[ -n "${DSTACK_VPN_PRIVATE_KEY:-}" ] ||
		fail "DSTACK_VPN_PRIVATE_KEY is empty: set it in the app's encrypted environment (see the README)"
	printf '%s\n' "$DSTACK_VPN_PRIVATE_KEY" >"$KEYS/private-key"
	if [ -n "${DSTACK_VPN_PRESHARED_KEY:-}" ]; then
		printf '%s\n' "$DSTACK_VPN_PRESHARED_KEY" >"$KEYS/preshared-key"
	fi
	exec env -u DSTACK_VPN_PRIVATE_KEY -u DSTACK_VPN_PRESHARED_KEY DSTACK_VPN_STAGE=run "$0"
fi

{% include "scripts/_kernel_wireguard.sh" %}
if kernel_wireguard; then
	say "kernel WireGuard"
else
	say "no WireGuard in this kernel: userspace wireguard-go"
	if [ ! -c /dev/net/tun ]; then
		mkdir -p /dev/net
		mknod -m 0600 /dev/net/tun c 10 200
	fi
fi

# The environment is not part of the app's measured identity: the key must be the one
# this node was given, whose public half is pinned in the compose file.
[ "$(wg pubkey <"$KEYS/private-key" 2>/dev/null)" = "$DSTACK_VPN_PUBLIC_KEY" ] ||
	fail "DSTACK_VPN_PRIVATE_KEY is not this node's key (its public key must be $DSTACK_VPN_PUBLIC_KEY)"

printf '%s\n' "$DSTACK_VPN_FIREWALL" >"$KEYS/firewall.nft"
printf '%s\n' "$DSTACK_VPN_WIREGUARD" >"$KEYS/$IF.conf"
# (public, read by v2ray as nobody: beside the keys' folder, not in it)
TCP_CONF=/run/dstack-vpn-tcp-transport.json
if [ -n "${DSTACK_VPN_TCP_TRANSPORT:-}" ]; then
	(umask 022 && printf '%s\n' "$DSTACK_VPN_TCP_TRANSPORT" >"$TCP_CONF")
	v2ray -test -config "$TCP_CONF" >/dev/null || fail "v2ray refused DSTACK_VPN_TCP_TRANSPORT"
fi

# The status page's helper hands it the peer dump here (see below).
DUMP_DIR=/run/dstack-vpn-status
DUMP_SOCKET=$DUMP_DIR/wg-dump.sock
status_pid=
helper_pid=
watchdog_pid=
tcp_pid=
stop() {
	trap - TERM INT
	say "stopping"
	if [ -n "$watchdog_pid" ]; then kill "$watchdog_pid" 2>/dev/null || true; fi
	if [ -n "$tcp_pid" ]; then kill "$tcp_pid" 2>/dev/null || true; fi
	if [ -n "$status_pid" ]; then kill "$status_pid" 2>/dev/null || true; fi
	if [ -n "$helper_pid" ]; then kill "$helper_pid" 2>/dev/null || true; fi
	rm -rf "$DUMP_DIR"
	wg-quick down "$KEYS/$IF.conf" >/dev/null 2>&1 || ip link del dev "$IF" 2>/dev/null || true
	nft delete table inet dstack_vpn 2>/dev/null || true
	rm -rf "$KEYS" "$TCP_CONF"
	exit 0
}
trap stop TERM INT

nft -c -f "$KEYS/firewall.nft" || fail "this kernel refused the firewall (nftables needs dstack OS 0.5.8 or later)"
nft -f "$KEYS/firewall.nft"
say "firewall loaded (table inet dstack_vpn)"
# WireGuard over TCP (transport tcp or auto): v2ray, as nobody with no capability, takes
# WireGuard's datagrams on 127.0.0.1 and carries them over TCP to the hub.
start_tcp() {
	setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs \
		--inh-caps=-all --ambient-caps=-all --bounding-set=-all \
		env -i PATH="$PATH" v2ray -config "$TCP_CONF" &
	tcp_pid=$!
}
if [ -n "${DSTACK_VPN_TCP_TRANSPORT:-}" ]; then
	start_tcp
	say "WireGuard over TCP to the hub (v2ray)"
fi
# a container restarted after a crash finds its old interface still there
if ip link show dev "$IF" >/dev/null 2>&1; then ip link del dev "$IF"; fi
wg-quick up "$KEYS/$IF.conf" || fail "$IF did not come up"
say "$IF up: $DSTACK_VPN_ADDRESS, hub ${DSTACK_VPN_HUB_ENDPOINT:-}"

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
		python3 -I "$STATUS_PROGRAM" --dump-helper --interface "$IF" --wg-dump-socket "$DUMP_SOCKET" &
	helper_pid=$!
}
start_status() {
	setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs \
		--inh-caps=-all --ambient-caps=-all --bounding-set=-all \
		env -i PATH="$PATH" LANG=C.UTF-8 \
		python3 -I "$STATUS_PROGRAM" --node-name "$DSTACK_VPN_NODE" --overlay-ip "$DSTACK_VPN_ADDRESS" \
		--interface "$IF" --listen-address 0.0.0.0 --listen-port "$DSTACK_VPN_STATUS_PORT" \
		--hub-public-key "$DSTACK_VPN_HUB_PUBLIC_KEY" --wg-dump-socket "$DUMP_SOCKET" &
	status_pid=$!
}
start_watchdog() {
	# shellcheck disable=SC2086 # DSTACK_VPN_AUTO: two endpoints (transport auto) or none
	bash {{ watchdog }} "$IF" "$DSTACK_VPN_HUB_ADDRESS" ${DSTACK_VPN_AUTO:-} &
	watchdog_pid=$!
}
start_helper
for _ in $(seq 50); do [ -S "$DUMP_SOCKET" ] && break; sleep 0.1; done
start_status
say "status page on port $DSTACK_VPN_STATUS_PORT"
start_watchdog

# Watch: the status page, its helper and the tunnel's watchdog come back if they stop; without
# the interface the container ends, and its restart policy starts it again. The watchdog asks
# the hub once a second over the overlay and gives it a fresh handshake when it stops answering
# (a rebooted or replaced hub), as dstack-vpn-nudge does on hosts.
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
	if [ -n "$tcp_pid" ] && ! kill -0 "$tcp_pid" 2>/dev/null; then
		say "v2ray (TCP transport) stopped; starting it again"
		start_tcp
	fi
	if ! kill -0 "$watchdog_pid" 2>/dev/null; then
		say "watchdog stopped; starting it again"
		start_watchdog
	fi
done

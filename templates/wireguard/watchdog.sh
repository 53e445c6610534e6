#!/bin/bash
# dstack-vpn watchdog of a spoke's tunnel: watchdog INTERFACE HUB_OVERLAY_ADDRESS
# Rendered by dstack-vpn from templates/wireguard/watchdog.sh; run by dstack-vpn-nudge.service
# on hosts and by the spoke image's entrypoint in a dstack app.
#
# Once a second, one echo request to the hub's overlay address: the hub answers (a reply; it
# opens nothing). After {{ misses }} unanswered in a row while the interface is up, the hub has lost
# our session (rebooted, replaced) or cannot be reached: the hub's peer is removed and set again
# from the interface's own configuration, so that a fresh handshake starts at once, instead of
# WireGuard's own retry 15 s after data went unanswered. While the hub stays silent that repeats
# every {{ misses }} s or so. The configuration (private key included) goes from `wg showconf` to
# `wg syncconf` through a pipe: never an argument, never a file.
set -u
IF=$1
HUB=$2
misses=0
say() { printf 'dstack-vpn watchdog %s: %s\n' "$IF" "$*"; }
while :; do
	if [ ! -e "/sys/class/net/$IF" ]; then
		misses=0
		sleep 1
		continue
	fi
	if ping -n -q -c 1 -W 1 -I "$IF" "$HUB" >/dev/null 2>&1; then
		misses=0
		sleep 1
		continue
	fi
	misses=$((misses + 1))
	if [ "$misses" -lt {{ misses }} ]; then
		continue
	fi
	misses=0
	if conf=$(wg showconf "$IF" 2>/dev/null) && [ -n "$conf" ]; then
		for peer in $(wg show "$IF" peers); do
			wg set "$IF" peer "$peer" remove
		done
		if wg syncconf "$IF" <(printf '%s\n' "$conf"); then
			say "no answer from the hub at $HUB for {{ misses }} s: its peer set again, a fresh handshake"
		else
			say "could not set the hub's peer again" >&2
		fi
	fi
done

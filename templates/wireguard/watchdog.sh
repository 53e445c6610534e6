#!/bin/bash
# dstack-vpn watchdog of a spoke's tunnel: watchdog INTERFACE HUB_OVERLAY_ADDRESS [UDP_ENDPOINT TCP_ENDPOINT]
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
#
# With two endpoints (transport `auto`): after {{ auto_bound }} s without an answer on one, the hub's
# peer is set again on the other (UDP: the hub's own port; TCP: the local relay of
# dstack-vpn-tcp). After {{ udp_retry[0] }} s on TCP it tries UDP again, and goes back to TCP if UDP stays
# silent for {{ auto_bound }} s, waiting twice as long before the next try (at most {{ udp_retry[1] }} s). Each
# switch is logged.
set -u
IF=$1
HUB=$2
UDP_EP=${3:-}
TCP_EP=${4:-}
misses=0   # unanswered in a row, since the last fresh handshake
silent=0   # unanswered in a row, since the last answer or switch
retry={{ udp_retry[0] }}
tcp_since=$SECONDS
say() { printf 'dstack-vpn watchdog %s: %s\n' "$IF" "$*"; }

# set_peer [ENDPOINT]: the hub's peer set again (on ENDPOINT): a fresh handshake at once.
set_peer() {
	local conf
	conf=$(wg showconf "$IF" 2>/dev/null) && [ -n "$conf" ] || return 1
	if [ -n "${1:-}" ]; then
		conf=$(printf '%s\n' "$conf" | sed "s/^Endpoint = .*/Endpoint = $1/")
	fi
	for peer in $(wg show "$IF" peers); do
		wg set "$IF" peer "$peer" remove
	done
	wg syncconf "$IF" <(printf '%s\n' "$conf")
}

# on_tcp: whether the hub's peer is on the TCP relay now (what a config change may also set).
on_tcp() { [ -n "$TCP_EP" ] && wg show "$IF" endpoints 2>/dev/null | grep -q "[[:space:]]$TCP_EP\$"; }

switch() {  # switch udp|tcp REASON
	local to=$1 ep=$UDP_EP
	if [ "$to" = tcp ]; then ep=$TCP_EP; fi
	if set_peer "$ep"; then
		say "transport $to ($2)"
	else
		say "could not move the hub's peer to $to" >&2
	fi
	if [ "$to" = tcp ]; then tcp_since=$SECONDS; fi
	misses=0
	silent=0
}

while :; do
	if [ ! -e "/sys/class/net/$IF" ]; then
		misses=0
		silent=0
		sleep 1
		continue
	fi
	if ping -n -q -c 1 -W 1 -I "$IF" "$HUB" >/dev/null 2>&1; then
		misses=0
		silent=0
		if [ -n "$TCP_EP" ] && on_tcp && [ $((SECONDS - tcp_since)) -ge "$retry" ]; then
			switch udp "trying udp again after $((SECONDS - tcp_since)) s on tcp"
			trying=1
		elif [ -n "$TCP_EP" ] && ! on_tcp; then
			retry={{ udp_retry[0] }}
			trying=0
		fi
		sleep 1
		continue
	fi
	misses=$((misses + 1))
	silent=$((silent + 1))
	if [ -n "$TCP_EP" ] && [ "$silent" -ge {{ auto_bound }} ]; then
		if on_tcp; then
			switch udp "no answer over tcp for $silent s"
		else
			if [ "${trying:-0}" = 1 ]; then
				retry=$((retry * 2))
				if [ "$retry" -gt {{ udp_retry[1] }} ]; then retry={{ udp_retry[1] }}; fi
				trying=0
			fi
			switch tcp "no answer over udp for $silent s; udp again in $retry s"
		fi
		continue
	fi
	if [ "$misses" -lt {{ misses }} ]; then
		continue
	fi
	misses=0
	if set_peer; then
		say "no answer from the hub at $HUB for {{ misses }} s: its peer set again, a fresh handshake"
	else
		say "could not set the hub's peer again" >&2
	fi
done

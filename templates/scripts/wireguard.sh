{% include "scripts/_lib.sh" %}
# stdin: the WireGuard config (holds the private key: 0600, never printed).
IF={{ interface }}
CONF=/etc/wireguard/$IF.conf
ADDRESS={{ address }}/{{ prefixlen }}
mkdir -p /etc/wireguard
chmod 0700 /etc/wireguard
stage=$(mktemp -d /etc/wireguard/.dstack-vpn.XXXXXX)
trap 'rm -rf "$stage"' EXIT
receive "$stage/$IF.conf"
# wg-quick strip parses the whole file: a broken config stops here, before anything changes.
wg-quick strip "$stage/$IF.conf" >"$stage/wg.conf"
install_stdin 0600 "$CONF" <"$stage/$IF.conf"

if ip link show dev "$IF" >/dev/null 2>&1; then
	# Running: apply only what changed, peer by peer; unchanged peers are not
	# touched, so no tunnel drops a packet. (`wg syncconf` rewrites every peer;
	# on wireguard-go 0.0.20220316 that stopped forwarding between spokes until
	# their next handshake, as measured in the lab.)
	peers() { awk -F' = ' -v OFS='\t' '
		function out() { if (k != "") print k, (p == "" ? "-" : p), a, (e == "" ? "-" : e), (ka == "" ? "off" : ka) }
		/^\[/ { out(); k = p = a = e = ka = "" }
		$1 == "PublicKey" { k = $2 } $1 == "PresharedKey" { p = $2 } $1 == "Endpoint" { e = $2 }
		$1 == "AllowedIPs" { a = $2; gsub(/ /, "", a) } $1 == "PersistentKeepalive" { ka = $2 }
		END { out() }' "$1" | sort; }
	# Peers as "key psk allowed-ips endpoint keepalive" lines, wanted and running;
	# keys stay in files (never in a command's arguments).
	peers "$stage/wg.conf" >"$stage/want"
	awk -F'\t' -v OFS='\t' '{ $4 = "-"; print }' "$stage/want" | sort >"$stage/want-no-endpoint"
	wg show "$IF" dump | awk -F'\t' -v OFS='\t' 'NR > 1 { print $1, ($2 == "(none)" ? "-" : $2), $4, "-", $8 }' |
		sort >"$stage/have"
	awk -F'\t' -v OFS='\t' '$4 != "-" { print $1, $4 }' "$stage/want" | sort >"$stage/want-endpoints"
	wg show "$IF" endpoints | sort >"$stage/have-endpoints"
	# gone: remove; new or changed (settings or configured endpoint): set
	comm -13 <(cut -f1 "$stage/want" | sort) <(cut -f1 "$stage/have" | sort) >"$stage/gone"
	{ comm -23 "$stage/want-no-endpoint" "$stage/have" | cut -f1
		comm -23 "$stage/want-endpoints" "$stage/have-endpoints" | cut -f1; } | sort -u >"$stage/changed"
	# A new private key first: setting a peer below sends it a keepalive at once,
	# which then starts the handshake with the new key (no wait for the next one).
	grep '^PrivateKey = ' "$stage/wg.conf" | cut -d' ' -f3 >"$stage/key"
	if [ "$(cat "$stage/key")" != "$(wg show "$IF" private-key)" ]; then wg set "$IF" private-key "$stage/key"; fi
	while read -r key; do wg set "$IF" peer "$key" remove; done <"$stage/gone"
	while IFS=$'\t' read -r key psk ips endpoint keepalive; do
		grep -qxF "$key" "$stage/changed" || continue
		if [ "$psk" = - ]; then : >"$stage/psk"; else printf '%s\n' "$psk" >"$stage/psk"; fi
		set -- peer "$key" preshared-key "$stage/psk" allowed-ips "$ips" persistent-keepalive "${keepalive/off/0}"
		if [ "$endpoint" != - ]; then set -- "$@" endpoint "$endpoint"; fi
		wg set "$IF" "$@"
	done <"$stage/want"
	port=$(awk -F' = ' '$1 == "ListenPort" { print $2 }' "$stage/wg.conf")
	if [ -n "$port" ] && [ "$port" != "$(wg show "$IF" listen-port)" ]; then wg set "$IF" listen-port "$port"; fi
	for old in $(ip -4 -o address show dev "$IF" | awk '{print $4}'); do
		if [ "$old" != "$ADDRESS" ]; then ip address del "$old" dev "$IF"; fi
	done
	ip address replace "$ADDRESS" dev "$IF"
	mtu=$(awk -F' = ' '$1 == "MTU" { print $2 }' "$stage/$IF.conf")
	if [ -n "$mtu" ] && [ "$mtu" != "$(cat "/sys/class/net/$IF/mtu")" ]; then ip link set mtu "$mtu" dev "$IF"; fi
	ip link set up dev "$IF"
	# Routes as wg-quick makes them: one per allowed network not already covered.
	# (field 1 is the peer's key, base64 with '/' in it; field 2 its networks)
	for net in $(wg show "$IF" allowed-ips | cut -f2 | tr ' ' '\n' | sort -u); do
		case $net in *:* | "(none)" | "") continue ;; esac
		if [ -z "$(ip -4 route show dev "$IF" match "$net" 2>/dev/null)" ]; then
			ip -4 route add "$net" dev "$IF"
		fi
	done
	say "changes applied in place; $IF kept up"
elif have_systemd; then
	systemctl restart "wg-quick@$IF.service"
	say "$IF up (wg-quick@$IF)"
else
	wg-quick up "$IF" >/dev/null
	say "$IF up (wg-quick; no systemd here, not restored at boot)"
fi
if have_systemd; then systemctl enable --quiet "wg-quick@$IF.service"; fi
{% if nudge_address %}
# A spoke: the tunnel's watchdog, which notices a hub that stopped answering (see the unit).
if have_systemd; then
	mkdir -p {{ watchdog.rsplit("/", 1)[0] }}
	chmod 0755 {{ watchdog.rsplit("/", 1)[0] }}
	install_stdin 0755 {{ watchdog }} <<'WATCHDOG'
{% include "wireguard/watchdog.sh" %}
WATCHDOG
	install_stdin 0644 /etc/systemd/system/dstack-vpn-nudge.service <<'UNIT'
{% include "systemd/dstack-vpn-nudge.service" %}
UNIT
	systemctl daemon-reload
	systemctl enable --quiet dstack-vpn-nudge.service
	systemctl restart dstack-vpn-nudge.service
fi
{% endif %}

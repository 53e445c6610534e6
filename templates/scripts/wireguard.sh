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
	# Running: apply the new keys and peer list in place; no tunnel drops.
	wg syncconf "$IF" "$stage/wg.conf"
	for old in $(ip -4 -o address show dev "$IF" | awk '{print $4}'); do
		if [ "$old" != "$ADDRESS" ]; then ip address del "$old" dev "$IF"; fi
	done
	ip address replace "$ADDRESS" dev "$IF"
	ip link set up dev "$IF"
	# Routes as wg-quick makes them: one per allowed network not already covered.
	for net in $(wg show "$IF" allowed-ips | tr ' \t' '\n\n' | grep '/' | sort -u); do
		case $net in *:*) continue ;; esac
		if [ -z "$(ip -4 route show dev "$IF" match "$net" 2>/dev/null)" ]; then
			ip -4 route add "$net" dev "$IF"
		fi
	done
	say "peer list applied with wg syncconf; $IF kept up"
elif have_systemd; then
	systemctl restart "wg-quick@$IF.service"
	say "$IF up (wg-quick@$IF)"
else
	wg-quick up "$IF" >/dev/null
	say "$IF up (wg-quick; no systemd here, not restored at boot)"
fi
if have_systemd; then systemctl enable --quiet "wg-quick@$IF.service"; fi

{% include "scripts/_lib.sh" %}
IF={{ interface }}
if have_systemd; then
	systemctl disable --now --quiet "wg-quick@$IF.service" 2>/dev/null || true
fi
if ip link show dev "$IF" >/dev/null 2>&1; then
	wg-quick down "$IF" >/dev/null 2>&1 || ip link del dev "$IF"
fi
rm -f "/etc/wireguard/$IF.conf"

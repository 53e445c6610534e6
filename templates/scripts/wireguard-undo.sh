{% include "scripts/_lib.sh" %}
IF={{ interface }}
if have_systemd; then
{% if nudge_address %}
	systemctl disable --now --quiet dstack-vpn-nudge.service 2>/dev/null || true
	rm -f /etc/systemd/system/dstack-vpn-nudge.service
	systemctl daemon-reload
	rm -f {{ watchdog }}
	rmdir {{ watchdog.rsplit("/", 1)[0] }} 2>/dev/null || true
{% endif %}
	systemctl disable --now --quiet "wg-quick@$IF.service" 2>/dev/null || true
fi
if ip link show dev "$IF" >/dev/null 2>&1; then
	wg-quick down "$IF" >/dev/null 2>&1 || ip link del dev "$IF"
fi
rm -f "/etc/wireguard/$IF.conf"

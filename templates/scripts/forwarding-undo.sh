{% include "scripts/_lib.sh" %}
rm -f {{ sysctl_path }} {{ dropin_dir }}/forwarding.conf
rmdir {{ dropin_dir }} 2>/dev/null || true
if have_systemd; then systemctl daemon-reload; fi
if [ -f "$STATE/ip_forward.before" ]; then
	sysctl -q -w "net.ipv4.ip_forward=$(cat "$STATE/ip_forward.before")"
	rm -f "$STATE/ip_forward.before"
fi
rmdir "$STATE" 2>/dev/null || true

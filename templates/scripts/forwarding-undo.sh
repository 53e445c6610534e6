{% include "scripts/_lib.sh" %}
rm -f {{ sysctl_path }}
if [ -f "$STATE/ip_forward.before" ]; then
	sysctl -q -w "net.ipv4.ip_forward=$(cat "$STATE/ip_forward.before")"
	rm -f "$STATE/ip_forward.before"
fi
rmdir "$STATE" 2>/dev/null || true

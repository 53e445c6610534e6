{% include "scripts/_lib.sh" %}
if have_systemd; then
	systemctl disable --now --quiet dstack-vpn-status.service 2>/dev/null || true
	rm -rf /etc/systemd/system/dstack-vpn-status.service /etc/systemd/system/dstack-vpn-status.service.d
	systemctl daemon-reload
fi
if [ -f /run/dstack-vpn-status.pid ]; then
	kill "$(cat /run/dstack-vpn-status.pid)" 2>/dev/null || true
	rm -f /run/dstack-vpn-status.pid
fi
rm -f {{ install_dir }}/dstack_vpn_status.py
rm -rf {{ install_dir }}/__pycache__
rmdir {{ install_dir }} 2>/dev/null || true

{% include "scripts/_lib.sh" %}
if have_systemd; then
	for unit in dstack-vpn-status.service dstack-vpn-status-helper.socket dstack-vpn-status-helper.service; do
		systemctl disable --now --quiet "$unit" 2>/dev/null || true
	done
	rm -rf /etc/systemd/system/dstack-vpn-status.service /etc/systemd/system/dstack-vpn-status.service.d \
		/etc/systemd/system/dstack-vpn-status-helper.socket /etc/systemd/system/dstack-vpn-status-helper.service
	systemctl daemon-reload
	if getent group dstack-vpn-wg-dump >/dev/null; then groupdel dstack-vpn-wg-dump; fi
fi
for pid in /run/dstack-vpn-status.pid /run/dstack-vpn-status-helper.pid; do
	if [ -f "$pid" ]; then
		kill "$(cat "$pid")" 2>/dev/null || true
		rm -f "$pid"
	fi
done
rm -rf /run/dstack-vpn-status
rm -f {{ install_dir }}/dstack_vpn_status.py
rm -rf {{ install_dir }}/__pycache__
rmdir {{ install_dir }} 2>/dev/null || true

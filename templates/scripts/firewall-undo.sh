{% include "scripts/_lib.sh" %}
if have_systemd && [ -f /etc/systemd/system/dstack-vpn-firewall.service ]; then
	systemctl disable --quiet dstack-vpn-firewall.service || true
	rm -f /etc/systemd/system/dstack-vpn-firewall.service
	systemctl daemon-reload
fi
if nft list table inet dstack_vpn >/dev/null 2>&1; then
	nft delete table inet dstack_vpn
fi
rm -f {{ rules_path }}
rmdir {{ rules_dir }} 2>/dev/null || true

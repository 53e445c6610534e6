# No TCP transport here: the service, its files and the mask on the package's own proxy go,
# where an earlier configuration had them.
if have_systemd && [ -e /etc/systemd/system/dstack-vpn-tcp.service ]; then
	systemctl disable --now --quiet dstack-vpn-tcp.service 2>/dev/null || true
	rm -f /etc/systemd/system/dstack-vpn-tcp.service
	systemctl unmask --quiet v2ray.service 2>/dev/null || true
	systemctl daemon-reload
	say "TCP transport removed"
fi
rm -f {{ config_path }}

{% include "scripts/_lib.sh" %}
if have_systemd; then
	systemctl disable --now --quiet dstack-vpn-prometheus.service dstack-vpn-alertmanager.service 2>/dev/null || true
	rm -f /etc/systemd/system/dstack-vpn-prometheus.service /etc/systemd/system/dstack-vpn-alertmanager.service
	systemctl unmask --quiet prometheus.service prometheus-alertmanager.service 2>/dev/null || true
	systemctl daemon-reload
fi
rm -rf {{ conf_dir | shquote }} {{ data_dir | shquote }} {{ alertmanager_data | shquote }}
say "the monitor is gone (Prometheus' data with it)"

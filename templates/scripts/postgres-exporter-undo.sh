{% include "scripts/_lib.sh" %}
if have_systemd; then
	systemctl disable --now --quiet dstack-vpn-postgres-exporter.service 2>/dev/null || true
	rm -f /etc/systemd/system/dstack-vpn-postgres-exporter.service
	systemctl unmask --quiet prometheus-postgres-exporter.service 2>/dev/null || true
	systemctl daemon-reload
fi
say "the PostgreSQL exporter is gone"

{% include "scripts/_lib.sh" %}
if have_systemd; then
	systemctl disable --now --quiet dstack-vpn-etcd.service 2>/dev/null || true
	rm -f /etc/systemd/system/dstack-vpn-etcd.service
	systemctl unmask --quiet etcd.service 2>/dev/null || true
	systemctl daemon-reload
fi
rm -rf {{ etcd_dir | shquote }}
{% if keep_data %}
say "kept etcd's data in {{ etcd_data }} (postgres.keepData)"
{% else %}
rm -rf {{ etcd_data | shquote }}
say "removed etcd's data (postgres.keepData: false)"
{% endif %}

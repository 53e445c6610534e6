{% include "scripts/_lib.sh" %}
if have_systemd; then
	# Patroni stops PostgreSQL as it stops
	systemctl disable --now --quiet dstack-vpn-patroni.service 2>/dev/null || true
	rm -f /etc/systemd/system/dstack-vpn-patroni.service
	systemctl daemon-reload
fi
rm -rf {{ conf_dir | shquote }}
rm -f /var/lib/postgresql/.pgpass-dstack-vpn {{ ca_path | shquote }}
rmdir {{ ca_path.rsplit("/", 1)[0] | shquote }} 2>/dev/null || true
{% if keep_data %}
say "kept the PostgreSQL data directory {{ data_dir }} (postgres.keepData)"
{% else %}
rm -rf {{ data_dir | shquote }}
say "removed the PostgreSQL data directory {{ data_dir }} (postgres.keepData: false)"
{% endif %}

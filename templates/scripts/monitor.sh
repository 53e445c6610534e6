{% include "scripts/_lib.sh" %}
{% include "scripts/_bundle.sh" %}
# stdin (secret: the receivers' credentials are in alertmanager.yml): the monitor's settings.
DIR={{ conf_dir }}
SYSTEMD=/etc/systemd/system
have_systemd || { say "the monitor runs as systemd services; this host has no systemd" >&2; exit 1; }
command -v prometheus >/dev/null && command -v prometheus-alertmanager >/dev/null && getent passwd prometheus >/dev/null ||
	{ say "Prometheus is not installed (the install step installs prometheus, prometheus-alertmanager)" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive_bundle "$stage"
# Checked by the tools themselves before anything changes (relative paths are the file's folder's).
mkdir "$stage/consoles"
mv "$stage/dstack-vpn.html" "$stage/consoles/dstack-vpn.html"
promtool check config "$stage/prometheus.yml" >/dev/null 2>"$stage/check.err" ||
	{ say "prometheus.yml does not pass promtool check config:" >&2; cat "$stage/check.err" >&2; exit 1; }
amtool check-config "$stage/alertmanager.yml" >/dev/null 2>&1 ||
	{ say "alertmanager.yml does not pass amtool check-config (its output may hold credentials: not shown)" >&2; exit 1; }
# The packages' own services (a Prometheus on every address) never run here; ours do.
for unit in prometheus.service prometheus-alertmanager.service; do
	systemctl disable --now --quiet "$unit" 2>/dev/null || true
	systemctl mask --quiet "$unit"
done
install -d -m 0755 "$DIR" "$DIR/consoles"
install -d -m 0750 -o prometheus -g prometheus {{ data_dir | shquote }} {{ alertmanager_data | shquote }}
prom_changed=
am_changed=
install_changed 0644 root "$stage/prometheus.yml" "$DIR/prometheus.yml" && prom_changed=1
install_changed 0644 root "$stage/rules.yml" "$DIR/rules.yml" && prom_changed=1
install_changed 0644 root "$stage/postgres-ca.crt" "$DIR/postgres-ca.crt" && prom_changed=1
install_changed 0644 root "$stage/consoles/dstack-vpn.html" "$DIR/consoles/dstack-vpn.html" || true
install_changed 0600 prometheus "$stage/alertmanager.yml" "$DIR/alertmanager.yml" && am_changed=1
umask 022
cat >"$stage/prometheus.service" <<'UNIT'
{% include "systemd/dstack-vpn-prometheus.service" %}
UNIT
cat >"$stage/alertmanager.service" <<'UNIT'
{% include "systemd/dstack-vpn-alertmanager.service" %}
UNIT
install_changed 0644 root "$stage/prometheus.service" "$SYSTEMD/dstack-vpn-prometheus.service" && prom_changed=1
install_changed 0644 root "$stage/alertmanager.service" "$SYSTEMD/dstack-vpn-alertmanager.service" && am_changed=1
systemctl daemon-reload
systemctl enable --quiet dstack-vpn-prometheus.service dstack-vpn-alertmanager.service
if [ -n "$am_changed" ] || ! systemctl is-active --quiet dstack-vpn-alertmanager.service; then
	systemctl restart dstack-vpn-alertmanager.service
fi
if [ -n "$prom_changed" ] || ! systemctl is-active --quiet dstack-vpn-prometheus.service; then
	systemctl restart dstack-vpn-prometheus.service
fi
# Both must really answer: a port taken by another program fails the step.
ready() { python3 -I -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }
for _ in $(seq 120); do
	if ready "http://{{ address }}:{{ prometheus_port }}/-/ready" && ready "http://127.0.0.1:{{ alertmanager_port }}/-/ready"; then
		say "Prometheus on {{ address }}:{{ prometheus_port }} (its page: {{ page }}), Alertmanager on 127.0.0.1:{{ alertmanager_port }}"
		exit 0
	fi
	sleep 0.5
done
say "Prometheus or Alertmanager does not answer" >&2
journalctl -u dstack-vpn-prometheus.service -u dstack-vpn-alertmanager.service -n 10 --no-pager -o cat >&2 || true
exit 1

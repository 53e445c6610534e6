{% include "scripts/_lib.sh" %}
{% include "scripts/_bundle.sh" %}
# No stdin: the exporter reads the cluster as the local superuser (peer authentication).
UNIT=/etc/systemd/system/dstack-vpn-postgres-exporter.service
have_systemd || { say "the exporter runs as a systemd service; this host has no systemd" >&2; exit 1; }
command -v prometheus-postgres-exporter >/dev/null ||
	{ say "the PostgreSQL exporter is not installed (the install step installs prometheus-postgres-exporter)" >&2; exit 1; }
systemctl disable --now --quiet prometheus-postgres-exporter.service 2>/dev/null || true
systemctl mask --quiet prometheus-postgres-exporter.service
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
umask 022
cat >"$stage/unit" <<'UNIT'
{% include "systemd/dstack-vpn-postgres-exporter.service" %}
UNIT
changed=
install_changed 0644 root "$stage/unit" "$UNIT" && changed=1
systemctl daemon-reload
systemctl enable --quiet dstack-vpn-postgres-exporter.service
if [ -n "$changed" ] || ! systemctl is-active --quiet dstack-vpn-postgres-exporter.service; then
	systemctl restart dstack-vpn-postgres-exporter.service
fi
for _ in $(seq 60); do
	if python3 -I -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
		"http://{{ address }}:{{ port }}/metrics" 2>/dev/null; then
		say "PostgreSQL exporter on {{ address }}:{{ port }} (dstack-vpn-postgres-exporter.service)"
		exit 0
	fi
	sleep 0.5
done
say "the PostgreSQL exporter does not answer on {{ address }}:{{ port }}" >&2
journalctl -u dstack-vpn-postgres-exporter.service -n 5 --no-pager -o cat >&2 || true
exit 1

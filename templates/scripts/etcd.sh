{% include "scripts/_lib.sh" %}
{% include "scripts/_bundle.sh" %}
# stdin (secret): this member's etcd settings, its certificate and key, the cluster's CA.
DIR={{ etcd_dir }}
UNIT=/etc/systemd/system/dstack-vpn-etcd.service
have_systemd || { say "etcd runs as a systemd service; this host has no systemd" >&2; exit 1; }
command -v etcd >/dev/null && getent passwd etcd >/dev/null ||
	{ say "etcd is not installed (the install step installs etcd-server)" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive_bundle "$stage"
# The package starts an etcd of its own (one node on localhost): not ours, never wanted here.
if grep -qx etcd-server "$STATE/installed-packages" 2>/dev/null && systemctl cat etcd.service >/dev/null 2>&1; then
	systemctl disable --now --quiet etcd.service 2>/dev/null || true
	systemctl mask --quiet etcd.service
fi
install -d -m 0700 -o etcd -g etcd "$DIR" {{ etcd_data | shquote }}
changed=
for f in ca.crt member.crt member.key etcd.env; do
	if ! cmp -s "$stage/$f" "$DIR/$f"; then
		install -m 0600 -o etcd -g etcd "$stage/$f" "$DIR/$f"
		changed=1
	fi
done
umask 022
unit=$(mktemp)
cat >"$unit" <<'UNIT'
{% include "systemd/dstack-vpn-etcd.service" %}
UNIT
if ! cmp -s "$unit" "$UNIT"; then
	install -m 0644 "$unit" "$UNIT"
	changed=1
fi
rm -f "$unit"
systemctl daemon-reload
systemctl enable --quiet dstack-vpn-etcd.service
# A new member waits for a quorum of its peers (their steps run at the same time): start it
# without waiting; the postgres step waits for the cluster to be healthy. Restart only what
# changed: restarting every member at once would leave Patroni without its store.
if [ -n "$changed" ] || ! systemctl is-active --quiet dstack-vpn-etcd.service; then
	systemctl restart --no-block dstack-vpn-etcd.service
fi
say "etcd member {{ name }} on {{ address }}:{{ etcd_port }} (dstack-vpn-etcd.service)"

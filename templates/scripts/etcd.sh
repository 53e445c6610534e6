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
etcdctl_at() {
	ETCDCTL_API=3 etcdctl --endpoints="$1" --cacert="$stage/ca.crt" --cert="$stage/member.crt" \
		--key="$stage/member.key" --command-timeout=5s "${@:2}"
}
# A member that has never run joins the store the other members already run (one added to a
# running cluster): it registers itself there and starts as one more member of it. When no other
# member answers, the cluster is being made, and every member starts it together (etcd.env).
: >"$stage/join.env"
if [ ! -d {{ etcd_data | shquote }}/member ]; then
	for endpoint in{% for a in other_addresses %} https://{{ a }}:{{ etcd_port }}{% endfor %}; do
		etcdctl_at "$endpoint" endpoint health >/dev/null 2>&1 || continue
		etcdctl_at "$endpoint" member list -w json >"$stage/members.json"
		if ! grep -qF '"https://{{ address }}:{{ peer_port }}"' "$stage/members.json"; then
			etcdctl_at "$endpoint" member add {{ name }} --peer-urls=https://{{ address }}:{{ peer_port }} >/dev/null
			etcdctl_at "$endpoint" member list -w json >"$stage/members.json"
		fi
		python3 -I - "$stage/members.json" >"$stage/join.env" <<'PY'
import json, sys
names = {{ peer_names | tojson }}  # peer URL -> name, as the config has them
members = json.load(open(sys.argv[1]))["members"]
pairs = [(names.get(m["peerURLs"][0]) or m.get("name") or "%x" % m["ID"], m["peerURLs"][0]) for m in members]
print("ETCD_INITIAL_CLUSTER_STATE=existing")
print("ETCD_INITIAL_CLUSTER=" + ",".join("%s=%s" % p for p in pairs))
PY
		say "joining the running etcd cluster through $endpoint"
		break
	done
fi
changed=
for f in ca.crt member.crt member.key etcd.env join.env; do
	if ! cmp -s "$stage/$f" "$DIR/$f"; then
		# the ETCD_INITIAL_* settings count only at a member's first start: a change of them
		# alone (a member added or removed elsewhere) restarts nothing
		if ! cmp -s <(grep -v '^ETCD_INITIAL_' "$stage/$f") <(grep -sv '^ETCD_INITIAL_' "$DIR/$f"); then
			changed=1
		fi
		install -m 0600 -o etcd -g etcd "$stage/$f" "$DIR/$f"
	fi
done
umask 022
cat >"$stage/unit" <<'UNIT'
{% include "systemd/dstack-vpn-etcd.service" %}
UNIT
install_changed 0644 root "$stage/unit" "$UNIT" && changed=1
systemctl daemon-reload
systemctl enable --quiet dstack-vpn-etcd.service
# A new member waits for a quorum of its peers (their steps run at the same time): start it
# without waiting; the postgres step waits for the cluster to be healthy. Restart only what
# changed: restarting every member at once would leave Patroni without its store.
if [ -n "$changed" ] || ! systemctl is-active --quiet dstack-vpn-etcd.service; then
	systemctl restart --no-block dstack-vpn-etcd.service
fi
say "etcd member {{ name }} on {{ address }}:{{ etcd_port }} (dstack-vpn-etcd.service)"

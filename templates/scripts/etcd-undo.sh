{% include "scripts/_lib.sh" %}
DIR={{ etcd_dir }}
# A member leaving a cluster that goes on leaves its store too (etcd counts every registered
# member for its quorum). When the whole cluster goes, the last one cannot: that is fine.
if [ -f "$DIR/member.key" ] && have_systemd && systemctl is-active --quiet dstack-vpn-etcd.service; then
	etcdctl_own() {
		ETCDCTL_API=3 etcdctl --endpoints=https://{{ address }}:{{ etcd_port }} --cacert="$DIR/ca.crt" \
			--cert="$DIR/member.crt" --key="$DIR/member.key" --command-timeout=5s "$@"
	}
	id=$(etcdctl_own endpoint status -w json 2>/dev/null |
		python3 -I -c 'import json, sys; print("%x" % json.load(sys.stdin)[0]["Status"]["header"]["member_id"])' 2>/dev/null || true)
	if [ -n "$id" ] && etcdctl_own member remove "$id" >/dev/null 2>&1; then
		say "left the etcd cluster (member $id)"
	fi
fi
if have_systemd; then
	systemctl disable --now --quiet dstack-vpn-etcd.service 2>/dev/null || true
	rm -f /etc/systemd/system/dstack-vpn-etcd.service
	systemctl unmask --quiet etcd.service 2>/dev/null || true
	systemctl daemon-reload
fi
rm -rf "$DIR"
{% if keep_data %}
say "kept etcd's data in {{ etcd_data }} (postgres.keepData)"
{% else %}
rm -rf {{ etcd_data | shquote }}
say "removed etcd's data (postgres.keepData: false)"
{% endif %}

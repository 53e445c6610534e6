{% include "scripts/_lib.sh" %}
# stdin: the firewall unit's drop-in that switches IPv4 forwarding on after the ruleset.
mkdir -p "$STATE"
if [ ! -f "$STATE/ip_forward.before" ]; then
	sysctl -n net.ipv4.ip_forward >"$STATE/ip_forward.before"
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive "$stage/forwarding.conf"
# Forwarding only behind our ruleset, now and at boot (never a sysctl.d file: those apply
# at early boot, before any ruleset).
nft list table inet dstack_vpn >/dev/null 2>&1 ||
	{ echo "dstack-vpn {{ step }}: table inet dstack_vpn is not loaded; forwarding stays off" >&2; exit 1; }
rm -f {{ sysctl_path }}
if have_systemd; then
	mkdir -p {{ dropin_dir }}
	install_stdin 0644 {{ dropin_dir }}/forwarding.conf <"$stage/forwarding.conf"
	systemctl daemon-reload
fi
sysctl -q -w net.ipv4.ip_forward=1
say "IPv4 forwarding on, behind the ruleset (and after it at boot)"

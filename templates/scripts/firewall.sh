{% include "scripts/_lib.sh" %}
# stdin: the nftables ruleset (one table of our own, replaced atomically).
mkdir -p {{ rules_dir }}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive "$stage/rules.nft"
nft -c -f "$stage/rules.nft"
install_stdin 0644 {{ rules_path }} <"$stage/rules.nft"
nft -f {{ rules_path }}
if have_systemd; then
	install_stdin 0644 /etc/systemd/system/dstack-vpn-firewall.service <<'UNIT'
{% include "systemd/dstack-vpn-firewall.service" %}
UNIT
	systemctl daemon-reload
	systemctl enable --now --quiet dstack-vpn-firewall.service
	say "ruleset loaded; restored at boot by dstack-vpn-firewall.service"
else
	say "ruleset loaded; no systemd here, so it is not restored at boot"
fi

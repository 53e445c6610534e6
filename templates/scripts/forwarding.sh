{% include "scripts/_lib.sh" %}
# stdin: the sysctl file enabling IPv4 forwarding.
mkdir -p "$STATE"
if [ ! -f "$STATE/ip_forward.before" ]; then
	sysctl -n net.ipv4.ip_forward >"$STATE/ip_forward.before"
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive "$stage/forwarding.conf"
install_stdin 0644 {{ sysctl_path }} <"$stage/forwarding.conf"
sysctl -q -p {{ sysctl_path }}
say "IPv4 forwarding on"

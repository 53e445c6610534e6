{% include "scripts/_lib.sh" %}
# A new droplet is still configuring itself (host keys, apt) until cloud-init ends.
if command -v cloud-init >/dev/null 2>&1; then
	cloud-init status --wait >/dev/null 2>&1 || true
fi

{% if preinstall is defined %}
# What some packages read as they install (written before apt runs; install-undo removes them).
{% for path, text in preinstall.items() %}
mkdir -p {{ path.rsplit("/", 1)[0] | shquote }}
cat >{{ path | shquote }} <<'DSTACK_VPN_FILE'
{{ text }}DSTACK_VPN_FILE
{% endfor %}
{% endif %}
need=()
pkg_missing() { ! dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q '^install ok installed'; }
for pkg in {{ packages | join(" ") }}; do
	if pkg_missing "$pkg"; then need+=("$pkg"); fi
done

{% include "scripts/_kernel_wireguard.sh" %}
if kernel_wireguard; then
	say "kernel WireGuard available"
else
	say "no WireGuard kernel module: using userspace {{ userspace | join(" ") }}"
{% for pkg in userspace %}
	if pkg_missing {{ pkg }}; then need+=({{ pkg }}); fi
{% endfor %}
fi

if [ "${#need[@]}" -gt 0 ]; then
	say "installing ${need[*]}"
	apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
	apt-get -q -y -o DPkg::Lock::Timeout=600 install --no-install-recommends "${need[@]}" >/dev/null
	# Remember what we installed, so that destroy removes exactly that.
	mkdir -p "$STATE"
	printf '%s\n' "${need[@]}" >>"$STATE/installed-packages"
	sort -u -o "$STATE/installed-packages" "$STATE/installed-packages"
else
	say "{{ packages | join(" and ") }} already installed"
fi

{% include "scripts/_lib.sh" %}
if [ -f "$STATE/installed-packages" ]; then
	mapfile -t installed <"$STATE/installed-packages"
	if [ "${#installed[@]}" -gt 0 ]; then
		say "removing ${installed[*]} (installed by dstack-vpn)"
		apt-get -q -y -o DPkg::Lock::Timeout=600 purge "${installed[@]}" >/dev/null || true
	fi
	rm -f "$STATE/installed-packages"
fi
{% if preinstall is defined %}
rm -f{% for path in preinstall %} {{ path | shquote }}{% endfor %}

{% endif %}
rmdir "$STATE" 2>/dev/null || true

#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian or Ubuntu machine (as root),
# then the pinned Python packages into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(python3 python3-venv python3-pip wireguard-tools wireguard-go nftables shellcheck iproute2 util-linux systemd openssh-client
	docker-compose v2ray patroni openssl postgresql-client pgbackrest prometheus prometheus-alertmanager chromium)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "install-deps: need root to apt-get install: ${missing[*]}" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	# No package's service starts on this machine (v2ray's own proxy would listen in its
	# namespace): the tests only read these tools' checks (v2ray -test, systemd-analyze).
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 0755 /usr/sbin/policy-rc.d
		trap 'rm -f /usr/sbin/policy-rc.d' EXIT
	fi
	apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ] || [ requirements.txt -nt .venv/.installed ]; then
	python3 -m venv .venv
	.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
	touch .venv/.installed
fi

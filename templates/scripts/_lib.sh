# dstack-vpn step "{{ step }}": shared helpers. Rendered by the program; runs as root.
set -euo pipefail
umask 077
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
# shellcheck disable=SC2034 # not every step keeps state
STATE=/var/lib/dstack-vpn

say() { printf 'dstack-vpn {{ step }}: %s\n' "$*"; }
have_systemd() { [ -d /run/systemd/system ]; }

# install_stdin MODE DEST: stdin -> DEST, written to a temporary name in the same
# folder and renamed, so DEST is never half-written.
install_stdin() {
	local mode=$1 dest=$2 tmp
	tmp=$(mktemp "${dest%/*}/.${dest##*/}.XXXXXX")
	if ! cat >"$tmp"; then rm -f "$tmp"; return 1; fi
	chmod "$mode" "$tmp"
	mv -f "$tmp" "$dest"
}

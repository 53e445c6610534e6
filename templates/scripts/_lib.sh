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

# receive FILE: the step's file from stdin, whole or not at all. The program ends
# it with an end line; a connection lost on the way leaves none, and nothing changes.
receive() {
	local raw="$1.partial"
	cat >"$raw"
	if [ "$(tail -n 1 "$raw")" != {{ end_marker | shquote }} ]; then
		rm -f "$raw"
		echo "dstack-vpn {{ step }}: the file arrived incomplete (connection lost?); nothing changed" >&2
		return 1
	fi
	head -n -1 "$raw" >"$1"
	rm -f "$raw"
}

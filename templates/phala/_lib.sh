# dstack-vpn: {{ node }} on Phala Cloud, through Phala's own CLI (`phala`, npm).
# Run by a local command resource of the program. Its secrets come on stdin (the API key,
# then the app's environment file), never in an argument or this shell's environment; the
# CLI runs with an environment of its own (an allow-list: no cloud token, no Pulumi
# passphrase) and the app's files go to a private folder that is removed after.
set -euo pipefail
umask 077
say() { printf 'dstack-vpn phala %s: %s\n' {{ node | shquote }} "$*" >&2; }
fail() { say "$*"; exit 1; }
command -v phala >/dev/null 2>&1 || fail "the Phala Cloud CLI is not on PATH (npm install -g phala@{{ phala_cli_version }})"
IFS= read -r api_key || true
# shellcheck disable=SC2034 # deploy.sh writes it out
app_env=$(cat)
# The key stored with this resource (a delete runs with the one it had when it last ran,
# even after a rotation at Phala); the operator's current key, exported as
# DSTACK_VPN_PHALA_API_KEY where `pulumi` runs, wins over it.
api_key=${DSTACK_VPN_PHALA_API_KEY:-$api_key}
unset DSTACK_VPN_PHALA_API_KEY
[ -n "$api_key" ] || fail "the Phala Cloud API key is empty (set phalaApiKey)"
# shellcheck disable=SC2034 # deploy.sh writes it out
app_compose=${DSTACK_VPN_COMPOSE:-}
unset DSTACK_VPN_COMPOSE
# phala ARGS...: the CLI, in a subshell whose environment holds only an allow-list and the
# API key (exported there, never an argument: `env KEY=...` would show it in a command line).
phala() (
	allowed=" PATH HOME TMPDIR LANG TZ HTTPS_PROXY HTTP_PROXY NO_PROXY https_proxy http_proxy no_proxy NODE_EXTRA_CA_CERTS SSL_CERT_FILE SSL_CERT_DIR "
	while IFS= read -r name; do
		case $allowed in *" $name "*) ;; *) unset "$name" 2>/dev/null || true ;; esac
	done < <(compgen -e)
	export CI=1 PHALA_DISABLE_UPDATE_CHECK=1 PHALA_CLOUD_API_KEY="$api_key"
	exec phala "$@"
)
# The CVM this resource made, from its last output (cvm_id=...).
previous_id=$(printf '%s\n' "${PULUMI_COMMAND_STDOUT:-}" | sed -n 's/^cvm_id=//p' | tail -n 1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A phala.toml in the working folder would choose the CVM: run from an empty one.
cd "$work"
# json_field FIELD...: the first of FIELDs in the CLI's JSON answer (it may print a line before it)
json_field() {
	python3 -c 'import json, sys
text = sys.stdin.read(); start = text.find("{")
data = json.loads(text[start:]) if start >= 0 else {}
print(next((str(data[k]) for k in sys.argv[1:] if data.get(k)), ""))' "$@"
}

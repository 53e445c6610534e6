# dstack-vpn: {{ node }} on Phala Cloud, through Phala's own CLI (`phala`, npm).
# Run by a local command resource of the program. Secrets come in the environment only
# (PHALA_CLOUD_API_KEY, which the CLI reads; DSTACK_VPN_ENV, the app's environment),
# never in an argument; the app's files go to a private folder that is removed after.
set -euo pipefail
umask 077
say() { printf 'dstack-vpn phala %s: %s\n' {{ node | shquote }} "$*" >&2; }
fail() { say "$*"; exit 1; }
command -v phala >/dev/null 2>&1 || fail "the Phala Cloud CLI is not on PATH (npm install -g phala@{{ phala_cli_version }})"
# The API key this resource stored when it last ran comes in PHALA_CLOUD_API_KEY (a delete runs
# with it, even after the key was rotated at Phala); the operator's current key, exported as
# DSTACK_VPN_PHALA_API_KEY where `pulumi` runs, wins over it.
if [ -n "${DSTACK_VPN_PHALA_API_KEY:-}" ]; then
	PHALA_CLOUD_API_KEY=$DSTACK_VPN_PHALA_API_KEY
	export PHALA_CLOUD_API_KEY
fi
unset DSTACK_VPN_PHALA_API_KEY
[ -n "${PHALA_CLOUD_API_KEY:-}" ] || fail "PHALA_CLOUD_API_KEY is empty (set phalaApiKey)"
export CI=1 PHALA_DISABLE_UPDATE_CHECK=1
# The app's files, out of the environment: the CLI's process gets only the key it needs.
# shellcheck disable=SC2034 # deploy.sh writes them out
app_compose=${DSTACK_VPN_COMPOSE:-} app_env=${DSTACK_VPN_ENV:-}
unset DSTACK_VPN_COMPOSE DSTACK_VPN_ENV
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

{% include "phala/_lib.sh" %}
if [ -z "$previous_id" ]; then
	say "no CVM recorded; nothing to delete"
	exit 0
fi
if out=$(phala cvms delete "$previous_id" --force --json 2>&1); then
	say "CVM $previous_id deleted"
elif printf '%s' "$out" | grep -qi 'not found'; then
	say "CVM $previous_id was already gone"
elif printf '%s' "$out" | grep -Eqi '401|unauthori[sz]ed|invalid api key'; then
	printf '%s\n' "$out" >&2
	fail "Phala Cloud refused the API key stored with this CVM (rotated since?): export DSTACK_VPN_PHALA_API_KEY=<the current key> and run again"
else
	printf '%s\n' "$out" >&2
	fail "phala cvms delete $previous_id failed"
fi
